"""Seconds per training step, peak memory and seconds per sampling step of the bundle's network, as configured.

    python -m scripts.benchmark --configs configs/train.json [configs/demo.json ...] [--spatial_size 96 96 72]
        [--steps 3] [--sample_steps 2] [--device cuda:0]

Builds ``network_def`` from the merged configs, then times full training iterations (noise, cosine forward
process, DiffusionInferer concat forward, L1 loss, backward, Adam step) on random data of the configured batch
size, and no-grad network evaluations at batch 1 (one sampling step = one evaluation; a volume costs 250 of them
with the ancestral sampler, ``num_inference_steps`` with the fast one). The first iteration is a warm-up and not
timed. Peak memory: CUDA max allocated on a GPU, the process's peak resident set size on a CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["configs/train.json"])
    ap.add_argument("--spatial_size", nargs=3, type=int, default=None, help="override the configured grid")
    ap.add_argument("--steps", type=int, default=3, help="timed training iterations")
    ap.add_argument("--sample_steps", type=int, default=2, help="timed sampling network evaluations")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip_training", action="store_true")
    args = ap.parse_args(argv)

    from monai.bundle import ConfigParser
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    parser = ConfigParser()
    parser.read_config(args.configs)
    size = tuple(args.spatial_size or parser["spatial_size"])
    n_img, n_cond = len(parser["modalities"]), len(parser["classes"])
    batch = int(parser["batch_size"])
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").to(device)
    scheduler = DDPMScheduler(num_train_timesteps=int(parser["num_train_timesteps"]), schedule="cosine")
    inferer = DiffusionInferer(scheduler)
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    result = {"configs": args.configs, "device": str(device), "threads": torch.get_num_threads(),
              "spatial_size": list(size), "batch_size": batch,
              "parameters_millions": round(sum(p.numel() for p in net.parameters()) / 1e6, 3)}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if not args.skip_training:
        times = []
        for i in range(args.steps + 1):
            image = torch.rand(batch, n_img, *size, device=device) * 2 - 1
            cond = torch.rand(batch, n_cond, *size, device=device).round()
            noise = torch.randn_like(image)
            t = torch.randint(0, scheduler.num_train_timesteps, (batch,), device=device)
            sync()
            start = time.perf_counter()
            pred = inferer(image, net, noise, t, condition=cond, mode="concat")
            loss = torch.nn.functional.l1_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            if i:
                times.append(time.perf_counter() - start)
        result["train_seconds_per_step"] = round(sum(times) / len(times), 3)
    net.eval()
    times = []
    with torch.no_grad():
        x = torch.randn(1, n_img + n_cond, *size, device=device)
        for i in range(args.sample_steps + 1):
            sync()
            start = time.perf_counter()
            net(x, timesteps=torch.tensor([100], device=device))
            sync()
            if i:
                times.append(time.perf_counter() - start)
    per_eval = sum(times) / len(times)
    result["sampling_seconds_per_network_evaluation"] = round(per_eval, 3)
    result["sampling_seconds_per_volume_ancestral_250"] = round(per_eval * 250, 1)
    result["sampling_seconds_per_volume_fast_50"] = round(per_eval * 50, 1)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_memory_kind"] = "CUDA max allocated"
    else:
        result["peak_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        result["peak_memory_kind"] = "process peak RSS"
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
