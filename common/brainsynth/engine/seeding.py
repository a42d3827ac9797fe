"""Same seed, same scan: every random number of a generated item comes from (run seed, item id), nothing else.

A generated volume's starting noise and, for stochastic samplers (ancestral DDPM, DDIM with eta > 0), its per-step
noise are drawn from generators seeded by ``item_seed(seed, item id)``. No global generator, call counter, batch
position, shard or rank enters, so plain inference with any batch size, sharded inference on any number of ranks
and a resumed run give the same volume for the same item (byte-identical where the network's kernels give each
item of a batch the same result as alone, as MONAI's U-Nets do on a CPU).

The evaluator's ``prepare_batch`` adds the batch's seeds (``ItemSeedsPrepareBatch``) and the bundle's sampler draws
its noise with ``item_noise`` and steps a stochastic scheduler through ``item_step_noise``.

Each item is also sampled alone (the samplers loop over the batch): a CPU (oneDNN) convolution rounds an item
differently with other items beside it (1e-9 to 5e-6 measured on MONAI's U-Net and a bare Conv3d at batch 1, 2
and 3 on this project's CPU; GPU kernels give no such promise either), and under sharding the batch's other items
depend on the number of ranks. ``batch_size`` at inference groups loading and writing, not the network's work.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Sequence

import torch

#: where a prepared batch carries its item seeds to the inferer (``inferer(inputs, network, item_seeds=[...])``)
ITEM_SEEDS = "item_seeds"


def item_seed(seed: int, item: str) -> int:
    """A 31-bit seed for one item, a hash of (run seed, item id): independent of ranks, shards, batches and order."""
    digest = hashlib.sha256(f"{int(seed)}/{item}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def batch_item_ids(batch: Mapping[str, Any], key: str) -> list[str]:
    """The item ids of a collated batch (``batch[key]``: one id, or one per item)."""
    if key not in batch:
        raise KeyError(f"the batch has no {key!r} field to seed its items from (has {', '.join(map(str, batch))})")
    ids = batch[key]
    return [str(ids)] if isinstance(ids, (str, int)) else [str(i) for i in ids]


def seeds_of_batch(item_seeds: Sequence[int] | None, batch_size: int, seed: int) -> list[int]:
    """The seeds of a batch's items: ``item_seeds`` (from ``ItemSeedsPrepareBatch``), checked against the batch;
    without them (MONAI Label's request, a preview) ``item_seed(seed, str(i))`` for item ``i``."""
    if item_seeds is None:
        return [item_seed(seed, str(i)) for i in range(batch_size)]
    if len(item_seeds) != batch_size:
        raise ValueError(f"{len(item_seeds)} item seeds for a batch of {batch_size}")
    return [int(s) for s in item_seeds]


def item_noise(
    shape: Sequence[int], seeds: Sequence[int], device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal noise, item ``i`` drawn alone from a CPU generator seeded
    ``seeds[i]`` (the same numbers on every machine and device), then moved to ``device``."""
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    return torch.stack(noise).to(device)


def is_stochastic(scheduler: Any) -> bool:
    """Whether a scheduler's step draws noise: MONAI's DDPMScheduler (ancestral), a DDIM with eta > 0."""
    from monai.networks.schedulers import DDPMScheduler

    return isinstance(scheduler, DDPMScheduler) or float(getattr(scheduler, "eta", 0.0) or 0.0) > 0


def _generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A generator on ``device`` seeded ``seed``; None on a device that has no generators (``meta``, whose tensors
    hold no numbers to draw)."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed)


class _ItemStepNoise:
    """A stochastic scheduler whose ``step`` runs item by item, each with its own generator (the rest of the
    scheduler is the wrapped one's): the per-step noise of an item depends on its seed alone. Its arithmetic is
    elementwise, so stepping one item alone gives the batch's numbers."""

    def __init__(self, scheduler: Any, seeds: Sequence[int]):
        self._scheduler, self._seeds, self._generators = scheduler, [int(s) for s in seeds], None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        if len(self._seeds) != sample.shape[0]:
            raise ValueError(f"{len(self._seeds)} item seeds for a batch of {sample.shape[0]}")
        if self._generators is None:  # on the sample's device: the scheduler draws its noise there
            self._generators = [_generator(sample.device, item_seed(s, "steps")) for s in self._seeds]
        kwargs.pop("generator", None)
        steps = [
            self._scheduler.step(model_output[i : i + 1], timestep, sample[i : i + 1], *args, generator=g, **kwargs)
            for i, g in enumerate(self._generators)
        ]
        return tuple(None if part[0] is None else torch.cat(part) for part in zip(*steps))


def item_step_noise(scheduler: Any, seeds: Sequence[int]) -> Any:
    """``scheduler`` itself when its steps draw no noise, else a view of it whose per-step noise comes from each
    item's own generator (seeded from ``seeds``, one per item of the batch). Pass it to the sampling loop as the
    scheduler for one batch."""
    return _ItemStepNoise(scheduler, seeds) if is_stochastic(scheduler) else scheduler


class ItemSeedsPrepareBatch:
    """Evaluator ``prepare_batch``: ``prepare_batch``'s result plus ``item_seeds`` for the inferer, one
    ``item_seed(seed, id)`` per item (``id``: the batch's ``key`` field, e.g. the subject)."""

    def __init__(self, seed: int, key: str, prepare_batch: Callable | None = None):
        from monai.engines.utils import default_prepare_batch

        self.seed, self.key = int(seed), key
        self.prepare_batch = prepare_batch or default_prepare_batch

    def __call__(self, batchdata: Mapping[str, Any], device: Any = None, non_blocking: bool = False, **kwargs: Any):
        prepared = self.prepare_batch(batchdata, device, non_blocking, **kwargs)
        inputs, targets, args, extra = (*prepared, (), {}) if len(prepared) == 2 else prepared
        seeds = [item_seed(self.seed, i) for i in batch_item_ids(batchdata, self.key)]
        return inputs, targets, tuple(args), {**dict(extra), ITEM_SEEDS: seeds}
