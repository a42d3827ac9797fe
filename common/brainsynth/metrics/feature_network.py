"""The in-house 3D feature network used for distribution metrics of generated brain MRI.

Usual practice computes FID / MMD on a pretrained MedicalNet ResNet-50; those weights cannot be downloaded
here, so this project trains its own small 3D ResNet (MONAI ``ResNet``) on real cohort volumes to recognise
**pathology and modality** from one single-channel volume. Its pooled penultimate activations are the features
for the Frechet distance and MMD (``brainsynth.metrics.distribution``); its two heads give the conditioning
accuracy of a conditional generator (does the network recognise the pathology and modality that were asked
for?). Every report names it ("in-house 3D pathology/modality network"), never plain "FID".

A user-supplied feature network is accepted by path (``load_feature_network``): either a checkpoint written
by ``train_feature_network`` (weights only), or a TorchScript file / ``torch.export`` archive (``.pt2``) mapping
(B, 1, H, W, D) to (B, F) features (e.g. an exported MedicalNet); those have no classification heads, so
conditioning accuracy is unavailable with them.

CLI: ``python -m brainsynth.metrics.feature_network train --dataset_dir DIR --out FILE [--input_shape 64 64 64]
[--epochs 30] [--seed 0]`` trains on the training split (validation split for the reported accuracy).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainsynth.conventions import MODALITIES, PATHOLOGIES
from brainsynth.engine.io import load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "brainsynth-feature-network/1"
DEFAULT_NAME = "in-house 3D pathology/modality ResNet"
DEFAULT_INPUT_SHAPE = (64, 64, 64)


def robust_rescale(volumes: torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> torch.Tensor:
    """Per volume: clip to its [lower, upper] percentiles and scale to [0, 1].

    Real scans (any scanner scale) and generated ones (about [0, 1]) go through the same mapping, so the
    features compare anatomy and contrast, not intensity units. ``volumes``: (B, 1, *spatial).
    """
    flat = volumes.reshape(volumes.shape[0], -1).float()
    lo = torch.quantile(flat, lower / 100.0, dim=1, keepdim=True)
    hi = torch.quantile(flat, upper / 100.0, dim=1, keepdim=True)
    scaled = (flat - lo) / (hi - lo).clamp_min(1e-8)
    return scaled.clamp(0.0, 1.0).reshape(volumes.shape)


def prepare_volumes(volumes: torch.Tensor | np.ndarray, input_shape: Sequence[int]) -> torch.Tensor:
    """Bring volumes of any size to the network input: (B, 1, *input_shape), robustly rescaled to [0, 1].

    Accepts (H, W, D), (B, H, W, D) or (B, 1, H, W, D).
    """
    x = torch.as_tensor(np.asarray(volumes) if not torch.is_tensor(volumes) else volumes).float()
    if x.ndim == 3:
        x = x[None, None]
    elif x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"expected single-channel 3-D volumes (B, 1, H, W, D), got shape {tuple(x.shape)}")
    if tuple(x.shape[2:]) != tuple(input_shape):
        x = F.interpolate(x, size=tuple(int(s) for s in input_shape), mode="trilinear", align_corners=False)
    return robust_rescale(x)


class PathologyModalityNet(nn.Module):
    """A small MONAI 3D ResNet with two heads: pathology and modality logits.

    ``features(x)`` returns the pooled penultimate activations (B, block_inplanes[-1]) used for distribution
    metrics; ``forward(x)`` returns ``{"pathology": logits, "modality": logits}``. Inputs go through
    ``prepare_volumes`` first (``extract`` / ``classify`` do it).
    """

    def __init__(
        self,
        pathologies: Sequence[str] = PATHOLOGIES,
        modalities: Sequence[str] = MODALITIES,
        block_inplanes: Sequence[int] = (16, 32, 64, 128),
        input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
        name: str = DEFAULT_NAME,
        max_pool: bool = True,
    ) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        self.pathologies = tuple(pathologies)
        self.modalities = tuple(modalities)
        self.block_inplanes = tuple(int(c) for c in block_inplanes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.name = name
        self.max_pool = bool(max_pool)
        self.backbone = ResNet(
            block="basic",
            layers=(1, 1, 1, 1),
            block_inplanes=list(self.block_inplanes),
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_stride=2,
            no_max_pool=not self.max_pool,  # max_pool False: twice the resolution after the stem, for small lesions
            feed_forward=False,
        )
        self.pathology_head = nn.Linear(self.block_inplanes[-1], len(self.pathologies))
        self.modality_head = nn.Linear(self.block_inplanes[-1], len(self.modalities))

    @property
    def feature_dim(self) -> int:
        return self.block_inplanes[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {"pathology": self.pathology_head(f), "modality": self.modality_head(f)}

    def config(self) -> dict[str, Any]:
        return {
            "pathologies": list(self.pathologies),
            "modalities": list(self.modalities),
            "block_inplanes": list(self.block_inplanes),
            "input_shape": list(self.input_shape),
            "name": self.name,
            "max_pool": self.max_pool,
        }


class FeatureExtractor:
    """What the metrics use: ``extract(volumes) -> (N, F)`` and, when the network has heads,
    ``classify(volumes) -> {"pathology": [names], "modality": [names]}``.

    Volumes of any size are resized to the network input and robustly rescaled (``prepare_volumes``).
    """

    def __init__(
        self,
        network: nn.Module,
        input_shape: Sequence[int],
        name: str,
        has_heads: bool,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
    ) -> None:
        self.network = network.to(device).eval()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.name = name
        self.has_heads = has_heads
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        #: accuracy on real validation scans stored with the in-house network ({} when unknown)
        self.validation: dict[str, Any] = {}

    def _batches(self, volumes: Any):
        if torch.is_tensor(volumes) or isinstance(volumes, np.ndarray):
            volumes = list(volumes) if np.ndim(volumes) >= 4 else [volumes]
        for i in range(0, len(volumes), self.batch_size):
            chunk = [prepare_volumes(v, self.input_shape) for v in volumes[i : i + self.batch_size]]
            yield torch.cat(chunk).to(self.device)

    @torch.no_grad()
    def extract(self, volumes: Any) -> torch.Tensor:
        """Features of a list / batch of single-channel volumes, (N, F) float64 on the CPU."""
        net = self.network.features if isinstance(self.network, PathologyModalityNet) else self.network
        out = [net(batch).reshape(batch.shape[0], -1).double().cpu() for batch in self._batches(volumes)]
        if not out:
            raise ValueError("no volumes given to extract features from")
        return torch.cat(out)

    @torch.no_grad()
    def classify(self, volumes: Any) -> dict[str, list[str]]:
        """Predicted pathology and modality names per volume."""
        if not self.has_heads:
            raise ValueError(
                f"feature network {self.name!r} has no pathology/modality heads; conditioning accuracy "
                "needs the in-house network (brainsynth.metrics.feature_network.train_feature_network)"
            )
        net = self.network
        preds: dict[str, list[str]] = {"pathology": [], "modality": []}
        for batch in self._batches(volumes):
            logits = net(batch)
            preds["pathology"] += [net.pathologies[i] for i in logits["pathology"].argmax(1).tolist()]
            preds["modality"] += [net.modalities[i] for i in logits["modality"].argmax(1).tolist()]
        return preds


def load_feature_network(
    path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 4
) -> FeatureExtractor:
    """Load the in-house network (checkpoint from ``train_feature_network``) or a user's TorchScript extractor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: feature network not found (train one with `python -m "
            "brainsynth.metrics.feature_network train ...` or give a TorchScript file)"
        )
    try:
        ckpt = load_checkpoint(path)
    except RuntimeError:
        ckpt = None
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        cfg = ckpt["config"]
        net = PathologyModalityNet(**cfg)
        net.load_state_dict(ckpt["state_dict"])
        extractor = FeatureExtractor(
            net, net.input_shape, net.name, has_heads=True, device=device, batch_size=batch_size
        )
        extractor.validation = dict(ckpt.get("validation", {}))
        return extractor
    try:
        if path.suffix == ".pt2":  # torch.export archive
            module = torch.export.load(str(path)).module()
        else:
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ValueError(
            f"{path}: neither a brainsynth feature-network checkpoint (format {CHECKPOINT_FORMAT}) nor "
            f"a TorchScript module / torch.export archive (.pt2) ({e})"
        ) from e
    input_shape = tuple(getattr(module, "input_shape", DEFAULT_INPUT_SHAPE))
    return FeatureExtractor(
        module, input_shape, f"user-supplied {path.name}", has_heads=False, device=device, batch_size=batch_size
    )


