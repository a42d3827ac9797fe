"""Weights saved by the Med-DDPM authors' trainer, run through this bundle's network.

Their trainer saves ``{"step", "model", "ema"}``; each is the state dict of their ``GaussianDiffusion``: the U-Net's
weights under ``denoise_fn.`` (guided-diffusion names: ``input_blocks`` / ``middle_block`` / ``output_blocks``) and the
noise-schedule buffers beside them. Their sampler uses ``ema``. The network is the same computation as the bundle's
``MedDDPMUNet`` with the paper's settings (``scripts.network``); the mapping is by structure:

* a residual block's ``in_layers`` / ``emb_layers`` / ``out_layers`` / ``skip_connection`` are MONAI's ``norm1``,
  ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``, ``skip_connection``;
* attention's fused ``qkv`` (a 1x1 Conv1d, rows in the legacy (head, q/k/v, channel) order) becomes ``to_q``,
  ``to_k``, ``to_v``; ``proj_out`` (a 1x1 Conv1d) becomes ``out_proj``;
* their tensors are (B, C, D, W, H), MONAI's (B, C, H, W, D) (their loader transposes the NIfTI array): every 3-D
  convolution kernel has its spatial axes reversed, so MONAI-layout data gives their output in MONAI's layout.
  Nothing else depends on the axis order (strided convolutions pad symmetrically, trilinear interpolation is
  separable, attention and GroupNorm do not see the order of voxels).

``convert_authors_checkpoint`` is the bundle's ``convert_authors_checkpoint`` run id (configs/train.json).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

#: prefix of the U-Net's weights in the authors' GaussianDiffusion state dict
DENOISER = "denoise_fn."
RESNET = {
    "norm1": "in_layers.0",
    "conv1.conv": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2.conv": "out_layers.3",
    "skip_connection.conv": "skip_connection",
}
ATTENTION = {"norm": "norm", "attn.out_proj": "proj_out"}
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")


def block_pairs(network: torch.nn.Module) -> list[tuple[str, str, str]]:
    """(MONAI module prefix, authors' module prefix, kind) for every block of ``network``, in the authors' order."""
    levels = len(network.block_out_channels)
    nrb, attention = network.num_res_blocks, network.attention_levels
    pairs = [("time_embed.0", "time_embed.0", "plain"), ("time_embed.2", "time_embed.2", "plain")]
    pairs.append(("conv_in.conv", "input_blocks.0.0", "plain"))
    k = 1
    for i in range(levels):
        for j in range(nrb[i]):
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", "resnet"))
            if attention[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", "attention"))
            k += 1
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsampler.op.conv", f"input_blocks.{k}.0.op", "plain"))
            k += 1
    pairs += [
        ("middle_block.resnet_1", "middle_block.0", "resnet"),
        ("middle_block.attention", "middle_block.1", "attention"),
        ("middle_block.resnet_2", "middle_block.2", "resnet"),
    ]
    k = 0
    for u in range(levels):
        level = levels - 1 - u
        for j in range(nrb[level] + 1):
            pairs.append((f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0", "resnet"))
            if attention[level]:
                pairs.append((f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1", "attention"))
            if j == nrb[level] and u < levels - 1:
                pairs.append(
                    (
                        f"up_blocks.{u}.upsampler.postconv.conv",
                        f"output_blocks.{k}.{1 + attention[level]}.conv",
                        "plain",
                    )
                )
            k += 1
    pairs += [("out.0", "out.0", "plain"), ("out.2.conv", "out.2", "plain")]
    return pairs


def key_map(network: torch.nn.Module) -> dict[str, tuple[tuple[str, ...], str, int]]:
    """authors' key -> (MONAI keys, how, heads) for every tensor of ``network``; how is ``copy`` (a tensor as it is,
    3-D kernels with their spatial axes reversed), ``conv1d`` (a 1x1 Conv1d as a Linear) or ``qkv`` (one fused
    projection split into three)."""
    monai_keys = list(network.state_dict())
    out: dict[str, tuple[tuple[str, ...], str, int]] = {}
    for monai_prefix, authors_prefix, kind in block_pairs(network):
        names = RESNET if kind == "resnet" else ATTENTION if kind == "attention" else {"": ""}
        for monai_name, authors_name in names.items():
            m = f"{monai_prefix}.{monai_name}".rstrip(".")
            a = f"{authors_prefix}.{authors_name}".rstrip(".")
            for suffix in ("weight", "bias"):
                if f"{m}.{suffix}" in monai_keys:
                    how = "conv1d" if monai_name == "attn.out_proj" and suffix == "weight" else "copy"
                    out[f"{a}.{suffix}"] = ((f"{m}.{suffix}",), how, 1)
        if kind == "attention":
            heads = network.get_submodule(f"{monai_prefix}.attn").num_heads
            for suffix in ("weight", "bias"):
                out[f"{authors_prefix}.qkv.{suffix}"] = (
                    tuple(f"{monai_prefix}.{q}.{suffix}" for q in QKV),
                    "qkv",
                    heads,
                )
    mapped = {k for keys, _, _ in out.values() for k in keys}
    unmapped = [k for k in monai_keys if k not in mapped]
    if unmapped:  # a network option the authors' architecture does not have (e.g. resblock_updown, cross-attention)
        raise ValueError(f"the authors' checkpoints have no counterpart for {', '.join(unmapped[:3])} of this network")
    return out


def _reverse_spatial(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 1, *range(t.ndim - 1, 1, -1)) if t.ndim > 3 else t


def authors_to_monai(authors: Mapping[str, torch.Tensor], network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The authors' U-Net state dict (keys without ``denoise_fn.``) as ``network``'s; keys and shapes are checked by
    :func:`check_layout` first."""
    out = {}
    for key, (targets, how, heads) in key_map(network).items():
        t = authors[key]
        if how == "qkv":  # rows (head, q/k/v, channel) -> three projections with rows (head, channel)
            split = t.reshape(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:])
            for i, target in enumerate(targets):
                out[target] = split[:, i].reshape(-1, *t.shape[1:2]).contiguous()
        else:
            out[targets[0]] = (t[..., 0] if how == "conv1d" else _reverse_spatial(t)).contiguous()
    return out


