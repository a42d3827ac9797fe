"""How far Med-DDPM's network and ancestral step are from the authors' on their reference data
(tests/data/med_ddpm_authors/).

    python ci/med_ddpm_authors_parity.py          # from the repository root; a few seconds on one core

Prints max |diff| of the network outputs at each reference timestep for the bundle's settings (the authors') and for
MONAI's defaults (the bundle before 0.7.0), and of one ancestral step's mean for the float64 and float32 cosine
schedules (on the authors' network outputs). tests/test_med_ddpm_authors.py asserts the same bounds.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brats_mri_med_ddpm"
DATA = REPO / "tests" / "data" / "med_ddpm_authors"
SMALL = {"channels": [32, 32], "num_res_blocks": 1, "attention_levels": [False, True]}
SETTINGS = {
    "authors' (0.7.0 default)": {"embedding_max_period": 1000, "upsample_mode": "trilinear", "norm_eps": 1e-5},
    "MONAI's (before 0.7.0)": {"embedding_max_period": 10000, "upsample_mode": "nearest", "norm_eps": 1e-6},
}


def parsed(config: str, key: str, overrides: dict):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / config))
    parser.update(overrides)
    return parser.get_parsed_content(key)


def swap_layout(a) -> torch.Tensor:
    """(B, C, D, W, H) <-> (B, C, H, W, D)."""
    return torch.as_tensor(np.ascontiguousarray(a)).permute(0, 1, 4, 3, 2)


def main() -> None:
    from brainsynth.engine.bundle_code import bundle_scripts

    ref = dict(np.load(DATA / "authors_outputs.npz"))
    steps = ref["timesteps"].tolist()
    x = swap_layout(ref["noisy_image"])
    with bundle_scripts(BUNDLE):
        conv = importlib.import_module("scripts.authors_checkpoint")
        unet, _ = conv.read_authors_checkpoint(DATA / "authors_format_checkpoint.pt")
        print("network output, max |diff| at t =", steps)
        for name, settings in SETTINGS.items():
            net = parsed("train.json", "network_def", {**SMALL, **settings}).eval()
            net.load_state_dict(conv.authors_to_monai(unet, net), strict=True)
            inputs = torch.cat([x, swap_layout(ref["mask"])], dim=1)
            with torch.no_grad():
                gaps = [
                    (swap_layout(net(inputs, torch.full((2,), t))) - torch.from_numpy(ref[f"t{t}"])).abs().max()
                    for t in steps
                ]
            print(f"  {name:<26}", "  ".join(f"{float(g):.3g}" for g in gaps))
        print("one ancestral step's mean on the authors' outputs, max |diff| at t =", steps)
        for schedule in ("cosine_float64", "cosine"):
            scheduler = parsed("inference.json", "ancestral_scheduler", {"ancestral_scheduler#schedule": schedule})
            gaps = []
            for t in steps:
                g = torch.Generator().manual_seed(t)
                stepped, _ = scheduler.step(swap_layout(ref[f"t{t}"]), t, x, generator=g)
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
                std = torch.as_tensor(scheduler._get_variance(t)).sqrt().float() if t > 0 else 0.0
                gaps.append(
                    float((swap_layout(stepped - std * noise) - torch.from_numpy(ref[f"step_mean_t{t}"])).abs().max())
                )
            print(f"  {schedule:<26}", "  ".join(f"{g:.3g}" for g in gaps))


if __name__ == "__main__":
    main()
