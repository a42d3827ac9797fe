"""A bundle's user-facing settings, listed from its configs: every top-level key a user may set on the command
line, its default and its one-line meaning (the config's ``_comment_<key>``).

    python -m monai.bundle run settings --config_file "['configs/inference.json','configs/demo.json']"

Component definitions (``_target_``), run lists and private keys are left out: they are the bundle's wiring, not
its settings. Defaults are shown as the merged configs give them (a later overlay wins), expressions as written.
"""

from __future__ import annotations

import ast
import json
from typing import Any, Sequence

#: meanings of the keys every bundle shares (one vocabulary); a config's ``_comment_<key>`` takes precedence
GLOSSARY: dict[str, str] = {
    "bundle_root": "folder the run reads weights from and writes into (models/, eval/, outputs/)",
    "ckpt_dir": "folder of training checkpoints and final weights",
    "model_path": "the weights file (models/model.pt is what monai.bundle.load and MONAI Label read)",
    "log_dir": "TensorBoard logs, previews and evaluation results",
    "cache_dir": "where the simulated demo cohort is built and reused",
    "output_dir": "where generated volumes are written (never over existing files unless overwrite)",
    "overwrite": "replace existing outputs / final weights (false: refuse and say which file exists)",
    "device": "torch device (default: the first GPU if there is one, else the CPU)",
    "dataset_dir": "your data: a folder of subjects, a BraTS release, or a datalist JSON; 'demo' = simulated cohort",
    "demo_cohort": "parameters of the simulated cohort when dataset_dir is 'demo' (n_subjects, spacing, seed, ...)",
    "split": "subjects to use: 'all', 'training' / 'validation' / 'test', or a list of those",
    "label_convention": "label numbering of your segmentations (null: inferred from the dataset's naming)",
    "seed": "random seed (weights init, data order, sampling noise)",
    "spatial_size": "network grid (voxels or pixels); inputs are cropped / padded to it and restored on output",
    "num_workers": "data-loading worker processes",
    "amp": "mixed precision: bf16 / fp16 autocast on a GPU; on a CPU, bf16 in the samplers and in D3M's training",
    "use_flash_attention": "fused scaled-dot-product attention in the U-Net attention blocks",
    "channels_last": "channels-last memory format (GPU speed switch)",
    "activation_checkpointing": "recompute activations in the backward pass: less memory, slower",
    "compile": "torch.compile the network",
    "num_train_timesteps": "diffusion steps of the training noise schedule (must match the weights)",
    "modalities": "MRI contrasts, in channel order",
    "channels": "U-Net channels per level (must match the weights)",
    "attention_levels": "U-Net levels with self-attention (must match the weights)",
    "num_res_blocks": "residual blocks per U-Net level (must match the weights)",
    "norm_num_groups": "GroupNorm groups (must match the weights)",
    "num_head_channels": "channels per attention head (must match the weights)",
    "batch_size": "samples per batch of this run (training step or sampling batch)",
    "save_every_epochs": "checkpoint every N epochs (training resumes from the last one)",
    "cache_rate": "fraction of the training data kept in memory after preprocessing",
    "preview_every": "write a preview PNG every N iterations",
    "preview_steps": "sampling steps of the previews",
    "prediction_type": "what the network predicts (epsilon / v_prediction; must match the weights)",
    "ema_decay": "decay of the exponential moving average of the weights (the final weights are the EMA)",
    "ema_update_every": "update the EMA every N iterations",
    "ema_start_step": "first iteration of EMA updates (before it the EMA copies the weights)",
    "learning_rate": "Adam learning rate",
    "epoch_length": "iterations per epoch",
    "max_epochs": "epochs of training (total iterations = epoch_length x max_epochs); raise it to resume longer",
    "num_inference_steps": "sampling steps (fewer: faster, see the bundle's docs for the measured trade-off)",
    "sampler": "sampling algorithm (the bundle's docs list the choices)",
    "progress": "show progress bars",
    "preview": "write a preview PNG next to each output",
    "num_samples": "samples per input (K > 1: the output is their mean and an uncertainty map is written)",
    "displayable_configs": "settings MONAI Label shows and lets a user change per request",
    "output_layout": "file naming of the outputs: null = the input's, or brats2021 / brats2023",
    "accumulation_steps": "gradient accumulation steps per optimiser step",
    "log_every": "log the loss every N iterations",
}


def _is_wiring(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_is_wiring(v) for v in value.values())
    if isinstance(value, list):
        return (
            bool(value)
            and all(isinstance(v, str) and v.startswith("$") for v in value)
            or any(isinstance(v, dict) and _is_wiring(v) for v in value)
        )
    return False


def bundle_comments(config_files: str | Sequence[str]) -> dict[str, str]:
    """Every ``_comment_<key>`` of every config in the folders of ``config_files``: a bundle documents a key once,
    in whichever of its configs defines it first, and the listing finds it from any of them."""
    from pathlib import Path

    files = [config_files] if isinstance(config_files, str) else list(config_files)
    out: dict[str, str] = {}
    for folder in dict.fromkeys(Path(f).resolve().parent for f in files):
        for path in sorted(folder.glob("*.json")):
            try:
                content = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(content, dict):
                for k, v in content.items():
                    if k.startswith("_comment_") and isinstance(v, str):
                        out.setdefault(k[len("_comment_") :], v)
    return out


def user_settings(config_files: str | Sequence[str]) -> list[tuple[str, Any, str]]:
    """(key, default, meaning) for every user-facing top-level key of the merged ``config_files``, in order."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files)
    config = parser.config
    documented = bundle_comments(config_files)
    rows = []
    for key, value in config.items():
        if key.startswith("_") or "#" in key or key in ("imports", "initialize", "finalize") or _is_wiring(value):
            continue
        meaning = str(config.get(f"_comment_{key}", "") or documented.get(key) or GLOSSARY.get(key, ""))
        if isinstance(value, str) and value.startswith(("$", "@")) and not meaning:
            continue  # an undocumented expression is wiring (objects built from other keys), not a setting
        rows.append((key, value, meaning))
    return rows


def format_settings(rows: list[tuple[str, Any, str]]) -> str:
    width = max((len(k) for k, _, _ in rows), default=0)
    lines = []
    for key, value, meaning in rows:
        default = json.dumps(value) if not isinstance(value, str) else value
        if len(default) > 70:
            default = default[:67] + "..."
        lines.append(f"--{key:<{width}}  {default}" + (f"\n  {'':<{width}}  {meaning}" if meaning else ""))
    return "\n".join(lines)


def print_settings(argv: list[str] | None = None) -> None:
    """Print the settings of the configs given to ``python -m monai.bundle run settings --config_file ...``."""
    from brainsynth.engine.training import monai_runner_arguments

    parsed = monai_runner_arguments(argv)
    files = parsed[0].get("config_file") if parsed else None
    if not files:
        raise ValueError("give the configs: python -m monai.bundle run settings --config_file CONFIG [...]")
    if files.startswith("["):
        files = ast.literal_eval(files)
    print(f"Settings of {files} (set any with --<key> <value>; a later config overrides an earlier one):\n")
    print(format_settings(user_settings(files)))
