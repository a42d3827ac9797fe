"""Verify every bundle the way MONAI's model zoo does, plus our own rules. One command, run in CI:

    python ci/verify_bundles.py                     # all bundles under bundles/
    python ci/verify_bundles.py --bundles brats_mri_med_ddpm --static   # skip the workflow runs
    python ci/verify_bundles.py --online            # also fetch the metadata schema from its URL

Checks, per bundle:
  files        LICENSE, configs/{metadata,inference,train*,multi_gpu_train*,demo}.json, logging.conf (accepted by
               MONAI's own logging-file validator), docs/README.md (saying what ``monai.bundle.load`` returns),
               docs/data_license.txt
  metadata     configs/metadata.json valid against meta_schema_20240725 (the copy in
               ../shared/reference/monai-schema/, or the schema's URL with --online); its version in the changelog
  configs      every runnable config imports brainsynth and calls reject_unknown_overrides() first in
               ``initialize``; MONAI's required workflow properties present (ConfigWorkflow.check_properties);
               every train config has a multi-GPU overlay
  net_in_out   MONAI's verify_net_in_out (Python API) for each network with a ``<net>_data_format`` in metadata
  overrides    an unknown ``--key`` is rejected with the list of valid keys: statically for every runnable
               config, and once through ``python -m monai.bundle run`` itself
  runs         every train config runs one iteration and every inference config runs once, with the bundle's
               demo overlay on tiny simulated-cohort data, in a scratch copy of the bundle (the repo stays clean)

Exit status 0 only when every check passes; a table of results (with seconds per check) is printed.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO / "bundles"
SCHEMA_DIRS = (REPO.parent / "shared" / "reference" / "monai-schema", REPO / "ci" / "monai-schema")
SCHEMA_NAME = "meta_schema_20240725.json"
REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/demo.json",
                  "configs/logging.conf", "docs/README.md", "docs/data_license.txt")
RUN_IDS = {"train": ("training", "run"), "infer": ("inference", "run", "evaluating")}
UNKNOWN_KEY = "surely_not_a_config_key"
INIT_FIRST = "reject_unknown_overrides()"
REF = re.compile(r"@([A-Za-z_][\w#:]*)")


@dataclass
class Check:
    bundle: str
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


@dataclass
class BundleConfigs:
    """The config files of one bundle, sorted into what they are for (by MONAI-zoo file-name conventions)."""

    root: Path
    train: list[str] = field(default_factory=list)        # train*.json
    infer: list[str] = field(default_factory=list)        # inference*.json
    evaluate: list[str] = field(default_factory=list)     # evaluate*.json
    multi_gpu: list[str] = field(default_factory=list)    # multi_gpu*.json
    demo: list[str] = field(default_factory=list)         # demo*.json
    other: list[str] = field(default_factory=list)        # ablation overlays and anything else

    @property
    def runnable(self) -> list[str]:
        return self.train + self.infer + self.evaluate


def discover_bundles(bundles_dir: Path = BUNDLES_DIR) -> list[Path]:
    return sorted(p.parent.parent for p in Path(bundles_dir).glob("*/configs/metadata.json"))


def classify_configs(bundle_dir: Path) -> BundleConfigs:
    found = BundleConfigs(Path(bundle_dir))
    for path in sorted((Path(bundle_dir) / "configs").glob("*.json")):
        name = path.name
        if name == "metadata.json":
            continue
        for prefix, bucket in (("multi_gpu", found.multi_gpu), ("train", found.train), ("inference", found.infer),
                               ("evaluate", found.evaluate), ("demo", found.demo)):
            if name.startswith(prefix):
                bucket.append(name)
                break
        else:
            found.other.append(name)
    return found


def load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e


def _defined_ids(config: Any, prefix: str = "") -> set[str]:
    ids: set[str] = set()
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for k, v in items:
        key = f"{prefix}#{k}" if prefix else str(k)
        ids.add(key)
        ids |= _defined_ids(v, key)
    return ids


def _referenced_ids(config: Any) -> set[str]:
    refs: set[str] = set()
    if isinstance(config, dict):
        for v in config.values():
            refs |= _referenced_ids(v)
    elif isinstance(config, list):
        for v in config:
            refs |= _referenced_ids(v)
    elif isinstance(config, str) and (config.startswith("$") or config.startswith("@")):
        refs |= {r.replace("::", "#") for r in REF.findall(config)}
    return refs


def config_stack(bundle_dir: Path, name: str, candidates: list[str]) -> list[str]:
    """The configs to merge, in order, to run ``name``: a stage that refers to ids another config of the same kind
    defines (e.g. a diffusion stage on top of its autoencoder stage) is merged on top of that config, MONAI's
    ``--config_file "['a.json','b.json']"`` way."""
    configs = {c: load_json(Path(bundle_dir) / "configs" / c) for c in candidates}
    stack = [name]
    missing = _referenced_ids(configs[name]) - _defined_ids(configs[name])
    for other in candidates:
        if other == name or not missing:
            continue
        provided = {m for m in missing if m in _defined_ids(configs[other])}
        if provided:
            stack.insert(len(stack) - 1, other)
            missing -= _defined_ids(configs[other])
    return stack


def multi_gpu_overlay(configs: BundleConfigs, train_name: str) -> str | None:
    stem = Path(train_name).stem  # train_diffusion -> multi_gpu_train_diffusion.json, else multi_gpu_train.json
    for candidate in (f"multi_gpu_{stem}.json", "multi_gpu_train.json"):
        if candidate in configs.multi_gpu:
            return candidate
    return None


def run_id_for(config: dict, kind: str) -> str:
    for run_id in RUN_IDS[kind]:
        if run_id in config:
            return run_id
    raise ValueError(f"none of the run ids {RUN_IDS[kind]} is defined")


# --- static checks --------------------------------------------------------------------------------------------
def check_files(bundle_dir: Path, configs: BundleConfigs) -> list[str]:
    problems = [f"missing {f}" for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]
    if not configs.train:
        problems.append("no configs/train*.json")
    readme = bundle_dir / "docs" / "README.md"
    if readme.is_file() and "monai.bundle.load" not in readme.read_text(encoding="utf-8"):
        problems.append("docs/README.md does not say what monai.bundle.load returns for this bundle")
    logging_conf = bundle_dir / "configs" / "logging.conf"
    if logging_conf.is_file():
        from monai.bundle.workflows import _reject_executable_logging_config

        try:
            _reject_executable_logging_config(str(logging_conf))
        except Exception as e:  # MONAI's own validator: python -m monai.bundle run would refuse the file too
            problems.append(f"configs/logging.conf rejected by MONAI: {e}")
    return problems


def find_schema(url: str | None, schema_path: Path | None = None) -> Path | None:
    if schema_path is not None:
        return Path(schema_path)
    name = Path(url).name if url else SCHEMA_NAME
    for d in SCHEMA_DIRS:
        if (d / name).is_file():
            return d / name
    return None


def check_metadata(bundle_dir: Path, schema_path: Path | None = None, online: bool = False) -> list[str]:
    import jsonschema

    meta_path = bundle_dir / "configs" / "metadata.json"
    meta = load_json(meta_path)
    problems = []
    url = meta.get("schema")
    if not url or not str(url).endswith(SCHEMA_NAME):
        problems.append(f"schema is {url!r}; expected MONAI's {SCHEMA_NAME} URL")
    local = find_schema(url, schema_path)
    if local is not None:
        schema = load_json(local)
        validator = jsonschema.validators.validator_for(schema)(schema)
        for err in sorted(validator.iter_errors(meta), key=lambda e: list(e.path)):
            where = "/".join(str(p) for p in err.path) or "(top level)"
            problems.append(f"metadata.json {where}: {err.message}")
    if online or local is None:
        from monai.bundle import verify_metadata

        try:
            with tempfile.TemporaryDirectory() as tmp:
                verify_metadata(meta_file=str(meta_path), filepath=str(Path(tmp) / SCHEMA_NAME))
        except Exception as e:
            where = f"the schema URL {url}" if local is not None else f"{url} (no local copy in {SCHEMA_DIRS[0]})"
            problems.append(f"metadata.json against {where}: {str(e).splitlines()[-1] if str(e) else e!r}")
    version = meta.get("version")
    if version not in (meta.get("changelog") or {}):
        problems.append(f"version {version!r} is not in the changelog {list(meta.get('changelog') or {})}")
    return problems


def _workflow_type(kind: str) -> str:
    return "train" if kind == "train" else "infer"


def check_configs(bundle_dir: Path, configs: BundleConfigs) -> list[str]:
    from monai.bundle import ConfigWorkflow

    problems = []
    cfg_dir = bundle_dir / "configs"
    for name in configs.runnable:
        try:
            config = load_json(cfg_dir / name)
        except ValueError as e:
            problems.append(str(e))
            continue
        imports = config.get("imports", [])
        stack = config_stack(bundle_dir, name, configs.train if name in configs.train else configs.runnable)
        if stack[0] == name and not any(re.search(r"\bimport brainsynth\b", i) for i in imports):
            problems.append(f"{name}: 'imports' lacks \"$import brainsynth\"")
        init = [config.get("initialize")] if isinstance(config.get("initialize"), str) else config.get("initialize")
        if stack[0] == name and (not init or INIT_FIRST not in str(init[0])):
            problems.append(f"{name}: the first 'initialize' item must be $brainsynth.training.{INIT_FIRST}")
        kind = "train" if name in configs.train else "infer"
        files = [str(cfg_dir / c) for c in stack]
        try:
            workflow = ConfigWorkflow(config_file=files, meta_file=str(cfg_dir / "metadata.json"),
                                      logging_file=False, workflow_type=_workflow_type(kind))
            run_id_for(workflow.parser.config, kind)
            missing = workflow.check_properties()
            if missing:
                problems.append(f"{'+'.join(stack)}: MONAI {kind} properties missing or with a wrong id: {missing}")
        except Exception as e:
            problems.append(f"{'+'.join(stack)}: {e}")
    for name in configs.train:
        if multi_gpu_overlay(configs, name) is None:
            problems.append(f"{name}: no multi-GPU overlay (multi_gpu_{Path(name).stem}.json or multi_gpu_train.json)")
    return problems


def _forward_extras(net: Any, io: dict, device: str) -> dict:
    """Extra forward arguments beyond the image: described in metadata inputs after the first (e.g. ``timesteps``,
    ``context``) or, for diffusion networks, the timestep a forward pass always needs."""
    import torch
    from monai.utils import get_equivalent_dtype

    params = inspect.signature(net.forward).parameters
    names = list(params)[1:]
    extras = {}
    for name, spec in list(io.get("inputs", {}).items())[1:]:
        if name not in params or not isinstance(spec, dict):
            continue
        dtype = get_equivalent_dtype(spec.get("dtype", "float32"), torch.Tensor)
        if name == "timesteps":
            high = int(max(spec.get("value_range", [0, 1])))
            extras[name] = torch.randint(0, max(high, 1), (1,), device=device)
            continue
        shape = (1, int(spec["num_channels"]), *[int(s) for s in spec.get("spatial_shape", [])])
        low, high = (spec.get("value_range") or [0, 1])[:2]
        if dtype.is_floating_point:
            extras[name] = torch.rand(*shape, dtype=dtype, device=device) * (high - low) + low
        else:
            extras[name] = torch.randint(int(low), int(high) + 1, shape, dtype=dtype, device=device)
    for name in names:
        p = params[name]
        if name not in extras and name == "timesteps" and p.default is inspect.Parameter.empty:
            extras[name] = torch.randint(0, 10, (1,), device=device)
    return extras


def check_net_in_out(bundle_dir: Path, configs: BundleConfigs) -> tuple[list[str], list[str]]:
    """verify_net_in_out for each ``<net>_data_format`` (``network_data_format`` -> ``network_def``) found in a
    config; returns (problems, what was verified)."""
    import torch
    from monai.bundle import ConfigParser, verify_net_in_out

    cfg_dir = bundle_dir / "configs"
    meta = load_json(cfg_dir / "metadata.json")
    formats = {k: v for k, v in meta.items() if k.endswith("_data_format")}
    problems, verified = [], []
    for fmt_key, io in formats.items():
        net = fmt_key[: -len("_data_format")]
        candidates = ["network_def"] if net == "network" else [f"{net}_def", net]
        located = None
        for name in configs.infer + configs.evaluate + configs.train:
            stack = config_stack(bundle_dir, name, configs.runnable)
            parser = ConfigParser()
            parser.read_config([str(cfg_dir / c) for c in stack])
            net_id = next((c for c in candidates if c in parser), None)
            if net_id:
                located = (stack, net_id)
                break
        if located is None:
            problems.append(f"metadata {fmt_key}: none of {candidates} is defined in any config")
            continue
        stack, net_id = located
        files = [str(cfg_dir / c) for c in stack]
        try:
            parser = ConfigParser()
            parser.read_config(files)
            network = parser.get_parsed_content(net_id)
            extras = _forward_extras(network, io, "cpu")
            del network
            torch.manual_seed(0)
            verify_net_in_out(net_id=net_id, meta_file=str(cfg_dir / "metadata.json"), config_file=files,
                              device="cpu", extra_forward_args=extras, **{"_meta_#network_data_format": io})
            verified.append(f"{net_id} ({'+'.join(stack)}; extra args: {sorted(extras) or 'none'})")
        except Exception as e:
            problems.append(f"verify_net_in_out {net_id} in {'+'.join(stack)}: {type(e).__name__}: {e}")
    if "network_data_format" not in formats:
        problems.append("metadata.json has no network_data_format")
    return problems, verified


def check_overrides_static(bundle_dir: Path, configs: BundleConfigs) -> list[str]:
    from brainsynth.training import check_overrides

    problems = []
    for name in configs.runnable:
        stack = config_stack(bundle_dir, name, configs.train if name in configs.train else configs.runnable)
        files = [str(bundle_dir / "configs" / c) for c in stack]
        try:
            check_overrides(files, {UNKNOWN_KEY: 1})
            problems.append(f"{'+'.join(stack)}: --{UNKNOWN_KEY} was accepted")
        except KeyError as e:
            if "valid keys" not in str(e):
                problems.append(f"{'+'.join(stack)}: rejected without listing the valid keys: {e}")
    return problems


def check_overrides_cli(bundle_dir: Path, configs: BundleConfigs, timeout: float = 300) -> list[str]:
    """Through MONAI's own runner: the command must fail before training and name the valid keys."""
    name = (configs.train or configs.infer)[0]
    kind = "train" if name in configs.train else "infer"
    stack = config_stack(bundle_dir, name, configs.train if kind == "train" else configs.runnable)
    run_id = run_id_for(_merged(bundle_dir, stack), kind)
    config_arg = repr([f"configs/{c}" for c in stack]) if len(stack) > 1 else f"configs/{stack[0]}"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_arg, f"--{UNKNOWN_KEY}", "1"]
    proc = subprocess.run(cmd, cwd=bundle_dir, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return [f"`{' '.join(cmd[1:])}` exited 0: the unknown key was silently accepted"]
    if UNKNOWN_KEY not in out or "valid keys" not in out:
        return [f"`{' '.join(cmd[1:])}` failed without naming the key and the valid ones:\n{out[-2000:]}"]
    return []


def _merged(bundle_dir: Path, stack: list[str]) -> dict:
    merged: dict = {}
    for c in stack:
        merged.update(load_json(bundle_dir / "configs" / c))
    return merged


# --- workflow runs ------------------------------------------------------------------------------------------
def scratch_copy(bundle_dir: Path, work: Path) -> Path:
    """Copy configs/, docs/, scripts/ and LICENSE into a scratch bundle root so runs write nowhere in the repo."""
    dest = work / bundle_dir.name
    if dest.exists():
        return dest
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "models", "eval", "runs", "outputs", "demo_data")
    shutil.copytree(bundle_dir, dest, ignore=ignore)
    return dest


