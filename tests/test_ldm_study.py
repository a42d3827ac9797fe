"""The conditional LDM study's measurements: condition sensitivity (and its training log) and the report's scoring
of generated scans, on inputs whose answers are known."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from bundle_code import bundle_scripts  # noqa: E402  (tests/ is on sys.path)

from brainsynth.conditioning.categorical import CategoricalConditioning

sensitivity = bundle_scripts("brain_mri_conditional_ldm", "condition_sensitivity")
report = bundle_scripts("brain_mri_conditional_ldm", "study_report")

PATHOLOGIES = ["healthy", "glioblastoma"]
MODALITIES = ["t1w", "t1ce", "t2w"]


def _conditioning() -> CategoricalConditioning:
    return CategoricalConditioning({"pathology": PATHOLOGIES, "modality": MODALITIES}, embedding_dim=4)


class _Toy(torch.nn.Module):
    """eps = x * 0.5 + (modality index) * modality_weight: depends on the modality token only."""

    def __init__(self, modality_weight: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(modality_weight)))

    def forward(self, x, t, idx):
        return 0.5 * x + self.w * idx[:, 1].float().view(-1, 1, 1, 1, 1)


def test_a_network_that_ignores_its_conditions_has_zero_sensitivity():
    values = sensitivity.condition_sensitivity(_Toy(0.0), _conditioning(), [2, 4, 4, 4], timesteps=(500,))
    assert values[500] == pytest.approx(
        {"conditioned_vs_null": 0.0, "between_pathologies": 0.0, "between_modalities": 0.0}, abs=1e-7
    )


def test_sensitivity_sees_a_modality_effect_and_no_pathology_effect():
    values = sensitivity.condition_sensitivity(_Toy(1.0), _conditioning(), [2, 4, 4, 4], timesteps=(900, 100))
    for t in (900, 100):
        assert values[t]["between_pathologies"] == pytest.approx(0.0, abs=1e-7)
        assert values[t]["between_modalities"] > 0.1
        assert values[t]["conditioned_vs_null"] > 0.1


def test_training_log_appends_a_line_per_measurement_and_a_resume_keeps_the_last(tmp_path):
    log = sensitivity.ConditionSensitivityLog(_Toy(1.0), _conditioning(), [2, 4, 4, 4], tmp_path / "s.jsonl", every_n=5)

    class Engine:  # what the handler reads of an ignite engine
        class state:
            iteration = 5

    log(Engine)
    Engine.state.iteration = 10
    log(Engine)
    log.network.w.data.fill_(2.0)
    log(Engine)  # the same iteration again, as after a resume: the later line wins
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["timesteps"] for line in lines)
    rows = sensitivity.read_log(tmp_path / "s.jsonl")
    assert [r["iteration"] for r in rows] == [5, 10]
    assert rows[1]["timesteps"]["500"]["between_modalities"] > rows[0]["timesteps"]["500"]["between_modalities"]


def _row(p, m, pp, pm):
    return {"pathology": p, "modality": m, "predicted_pathology": pp, "predicted_modality": pm}


def test_report_scores_seen_and_held_out_apart_and_counts_t1_confusions_separately():
    rows = [
        _row("healthy", "t1w", "healthy", "t1w"),  # right
        _row("healthy", "t1w", "healthy", "t1ce"),  # T1 confusion only
        _row("healthy", "t2w", "glioblastoma", "t2w"),  # pathology wrong
        _row("glioblastoma", "t2w", "glioblastoma", "t1w"),  # held out, modality wrong
    ]
    scores = report.score(rows, {("glioblastoma", "t2w")}, PATHOLOGIES, MODALITIES)
    seen, held = scores["seen"], scores["held-out"]
    assert seen["n"] == 3 and held["n"] == 1
    assert seen["pathology_accuracy"] == pytest.approx(2 / 3)
    assert seen["modality_accuracy"] == pytest.approx(2 / 3)
    assert seen["modality_accuracy_t1_merged"] == pytest.approx(1.0)
    assert seen["joint_accuracy"] == pytest.approx(1 / 3)
    assert seen["joint_accuracy_t1_merged"] == pytest.approx(2 / 3)
    assert seen["modality_confusion"] == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert held["pathology_accuracy"] == 1.0 and held["modality_accuracy"] == 0.0


def test_report_relates_held_out_frechet_to_the_seen_mean():
    metrics = {
        "combinations": [
            {"pathology": "healthy", "modality": "t1w", "split": "seen", "feature_frechet_distance": 2.0},
            {"pathology": "healthy", "modality": "t2w", "split": "seen", "feature_frechet_distance": 4.0},
            {"pathology": "glioblastoma", "modality": "t2w", "split": "held-out", "feature_frechet_distance": 9.0},
        ]
    }
    d = report.distribution(metrics, {("glioblastoma", "t2w")})
    assert d["seen"]["frechet_mean"] == pytest.approx(3.0)
    assert d["held_out_frechet_over_seen"] == pytest.approx(3.0)
    assert np.isclose(report.merged_accuracy([[1, 1, 0], [1, 1, 0], [0, 0, 2]], MODALITIES), 1.0)


def test_study_step_runs_the_bundle_and_reports_its_time_and_status(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bundles" / "brain_mri_conditional_ldm"
    command = [sys.executable, "-m", "brainsynth.engine.study", "step", str(tmp_path), "listing", "settings"]
    configs = "['configs/train_autoencoder.json','configs/demo.json']"
    ok = subprocess.run(command + [configs], cwd=folder, capture_output=True, text=True)
    assert ok.returncode == 0 and "--ae_channels" in ok.stdout
    assert re.search(r"^listing: [\d.]+ s wall, [\d.]+ s user CPU, \d+ KB max RSS$", ok.stderr, re.M)
    bad = subprocess.run(command + ["['configs/no_such.json']"], cwd=folder, capture_output=True, text=True)
    assert bad.returncode != 0 and re.search(r"^listing: .* s wall", bad.stderr, re.M)
