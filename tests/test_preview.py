"""PNG previews: real PNG files, the radiological orientation, label outlines in the right colours, no overwrite."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from brainsynth.engine.io import OutputExistsError
from brainsynth.engine.preview import LABEL_COLOURS, _panel, save_montage, save_preview

SHAPE = (40, 48, 32)


def _phantom() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An ellipsoidal 'brain' with a bright block at the patient's right, anterior, superior corner, and a
    segmentation: edema around necrosis."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).astype(float)
    centre = (np.array(SHAPE) - 1) / 2
    brain = (((idx - centre) / (np.array(SHAPE) * 0.45)) ** 2).sum(-1) < 1
    t1 = np.where(brain, 100.0, 0.0).astype(np.float32)
    t1[28:34, 34:40, 20:26] = 400.0  # right (high x), anterior (high y), superior (high z)
    seg = np.zeros(SHAPE, np.uint8)
    r = np.linalg.norm(idx - centre, axis=-1)
    seg[r < 9] = 2
    seg[r < 4] = 1
    return {"t1w": t1, "flair": t1 * 0.5 + brain * 20}, seg


def _colour_present(pixels: np.ndarray, colour) -> bool:
    return bool((pixels == np.array(colour, np.uint8)).all(-1).any())


def test_save_preview_writes_a_png_with_a_row_per_volume_and_outlines(tmp_path):
    volumes, seg = _phantom()
    two = save_preview(volumes, tmp_path / "two.png", seg=seg)
    one = save_preview({"t1w": volumes["t1w"]}, tmp_path / "one.png", seg=seg)
    with Image.open(two) as a, Image.open(one) as b:
        assert a.format == b.format == "PNG"
        assert a.width == b.width
        pixels = np.asarray(a.convert("RGB"))
        row_height = a.height - b.height  # one more volume adds exactly one row of panels
    assert row_height > 100
    assert _colour_present(pixels, LABEL_COLOURS[1]) and _colour_present(pixels, LABEL_COLOURS[2])
    assert not _colour_present(pixels, LABEL_COLOURS[3]) and not _colour_present(pixels, LABEL_COLOURS[4])


def test_no_segmentation_means_no_colour(tmp_path):
    volumes, _ = _phantom()
    path = save_preview(volumes, tmp_path / "plain.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_views_are_radiological():
    volumes, _ = _phantom()
    t1 = volumes["t1w"]
    centre = (31, 37, 23)  # through the bright block
    window = (0.0, 400.0)

    def bright(view):
        panel = _panel(t1, None, view, centre, (1.0, 1.0, 1.0), window, scale=1.0)[..., 0]
        rows, cols = np.nonzero(panel > 200)
        return rows.mean() / panel.shape[0], cols.mean() / panel.shape[1]

    row, col = bright("axial")
    assert col < 0.5 and row < 0.5  # patient's right on the viewer's left, anterior up
    row, col = bright("coronal")
    assert col < 0.5 and row < 0.5  # right on the left, superior up
    row, col = bright("sagittal")
    assert col < 0.5 and row < 0.5  # anterior on the left, superior up


def test_panels_keep_physical_proportions():
    volumes, _ = _phantom()
    fine = _panel(volumes["t1w"], None, "axial", (20, 24, 16), (1.0, 1.0, 1.0), (0, 400), scale=2.0)
    coarse = _panel(volumes["t1w"][::2], None, "axial", (10, 24, 16), (2.0, 1.0, 1.0), (0, 400), scale=2.0)
    assert fine.shape == coarse.shape == (2 * SHAPE[1], 2 * SHAPE[0], 3)


def test_label_convention_is_mapped_before_colouring(tmp_path):
    volumes, seg = _phantom()
    brats2021 = np.where(seg == 1, 4, seg).astype(np.uint8)  # 4 = enhancing tumour in BraTS 2021
    path = save_preview(volumes, tmp_path / "et.png", seg=brats2021, label_convention="brats2021")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert _colour_present(pixels, LABEL_COLOURS[3]) and not _colour_present(pixels, LABEL_COLOURS[4])


def test_existing_png_is_kept_unless_overwrite(tmp_path):
    volumes, seg = _phantom()
    path = save_preview(volumes, tmp_path / "p.png", seg=seg)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="p.png"):
        save_preview({"t1w": volumes["t1w"]}, path)
    assert path.read_bytes() == before
    save_preview({"t1w": volumes["t1w"]}, path, overwrite=True)
    assert path.read_bytes() != before


def test_bad_volumes_are_named(tmp_path):
    volumes, seg = _phantom()
    with pytest.raises(ValueError, match="flair"):
        save_preview({"t1w": volumes["t1w"], "flair": volumes["flair"][:-1]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="3-D"):
        save_preview({"t1w": volumes["t1w"][0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="seg shape"):
        save_preview(volumes, tmp_path / "x.png", seg=seg[:-1])
    assert not (tmp_path / "x.png").exists()


def test_montage_has_a_row_per_subject_and_a_column_per_volume(tmp_path):
    volumes, seg = _phantom()
    subject = {"volumes": volumes, "seg": seg, "title": "phantom"}
    two = save_montage([subject, subject], tmp_path / "two.png")
    three = save_montage([subject] * 3, tmp_path / "three.png")
    t1_only = save_montage([subject] * 3, tmp_path / "t1.png", modalities=["t1w"])
    with Image.open(two) as a, Image.open(three) as b, Image.open(t1_only) as c:
        assert b.height - a.height > 50  # one more subject, one more row
        assert b.width > 1.8 * c.width  # two volumes, two columns
        assert _colour_present(np.asarray(b.convert("RGB")), LABEL_COLOURS[2])
    with pytest.raises(ValueError, match="lacks pd"):
        save_montage([subject], tmp_path / "bad.png", modalities=["t1w", "pd"])
