"""The simulated cohort: MR physics by ground-truth region, pathology models, determinism, layouts on disk.

Subjects are simulated on coarse grids (2-3 mm, 6 mm for files) so the module runs in well under a minute after
the template (nilearn's MNI ICBM152) is loaded once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from brainsynth.cohort import CohortError, generate_cohort, make_grid, simulate_subject
from brainsynth.cohort.__main__ import main as cohort_cli
from brainsynth.cohort.anatomy import GRID_CENTRE_MNI, SplineField, Swelling, random_transform, template_landmarks
from brainsynth.cohort.layout import assign_splits, subject_files
from brainsynth.cohort.physics import ACQUISITIONS, TISSUE_PROPERTIES, intensity_scale, tissue_signal
from brainsynth.conventions import LAYOUTS, MSD_CHANNELS, PATHOLOGIES, label_convention

PATHOLOGY_SEED = 11
#: grid of the physics tests: fine enough that a necrotic core is not mostly partial volume with its rim
SPACING = 2.0


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def subjects():
    """One subject per pathology at 2 mm, all from the same seed (same anatomy and scanner). The glioblastoma
    seed is the first that gives all three tumour labels (a tenth of tumours have no necrosis)."""
    out = {p: simulate_subject(p, seed=PATHOLOGY_SEED, spacing=SPACING) for p in PATHOLOGIES}
    seed = PATHOLOGY_SEED
    while not {1, 2, 3} <= set(np.unique(out["glioblastoma"].labels).tolist()):
        seed += 1
        assert seed < PATHOLOGY_SEED + 10, "no glioblastoma with necrosis, edema and enhancing rim in 10 seeds"
        out["glioblastoma"] = simulate_subject("glioblastoma", seed=seed, spacing=SPACING)
    return out


def test_grid_defaults_to_brats_and_centres_the_brain():
    grid = make_grid()
    assert grid.shape == (240, 240, 155) and grid.spacing == (1.0, 1.0, 1.0)
    centre_index = (np.array(grid.shape) - 1) / 2.0
    np.testing.assert_allclose(grid.affine @ [*centre_index, 1.0], [*GRID_CENTRE_MNI, 1.0])
    coarse = make_grid(spacing=3)
    assert coarse.shape == (80, 80, 52)
    np.testing.assert_allclose(np.diag(coarse.affine)[:3], 3.0)
    shaped = make_grid(shape=(96, 96, 64))
    np.testing.assert_allclose(np.multiply(shaped.shape, shaped.spacing), (240, 240, 155))
    with pytest.raises(ValueError, match="spacing"):
        make_grid(spacing=-1)
    with pytest.raises(ValueError, match="shape"):
        make_grid(shape=(10, 10))


def test_flair_nulls_csf_and_t1_t1ce_share_their_scale():
    wm, csf = TISSUE_PROPERTIES["wm"], TISSUE_PROPERTIES["csf"]
    assert tissue_signal("flair", csf) < 0.25 * tissue_signal("flair", wm)  # TI 2500 ms is near the CSF null
    assert intensity_scale("t1w") == intensity_scale("t1ce")
    # gadolinium changes only the post-contrast acquisition
    enhancing = TISSUE_PROPERTIES["enhancing"]
    assert tissue_signal("t1w", enhancing, 0.4) == tissue_signal("t1w", enhancing, 0.0)
    assert tissue_signal("t1ce", enhancing, 0.4) > 1.5 * tissue_signal("t1ce", enhancing, 0.0)
    # spin-echo equation by hand
    t1, t2, pd = wm
    a = ACQUISITIONS["t2w"]
    assert float(tissue_signal("t2w", wm)) == pytest.approx(
        pd * (1 - np.exp(-a.tr / t1)) * np.exp(-a.te / t2), rel=1e-6
    )


@pytest.mark.parametrize("pathology", PATHOLOGIES)
def test_healthy_tissue_contrast_order(subjects, pathology):
    means = subjects[pathology].region_means()
    wm, gm, csf = means["wm"], means["gm"], means["csf"]
    assert wm["t1w"] > gm["t1w"] > csf["t1w"]
    assert csf["t2w"] > gm["t2w"] > wm["t2w"]
    assert csf["flair"] < 0.5 * wm["flair"] and csf["flair"] < 0.5 * gm["flair"]
    assert gm["flair"] > wm["flair"]


def test_glioblastoma_region_contrasts(subjects):
    means = subjects["glioblastoma"].region_means()
    wm, gm, edema = means["wm"], means["gm"], means["edema"]
    enhancing, necrosis = means["enhancing"], means["necrotic_core"]
    for contrast in ("flair", "t2w"):
        assert edema[contrast] > 1.15 * max(wm[contrast], gm[contrast])
    assert enhancing["t1ce"] > 1.4 * wm["t1ce"]  # bright after gadolinium ...
    assert enhancing["t1w"] < wm["t1w"]  # ... but not before
    assert necrosis["t1ce"] < min(wm["t1ce"], gm["t1ce"]) and necrosis["t1ce"] < 0.6 * enhancing["t1ce"]


def test_sclerosis_lesions_are_bright_on_flair_and_t2(subjects):
    subject = subjects["sclerosis"]
    assert set(np.unique(subject.labels).tolist()) == {0, 4}
    means = subject.region_means()
    assert means["lesion"]["flair"] > 1.15 * means["wm"]["flair"]
    assert means["lesion"]["t2w"] > 1.3 * means["wm"]["t2w"]
    # lesions sit in white matter: before the lesion replaced it, the tissue there was mostly white matter
    healthy = subjects["healthy"]
    lesion = subject.labels == 4
    assert healthy.fractions["wm"][lesion].mean() > 0.5


def test_dementia_is_atrophy_of_the_same_brain(subjects):
    healthy, dementia = subjects["healthy"].fractions, subjects["dementia"].fractions
    assert dementia["csf"].sum() > 1.3 * healthy["csf"].sum()
    assert dementia["gm"].sum() < 0.95 * healthy["gm"].sum()  # cortical grey matter lost (AD: ~10-15 %)
    # enlarged lateral ventricles: more CSF within 12 mm of the template's ventricle centres
    grid = subjects["healthy"].grid
    world = np.stack(np.meshgrid(*grid.axes(), indexing="ij"), axis=-1)
    near = np.zeros(grid.shape, bool)
    for centre in template_landmarks().ventricle_centres:
        near |= np.linalg.norm(world - centre, axis=-1) < 12.0
    assert dementia["csf"][near].sum() > 1.3 * healthy["csf"][near].sum()
    assert np.array_equal(np.unique(subjects["dementia"].labels), [0])


def test_fractions_masks_and_background(subjects):
    for pathology, subject in subjects.items():
        total = sum(subject.fractions.values())
        assert min(f.min() for f in subject.fractions.values()) >= 0.0, pathology
        assert total.max() <= 1.0 + 1e-5, pathology
        inside = subject.brain_mask.astype(bool)
        assert np.array_equal(inside, total >= 0.5)
        for modality, image in subject.images.items():
            assert image.dtype == np.float32 and image.shape == subject.grid.shape
            assert not image[~inside].any(), f"{pathology} {modality}: signal outside the brain"
            assert (image[inside] > 0).mean() > 0.999
        assert not subject.labels[~inside].any()


def test_tumour_mass_effect_and_labels(subjects):
    gbm, healthy = subjects["glioblastoma"], subjects["healthy"]
    assert set(np.unique(gbm.labels).tolist()) == {0, 1, 2, 3}
    # the tumour displaces tissue: the same brain without it differs also where no tumour tissue is (mass effect)
    tumour_tissue = sum(gbm.fractions[t] for t in ("necrosis", "enhancing", "edema")) > 0
    away = ~ndi.binary_dilation(tumour_tissue, iterations=2)
    changed = np.abs(gbm.fractions["wm"] - healthy.fractions["wm"]) > 0.2
    assert (changed & away).sum() > 50


def test_swelling_pushes_tissue_away_from_its_centre():
    axes = [np.arange(-30.0, 31.0, 2.0)] * 3
    swelling = Swelling(np.zeros(3), np.full(3, 10.0), 0.5)
    box, disp = swelling.displacement(axes)
    x = np.stack(np.meshgrid(*[a[s] for a, s in zip(axes, box)], indexing="ij"))
    r_out = np.linalg.norm(x, axis=0)
    r_source = np.linalg.norm(x + disp, axis=0)
    shown = r_out > 0
    # every output point shows anatomy from nearer the centre: the neighbourhood is magnified, pushed out
    assert (r_source[shown] < r_out[shown]).all()
    # and the map stays monotone along a ray (no folding)
    ray = np.linspace(0.1, 30.0, 300)
    source = ray * (1 - 0.5 * np.exp(-0.5 * (ray / 10.0) ** 2))
    assert (np.diff(source) > 0).all()


def test_spline_field_on_axes_matches_points_and_transform_inverts():
    rng = np.random.default_rng(0)
    field = SplineField.random(rng, [-50, -60, -40], [50, 60, 40], lattice_spacing=25.0, std=3.0)
    axes = [np.linspace(-50, 50, 11), np.linspace(-60, 60, 13), np.linspace(-40, 40, 9)]
    grid_values = field.on_axes(axes)
    idx = rng.integers(0, [11, 13, 9], size=(20, 3))
    points = np.stack([axes[d][idx[:, d]] for d in range(3)], axis=1)
    np.testing.assert_allclose(
        field.at_points(points), grid_values[:, idx[:, 0], idx[:, 1], idx[:, 2]].T, rtol=1e-4, atol=1e-4
    )
    transform = random_transform(
        rng, make_grid(spacing=3), elastic_std=3.0, rotation_deg=3.0, scale_std=0.05, shift_std=2.0
    )
    x = rng.uniform(-60, 60, (10, 3))
    np.testing.assert_allclose(transform.inverse_points(transform.at_points(x)), x, atol=1e-3)


def test_same_seed_same_subject_other_seed_other_subject(subjects):
    again = simulate_subject("glioblastoma", seed=PATHOLOGY_SEED, spacing=3.0)
    reference = simulate_subject("glioblastoma", seed=PATHOLOGY_SEED, spacing=3.0)
    for m in again.images:
        assert np.array_equal(again.images[m], reference.images[m])
    assert np.array_equal(again.labels, reference.labels)
    other = simulate_subject("glioblastoma", seed=PATHOLOGY_SEED + 100, spacing=3.0)
    assert not np.array_equal(other.brain_mask, reference.brain_mask)  # different anatomy
    core = lambda s: np.argwhere(np.isin(s.labels, (1, 3))).mean(0)  # noqa: E731
    assert np.linalg.norm(core(other) - core(reference)) * 3.0 > 5.0  # tumour elsewhere (mm)


def test_a_seed_gives_the_same_subject_at_every_resolution():
    coarse = simulate_subject("glioblastoma", seed=5, spacing=3.0)
    fine = simulate_subject("glioblastoma", seed=5, spacing=2.0)

    def core_centre_mm_and_volume_ml(s):
        idx = np.argwhere(np.isin(s.labels, (1, 3)))
        centre = (s.affine @ np.append(idx.mean(0), 1.0))[:3]
        return centre, len(idx) * np.prod(s.grid.spacing) / 1000.0

    (c3, v3), (c2, v2) = core_centre_mm_and_volume_ml(coarse), core_centre_mm_and_volume_ml(fine)
    assert np.linalg.norm(c3 - c2) < 4.0
    assert v3 == pytest.approx(v2, rel=0.3)


def test_splits_are_deterministic_disjoint_and_mixed():
    pathologies = [PATHOLOGIES[i % 4] for i in range(20)]
    a, b = assign_splits(pathologies, seed=3), assign_splits(pathologies, seed=3)
    assert a == b
    members = a["training"] + a["validation"] + a["test"]
    assert sorted(members) == list(range(20))
    assert len(a["validation"]) == len(a["test"]) == 3
    assert len({pathologies[i] for i in a["test"]}) == 3
    assert assign_splits(pathologies, seed=4) != a
    small = assign_splits(["healthy"] * 3, seed=0)
    assert [len(small[s]) for s in ("training", "validation", "test")] == [1, 1, 1]


# --- files on disk ------------------------------------------------------------------------------------------------
COARSE = {"spacing": 6.0}  # 40 x 40 x 26 voxels


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_round_trip(tmp_path, layout):
    from brainsynth.data import LoadSubjectd, discover

    out = tmp_path / layout
    datalist_path = generate_cohort(out, n_subjects=4, seed=2, layout=layout, **COARSE)
    datalist = json.loads(datalist_path.read_text())
    grid = make_grid(**COARSE)
    assert datalist["layout"] == layout and datalist["seed"] == 2
    assert datalist["grid"]["shape"] == list(grid.shape)
    rows = {r["subject"]: r for split in ("training", "validation", "test") for r in datalist[split]}
    expected_ids = {"brats2023": "BraTS-GLI-00000-000", "brats2021": "BraTS2021_00000", "msd": "BRATS_001"}
    assert expected_ids[layout] in rows and len(rows) == 4
    for i, (sid, row) in enumerate(sorted(rows.items())):
        assert row["pathology"] == PATHOLOGIES[i]
        for role, relative in subject_files(layout, sid).items():
            assert row[role] == relative
            image = nib.load(out / relative)
            np.testing.assert_allclose(image.affine, grid.affine)
            expected_shape = grid.shape + ((len(MSD_CHANNELS),) if role == "image4d" else ())
            assert image.shape == expected_shape, relative
        seg = np.asarray(nib.load(out / row["seg"]).dataobj)
        assert seg.dtype == np.uint8
        valid = label_convention(row["label_convention"]).valid_values
        assert set(np.unique(seg).tolist()) <= valid
    assert rows[sorted(rows)[2]]["label_convention"] == "canonical"  # sclerosis: lesions have no BraTS label
    if layout == "msd":
        dataset = json.loads((out / "dataset.json").read_text())
        assert dataset["numTraining"] == 4 and dataset["modality"]["2"] == "t1gd"
    else:
        names = sorted(p.name for p in (out / sorted(rows)[0]).iterdir())
        assert len(names) == 7 and all(n.startswith(sorted(rows)[0]) for n in names)

    # the data layer reads it back: same rows, and labels that are the simulated ones in canonical values
    found = {r["subject"]: r for r in discover(out)}
    assert set(found) == set(rows)
    for split in ("training", "validation", "test"):
        assert {r["subject"] for r in datalist[split]} == {s for s, r in found.items() if r["split"] == split}
    for i in (1, 2):  # the glioblastoma and the sclerosis subject
        sid = sorted(rows)[i]
        loaded = LoadSubjectd(keys=["t1ce", "flair"])(found[sid])
        simulated = simulate_subject(PATHOLOGIES[i], seed=(2, i), grid=grid)
        assert np.array_equal(loaded["seg"][0].numpy().astype(np.uint8), simulated.labels)
        np.testing.assert_allclose(loaded["flair"][0].numpy(), simulated.images["flair"], rtol=1e-6)


def test_generate_cohort_reuses_refuses_and_resumes(tmp_path):
    out = tmp_path / "cohort"
    first = generate_cohort(out, n_subjects=2, seed=1, **COARSE)
    stamp = first.stat().st_mtime_ns
    image = out / subject_files("brats2023", "BraTS-GLI-00001-000")["t2w"]
    before = np.asarray(nib.load(image).dataobj)
    assert generate_cohort(out, n_subjects=2, seed=1, **COARSE) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(CohortError, match="different cohort.*seed"):
        generate_cohort(out, n_subjects=2, seed=2, **COARSE)
    # an interrupted run (no datalist, a file missing) is resumed with the same files
    first.unlink()
    image.unlink()
    generate_cohort(out, n_subjects=2, seed=1, **COARSE)
    assert np.array_equal(np.asarray(nib.load(image).dataobj), before)
    # overwrite replaces it with the cohort asked for
    generate_cohort(out, n_subjects=2, seed=2, overwrite=True, **COARSE)
    assert json.loads(first.read_text())["seed"] == 2
    assert not np.array_equal(np.asarray(nib.load(image).dataobj), before)


def _request_cohort(out, log, barrier, queue):
    """One process asking for a cohort; every subject it simulates is logged (slowed, so requests overlap)."""
    import time

    import brainsynth.cohort.layout as layout

    simulate = layout.simulate_subject

    def slow_logged(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        return simulate(*args, **kwargs)

    layout.simulate_subject = slow_logged
    barrier.wait()
    queue.put(str(layout.generate_cohort(out, 2, 3, **COARSE)))


def test_concurrent_requests_for_the_same_cohort_both_succeed(tmp_path):
    """Two processes asking for the same demo cohort at the same moment: one builds it, the other waits for the
    lock and reuses it. Without the lock both would simulate (4 subjects logged) or collide."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, queue, log = ctx.Barrier(2), ctx.Queue(), tmp_path / "simulated.log"
    procs = [ctx.Process(target=_request_cohort, args=(tmp_path / "shared", log, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted(queue.get(timeout=5) for _ in range(2))
    assert results[0] == results[1] == str(tmp_path / "shared" / "datalist.json")
    simulated_by = log.read_text().split()
    assert len(simulated_by) == 2 and len(set(simulated_by)) == 1, f"subjects simulated by {simulated_by}"
    assert len(json.loads(Path(results[0]).read_text())["training"]) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_subjects": 0}, "n_subjects"),
        ({"n_subjects": 2, "layout": "nifti"}, "unknown layout"),
        ({"n_subjects": 2, "pathologies": ["healthy", "flu"]}, "unknown pathology"),
        ({"n_subjects": 2, "spacing": 0}, "spacing"),
        ({"n_subjects": 2, "seed": -1}, "seed"),
    ],
)
def test_bad_parameters_are_named_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(CohortError, match=message):
        generate_cohort(tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_cli_writes_cohort_and_preview_and_reports_errors(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "cli"
    rc = cohort_cli(
        [
            "--out",
            str(out),
            "--subjects",
            "2",
            "--seed",
            "4",
            "--spacing",
            "6",
            "--layout",
            "brats2021",
            "--pathologies",
            "glioblastoma",
            "sclerosis",
            "--preview",
            "--quiet",
        ]
    )
    assert rc == 0
    datalist = json.loads((out / "datalist.json").read_text())
    assert {r["pathology"] for s in ("training", "validation") for r in datalist[s]} == {"glioblastoma", "sclerosis"}
    with Image.open(out / "preview.png") as png:
        assert png.format == "PNG" and png.width > 5 * 100 and png.height > 2 * 100
    capsys.readouterr()
    assert cohort_cli(["--out", str(out), "--subjects", "3", "--seed", "4", "--spacing", "6"]) == 2
    assert "different cohort" in capsys.readouterr().err
    assert cohort_cli(["--out", str(tmp_path / "x"), "--subjects", "1", "--pathologies", "flu"]) == 2
    assert "unknown pathology 'flu'" in capsys.readouterr().err


@pytest.mark.slow
def test_brats_grid_cohort(tmp_path):
    """Full-size check (opt in with -m slow): one subject of each pathology on the BraTS grid, read back."""
    from brainsynth.data import discover, validate_items

    generate_cohort(tmp_path / "full", n_subjects=4, seed=0)
    rows = discover(tmp_path / "full")
    validate_items(rows, ["t1w", "t1ce", "t2w", "flair", "pd"], True)
    gbm = next(r for r in rows if r["pathology"] == "glioblastoma")
    t1ce, seg = (np.asarray(nib.load(gbm[k]).dataobj) for k in ("t1ce", "seg"))
    assert t1ce.shape == seg.shape == (240, 240, 155)
    assert t1ce[seg == 3].mean() > 1.4 * t1ce[(seg == 0) & (t1ce > 0)].mean()