def run_workflow(bundle_root: Path, stack: list[str], kind: str, max_iterations: int | None,
                 overrides: dict | None = None, timeout: float = 600) -> dict:
    """Run one workflow in a fresh process through ConfigWorkflow (what ``monai.bundle run`` does), optionally
    stopping every engine after ``max_iterations``; returns the probe's report (iterations, losses, new files)."""
    report = Path(tempfile.mkstemp(prefix="probe_", suffix=".json")[1])
    spec = {"bundle_root": str(bundle_root), "configs": [str(bundle_root / "configs" / c) for c in stack],
            "kind": kind, "max_iterations": max_iterations, "overrides": overrides or {}, "report": str(report)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)], cwd=bundle_root,
                          capture_output=True, text=True, timeout=timeout, env=env)
    result = json.loads(report.read_text()) if report.stat().st_size else {}
    report.unlink()
    result.update(returncode=proc.returncode, seconds=time.time() - started, output=(proc.stdout + proc.stderr))
    return result


def _probe(spec: dict) -> None:
    """Subprocess side of run_workflow."""
    import torch
    from ignite.engine import Engine, Events
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(1)
    from brainsynth.training import check_overrides

    root = Path(spec["bundle_root"])
    before = {p for p in root.rglob("*") if p.is_file()}
    engines: list[dict] = []
    original_run = Engine.run

    def counting_run(engine, *args, **kwargs):
        record = {"engine": type(engine).__name__, "iterations": 0, "losses": []}
        engines.append(record)

        def count(e):
            record["iterations"] = e.state.iteration
            out = e.state.output
            loss = out.get("loss") if isinstance(out, dict) else out if torch.is_tensor(out) else None
            if torch.is_tensor(loss) and loss.numel() == 1:
                record["losses"].append(float(loss))
            if spec["max_iterations"] and e.state.iteration >= spec["max_iterations"]:
                e.terminate()

        if not engine.has_event_handler(count, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, count)
        try:
            return original_run(engine, *args, **kwargs)
        finally:
            engine.remove_event_handler(count, Events.ITERATION_COMPLETED)

    Engine.run = counting_run
    overrides = {"bundle_root": str(root), **spec["overrides"]}
    check_overrides(spec["configs"], overrides)  # never add a key the configs do not define
    workflow = ConfigWorkflow(config_file=spec["configs"], meta_file=str(root / "configs" / "metadata.json"),
                              logging_file=str(root / "configs" / "logging.conf"),
                              workflow_type=_workflow_type(spec["kind"]),
                              run_id=run_id_for(_merged(root, [Path(c).name for c in spec["configs"]]), spec["kind"]),
                              **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    after = {p for p in root.rglob("*") if p.is_file()}
    Path(spec["report"]).write_text(json.dumps({
        "engines": engines,
        "new_files": sorted(str(p.relative_to(root)) for p in after - before)}))


def run_checks(bundle_dir: Path, configs: BundleConfigs, work: Path, timeout: float) -> list[tuple[str, list[str]]]:
    """Train configs for one iteration (dependency order), then inference configs once, in one scratch copy."""
    root = scratch_copy(bundle_dir, work)
    results = []
    demo = configs.demo[:1]
    for name in configs.train:
        stack = config_stack(bundle_dir, name, configs.train) + demo
        label = f"train {'+'.join(stack)}"
        r = run_workflow(root, stack, "train", max_iterations=1, timeout=timeout)
        problems = _run_problems(r)
        trainers = [e for e in r.get("engines", []) if e["iterations"] and "Trainer" in e["engine"]]
        if not problems and not trainers:
            problems.append(f"no trainer ran an iteration (engines: {r.get('engines')})")
        for e in trainers:
            bad = [x for x in e["losses"] if not (x == x and abs(x) != float("inf"))]
            if bad:
                problems.append(f"{e['engine']}: non-finite loss {bad}")
        results.append((f"{label} ({r['seconds']:.0f} s)", problems))
    for name in configs.infer:
        stack = config_stack(bundle_dir, name, configs.runnable) + demo
        label = f"infer {'+'.join(stack)}"
        r = run_workflow(root, stack, "infer", max_iterations=None, timeout=timeout)
        problems = _run_problems(r)
        outputs = [f for f in r.get("new_files", []) if f.endswith((".nii.gz", ".nii"))]
        if not problems and not outputs:
            problems.append(f"wrote no NIfTI output (new files: {r.get('new_files')})")
        results.append((f"{label} ({r['seconds']:.0f} s, {len(outputs)} NIfTI)", problems))
    return results


def _run_problems(result: dict) -> list[str]:
    if result["returncode"] != 0:
        return [f"exit {result['returncode']}:\n{_tail(result['output'])}"]
    return []


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- driver -----------------------------------------------------------------------------------------------
def _timed(bundle: str, name: str, fn: Callable[[], list[str]]) -> Check:
    started = time.time()
    try:
        problems = fn()
    except Exception as e:
        problems = [f"{type(e).__name__}: {e}\n{_tail(traceback.format_exc(), 8)}"]
    return Check(bundle, name, not problems, "\n".join(problems), time.time() - started)


def verify_bundle(bundle_dir: Path, work: Path, runs: bool = True, schema_path: Path | None = None,
                  online: bool = False, timeout: float = 600) -> list[Check]:
    bundle_dir = Path(bundle_dir)
    b = bundle_dir.name
    configs = classify_configs(bundle_dir)
    checks = [
        _timed(b, "files", lambda: check_files(bundle_dir, configs)),
        _timed(b, "metadata", lambda: check_metadata(bundle_dir, schema_path, online)),
        _timed(b, "configs", lambda: check_configs(bundle_dir, configs)),
    ]
    verified: list[str] = []

    def net_in_out():
        problems, done = check_net_in_out(bundle_dir, configs)
        verified.extend(done)
        return problems

    checks.append(_timed(b, "net_in_out", net_in_out))
    if verified:
        checks[-1].detail = "\n".join(filter(None, [checks[-1].detail, "verified: " + "; ".join(verified)]))
    checks.append(_timed(b, "overrides", lambda: check_overrides_static(bundle_dir, configs)
                         + check_overrides_cli(bundle_dir, configs)))
    if runs:
        started = time.time()
        try:
            for label, problems in run_checks(bundle_dir, configs, work, timeout):
                checks.append(Check(b, f"run {label}", not problems, "\n".join(problems), time.time() - started))
                started = time.time()
        except Exception as e:
            checks.append(Check(b, "runs", False, f"{type(e).__name__}: {e}", time.time() - started))
    return checks


def format_report(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{'PASS' if c.ok else 'FAIL'}  {c.bundle:28s} {c.name}  [{c.seconds:.1f} s]")
        if c.detail and (not c.ok or c.name == "net_in_out"):
            lines += [f"        {line}" for line in c.detail.splitlines()]
    passed = sum(c.ok for c in checks)
    lines.append(f"{passed} passed, {len(checks) - passed} failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", nargs="*", help="bundle names (default: all under bundles/)")
    parser.add_argument("--static", action="store_true", help="skip the train/inference runs")
    parser.add_argument("--online", action="store_true", help="also validate against the schema URL")
    parser.add_argument("--schema", type=Path, default=None, help="a local copy of the metadata schema")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for runs (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per workflow run")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        _probe(json.loads(args.probe))
        return 0
    available = {p.name: p for p in discover_bundles()}
    names = args.bundles or sorted(available)
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        print(f"error: unknown bundle(s) {unknown}; available: {sorted(available)}", file=sys.stderr)
        return 2
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="verify_bundles_") as tmp:
        work = args.work or Path(tmp)
        checks = []
        for name in names:
            checks += verify_bundle(available[name], work, not args.static, args.schema, args.online, args.timeout)
    print(format_report(checks))
    print(f"verification of {len(names)} bundle(s) took {time.time() - started:.0f} s")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
