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
    seg_seeds: Sequence[int] | None = None,
    scarce_subjects: int = 0,
    memorisation: bool = True,
    figures: bool = True,
    training_log_dir: str | None = None,
) -> dict[str, Any]:
    """The experiment, each arm trained once per seed in ``seg_seeds`` (default ``[seed]``). ``scarce_subjects``
    > 0 adds the data-scarce arms: that many real training subjects alone, and the same plus the volumes generated
    from their augmented masks. Writes ``downstream.json`` / ``.md`` and, with ``memorisation`` / ``figures``, the
    nearest-training-subject audit and PNGs (``figures`` needs matplotlib)."""
    from brainsynth.data import discover, split_items, validate_items
    from brainsynth.data.provenance import count_synthetic, refuse_synthetic
    from brainsynth.engine.study import run_context

    from .generation import generate
    from .mask_augmentation import PAPER_SCALE_FACTORS, write_augmented_masks

    out = Path(out_dir)
    if (out / "downstream.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'downstream.json'}: already exists; set overwrite=true or another log_dir")
    seeds = [int(s) for s in (seg_seeds if seg_seeds is not None else [seed])]
    if not seeds:
        raise ValueError("seg_seeds is empty; give at least one seed")
    device = torch.device(device)
    real_train = refuse_synthetic(
        validate_items(split_items(rows, "training"), modalities, True),
        "real training data of the downstream experiment",
        modalities,
    )
    real_test = refuse_synthetic(
        validate_items(split_items(rows, "test"), modalities, True), "the held-out real test split", modalities
    )
    if scarce_subjects < 0 or scarce_subjects >= len(real_train):
        raise ValueError(
            f"scarce_subjects={scarce_subjects}: must be 0 (off) or fewer than the {len(real_train)} training subjects"
        )
    region_key = next(iter((region_keys or {"brain": "brain_mask"}).values()))
    context = run_context()

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
    synthetic_same, synthetic_aug = discover(same_dir), discover(aug_dir)
    arms = {
        "real": real_train,
        "synthetic": synthetic_same,
        "real + synthetic": list(real_train) + synthetic_aug,
    }
    if scarce_subjects:
        # the first subjects of the training split (its order is the dataset's, not chosen on results)
        few = real_train[:scarce_subjects]
        few_ids = {r["subject"] for r in few}
        few_aug = [r for r in synthetic_aug if _augmented_source(r["subject"]) in few_ids]
        arms[f"{scarce_subjects} real"] = few
        arms[f"{scarce_subjects} real + synthetic"] = list(few) + few_aug
    result: dict[str, Any] = {
        "context": context,
        "test_subjects": [r["subject"] for r in real_test],
        "n_real_training_subjects": len(real_train),
        "seg_iterations": seg_iterations,
        "seg_batch_size": seg_batch_size,
        "seg_spatial_size": list(seg_spatial_size),
        "seg_seeds": seeds,
        "sampler_seed": seed,
        "arms": {},
    }
    for name, train_rows in arms.items():
        per_seed = []
        for s in seeds:
            logger.info("downstream: SegResNet on %s (%d volumes), seed %d", name, len(train_rows), s)
            net = train_segmenter(
                train_rows, modalities, seg_spatial_size, seg_iterations, seg_batch_size, seg_lr,
                seg_init_filters, s, device,
            )  # fmt: skip
            save_checkpoint(net.state_dict(), out / f"segresnet_{_slug(name)}_seed{s}.pt")
            per_seed.append(tumour_dice(net, real_test, modalities, seg_spatial_size, device))
        dice = np.asarray(per_seed)  # seeds x test subjects
        seed_means = dice.mean(1)
        result["arms"][name] = {
            "n_training_volumes": len(train_rows),
            **count_synthetic(train_rows, modalities),
            "dice_mean": float(dice.mean()),
            "dice_sd_over_seeds": float(seed_means.std(ddof=1)) if len(seeds) > 1 else 0.0,
            "dice_sd_over_subjects": float(dice.mean(0).std(ddof=1)) if dice.shape[1] > 1 else 0.0,
            "dice_per_seed": seed_means.tolist(),
            "dice_per_subject": dice.mean(0).tolist(),
            "dice": dice.tolist(),
        }
    result["comparisons"] = _comparisons(result["arms"], scarce_subjects)
    if memorisation:
        result["memorisation"] = _memorisation(
            synthetic_same, synthetic_aug, real_train, split_items(rows, "validation", allow_empty=True), real_test,
            modalities,
        )  # fmt: skip
    atomic_write_text(out / "downstream.json", json.dumps(result, indent=1), overwrite=overwrite)
    atomic_write_text(out / "downstream.md", downstream_table(result), overwrite=overwrite)
    if figures:
        _figures(result, out, real_train[0], synthetic_same[0], modalities, training_log_dir, overwrite)
    logger.info("\n%s", downstream_table(result))
    return result


