"""Dual-stream image/mask diffusion U-Net (D3M's DSIMD): one shared encoder and middle block, several decoders.

Built from MONAI's DiffusionModelUNet: the class *is* a DiffusionModelUNet (its time embedding, encoder, middle
block, first decoder and output head, with MONAI's parameter names), plus ``num_decoders - 1`` further decoders,
each a fresh set of MONAI up-blocks and output head made by the same constructor. Every decoder reads the same
encoder skips and produces ``out_channels // num_decoders`` channels; the outputs are concatenated on the channel
axis, so the network is a drop-in for DiffusionModelUNet (``forward(x, timesteps, context=None,
class_labels=None)``) in MONAI's inferers.

D3M: ``out_channels=2, num_decoders=2`` - decoder 0 predicts the image velocity, decoder 1 the mask velocity.
The ``no_dsimd`` ablation is ``num_decoders=1``: one decoder predicts both channels, and the state dict is then
exactly a DiffusionModelUNet's.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn


class DualStreamDiffusionUNet(DiffusionModelUNet):
    """DiffusionModelUNet with ``num_decoders`` decoders sharing one encoder and middle block.

    Args:
        spatial_dims, in_channels: as DiffusionModelUNet.
        out_channels: total output channels, split evenly over the decoders (in order).
        num_decoders: 2 for D3M's dual stream (image, mask); 1 for a single shared decoder.
        **unet_kwargs: any other DiffusionModelUNet argument (channels, attention_levels, num_res_blocks, ...).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int = 2, num_decoders: int = 2, **unet_kwargs
    ):
        if num_decoders < 1:
            raise ValueError(f"num_decoders must be >= 1, got {num_decoders}")
        if out_channels % num_decoders:
            raise ValueError(f"out_channels={out_channels} cannot be split evenly over num_decoders={num_decoders}")
        per_decoder = out_channels // num_decoders
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=per_decoder, **unet_kwargs)
        self.num_decoders = num_decoders
        self.total_out_channels = out_channels
        self.extra_decoders = nn.ModuleList()
        for _ in range(num_decoders - 1):
            # a second MONAI U-Net of the same configuration donates a freshly initialised decoder + head
            donor = DiffusionModelUNet(
                spatial_dims=spatial_dims, in_channels=in_channels, out_channels=per_decoder, **unet_kwargs
            )
            self.extra_decoders.append(nn.ModuleDict({"up_blocks": donor.up_blocks, "out": donor.out}))

    # --- the two halves of DiffusionModelUNet.forward --------------------------------------------------------
    def encode(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Shared trunk: (middle-block features, encoder skips, time(+class) embedding)."""
        if context is not None and not self.with_conditioning:
            raise ValueError("model should have with_conditioning = True if context is provided")
        emb = self.time_embed(get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype))
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when num_class_embeds > 0")
            emb = emb + self.class_embedding(class_labels).to(dtype=x.dtype)
        h = self.conv_in(x)
        skips: list[torch.Tensor] = [h]
        for down in self.down_blocks:
            h, res = down(hidden_states=h, temb=emb, context=context)
            skips.extend(res)
        h = self.middle_block(hidden_states=h, temb=emb, context=context)
        return h, skips, emb

    @staticmethod
    def decode(
        up_blocks: nn.ModuleList,
        out: nn.Module,
        h: torch.Tensor,
        skips: list[torch.Tensor],
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decoder stream over the shared skips (the list is not modified)."""
        remaining = list(skips)
        for up in up_blocks:
            n = len(up.resnets)
            res, remaining = remaining[-n:], remaining[:-n]
            h = up(hidden_states=h, res_hidden_states_list=res, temb=emb, context=context)
        return out(h)

    def decoders(self) -> list[tuple[nn.ModuleList, nn.Module]]:
        return [(self.up_blocks, self.out)] + [(d["up_blocks"], d["out"]) for d in self.extra_decoders]

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:  # type: ignore[override]
        h, skips, emb = self.encode(x, timesteps, context, class_labels)
        outputs = [self.decode(up, out, h, skips, emb, context) for up, out in self.decoders()]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
