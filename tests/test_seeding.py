"""brainsynth.engine.seeding: an item's noise (starting and per-step) depends on (seed, item id) alone."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from brainsynth.conditioning.semantic_mask import MaskConditionedSampler
from brainsynth.engine.seeding import ItemSeedsPrepareBatch, item_noise, item_seed, item_step_noise
from brainsynth.schedulers.ddim import ExactDDIMScheduler


class _Denoiser(torch.nn.Module):
    """A small convolution that reads the condition channels and the timestep: enough to carry each item's noise
    through the sampler's arithmetic. It runs item by item: a CPU convolution may round a batch differently from
    one item (seen here at 4e-7), and this test is about the sampler's noise, not the kernels (the bundles'
    U-Nets are compared batched and alone in tests/test_same_seed_same_scan.py)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x, timesteps=None, context=None):
        out = torch.cat([self.conv(x[i : i + 1]) for i in range(x.shape[0])])
        return torch.tanh(out) * (1 + timesteps.float().mean() / 100)


def test_item_noise_is_each_items_own_whatever_the_batch_and_the_global_generator():
    seeds = [item_seed(0, "a"), item_seed(0, "b"), item_seed(0, "c")]
    torch.manual_seed(1)
    batch = item_noise((2, 4, 4), seeds)
    torch.manual_seed(2)
    alone = torch.cat([item_noise((2, 4, 4), [s]) for s in reversed(seeds)]).flip(0)
    assert torch.equal(batch, alone) and not torch.equal(batch[0], batch[1])


SCHEDULERS = {
    "ddpm_ancestral": lambda: DDPMScheduler(20, schedule="cosine", clip_sample=True),
    "ddim_eta_1": lambda: ExactDDIMScheduler(20, schedule="cosine", clip_sample=True, eta=1.0),
    "ddim_eta_0": lambda: ExactDDIMScheduler(20, schedule="cosine", clip_sample=True, eta=0.0),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_mask_sampler_gives_an_item_the_same_volume_alone_or_batched(name):
    scheduler = SCHEDULERS[name]()
    steps = None if name == "ddpm_ancestral" else 4
    sampler = MaskConditionedSampler(scheduler, out_channels=2, num_inference_steps=steps, progress=False, seed=5)
    network = _Denoiser(2 + 3, 2).eval()
    conditions = (torch.rand(3, 3, 6, 6, 4) > 0.5).float()
    seeds = [item_seed(5, s) for s in ("s1", "s2", "s3")]
    torch.manual_seed(10)
    together = sampler(conditions, network, item_seeds=seeds)
    torch.manual_seed(99)  # a different global generator state: nothing may depend on it
    pairs = [sampler(conditions[i : i + 2], network, item_seeds=seeds[i : i + 2]) for i in (1,)]
    alone = [sampler(conditions[i : i + 1], network, item_seeds=seeds[i : i + 1]) for i in range(3)]
    assert torch.equal(together, torch.cat(alone)) and torch.equal(together[1:], pairs[0])
    assert not torch.equal(together[0], together[1])
    other = sampler(conditions[:1], network, item_seeds=[item_seed(6, "s1")])
    assert not torch.equal(other, alone[0]), "another seed must give another volume"


def test_step_noise_wraps_only_stochastic_schedulers():
    ddim = ExactDDIMScheduler(20, eta=0.0)
    assert item_step_noise(ddim, [1, 2]) is ddim
    wrapped = item_step_noise(DDPMScheduler(20), [1, 2])
    assert wrapped is not ddim and wrapped.num_train_timesteps == 20
    with pytest.raises(ValueError, match="2 item seeds for a batch of 3"):
        wrapped.step(torch.zeros(3, 1, 2), 5, torch.zeros(3, 1, 2))


def test_prepare_batch_adds_one_seed_per_item_id():
    batch = {"image": torch.zeros(2, 1, 3), "subject": ["BraTS-1", "BraTS-2"]}
    inputs, target, args, kwargs = ItemSeedsPrepareBatch(7, "subject")(batch)
    assert inputs.shape == (2, 1, 3) and target is None and args == ()
    assert kwargs == {"item_seeds": [item_seed(7, "BraTS-1"), item_seed(7, "BraTS-2")]}
    with pytest.raises(KeyError, match="no 'name' field"):
        ItemSeedsPrepareBatch(7, "name")(batch)