def monai_to_authors(state: Mapping[str, torch.Tensor], network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of :func:`authors_to_monai`: ``network``'s state dict in the authors' names, shapes and layout."""
    out = {}
    for key, (sources, how, heads) in key_map(network).items():
        if how == "qkv":
            parts = [state[s].reshape(heads, -1, *state[s].shape[1:]) for s in sources]
            fused = torch.stack(parts, dim=1)
            out[key] = (
                fused.reshape(-1, *state[sources[0]].shape[1:])[..., None] if fused.ndim > 3 else fused.reshape(-1)
            )
        else:
            t = state[sources[0]]
            out[key] = (t[..., None] if how == "conv1d" and t.ndim == 2 else _reverse_spatial(t)).contiguous()
    return out


def expected_shapes(network: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """authors' key -> shape, for the checkpoint ``network`` can take (built on the meta device: no memory)."""
    meta = {k: torch.empty(v.shape, device="meta") for k, v in network.state_dict().items()}
    return {k: tuple(v.shape) for k, v in monai_to_authors(meta, network).items()}


def describe(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """The network options (channels, residual blocks, attention, in / out channels) an authors' U-Net state dict
    was made with, read from its keys and shapes; None when it is not one."""
    try:
        level_channels, nrb, attention = [], [], []
        k, channels, blocks, attention_here = 1, shapes["input_blocks.0.0.weight"][0], 0, False
        while f"input_blocks.{k}.0.in_layers.2.weight" in shapes or f"input_blocks.{k}.0.op.weight" in shapes:
            if f"input_blocks.{k}.0.op.weight" in shapes:  # a down-sampler closes a level
                level_channels.append(channels)
                nrb.append(blocks)
                attention.append(attention_here)
                blocks = 0
            else:
                channels = shapes[f"input_blocks.{k}.0.in_layers.2.weight"][0]
                attention_here = f"input_blocks.{k}.1.qkv.weight" in shapes
                blocks += 1
            k += 1
        level_channels.append(channels)
        nrb.append(blocks)
        attention.append(attention_here)
        return {
            "channels": level_channels,
            "num_res_blocks": nrb[0] if len(set(nrb)) == 1 else nrb,
            "attention_levels": attention,
            "in_channels": shapes["input_blocks.0.0.weight"][1],
            "out_channels": shapes["out.2.weight"][0],
        }
    except (KeyError, IndexError):
        return None


def shipped_shapes(configs_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The network options of the bundle's shipped configurations, as :func:`describe` gives them."""
    from monai.bundle import ConfigParser

    out = {}
    for files in (["train.json"], ["train.json", "single_modality.json"]):
        parser = ConfigParser()
        parser.read_config([str(Path(configs_dir) / f) for f in files])
        nrb = parser.get_parsed_content("num_res_blocks")
        out[" + ".join(f"configs/{f}" for f in files)] = {
            "channels": list(parser.get_parsed_content("channels")),
            "num_res_blocks": nrb if isinstance(nrb, int) else list(nrb),
            "attention_levels": list(parser.get_parsed_content("attention_levels")),
            "in_channels": parser.get_parsed_content("network_def#in_channels", instantiate=False),
            "out_channels": parser.get_parsed_content("network_def#out_channels", instantiate=False),
        }
    return out


def check_layout(source: Path, found: Mapping[str, tuple[int, ...]], network: torch.nn.Module) -> None:
    """Refuse (naming the first mismatching tensor and the configuration that would fit) unless ``found`` has exactly
    the keys and shapes ``network`` takes."""
    expected = expected_shapes(network)
    problem = None
    for key, shape in expected.items():
        if key not in found:
            problem = f"it has no tensor {DENOISER}{key} (expected shape {shape})"
        elif tuple(found[key]) != shape:
            problem = f"{DENOISER}{key} has shape {tuple(found[key])}, this network expects {shape}"
        if problem:
            break
    extra = [k for k in found if k not in expected]
    if problem is None and extra:
        problem = f"it has a tensor this network does not: {DENOISER}{extra[0]} {tuple(found[extra[0]])}"
    if problem is None:
        return
    options = describe(found)
    fits = [name for name, shape in shipped_shapes(Path(__file__).parents[1] / "configs").items() if shape == options]
    if fits:
        hint = f"it is the shape of --config_file {fits[0]}: convert with that"
    elif options:
        hint = (
            "no shipped configuration fits; set the network keys to its shape: "
            + ", ".join(f'--{k} "{v}"' for k, v in options.items() if k not in ("in_channels", "out_channels"))
            + f" ({options['in_channels']} input / {options['out_channels']} output channels: --modalities, --classes)"
        )
    else:
        hint = "it does not look like a Med-DDPM U-Net"
    raise ValueError(f"{source}: not the shape of this bundle's network: {problem}; {hint}")


def read_authors_checkpoint(path: str | Path, authors_key: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """(U-Net state dict without ``denoise_fn.``, the other tensors) of one entry of an authors' checkpoint, loaded
    ``weights_only``; every refusal names the file."""
    from brainsynth.engine.io import _non_finite

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (--authors_checkpoint)")
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle with code objects
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(authors_key), dict):
        found = ", ".join(map(repr, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path}: no state dict under {authors_key!r} (found {found}); the authors' trainer saves 'ema' and "
            f"'model': pass --authors_key with the one to convert"
        )
    entry = checkpoint[authors_key]
    unet = {k[len(DENOISER) :]: v for k, v in entry.items() if k.startswith(DENOISER)}
    if not unet:
        raise ValueError(
            f"{path}: {authors_key!r} holds no {DENOISER}* tensors; not a Med-DDPM GaussianDiffusion state"
        )
    bad = _non_finite(unet)
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor(s) under {authors_key!r} hold NaN or Inf (e.g. {bad[0]})")
    others = {k: v for k, v in entry.items() if not k.startswith(DENOISER)}
    return unet, {"step": checkpoint.get("step"), "buffers": others}


def check_schedule(path: Path, buffers: Mapping[str, torch.Tensor], num_train_timesteps: int) -> None:
    """The checkpoint's noise schedule must be the one this bundle samples with (T steps, cosine)."""
    betas = buffers.get("betas")
    if betas is None:
        return
    if betas.numel() != num_train_timesteps:
        raise ValueError(
            f"{path}: trained with {betas.numel()} diffusion steps, this configuration has {num_train_timesteps}; "
            f"pass --num_train_timesteps {betas.numel()}"
        )
    from monai.networks.schedulers import DDPMScheduler

    import brainsynth.schedulers.cosine  # noqa: F401  (registers cosine_float64)

    ours = DDPMScheduler(num_train_timesteps, schedule="cosine_float64").betas
    gap = float((betas.double() - ours).abs().max())
    if gap > 1e-5:
        raise ValueError(f"{path}: its noise schedule is not the cosine one of this bundle (betas differ by {gap:.2g})")


def convert_authors_checkpoint(
    authors_checkpoint: str | None,
    network: torch.nn.Module,
    model_path: str,
    authors_key: str = "ema",
    overwrite: bool = False,
    num_train_timesteps: int = 250,
) -> Path:
    """Write ``model_path`` (with its ``.sha256`` record and a JSON sidecar) from an authors' checkpoint; everything
    is checked before anything is written, and existing weights are kept unless ``overwrite``."""
    from brainsynth.data.provenance import sha256_file, sidecar_path
    from brainsynth.engine.io import atomic_write_text, hash_record_path, save_checkpoint

    if not authors_checkpoint:
        raise ValueError("give the authors' checkpoint: --authors_checkpoint FILE (e.g. their model-*.pt)")
    source, target = Path(authors_checkpoint), Path(model_path)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target}: already exists; pass --overwrite true to replace it with the converted weights"
        )
    unet, rest = read_authors_checkpoint(source, authors_key)
    check_schedule(source, rest["buffers"], num_train_timesteps)
    check_layout(source, {k: tuple(v.shape) for k, v in unet.items()}, network)
    state = authors_to_monai(unet, network)
    network.load_state_dict(state, strict=True)
    digest = sha256_file(source)
    save_checkpoint(state, target, record=True)
    sidecar = {
        "converted_from": source.name,
        "source_sha256": digest,
        "authors_key": authors_key,
        "authors_step": rest["step"],
        "network": type(network).__name__,
        "embedding_max_period": getattr(network, "embedding_max_period", None),
        "upsample_mode": getattr(network, "upsample_mode", None),
        "layout": "MONAI (H, W, D); the authors' kernels had their spatial axes reversed",
    }
    atomic_write_text(sidecar_path(target), json.dumps(sidecar, indent=1) + "\n", overwrite=True)
    n = sum(v.numel() for v in state.values())
    print(
        f"converted {source} ({authors_key!r}, step {rest['step']}, sha256 {digest[:12]}...): {len(unet)} tensors, "
        f"{n:,} parameters\nwrote {target}, {hash_record_path(target).name}, {sidecar_path(target).name}"
    )
    return target