def _slug(name: str) -> str:
    return name.replace(" + ", "_plus_").replace(" ", "_")


def _augmented_source(subject: str) -> str:
    """``<subject>_aug<k>`` -> ``<subject>`` (the names write_augmented_masks gives)."""
    return subject.rsplit("_aug", 1)[0]


def _comparisons(arms: dict[str, Any], scarce: int) -> list[dict[str, Any]]:
    """Paired two-sided Wilcoxon tests on per-test-subject Dice (mean over seeds), and the Dice ratio."""
    from brainsynth.metrics.paired import wilcoxon_signed_rank

    pairs = [("synthetic", "real"), ("real + synthetic", "real")]
    if scarce:
        pairs.append((f"{scarce} real + synthetic", f"{scarce} real"))
    out = []
    for a, b in pairs:
        test = wilcoxon_signed_rank(arms[a]["dice_per_subject"], arms[b]["dice_per_subject"])
        out.append({"arm": a, "against": b, "ratio": arms[a]["dice_mean"] / arms[b]["dice_mean"], **test})
    return out


def _volumes(rows: Sequence[dict], modalities: Sequence[str], unit: bool) -> dict[str, np.ndarray]:
    """Each subject's channels stacked (C, ...); real volumes min-max scaled to [0, 1] per channel as the
    generated ones are written."""
    from brainsynth.data import LoadSubjectd

    load = LoadSubjectd(keys=list(modalities), seg_key=None)
    out = {}
    for row in rows:
        d = load(row)
        chans = []
        for m in modalities:
            a = np.asarray(d[m].array if hasattr(d[m], "array") else d[m], np.float32)[0]
            if unit:
                a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
            chans.append(a)
        out[str(row["subject"])] = np.stack(chans)
    return out


def _memorisation(same, aug, train, val, test, modalities) -> dict[str, Any]:
    from brainsynth.metrics.memorisation import memorisation_audit

    synthetic = {**_volumes(same, modalities, unit=False), **_volumes(aug, modalities, unit=False)}
    synthetic = {k: np.clip(v, 0, 1) for k, v in synthetic.items()}
    return memorisation_audit(
        synthetic,
        _volumes(list(val) + list(test), modalities, unit=True),
        _volumes(train, modalities, unit=True),
        groups={
            "generated from training masks": [str(r["subject"]) for r in same],
            "generated from augmented masks": [str(r["subject"]) for r in aug],
        },
    )


