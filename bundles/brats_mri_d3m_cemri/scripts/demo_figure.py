"""PNG of a synthesis beside the real scan: input T1, real T1ce, synthetic T1ce, predicted mask (+ sd map).

    python scripts/demo_figure.py [--config_file configs/inference.json configs/demo.json] [--bundle_root .]
                                  [--subject ID] [--out outputs/demo_synthesis.png]

Reads the rows and output folder the given inference configs define (the first held-out subject by default),
and writes the PNG with brainsynth.engine.preview (axial, coronal and sagittal views, ground-truth labels outlined).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser

from brainsynth.data.reader import read_nifti


def print_demo_ratios(items, writer, dataset_dir, target_modality: str = "t1ce") -> dict:
    """The demo's last words: region ratios (CSF, edema, enhancing tumour over white matter) of each synthetic
    T1ce beside the real T1ce of the same subject, from the simulated cohort's ground truth (``writer``: the
    inference postprocessing's ``SaveSynthesisd``, for the file names). Returns {"generated", "real", "agree"}."""
    from brainsynth.metrics.contrast import cohort_ratio_table, print_ratio_table

    files = {
        str(r["subject"]): {target_modality: writer.paths(str(r["subject"]), writer.layout(r))["image"]} for r in items
    }
    table, agree, generated, real = cohort_ratio_table(Path(dataset_dir) / "datalist.json", files)
    print_ratio_table(
        f"Mean intensity of a region over white matter in the synthetic {target_modality} of {len(files)} held-out "
        "subject(s), the real scan in brackets (enhancing tumour bright on T1ce; CSF and edema dark):",
        table,
        agree,
    )
    return {"generated": generated, "real": real, "agree": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", nargs="+", default=["configs/inference.json", "configs/demo.json"])
    parser.add_argument("--bundle_root", default=".")
    parser.add_argument("--subject", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    config = ConfigParser()
    config.read_config(args.config_file)
    config["bundle_root"] = args.bundle_root
    rows = config.get_parsed_content("rows")
    from brainsynth.data import select_split

    rows = select_split(rows, config.get_parsed_content("split"))
    row = next((r for r in rows if r["subject"] == args.subject), None) if args.subject else rows[0]
    if row is None:
        raise SystemExit(f"subject {args.subject} not found; subjects: {', '.join(r['subject'] for r in rows)}")
    out_dir = Path(config.get_parsed_content("output_dir"))
    subject, target = row["subject"], config.get_parsed_content("target_modality")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle folder, for its scripts package
    from scripts.slices import SaveSynthesisd

    writer = SaveSynthesisd("pred", out_dir, target_modality=target, save_uncertainty=True)
    names = writer.paths(subject, writer.layout(row))
    synthetic = names["image"]
    if not synthetic.is_file():
        raise SystemExit(f"{synthetic}: not found; run the inference workflow first")
    volumes = {
        "T1 (input)": read_nifti(row["t1w"], np.float64)[0],
        "T1ce real": read_nifti(row[target], np.float64)[0],
        "T1ce synthetic": read_nifti(synthetic, np.float64)[0],
    }
    for key, name in (("mask", "mask predicted"), ("sd", "uncertainty (sd)")):
        if names[key].is_file():
            volumes[name] = read_nifti(names[key], np.float64)[0]
    from brainsynth.engine.preview import save_preview

    seg = read_nifti(row["seg"], np.float64)[0] if row.get("seg") else None
    out = Path(args.out) if args.out else out_dir.parent / "demo_synthesis.png"
    save_preview(volumes, out, seg=seg, overwrite=args.overwrite)
    print(out)


if __name__ == "__main__":
    main()
