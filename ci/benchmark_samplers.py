"""One sampling adapter per bundle for ci/benchmark.py: build the bundle's own sampler from its inference config
and return (run_once, unit, device); run_once() samples and returns how many units it produced.

Step specs are "SAMPLER:STEPS" strings; what each sampler name means is the bundle's own config key."""

from __future__ import annotations

import torch


def _spec(spec: str) -> tuple[str, int]:
    name, _, steps = str(spec).partition(":")
    return name, int(steps)


def med_ddpm(parser, spec):
    sampler, steps = _spec(spec)  # ddpm:250 (faithful ancestral) or ddim:N (exact fast sampler)
    parser["sampler"], parser["num_inference_steps"], parser["progress"] = sampler, steps, False
    device = torch.device(parser.get_parsed_content("device"))
    network = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    classes, size = parser.get_parsed_content("classes"), parser.get_parsed_content("spatial_size")
    condition = torch.zeros(1, len(classes), *size, device=device)
    condition[:, classes.index("brain") if "brain" in classes else -1] = 1.0  # an all-brain mask: speed only

    def run_once():
        with torch.no_grad():
            inferer(condition, network)
        return 1

    return run_once, "volume", device


SAMPLERS = {"brats_mri_med_ddpm": med_ddpm}
DEFAULT_SAMPLE_STEPS = {"brats_mri_med_ddpm": ["ddpm:250", "ddim:50", "ddim:10"]}
