"""Speed and memory switches for any network of the collection, each a config key with a safe default.

- ``activation_checkpointing``: recompute each residual / attention block's activations in the backward pass
  instead of storing them. For 3D U-Nets at paper resolution this is what makes training fit in memory. Uses
  torch's own checkpoint wrapper, which keeps state-dict keys unchanged, so checkpoints stay interchangeable.
- ``channels_last``: channels-last (3D: ``channels_last_3d``) memory format; helps convolutions on GPUs with
  tensor cores, rarely on CPU.
- ``compile``: ``torch.compile`` the network (first iterations are slow while it compiles). The compiled wrapper
  keeps the plain network's state-dict keys (no ``_orig_mod.`` prefix), so MONAI's CheckpointLoader / Saver, the
  EMA and ``monai.bundle.load`` see the same checkpoints with compile on or off. (``nn.Module.compile()`` in place
  would be simpler but does not trace at all in torch 2.13, so it would silently measure nothing.)
- Fused scaled-dot-product attention is a constructor argument of MONAI's U-Nets (``use_flash_attention``) and
  bf16 autocast a flag of the engines (``amp`` with ``amp_kwargs={"dtype": torch.bfloat16}``): both stay in configs.
  Samplers call the network outside the engines' autocast, so they take the same ``amp`` flag and use ``autocast``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn

#: block types whose activations are worth recomputing (MONAI diffusion U-Net, autoencoder and D3M blocks)
_BLOCK_TYPE_NAMES = {
    "DiffusionUNetResnetBlock",
    "SpatialAttentionBlock",
    "DiffusionUNetTransformerBlock",  # diffusion U-Net
    "AEKLResBlock",
    "SpatialAttentionBlock",  # AutoencoderKL
}


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__ in _BLOCK_TYPE_NAMES


def apply_activation_checkpointing(network: nn.Module, check_fn=_is_block) -> int:
    """Wrap every block selected by ``check_fn`` for activation checkpointing, in place; returns how many."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as _apply,
    )

    count = sum(1 for m in network.modules() if check_fn(m))
    if count:
        _apply(
            network,
            checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=check_fn,
        )
    return count


_COMPILED_PREFIX = "_orig_mod."


def _strip_compiled_prefix(module, state_dict, prefix, local_metadata):
    """State-dict hook: ``<prefix>_orig_mod.<key>`` -> ``<prefix><key>`` (keys keep their order)."""
    inner = prefix + _COMPILED_PREFIX
    for key in list(state_dict):
        state_dict[prefix + key[len(inner) :] if key.startswith(inner) else key] = state_dict.pop(key)


def _add_compiled_prefix(module, state_dict, prefix, *args):
    """Load pre-hook: accept plain keys ``<prefix><key>`` by renaming them to ``<prefix>_orig_mod.<key>``."""
    inner = prefix + _COMPILED_PREFIX
    for key in list(state_dict):
        if key.startswith(prefix) and not key.startswith(inner):
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


def _plain_tensors(module, args, kwargs):
    """Forward pre-hook: MONAI MetaTensors (what MONAI's transforms and evaluators hand the network) become plain
    tensors before the compiled code, as MONAI's own trainers strip them: a tensor subclass would make dynamo trace
    its ``__torch_function__`` and carry metadata through every operation, or break the graph."""

    def plain(value):
        return value.as_tensor() if isinstance(value, MetaTensor) else value

    return tuple(plain(a) for a in args), {k: plain(v) for k, v in kwargs.items()}


def compile_network(network: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile(network)`` whose ``state_dict`` / ``load_state_dict`` use the plain network's keys and that
    takes MetaTensors as plain tensors."""
    compiled = torch.compile(network, **compile_kwargs)
    compiled.register_state_dict_post_hook(_strip_compiled_prefix)
    compiled.register_load_state_dict_pre_hook(_add_compiled_prefix)
    compiled.register_forward_pre_hook(_plain_tensors, with_kwargs=True)
    return compiled


def distributed(network: nn.Module, acceleration: dict, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel`` around ``accelerate(network, ...)``, with ``compile`` applied last, to the wrapper:
    PyTorch compiles DDP models that way (its DDP optimiser splits the graph at the gradient buckets, so the
    all-reduce overlaps the backward pass); compiling inside the wrapper hides the buckets from the compiler."""
    settings = dict(acceleration)
    compile = settings.pop("compile", False)
    wrapped = torch.nn.parallel.DistributedDataParallel(accelerate(network, **settings), **ddp_kwargs)
    return compile_network(wrapped) if compile else wrapped


def autocast(device: torch.device | str | torch.Tensor, enabled: bool, dtype: torch.dtype = torch.bfloat16):
    """``torch.autocast`` for the network calls of a sampler on ``device`` (a tensor gives its own device).

    Not enabled, it changes nothing: an autocast the caller opened (MONAI's trainer autocasts its step on CUDA)
    stays on, where ``torch.autocast(enabled=False)`` would switch it off for the block."""
    if isinstance(device, torch.Tensor):
        device = device.device
    device_type = torch.device(device).type
    if not enabled or device_type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def without_autocast(device: torch.device | str | torch.Tensor):
    """Autocast switched off on ``device`` for a block that must compute in float32 (a no-op on a device that has no
    autocast, such as ``meta``, where ``torch.autocast`` raises)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class Float32Output:
    """``network`` called under ``autocast(device, amp, dtype)``, its output returned in float32.

    What a sampler hands to a scheduler: the network runs in mixed precision, and everything the scheduler does with
    its output stays float32 (MONAI's ``DDPMScheduler`` draws its noise in the output's dtype, diffusers' solvers
    cast each step to it)."""

    def __init__(self, network: Any, device: torch.device | str | torch.Tensor, amp: bool, dtype=torch.bfloat16):
        self.network, self.device, self.amp, self.dtype = network, device, bool(amp), dtype

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast(self.device, self.amp, self.dtype):
            output = self.network(*args, **kwargs)
        return output.float()


def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX, read from the kernel's CPU flags), so bf16
    autocast speeds it up; elsewhere (no flag, or no /proc/cpuinfo) False: emulated bf16 would not pay."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[-1].split()))
    except OSError:
        pass
    return False


def accelerate(
    network: nn.Module,
    activation_checkpointing: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    spatial_dims: int | None = None,
) -> nn.Module:
    """Apply the chosen switches to ``network`` and return it (compiled networks are wrapped, so use the result)."""
    if activation_checkpointing and apply_activation_checkpointing(network) == 0:
        raise ValueError(f"activation_checkpointing: no checkpointable block found in {type(network).__name__}")
    if channels_last:
        if spatial_dims is None:
            conv = next((m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
            spatial_dims = 3 if isinstance(conv, nn.Conv3d) else 2
        network = network.to(memory_format=torch.channels_last_3d if spatial_dims == 3 else torch.channels_last)
    if compile:
        network = compile_network(network)
    return network
