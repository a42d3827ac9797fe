"""CLI: ``python -m brainsynth.data check DIR [--modalities ...] [--require-seg]`` | ``discover DIR [--json]`` |
``provenance FILE_OR_DIR ...``.

``check`` and ``discover`` mark synthetic subjects (brainsynth provenance mark in a file's header or sidecar).

``check`` prints one line per subject (OK / UNUSABLE) with each problem below it, naming the file, and exits 1
when any subject is unusable (2 when the dataset itself cannot be read).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from brainsynth.data.check import check_items
from brainsynth.data.discover import discover
from brainsynth.data.errors import DatasetError
from brainsynth.data.items import available_modalities
from brainsynth.data.provenance import synthetic_files


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m brainsynth.data",
        description="Validate (check) or list (discover) a brain-MRI dataset: BraTS "
        "2021 / 2023 GLI / BraSyn / PEDs folders, MSD Task01, datalists.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("check", "validate a dataset and print a per-subject report"),
        ("discover", "list the subjects and files a dataset provides"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "path",
            help="dataset folder (BraTS 2021/2023/PEDs, MSD Task01, datalist.json inside) or a .json / .csv datalist",
        )
        p.add_argument(
            "--label-convention",
            default=None,
            help="override the inferred label convention (brats2021, brats2023, peds2024, msd, canonical)",
        )
        p.add_argument("--pathology", default=None, help="pathology for subjects the dataset does not label")
    check = sub.choices["check"]
    check.add_argument(
        "--modalities",
        nargs="+",
        default=None,
        help="modalities every subject must have (default: every modality any subject has)",
    )
    check.add_argument("--require-seg", action="store_true", help="a segmentation is required for every subject")
    check.add_argument("--headers-only", action="store_true", help="skip reading voxel data (fast, fewer checks)")
    check.add_argument("--workers", type=int, default=1, help="subjects checked in parallel")
    sub.choices["discover"].add_argument("--json", action="store_true", help="print the canonical rows as JSON")
    prov = sub.add_parser(
        "provenance",
        help="print the provenance record of generated volumes",
        description="exit 0: every file is marked synthetic; 1: some file carries no mark (real, "
        "or of unknown origin); 2: a file cannot be read",
    )
    prov.add_argument("paths", nargs="+", help="NIfTI files or folders")
    return parser


def _synthetic_note(files: list) -> str:
    return f"  SYNTHETIC ({len(files)} file{'s' * (len(files) != 1)})" if files else ""


def _run_check(args, rows) -> int:
    reports = check_items(rows, args.modalities, args.require_seg, not args.headers_only, args.workers)
    conventions = Counter(r.get("label_convention") for r in rows)
    layouts = Counter(r.get("layout") for r in rows)
    print(
        f"{args.path}: {len(rows)} subjects; layout {', '.join(map(str, layouts))}; "
        f"labels {', '.join(map(str, conventions))}"
    )
    width = max(len(r.subject) for r in reports)
    synthetic = [report.synthetic for report in reports]  # marks read from the headers the check read
    for row, report, marked in zip(rows, reports, synthetic):
        grid = ""
        if report.shape:
            grid = f"  {'x'.join(map(str, report.shape))} @ {'x'.join(f'{s:.3g}' for s in report.spacing)} mm"
        files = " ".join(report.modalities + [k for k in ("seg", "brain_mask") if row.get(k)])
        notes = f"  ({'; '.join(report.notes)})" if report.notes else ""
        print(
            f"{'OK' if report.usable else 'UNUSABLE':9s} {report.subject:{width}s}  {files}{grid}{notes}"
            f"{_synthetic_note(marked)}"
        )
        for problem in report.problems:
            print(f"    - {problem}")
    bad = sum(not r.usable for r in reports)
    synthetic = sum(bool(marked) for marked in synthetic)
    if synthetic:
        print(f"{synthetic} synthetic subject{'s' * (synthetic != 1)} (brainsynth provenance mark)")
    print(f"{len(reports)} subjects: {len(reports) - bad} usable, {bad} unusable")
    return 1 if bad else 0


def _run_discover(args, rows) -> int:
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        files = " ".join(available_modalities(row) + [k for k in ("seg", "brain_mask") if row.get(k)])
        try:
            note = _synthetic_note(synthetic_files(row))
        except DatasetError as e:  # discover lists; check says what is wrong with each file
            note = f"  UNREADABLE {str(e).split(': ')[0]} (run check)"
        print(
            f"{row['subject']}  split={row.get('split', '-')}  pathology={row.get('pathology', '-')}  "
            f"labels={row.get('label_convention')}  layout={row.get('layout')}  {files}{note}"
        )
    print(f"{len(rows)} subjects")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "provenance":
        from brainsynth.data.provenance import main as provenance_main

        return provenance_main(args.paths)
    try:
        rows = discover(args.path, label_convention=args.label_convention, pathology=args.pathology)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _run_check(args, rows) if args.command == "check" else _run_discover(args, rows)
    except DatasetError as e:  # every expected failure is reported per file above; this is the last resort
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