# --- training ----------------------------------------------------------------------------------------------
def _scan_transforms(input_shape: Sequence[int], preprocessing: Any = None):
    from monai import transforms as mt

    from brainsynth.data import LoadSubjectd

    # default: LoadSubjectd reads NIfTI, DICOM series and channels of MSD 4-D files alike. A bundle passes its
    # own preprocessing so the network learns on the exact image space its generator produces.
    steps = [
        preprocessing if preprocessing is not None else LoadSubjectd("image", seg_key=None),
        mt.Resized("image", spatial_size=tuple(input_shape), mode="trilinear"),
        mt.Lambdad("image", lambda x: robust_rescale(torch.as_tensor(x)[None])[0]),
        mt.ToTensord("image", track_meta=False),
    ]
    return mt.Compose(steps)


def _targets(rows: Sequence[dict], net: PathologyModalityNet) -> list[dict]:
    out, bad = [], []
    for r in rows:
        if r.get("pathology") not in net.pathologies or r.get("modality") not in net.modalities:
            bad.append(
                f"{r.get('image')}: pathology {r.get('pathology')!r} / modality {r.get('modality')!r} "
                f"not in {list(net.pathologies)} / {list(net.modalities)}"
            )
            continue
        out.append(
            {
                "image": r["image"],
                **({"image_channel": r["image_channel"]} if "image_channel" in r else {}),
                "pathology": net.pathologies.index(r["pathology"]),
                "modality": net.modalities.index(r["modality"]),
            }
        )
    if bad:
        raise ValueError("feature-network training rows with unknown labels:\n" + "\n".join(bad))
    return out