def _figures(result, out: Path, real_row, synthetic_row, modalities, training_log_dir, overwrite) -> None:
    from brainsynth.engine import figures
    from brainsynth.engine.preview import save_preview

    arms = result["arms"]
    figures.bar_chart(
        out / "dice_per_arm.png",
        {f"{k}\n({v['n_training_volumes']} vol.)": {"Dice": (v["dice_mean"], v["dice_sd_over_seeds"])}
         for k, v in arms.items()},
        "whole-tumour Dice",
        f"Held-out real test subjects (n={len(result['test_subjects'])}), mean +- sd over "
        f"{len(result['seg_seeds'])} seeds",
        overwrite=overwrite,
    )  # fmt: skip
    memo = result.get("memorisation")
    if memo:
        samples = {"held-out real": [v["similarity"] for v in memo["held_out_real"]["per_volume"].values()]}
        samples.update({group: g["similarities"] for group, g in memo["groups"].items()})
        figures.histograms(
            out / "memorisation.png",
            samples,
            "highest correlation to any training subject",
            "Nearest-training-subject similarity",
            threshold=memo["ceiling"],
            threshold_label="held-out real maximum",
            overwrite=overwrite,
        )
    real = _volumes([real_row], modalities, unit=True)[str(real_row["subject"])]
    syn = _volumes([synthetic_row], modalities, unit=False)[str(synthetic_row["subject"])]
    panels = {}
    for i, m in enumerate(modalities):
        panels[f"real {m}"] = real[i]
        panels[f"synthetic {m}"] = syn[i]
    save_preview(
        panels,
        out / "real_vs_synthetic.png",
        seg=np.asarray(_seg(real_row)),
        title=f"subject {real_row['subject']}: real (odd rows) vs generated from its mask",
        overwrite=overwrite,
    )
    if training_log_dir:
        try:
            steps, values = figures.tensorboard_scalars(training_log_dir, "train_l1_loss")
        except (KeyError, OSError) as e:
            logger.warning("no training loss curve: %s", e)
        else:
            figures.curves(
                out / "training_loss.png",
                {"L1 loss": (steps, values)},
                "iteration",
                "training L1 loss",
                "Generator training loss",
                logy=True,
                overwrite=overwrite,
            )


def _seg(row: dict) -> np.ndarray:
    from brainsynth.data.reader import read_nifti

    return read_nifti(row["seg"])[0]


def downstream_table(result: dict[str, Any]) -> str:
    seeds = result.get("seg_seeds", [result.get("sampler_seed", 0)])
    n_test = len(result["test_subjects"]) if isinstance(result["test_subjects"], list) else result["test_subjects"]
    lines = [
        f"Whole-tumour Dice of MONAI SegResNet on {n_test} held-out real subjects ({result['seg_iterations']} "
        f"optimiser steps of batch {result.get('seg_batch_size', '?')} per model, grid {result['seg_spatial_size']}, "
        f"seeds {seeds}). sd over seeds = spread of the per-seed mean Dice; sd over subjects = spread of the "
        "per-subject Dice (mean over seeds).",
        "",
        "| training data | volumes | Dice mean | sd over seeds | sd over subjects | per-seed means |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        per_seed = ", ".join(f"{d:.3f}" for d in arm.get("dice_per_seed", [arm["dice_mean"]]))
        lines.append(
            f"| {name} | {arm['n_training_volumes']} | {arm['dice_mean']:.4f} | "
            f"{arm.get('dice_sd_over_seeds', 0.0):.4f} | {arm.get('dice_sd_over_subjects', 0.0):.4f} | {per_seed} |"
        )
    if result.get("comparisons"):
        lines += [
            "",
            "Paired two-sided Wilcoxon signed-rank tests on the per-subject Dice (mean over seeds):",
            "",
            "| arm | against | Dice ratio | median difference | n | p |",
            "|---|---|---|---|---|---|",
        ]
        for c in result["comparisons"]:
            lines.append(
                f"| {c['arm']} | {c['against']} | {c['ratio']:.3f} | {c['median_difference']:+.4f} | {c['n']} | "
                f"{c['p_value']:.3g} |"
            )
    memo = result.get("memorisation")
    if memo:
        lines += [
            "",
            f"Memorisation audit ({memo['measure']}): highest similarity of each volume to any real training "
            f"subject. Ceiling (largest held-out real value): {memo['ceiling']:.4f}.",
            "",
            "| volumes | n | mean +- sd | max | above the ceiling |",
            "|---|---|---|---|---|",
        ]
        h = memo["held_out_real"]["summary"]
        lines.append(f"| held-out real | {h['n']} | {h['mean']:.4f} +- {h['sd']:.4f} | {h['max']:.4f} | - |")
        for group, g in memo["groups"].items():
            s = g["summary"]
            if s.get("n"):
                lines.append(
                    f"| {group} | {s['n']} | {s['mean']:.4f} +- {s['sd']:.4f} | {s['max']:.4f} | "
                    f"{len(g['above_ceiling'])} |"
                )
    context = result.get("context")
    if context:
        lines += ["", f"Command: `{context['command']}`; commit {context['commit']}; {context['machine']}; "
                  f"{context['date']}."]  # fmt: skip
    return "\n".join(lines) + "\n"
