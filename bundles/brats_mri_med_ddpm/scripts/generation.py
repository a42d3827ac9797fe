"""Generate and write volumes for a list of mask rows with the components of inference.json.

The inference workflow runs MONAI's SupervisedEvaluator once over ``dataset_dir``; the downstream experiment needs
two more generation passes (real masks, augmented masks) into other folders, so this builds the same evaluator
around the same preprocessing, sampler and writer for any rows and output folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose

from brainsynth.conditioning.semantic_mask import ConditionInputPrepareBatch, SemanticMaskConditioning
from brainsynth.data import InvertWithBackgroundd
from brainsynth.engine.seeding import ItemSeedsPrepareBatch

from .inputs import check_inputs
from .outputs import SaveGeneratedd

logger = logging.getLogger("med_ddpm.generation")


def generate(
    rows: Sequence[dict],
    output_dir: str | Path,
    network: torch.nn.Module,
    inferer: Any,
    preprocessing: Compose,
    conditioning: SemanticMaskConditioning,
    modalities: Sequence[str],
    spatial_size: Sequence[int],
    region_keys: dict | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    preview: bool = False,
    overwrite: bool = False,
    provenance: dict | None = None,
    output_layout: str | None = None,
) -> Path:
    """Sample one volume per row (``{"subject", "mask"}`` or dataset rows) into ``output_dir``; returns it."""
    rows = check_inputs(
        rows,
        conditioning,
        spatial_size,
        region_keys,
        list(modalities),
        str(output_dir),
        list(modalities),
        overwrite,
        output_layout,
    )
    post = Compose(
        [
            InvertWithBackgroundd(
                keys=["pred", "mask"],
                background=[-1.0, None],
                transform=preprocessing,
                orig_keys="mask",
                nearest_interp=[False, True],
                to_tensor=True,
            ),
            SaveGeneratedd(
                str(output_dir),
                modalities,
                conditioning,
                preview=preview,
                overwrite=overwrite,
                provenance=provenance,
                output_layout=output_layout,
            ),
        ]
    )
    loader = DataLoader(Dataset(list(rows), preprocessing), batch_size=batch_size, shuffle=False, num_workers=0)
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=loader,
        network=network,
        inferer=inferer,
        prepare_batch=ItemSeedsPrepareBatch(
            getattr(inferer, "seed", 0), "subject", ConditionInputPrepareBatch("condition")
        ),
        postprocessing=post,
    )
    logger.info("generating %d volumes into %s", len(rows), output_dir)
    evaluator.run()
    return Path(output_dir)
