"""The nearest-training-subject memorisation audit (brainsynth.metrics.memorisation) and the study figures."""

import numpy as np
import pytest

from brainsynth.metrics.memorisation import masked_correlation, memorisation_audit, nearest_training_similarity

ANATOMY = np.random.default_rng(99).random((2, 8, 8, 6))  # what every subject of the population shares


def _brains(n, seed, individuality=0.5):
    """n volumes (2 channels): zero background outside a box, shared anatomy + individual variation inside."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        v = np.zeros((2, 12, 12, 8), np.float32)
        v[:, 2:10, 2:10, 1:7] = 1 + ANATOMY + individuality * rng.random((2, 8, 8, 6))
        out[f"s{seed}_{i}"] = v
    return out


def test_masked_correlation_is_pearson_inside_the_reference_brain():
    a, b = _brains(1, 0)["s0_0"], _brains(1, 1)["s1_0"]
    mask = b != 0
    expected = np.corrcoef(a[mask], b[mask])[0, 1]
    assert masked_correlation(a, b) == pytest.approx(expected, abs=1e-12)
    noisy = a + np.float32(0.3) * (a == 0)  # a generated volume with a grey background: same figure
    assert masked_correlation(noisy, b) == pytest.approx(expected, abs=1e-12)
    assert masked_correlation(a, 3 * a + 1 * (a != 0)) == pytest.approx(1.0)  # affine inside the brain
    with pytest.raises(ValueError, match="shapes"):
        masked_correlation(a, a[:1])


def test_a_copied_training_subject_is_flagged_and_new_ones_are_not():
    train, held_out = _brains(6, 10), _brains(4, 20)
    copy = train["s10_3"] + np.float32(1e-3) * (train["s10_3"] != 0)
    # new volumes of the same population, a little more individual than real subjects: below the ceiling
    synthetic = {"copy": copy, **{f"new{i}": v for i, v in enumerate(_brains(3, 30, individuality=0.8).values())}}
    audit = memorisation_audit(synthetic, held_out, train, groups={"copies": ["copy"], "new": ["new0", "new1"]})
    assert audit["above_ceiling"] == ["copy"]
    assert audit["synthetic"]["per_volume"]["copy"]["nearest"] == "s10_3"
    assert audit["synthetic"]["per_volume"]["copy"]["similarity"] == pytest.approx(1.0, abs=1e-6)
    ceiling = max(nearest_training_similarity(held_out, train)[k]["similarity"] for k in held_out)
    assert audit["ceiling"] == pytest.approx(ceiling)
    assert audit["groups"]["copies"]["above_ceiling"] == ["copy"] and audit["groups"]["new"]["above_ceiling"] == []
    assert audit["groups"]["new"]["summary"]["n"] == 2 and len(audit["groups"]["new"]["similarities"]) == 2
    with pytest.raises(ValueError, match="held-out"):
        memorisation_audit(synthetic, {}, train)


def test_study_figures_are_png_files_and_never_overwrite(tmp_path):
    pytest.importorskip("matplotlib")
    from brainsynth.engine import figures
    from brainsynth.engine.io import OutputExistsError

    bars = figures.bar_chart(
        tmp_path / "b.png", {"real": {"Dice": (0.8, 0.05)}, "syn": {"Dice": (0.7, 0.1)}}, "Dice", "t"
    )
    hist = figures.histograms(tmp_path / "h.png", {"a": [0.1, 0.2, 0.3], "b": [0.5]}, "x", "t", threshold=0.4)
    line = figures.curves(tmp_path / "c.png", {"loss": ([1, 2, 3], [1.0, 0.5, 0.2])}, "it", "loss", "t", logy=True)
    for path in (bars, hist, line):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    before = bars.read_bytes()
    with pytest.raises(OutputExistsError):
        figures.bar_chart(bars, {"x": {"Dice": (0.1, 0.0)}}, "Dice", "t")
    assert bars.read_bytes() == before
