"""Does synthetic data help segmentation? The paper's downstream experiment, at any scale.

Three MONAI SegResNet models learn to segment the whole tumour (every tumour label against the rest) from the
four modalities, with identical settings and the same number of optimiser steps:

* **real**: the real training subjects;
* **synthetic**: volumes Med-DDPM generates from the same subjects' masks (nothing real but the masks);
* **real + synthetic**: the real subjects plus volumes generated from augmented masks (each tumour scaled from
  2.0x to 0.5x and moved inside the brain, ``augment_per_subject`` new masks per subject; the paper used 2).

Each is scored by tumour Dice on the held-out real test subjects. Results: ``downstream.json`` / ``.md``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from brainsynth.engine.io import atomic_write_text, load_checkpoint, save_checkpoint

logger = logging.getLogger("med_ddpm.downstream")


def segmentation_transforms(modalities: Sequence[str], spatial_size: Sequence[int], augment: bool):
    from monai import transforms as mt

    from brainsynth.data import LoadSubjectd

    steps = [
        LoadSubjectd(keys=list(modalities), seg_key="seg"),
        mt.ConcatItemsd(keys=list(modalities), name="image"),
        mt.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        mt.Lambdad(keys="seg", func=lambda s: (s > 0).float()),  # whole tumour
        mt.ResizeWithPadOrCropd(keys=["image", "seg"], spatial_size=tuple(spatial_size)),
    ]
    if augment:
        steps += [mt.RandFlipd(keys=["image", "seg"], prob=0.5, spatial_axis=axis) for axis in range(3)]
        steps += [
            mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    steps += [mt.SelectItemsd(keys=["image", "seg"]), mt.EnsureTyped(keys=["image", "seg"], track_meta=False)]
    return mt.Compose(steps)


def segmentation_network(n_in: int, init_filters: int):
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=3,
        in_channels=n_in,
        out_channels=1,
        init_filters=init_filters,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
    )


def train_segmenter(
    rows: Sequence[dict],
    modalities: Sequence[str],
    spatial_size: Sequence[int],
    iterations: int,
    batch_size: int,
    lr: float,
    init_filters: int,
    seed: int,
    device: torch.device,
) -> torch.nn.Module:
    """SegResNet + Dice-CE on the rows, ``iterations`` optimiser steps (data cycled), seeded init and order."""
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss

    from brainsynth.engine.training import seed_everything

    seed_everything(seed)
    net = segmentation_network(len(modalities), init_filters).to(device)
    loader = DataLoader(
        Dataset(list(rows), segmentation_transforms(modalities, spatial_size, augment=True)),
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        epoch_length=iterations,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5),
        loss_function=DiceCELoss(sigmoid=True),
        prepare_batch=lambda batch, device, non_blocking, **kw: (batch["image"].to(device), batch["seg"].to(device)),
    )
    trainer.run()
    return net.eval()


@torch.no_grad()
def tumour_dice(
    net: torch.nn.Module,
    rows: Sequence[dict],
    modalities: Sequence[str],
    spatial_size: Sequence[int],
    device: torch.device,
) -> list[float]:
    """Whole-tumour Dice per held-out subject (prediction: sigmoid > 0.5)."""
    from monai.metrics import DiceMetric

    transform = segmentation_transforms(modalities, spatial_size, augment=False)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    scores = []
    for row in rows:
        d = transform(row)
        pred = (torch.sigmoid(net(d["image"][None].to(device))) > 0.5).float()
        scores.append(float(metric(pred, d["seg"][None].to(device)).item()))
    return scores


def run_downstream(
    rows: Sequence[dict],
    out_dir: str,
    network: torch.nn.Module,
    inferer: Any,
    preprocessing: Any,
    conditioning: Any,
    modalities: Sequence[str],
    spatial_size: Sequence[int],
    model_path: str,
    region_keys: dict | None = None,
    augment_per_subject: int = 2,
    seg_spatial_size: Sequence[int] = (192, 192, 144),
    seg_iterations: int = 2000,
    seg_batch_size: int = 2,
    seg_lr: float = 1e-4,
    seg_init_filters: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    from brainsynth.data import discover, split_items, validate_items
    from brainsynth.data.provenance import count_synthetic, refuse_synthetic

    from .generation import generate
    from .mask_augmentation import PAPER_SCALE_FACTORS, write_augmented_masks

    out = Path(out_dir)
    if (out / "downstream.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'downstream.json'}: already exists; set overwrite=true or another log_dir")
    device = torch.device(device)
    real_train = refuse_synthetic(
        validate_items(split_items(rows, "training"), modalities, True),
        "real training data of the downstream experiment",
        modalities,
    )
    real_test = refuse_synthetic(
        validate_items(split_items(rows, "test"), modalities, True), "the held-out real test split", modalities
    )
    region_key = next(iter((region_keys or {"brain": "brain_mask"}).values()))

    network.load_state_dict(load_checkpoint(model_path, map_location=device))
    gen = dict(
        network=network,
        inferer=inferer,
        preprocessing=preprocessing,
        conditioning=conditioning,
        modalities=modalities,
        spatial_size=spatial_size,
        region_keys=region_keys,
        device=device,
        batch_size=batch_size,
        overwrite=overwrite,
        provenance={"weights": model_path, "seed": seed, "settings": {"purpose": "downstream experiment"}},
    )
    same_dir = generate(real_train, out / "synthetic_same_masks", **gen)
    aug_list = write_augmented_masks(
        real_train,
        out / "augmented_masks",
        PAPER_SCALE_FACTORS,
        per_subject=augment_per_subject,
        seed=seed,
        region_key=region_key,
        image_keys=modalities,
        overwrite=overwrite,
    )
    from .inputs import mask_rows

    aug_dir = generate(mask_rows(str(aug_list)), out / "synthetic_augmented_masks", **gen)
    arms = {
        "real": real_train,
        "synthetic": discover(same_dir),
        "real + synthetic": list(real_train) + discover(aug_dir),
    }
    result: dict[str, Any] = {
        "test_subjects": len(real_test),
        "seg_iterations": seg_iterations,
        "seg_spatial_size": list(seg_spatial_size),
        "arms": {},
    }
    for name, train_rows in arms.items():
        logger.info("downstream: training SegResNet on %s (%d volumes)", name, len(train_rows))
        net = train_segmenter(
            train_rows,
            modalities,
            seg_spatial_size,
            seg_iterations,
            seg_batch_size,
            seg_lr,
            seg_init_filters,
            seed,
            device,
        )
        save_checkpoint(net.state_dict(), out / f"segresnet_{name.replace(' + ', '_plus_')}.pt")
        dice = tumour_dice(net, real_test, modalities, seg_spatial_size, device)
        result["arms"][name] = {
            "n_training_volumes": len(train_rows),
            **count_synthetic(train_rows, modalities),
            "dice_mean": float(np.mean(dice)),
            "dice_sd": float(np.std(dice, ddof=1)) if len(dice) > 1 else 0.0,
            "dice": dice,
        }
    atomic_write_text(out / "downstream.json", json.dumps(result, indent=1), overwrite=overwrite)
    atomic_write_text(out / "downstream.md", downstream_table(result), overwrite=overwrite)
    logger.info("\n%s", downstream_table(result))
    return result


def downstream_table(result: dict[str, Any]) -> str:
    lines = [
        f"Whole-tumour Dice of MONAI SegResNet on {result['test_subjects']} held-out real subjects "
        f"({result['seg_iterations']} optimiser steps each, grid {result['seg_spatial_size']}).",
        "",
        "| training data | volumes | Dice (mean +- sd) |",
        "|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        lines.append(f"| {name} | {arm['n_training_volumes']} | {arm['dice_mean']:.4f} +- {arm['dice_sd']:.4f} |")
    return "\n".join(lines) + "\n"
