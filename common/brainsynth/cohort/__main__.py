"""CLI: ``python -m brainsynth.cohort --out DIR --subjects N --seed S [--spacing 3] [--shape 96 96 64]
[--layout brats2023|brats2021|msd] [--pathologies healthy glioblastoma ...] [--preview] [--overwrite]``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from brainsynth.conventions import LAYOUTS, PATHOLOGIES


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brainsynth.cohort",
        description="Simulate a BraTS-like cohort (T1w, T1ce, T2w, FLAIR, PD, segmentation, brain mask) with a "
        "datalist.json. Deterministic for a seed; an existing identical cohort is reused.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        default=None,
        help="voxel size in mm, one value or three (default: 1 mm BraTS grid)",
    )
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="grid shape (default 240 240 155)")
    parser.add_argument("--layout", choices=LAYOUTS, default="brats2023", help="file layout (default brats2023)")
    parser.add_argument(
        "--pathologies",
        nargs="+",
        default=None,
        help=f"assigned to subjects in turn (default: {' '.join(PATHOLOGIES)})",
    )
    parser.add_argument("--preview", action="store_true", help="also write preview.png (a montage) in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a different cohort in --out")
    parser.add_argument("--quiet", action="store_true", help="no per-subject timing lines")
    args = parser.parse_args(argv)
    if args.spacing is not None and len(args.spacing) not in (1, 3):
        parser.error("--spacing takes one value or three")

    from brainsynth.cohort.layout import CohortError, generate_cohort
    from brainsynth.engine.io import OutputExistsError

    start = time.perf_counter()
    try:
        spacing = None if args.spacing is None else (args.spacing[0] if len(args.spacing) == 1 else args.spacing)
        datalist = generate_cohort(
            args.out,
            args.subjects,
            seed=args.seed,
            spacing=spacing,
            shape=args.shape,
            layout=args.layout,
            pathologies=args.pathologies,
            overwrite=args.overwrite,
            verbose=not args.quiet,
        )
        print(f"{datalist} ({time.perf_counter() - start:.1f} s)")
        if args.preview:
            from brainsynth.engine.preview import preview_cohort

            target = datalist.parent / "preview.png"
            if target.exists() and not args.overwrite:
                print(f"{target} (kept: it exists; --overwrite replaces it)")
            else:
                print(preview_cohort(datalist.parent, target, overwrite=args.overwrite))
    except (CohortError, OutputExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
