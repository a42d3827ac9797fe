"""Does a trained model use its conditions? Relative change of the predicted noise when the condition tokens
change, at a few timesteps.

    python scripts/condition_sensitivity.py --config_file "['configs/inference.json','configs/demo.json']" \
        --bundle_root /path/to/run

For each timestep: ||eps(c) - eps(null)|| / ||eps(null)|| averaged over every pathology x modality c, and the
same between pathologies at a fixed modality and between modalities at a fixed pathology. Values near 0 mean
the network ignores its conditions (guidance then has nothing to amplify).
"""

from __future__ import annotations

import ast
import json

import fire
import torch


def main(config_file, bundle_root: str = ".", timesteps: tuple = (900, 500, 100), seed: int = 0, **overrides) -> None:
    from monai.bundle import ConfigParser

    from brainsynth.conditioning.categorical import all_combinations
    from brainsynth.engine.io import load_checkpoint

    torch.set_num_threads(1)
    parser = ConfigParser()
    if isinstance(config_file, str) and config_file.startswith("["):  # fire passes a list literal through as text
        config_file = ast.literal_eval(config_file)
    parser.read_config(config_file)
    parser.update({"bundle_root": bundle_root, **overrides})
    net = parser.get_parsed_content("network")
    net.load_state_dict(load_checkpoint(parser.get_parsed_content("diffusion_path")))
    net.eval()
    cond = parser.get_parsed_content("conditioning")
    combos = all_combinations(cond)
    idx = torch.stack([cond.encode(c) for c in combos])
    x = torch.randn([1] + parser.get_parsed_content("latent_shape"), generator=torch.Generator().manual_seed(seed))
    out = {}
    with torch.no_grad():
        for t in timesteps:
            tt = torch.tensor([int(t)])
            e0 = net(x, tt, cond.null_indices(1))
            eps = net(x.expand(len(combos), *x.shape[1:]), tt, idx)
            rel = ((eps - e0).flatten(1).norm(dim=1) / e0.norm()).mean()
            by_p = {}
            for i, c in enumerate(combos):
                by_p.setdefault(c["modality"], []).append(eps[i])
            between_p = (
                torch.stack(
                    [(torch.stack(v) - torch.stack(v).mean(0)).flatten(1).norm(dim=1).mean() for v in by_p.values()]
                ).mean()
                / e0.norm()
            )
            by_m = {}
            for i, c in enumerate(combos):
                by_m.setdefault(c["pathology"], []).append(eps[i])
            between_m = (
                torch.stack(
                    [(torch.stack(v) - torch.stack(v).mean(0)).flatten(1).norm(dim=1).mean() for v in by_m.values()]
                ).mean()
                / e0.norm()
            )
            out[int(t)] = {
                "conditioned_vs_null": float(rel),
                "between_pathologies": float(between_p),
                "between_modalities": float(between_m),
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
