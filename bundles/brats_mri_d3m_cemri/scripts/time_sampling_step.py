"""Time MSSDM sampling steps of the network a bundle config defines (random weights: cost only, not quality).

    python scripts/time_sampling_step.py [--config_file configs/train.json ...] [--slices 1] [--steps 3]

Prints the parameter count, seconds per DDIM + MSSDM step for a batch of ``--slices`` slices, and the peak
resident memory of the process. Used for the paper-scale (256 x 256, ~98 M parameters) row of docs/README.md.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from monai.bundle import ConfigParser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", nargs="+", default=["configs/train.json"])
    parser.add_argument("--slices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    config = ConfigParser()
    config.read_config(args.config_file)
    network = config.get_parsed_content("network_def").eval()
    scheduler = config.get_parsed_content("scheduler")
    import brainsynth.deformation.mssdm

    sampler = brainsynth.deformation.mssdm.MSSDMInferer(scheduler)
    size = config.get_parsed_content("spatial_size")
    n_target = len(config.get_parsed_content("target_keys"))
    n_cond = len(config.get_parsed_content("condition_modalities"))
    noise = torch.randn(args.slices, n_target, *size)
    cond = torch.randn(args.slices, n_cond, *size)
    with torch.no_grad():
        sampler.sample(noise, network, conditioning=cond, num_inference_steps=1, verbose=False)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        sampler.sample(noise, network, conditioning=cond, num_inference_steps=args.steps, verbose=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    params = sum(p.numel() for p in network.parameters())
    print(
        f"parameters: {params / 1e6:.2f} M; {args.slices} slice(s) of {size[0]} x {size[1]}; threads "
        f"{torch.get_num_threads()}"
    )
    print(f"per DDIM+MSSDM step: {wall / args.steps:.2f} s wall, {cpu / args.steps:.2f} s CPU")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
