"""Does a model use its conditions? Relative change of the predicted noise when the condition tokens change, at a
few timesteps; measured on a trained model from the command line, and during training by a handler.

    python scripts/condition_sensitivity.py --config_file "['configs/inference.json','configs/demo.json']" \
        --bundle_root /path/to/run

For each timestep: ||eps(c) - eps(null)|| / ||eps(null)|| averaged over every pathology x modality c, and the
spread between pathologies at a fixed modality and between modalities at a fixed pathology, on the same scale.
Values near 0 mean the network ignores its conditions (guidance then has nothing to amplify).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, Sequence

import fire
import torch


def _spread(eps: torch.Tensor, groups: dict[str, list[int]], scale: torch.Tensor) -> float:
    """Mean distance of each prediction from its group's mean, over groups, relative to ``scale``."""
    per_group = [(eps[i] - eps[i].mean(0)).flatten(1).norm(dim=1).mean() for i in groups.values()]
    return float(torch.stack(per_group).mean() / scale)


@torch.no_grad()
def condition_sensitivity(
    network: torch.nn.Module,
    conditioning: Any,
    latent_shape: Sequence[int],
    timesteps: Sequence[int] = (900, 500, 100),
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """{timestep: {conditioned_vs_null, between_pathologies, between_modalities}} for one fixed latent."""
    from brainsynth.conditioning.categorical import all_combinations
    from brainsynth.engine.training import unwrap

    net = unwrap(network)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    combos = all_combinations(conditioning)
    idx = torch.stack([conditioning.encode(c) for c in combos]).to(device)
    x = torch.randn([1, *latent_shape], generator=torch.Generator().manual_seed(seed)).to(device)
    by_modality: dict[str, list[int]] = {}
    by_pathology: dict[str, list[int]] = {}
    for i, c in enumerate(combos):
        by_modality.setdefault(c["modality"], []).append(i)
        by_pathology.setdefault(c["pathology"], []).append(i)
    out = {}
    for t in timesteps:
        tt = torch.tensor([int(t)], device=device)
        e0 = net(x, tt, conditioning.null_indices(1).to(device))
        eps = net(x.expand(len(combos), *x.shape[1:]), tt.expand(len(combos)), idx)
        out[int(t)] = {
            "conditioned_vs_null": float(((eps - e0).flatten(1).norm(dim=1) / e0.norm()).mean()),
            "between_pathologies": _spread(eps, by_modality, e0.norm()),
            "between_modalities": _spread(eps, by_pathology, e0.norm()),
        }
    net.train(was_training)
    return out


class ConditionSensitivityLog:
    """Ignite handler: every ``every_n`` iterations, measure ``condition_sensitivity`` of ``network`` (the EMA
    copy in stage 2) and append ``{"iteration", "timesteps": {...}}`` as one JSON line to ``path`` (rank 0 only;
    0 switches it off). The file shows whether, and when, the model starts to use its conditions."""

    def __init__(
        self,
        network: torch.nn.Module,
        conditioning: Any,
        latent_shape: Sequence[int],
        path: str,
        every_n: int = 500,
        timesteps: Sequence[int] = (900, 500, 100),
        seed: int = 0,
    ) -> None:
        self.network, self.conditioning, self.latent_shape = network, conditioning, list(latent_shape)
        self.path, self.every_n, self.timesteps, self.seed = Path(path), int(every_n), tuple(timesteps), int(seed)

    def __call__(self, engine) -> None:
        from brainsynth.engine.sharding import rank_and_world

        if rank_and_world()[0] != 0:
            return
        values = condition_sensitivity(self.network, self.conditioning, self.latent_shape, self.timesteps, self.seed)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one line per measurement: a crash never corrupts earlier lines
            f.write(json.dumps({"iteration": int(engine.state.iteration), "timesteps": values}) + "\n")

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.every_n > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n), self)


def read_log(path: str | Path) -> list[dict]:
    """The lines ``ConditionSensitivityLog`` wrote, in order (a repeated iteration after a resume: the last)."""
    rows: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["iteration"])] = row
    return [rows[k] for k in sorted(rows)]


def main(config_file, bundle_root: str = ".", timesteps: tuple = (900, 500, 100), seed: int = 0, **overrides) -> None:
    from monai.bundle import ConfigParser

    from brainsynth.engine.io import load_checkpoint

    torch.set_num_threads(1)
    parser = ConfigParser()
    if isinstance(config_file, str) and config_file.startswith("["):  # fire passes a list literal through as text
        config_file = ast.literal_eval(config_file)
    parser.read_config(config_file)
    parser.update({"bundle_root": bundle_root, **overrides})
    net = parser.get_parsed_content("network")
    net.load_state_dict(load_checkpoint(parser.get_parsed_content("diffusion_path")))
    values = condition_sensitivity(
        net, parser.get_parsed_content("conditioning"), parser.get_parsed_content("latent_shape"), timesteps, seed
    )
    print(json.dumps(values, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