def _load_all(items: Sequence[dict], input_shape: Sequence[int], preprocessing: Any) -> tuple[torch.Tensor, ...]:
    """Every scan through the deterministic preprocessing once: (N, 1, *input_shape) volumes and their labels.
    Held in memory (a 32^3 scan is 128 kB), so the epochs cost only the network."""
    transform = _scan_transforms(input_shape, preprocessing)
    volumes = torch.stack([torch.as_tensor(transform(dict(item))["image"]).float() for item in items])
    pathology = torch.tensor([item["pathology"] for item in items])
    modality = torch.tensor([item["modality"] for item in items])
    return volumes, pathology, modality


def random_pose(volumes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batched augmentation: left-right flip, rotation up to about 8.6 degrees about each axis, scaling by
    0.9-1.1, shifts up to 7.5 % of the field of view, global intensity by 0.9-1.1. Head position and size
    vary between subjects and scanners; without this the network recognises subjects, not pathologies."""
    b = volumes.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1

    a = uniform(b, 3) * 0.15
    c, s = torch.cos(a), torch.sin(a)
    one, zero = torch.ones(b), torch.zeros(b)
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(b, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(b, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(b, 3, 3)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    matrix = rz @ ry @ rx * (1 + 0.1 * uniform(b, 1, 1))
    matrix[:, :, 0] *= flip[:, None]
    theta = torch.cat([matrix, 0.15 * uniform(b, 3, 1)], 2).to(volumes)
    grid = F.affine_grid(theta, list(volumes.shape), align_corners=False)
    moved = F.grid_sample(volumes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved * (1 + 0.1 * uniform(b, 1, 1, 1, 1)).to(volumes)


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], n: int) -> list[list[int]]:
    """``m[i][j]``: scans of class i recognised as class j."""
    m = np.zeros((n, n), dtype=int)
    for t, p in zip(truth, predicted):
        m[int(t), int(p)] += 1
    return m.tolist()


@torch.no_grad()
def _validate(net: PathologyModalityNet, data: tuple[torch.Tensor, ...], batch_size: int, device) -> dict[str, Any]:
    net.eval()
    volumes, pathology, modality = data
    pred = {"pathology": [], "modality": []}
    for i in range(0, len(volumes), batch_size):
        logits = net(volumes[i : i + batch_size].to(device))
        for key in pred:
            pred[key] += logits[key].argmax(1).cpu().tolist()
    out: dict[str, Any] = {"n_scans": int(len(volumes))}
    for key, truth, names in (
        ("pathology", pathology, net.pathologies),
        ("modality", modality, net.modalities),
    ):
        out[f"{key}_accuracy"] = float(np.mean(np.asarray(pred[key]) == truth.numpy()))
        out[f"{key}_confusion"] = confusion_matrix(truth.tolist(), pred[key], len(names))
    out["classes"] = {"pathology": list(net.pathologies), "modality": list(net.modalities)}
    return out


def train_feature_network(
    train_rows: Sequence[dict],
    out_path: str | os.PathLike,
    val_rows: Sequence[dict] | None = None,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    pathologies: Sequence[str] = PATHOLOGIES,
    modalities: Sequence[str] = MODALITIES,
    block_inplanes: Sequence[int] = (16, 32, 64, 128),
    max_pool: bool = True,
    epochs: int = 30,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    augment: bool = True,
    device: str = "cpu",
    num_workers: int = 0,
    overwrite: bool = False,
    preprocessing: Any = None,
) -> Path:
    """Train the in-house network on real per-scan rows ``{"image", "pathology", "modality"}`` (e.g. from
    ``brainsynth.data.expand_scans``) and write a weights-only checkpoint to ``out_path``.

    ``preprocessing``: a transform turning a row into ``{"image": (1, H, W, D)}`` (default: load the file);
    give the generator's own preprocessing so real and generated volumes share one image space. Scans are
    preprocessed once and kept in memory; each batch gets a random pose (``random_pose``) when ``augment``.
    Loss: cross-entropy of the pathology head (classes weighted by inverse frequency) + cross-entropy of the
    modality head. The validation accuracy and confusion matrices (``val_rows``: other subjects) are stored in
    the checkpoint, so every report can say how well the network recognises what it is asked to judge.
    ``num_workers`` is accepted for compatibility and unused.
    """
    from monai.utils import set_determinism

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: already exists; pass overwrite=True to retrain")
    set_determinism(seed)
    net = PathologyModalityNet(pathologies, modalities, block_inplanes, input_shape, max_pool=max_pool).to(device)
    train_items = _targets(train_rows, net)
    if not train_items:
        raise ValueError("no training scans given to the feature network")
    data = _load_all(train_items, input_shape, preprocessing)
    counts = np.bincount(data[1].numpy(), minlength=len(net.pathologies))
    logger.info(
        "feature network: %d training scans, pathology counts %s",
        len(train_items),
        dict(zip(net.pathologies, counts.tolist())),
    )
    # classes are unbalanced in pooled datasets: weight each pathology by its inverse frequency
    weight = torch.tensor([1.0 / c if c else 0.0 for c in counts], dtype=torch.float32)
    weight = (weight * (counts > 0).sum() / weight.sum()).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    per_epoch = max(1, len(train_items) // batch_size)  # full batches only: BatchNorm dislikes a batch of one
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * per_epoch))
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_items), generator=generator)
        total = 0.0
        for i in range(per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            volumes = data[0][idx]
            if augment:
                volumes = random_pose(volumes, generator)
            logits = net(volumes.to(device))
            loss = F.cross_entropy(logits["pathology"], data[1][idx].to(device), weight=weight) + F.cross_entropy(
                logits["modality"], data[2][idx].to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        logger.info("feature network epoch %d/%d loss %.4f", epoch + 1, epochs, total / (per_epoch * batch_size))
    validation = {}
    if val_rows:
        validation = _validate(net, _load_all(_targets(val_rows, net), input_shape, preprocessing), batch_size, device)
        logger.info(
            "feature network validation: pathology %.3f, modality %.3f on %d scans",
            validation["pathology_accuracy"],
            validation["modality_accuracy"],
            validation["n_scans"],
        )
    save_checkpoint(
        {
            "format": CHECKPOINT_FORMAT,
            "config": net.config(),
            "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
            "validation": validation,
            "seed": seed,
            "epochs": epochs,
            "n_training_scans": len(train_items),
        },
        out_path,
    )
    return out_path


def ensure_feature_network(
    path: str | os.PathLike,
    train_rows: Sequence[dict] | None = None,
    val_rows: Sequence[dict] | None = None,
    device: str | torch.device = "cpu",
    **train_kwargs: Any,
) -> FeatureExtractor:
    """Load the feature network at ``path``; if there is none yet and real training rows are given, train the
    in-house one on them first (``train_feature_network``). A user's own network is used by giving its path."""
    path = Path(path)
    if not path.is_file():
        if not train_rows:
            raise FileNotFoundError(f"{path}: no feature network there and no real scans given to train one")
        logger.info("training the in-house feature network on %d real scans -> %s", len(train_rows), path)
        train_feature_network(train_rows, path, val_rows, device=str(device), **train_kwargs)
    return load_feature_network(path, device=device)


def feature_network_validation(path: str | os.PathLike) -> dict[str, Any]:
    """The validation accuracy stored with an in-house feature network ({} for user-supplied ones)."""
    try:
        ckpt = load_checkpoint(path)
    except RuntimeError:
        return {}
    return dict(ckpt.get("validation", {})) if isinstance(ckpt, dict) else {}


def _cli_train(
    dataset_dir: str,
    out: str,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    epochs: int = 30,
    batch_size: int = 8,
    seed: int = 0,
    cache_dir: str | None = None,
    overwrite: bool = False,
) -> str:
    from brainsynth.data import discover, expand_scans, resolve_dataset_dir, split_items

    root = resolve_dataset_dir(dataset_dir, cache_dir=cache_dir)
    items = discover(root)
    train_rows = expand_scans(split_items(items, "training"))
    val_rows = expand_scans(split_items(items, "validation"))
    return str(
        train_feature_network(
            train_rows,
            out,
            val_rows,
            input_shape=input_shape,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            overwrite=overwrite,
        )
    )


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire({"train": _cli_train})
