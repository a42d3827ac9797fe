"""Region contrast ratios (the demos' closing table): exact on arrays, physically right on the simulated cohort,
and a contrast swapped for another is flagged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainsynth.cohort import generate_cohort, subject_regions
from brainsynth.metrics.contrast import cohort_ratio_table, ratio_table, region_ratios, same_side


def test_region_ratios_are_exact_means_and_undefined_regions_are_none():
    image = np.ones((4, 4, 4))
    regions = {"wm": np.zeros((4, 4, 4), bool), "csf": np.zeros((4, 4, 4), bool)}
    regions["wm"][0] = True
    regions["csf"][1] = True
    image[1] = 2.5
    image[1, 0, 0] = 4.5  # mean of csf: (15 * 2.5 + 4.5) / 16
    out = region_ratios(image, regions)
    assert out["csf/wm"] == pytest.approx((15 * 2.5 + 4.5) / 16)
    assert out["edema/wm"] is None and out["enhancing/wm"] is None
    assert same_side(1.2, 1.8) and not same_side(0.9, 1.8) and same_side(None, 2.0) is None
    table, agree = ratio_table({"t2w": {"csf/wm": 0.9}}, {"t2w": {"csf/wm": 1.8}})
    assert not agree and "0.90 (1.80) !" in table


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    return generate_cohort(out, n_subjects=2, seed=0, spacing=10.0, pathologies=["glioblastoma"])


def test_real_scans_of_the_cohort_show_the_physics(cohort):
    datalist = json.loads(cohort.read_text())
    row = (datalist["training"] + datalist["validation"] + datalist["test"])[0]
    files = {row["subject"]: {m: cohort.parent / row[m] for m in ("t1w", "t1ce", "t2w", "flair")}}
    table, agree, generated, real = cohort_ratio_table(cohort, files)
    assert agree and generated == real  # the real scans against themselves
    assert real["t2w"]["csf/wm"] > 1 > real["t1w"]["csf/wm"]  # CSF bright on T2w, dark on T1w and FLAIR
    assert real["flair"]["csf/wm"] < 1
    assert real["t2w"]["edema/wm"] > 1 and real["flair"]["edema/wm"] > 1 > real["t1w"]["edema/wm"]
    assert real["t1ce"]["enhancing/wm"] > 1 > real["t1w"]["enhancing/wm"]  # gadolinium

    # a T1w volume handed in as the T2w is caught: CSF dark where the real T2w has it bright
    swapped = {row["subject"]: {"t2w": files[row["subject"]]["t1w"]}}
    table, agree, _, _ = cohort_ratio_table(cohort, swapped)
    assert not agree and "!" in table


def test_subject_regions_match_the_written_labels(cohort):
    import nibabel as nib

    datalist = json.loads(cohort.read_text())
    row = (datalist["training"] + datalist["validation"] + datalist["test"])[0]
    regions = subject_regions(cohort, row["subject"])
    seg = np.asarray(nib.load(cohort.parent / row["seg"]).dataobj)
    labelled = np.zeros(seg.shape, bool)
    for name in ("necrotic_core", "edema", "enhancing"):
        labelled |= regions.get(name, np.zeros(seg.shape, bool))
    assert np.array_equal(labelled, seg > 0)  # the re-simulated subject is the one on disk
    with pytest.raises(ValueError, match="no subject"):
        subject_regions(cohort, "nobody")
