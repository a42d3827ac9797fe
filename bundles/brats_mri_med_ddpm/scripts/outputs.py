"""Writing generated volumes: one NIfTI per modality in the condition mask's geometry, plus the masks and a preview.

Each subject gets ``<output_dir>/<subject>/`` named as the input (BraTS 2021 ``_t1``, ``_t1ce``, ``_t2``,
``_flair``, ``_seg`` with labels 1 / 2 / 4; BraTS 2023 ``-t1n``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg`` with 1 / 2 / 3;
any other input the BraTS 2023 form; ``output_layout`` chooses), plus ``brain_mask``, so the folder is itself a
dataset ``brainsynth.data.discover`` reads (the downstream segmentation experiment trains on it), plus
``condition.nii.gz`` (the label map the model saw) and ``preview.png``. Intensities are the model's [-1, 1]
mapped to [0, 1]. Writes are atomic and never replace an existing file unless ``overwrite``. Every generated
modality carries the synthetic mark and a JSON sidecar (``brainsynth.data.provenance``); the masks are copies of the
input and are not marked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from brainsynth.conditioning.semantic_mask import SemanticMaskConditioning
from brainsynth.conventions import LABEL_VALUES, LAYOUT_LABELS, encode_labels
from brainsynth.data import output_layout_of
from brainsynth.data.discover import strip_nifti_extension
from brainsynth.data.provenance import RunProvenance, input_hashes
from brainsynth.engine.io import save_nifti

from .inputs import output_paths

logger = logging.getLogger("med_ddpm.outputs")
BUNDLE_DIR = Path(__file__).resolve().parents[1]


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model intensities [-1, 1] -> [0, 1] (clipped)."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def canonical_seg(label_map: torch.Tensor, conditioning: SemanticMaskConditioning) -> np.ndarray | None:
    """Canonical tumour labels from a condition label map; None when a class has no single canonical label."""
    lm = np.asarray(torch.as_tensor(label_map).cpu()).astype(np.int16)
    seg = np.zeros(lm.shape, np.int16)
    for index, name in enumerate(conditioning.classes, start=1):
        if name in ("brain", "head"):
            continue
        if name not in LABEL_VALUES:  # "tumour" merges several labels
            return None
        seg[lm == index] = LABEL_VALUES[name]
    return seg


def item_files(
    output_dir: str | Path,
    modalities: Sequence[str],
    conditioning: SemanticMaskConditioning,
    output_layout: str | None = None,
    preview: bool = True,
):
    """``files(row)`` -> every file ``SaveGeneratedd`` writes for that input row (generated modalities with their
    provenance sidecars, the masks, the preview): what sharded generation checks to call an item complete."""
    from brainsynth.data.provenance import sidecar_path

    writes_seg = canonical_seg(torch.zeros(1, 1, 1, 1), conditioning) is not None

    def files(row: Mapping[str, Any]) -> list[Path]:
        paths = output_paths(output_dir, str(row["subject"]), modalities, output_layout_of(row, output_layout))
        out = [p for m in modalities for p in (paths[m], sidecar_path(paths[m]))] + [paths["condition"]]
        out += [paths["seg"]] if writes_seg else []
        out += [paths["brain_mask"]] if "brain" in conditioning.classes else []
        return out + ([paths["preview"]] if preview else [])

    return files


class SaveGeneratedd(MapTransform):
    """Postprocessing transform: write ``pred`` (C modalities, mask geometry) and the masks of one subject."""

    def __init__(
        self,
        output_dir: str,
        modalities: Sequence[str],
        conditioning: SemanticMaskConditioning,
        pred_key: str = "pred",
        mask_key: str = "mask",
        preview: bool = True,
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
        output_layout: str | None = None,
    ):
        """``provenance``: the run's settings for the synthetic mark (weights, sampler, num_inference_steps, seed,
        settings; see ``brainsynth.data.provenance.RunProvenance``); outputs are marked in any case.
        ``output_layout``: the file naming (None: the input's)."""
        super().__init__([pred_key])
        self.output_layout = output_layout
        self.provenance = RunProvenance(BUNDLE_DIR, **dict(provenance or {}))
        self.output_dir = Path(output_dir)
        self.modalities = list(modalities)
        self.conditioning = conditioning
        self.pred_key, self.mask_key = pred_key, mask_key
        self.preview, self.overwrite = preview, overwrite

    def _save(
        self,
        array: Any,
        path: Path,
        source: str | None,
        affine: np.ndarray,
        dtype=np.float32,
        provenance: dict | None = None,
    ) -> None:
        reference = source if source and strip_nifti_extension(Path(source).name) is not None else None
        save_nifti(
            array,
            path,
            reference=reference,
            affine=None if reference else affine,
            overwrite=self.overwrite,
            dtype=dtype,
            provenance=provenance,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        pred, lm = d[self.pred_key], d[self.mask_key]
        subject, source = str(d["subject"]), d.get("source")
        if pred.shape[0] != len(self.modalities):
            raise ValueError(f"{subject}: generated {pred.shape[0]} channels for modalities {self.modalities}")
        affine = np.asarray(torch.as_tensor(getattr(pred, "affine", torch.eye(4))).cpu(), dtype=np.float64)
        layout = output_layout_of({"source": source, "layout": d.get("layout")}, self.output_layout)
        paths = output_paths(self.output_dir, subject, self.modalities, layout)
        conditions = {
            **input_hashes({"mask": source}),
            "label_convention": d.get("label_convention"),
            "classes": list(self.conditioning.classes),
        }
        volumes = {}
        for channel, modality in enumerate(self.modalities):
            volumes[modality] = to_unit_range(torch.as_tensor(pred[channel]).float().cpu()).numpy()
            if not np.isfinite(volumes[modality]).all():
                raise FloatingPointError(
                    f"{subject}: the generated {modality} volume is not finite (NaN / Inf); "
                    f"nothing was written. Likely damaged weights ({self.provenance.weights}) "
                    f"or an unstable sampler setting"
                )
            record = self.provenance.record(conditions, modality=modality)
            self._save(volumes[modality], paths[modality], source, affine, provenance=record)
        lm = np.asarray(torch.as_tensor(lm).cpu())[0].round().astype(np.int16)
        self._save(lm, paths["condition"], source, affine, dtype=np.int16)
        seg = canonical_seg(lm, self.conditioning)
        if seg is not None:  # in the layout's label numbering (BraTS 2021: enhancing = 4)
            written = encode_labels(seg, LAYOUT_LABELS[layout]).astype(np.int16)
            self._save(written, paths["seg"], source, affine, dtype=np.int16)
        if "brain" in self.conditioning.classes:
            self._save((lm > 0).astype(np.uint8), paths["brain_mask"], source, affine, dtype=np.uint8)
        if self.preview:
            from brainsynth.engine.preview import save_preview

            save_preview(volumes, paths["preview"], seg=seg, overwrite=self.overwrite)
        logger.info("%s: wrote %s", subject, paths[self.modalities[0]].parent)
        d["written"] = str(paths[self.modalities[0]].parent)
        return d


class TrainingPreviewWriter:
    """``fn`` of ``brainsynth.engine.training.TrainingPreview``: sample one fixed condition with the EMA network and the
    fast sampler (same noise every time, so successive previews show training progress) and write a PNG."""

    def __init__(
        self,
        network: torch.nn.Module,
        sampler: Any,
        dataset: Any,
        conditioning: SemanticMaskConditioning,
        modalities: Sequence[str],
        out_dir: str,
        seed: int = 0,
    ):
        self.network, self.sampler, self.dataset = network, sampler, dataset
        self.conditioning, self.modalities = conditioning, list(modalities)
        self.out_dir, self.seed = Path(out_dir), seed

    def __call__(self, engine: Any) -> Path:
        from brainsynth.engine.preview import save_training_preview
        from brainsynth.engine.seeding import item_seed

        item = self.dataset[0]
        device = next(self.network.parameters()).device
        condition = torch.as_tensor(item["condition"])[None].to(device)
        image = self.sampler(condition, self.network, item_seeds=[item_seed(self.seed, "training_preview")])[0].cpu()
        volumes = {m: to_unit_range(image[c]).numpy() for c, m in enumerate(self.modalities)}
        seg = canonical_seg(self.conditioning.from_one_hot(condition.cpu(), channel_dim=1)[0, 0], self.conditioning)
        return save_training_preview(engine, self.out_dir, volumes, seg=seg)


def print_demo_ratios(
    output_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    modalities: Sequence[str],
    dataset_dir: str | Path,
    output_layout: str | None = None,
) -> dict:
    """The demo's last words: region ratios (CSF, edema, enhancing tumour over white matter) of every generated
    contrast beside those of the real scans of the same subjects, from the simulated cohort's ground truth. Only
    for the simulated cohort (``dataset_dir`` is its folder); returns {"generated", "real", "agree"}."""
    from brainsynth.metrics.contrast import cohort_ratio_table, print_ratio_table

    files = {}
    for row in rows:
        paths = output_paths(output_dir, str(row["subject"]), modalities, output_layout_of(row, output_layout))
        files[str(row["subject"])] = {m: paths[m] for m in modalities}
    table, agree, generated, real = cohort_ratio_table(Path(dataset_dir) / "datalist.json", files)
    print_ratio_table(
        f"Mean intensity of a region over white matter in the {len(files)} generated subject(s), "
        "real scans of the same subjects in brackets (CSF bright on T2w, dark on T1w / FLAIR; edema bright on "
        "T2w / FLAIR; enhancing tumour bright on T1ce):",
        table,
        agree,
    )
    return {"generated": generated, "real": real, "agree": agree}
