"""Verify every bundle the way MONAI's model zoo does, plus our own rules. One command, run in CI:

    python ci/verify_bundles.py                     # all bundles under bundles/
    python ci/verify_bundles.py --bundles brats_mri_med_ddpm --static   # skip the workflow runs
    python ci/verify_bundles.py --online            # also fetch the metadata schema from its URL
    python ci/verify_bundles.py --sampling-steps 2  # the test suite's run: inference with a 2-step DDIM

Checks, per bundle:
  files        LICENSE, configs/{metadata,inference,train*,multi_gpu_train*,demo}.json, logging.conf (accepted by
               MONAI's own logging-file validator), docs/README.md (saying what ``monai.bundle.load`` returns),
               docs/data_license.txt
  metadata     configs/metadata.json valid against meta_schema_20240725 (the copy in ci/schemas/, or the
               schema's URL with --online); its version in the changelog
  configs      every runnable config imports brainsynth and calls reject_unknown_overrides() first in
               ``initialize``; MONAI's workflow properties (monai.bundle.properties) at the ids MONAI expects;
               every train config has a multi-GPU overlay; stages and overlays merge on the configs they build on
  tracking     every train config logs to TensorBoard (and its one-iteration run writes an event file), shows a
               progress bar (ignite ProgressBar) and writes preview PNGs every N iterations (TrainingPreview)
  monailabel   inference.json has what MONAI Label's monaibundle app reads: network_def + models/model.pt, an
               inferer, transforms that read the key "image" (the opt-in test serves it for real)
  net_in_out   MONAI's verify_net_in_out (Python API) for each network with a ``<net>_data_format`` in metadata
  export       (with --export DIR) each described network to TorchScript: script, else trace with its extra
               inputs, checked against the eager output; one that exports neither way must be explained in the README
  overrides    an unknown ``--key`` is rejected with the list of valid keys: statically for every runnable
               config, and once through ``python -m monai.bundle run`` itself
  runs         every train config runs one iteration and every inference config runs once (one batch), with the
               bundle's demo overlay on its simulated cohort cut to 8 subjects (or on --dataset-dir), in a
               scratch copy of the bundle (the repository stays clean); with --sampling-steps N the inference runs
               use the fast deterministic sampler for N steps (a smoke run: the samplers' own tests cover them)

Exit status 0 only when every check passes; a table of results (with seconds per check) is printed.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
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
SCHEMA_DIRS = (REPO / "ci" / "schemas",)  # a copy inside the repository: the verifier needs nothing beside it
SCHEMA_NAME = "meta_schema_20240725.json"
REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "configs/demo.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
)
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
    train: list[str] = field(default_factory=list)  # train*.json
    infer: list[str] = field(default_factory=list)  # inference*.json
    evaluate: list[str] = field(default_factory=list)  # evaluate*.json
    multi_gpu: list[str] = field(default_factory=list)  # multi_gpu*.json
    demo: list[str] = field(default_factory=list)  # demo*.json
    other: list[str] = field(default_factory=list)  # ablation overlays and anything else

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
        for prefix, bucket in (
            ("multi_gpu", found.multi_gpu),
            ("train", found.train),
            ("inference", found.infer),
            ("evaluate", found.evaluate),
            ("demo", found.demo),
        ):
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


def _defined_ids(config: Any) -> set[str]:
    from brainsynth.engine.training import config_ids

    return config_ids(config)


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
    """The configs to merge, in order, to run ``name``, MONAI's ``--config_file "['a.json','b.json']"`` way. A
    complete config (it defines ``bundle_root``) runs alone; a stage or overlay that refers to ids it does not
    define (a diffusion stage on its autoencoder stage, evaluate.json on inference.json) goes on top of the
    configs that define them, inference configs preferred."""
    configs = {c: load_json(Path(bundle_dir) / "configs" / c) for c in candidates}
    if "bundle_root" in configs[name]:  # a complete config stands alone; a missing id in it is its own fault
        return [name]

    def suffix(c: str) -> str:  # inference_autoencoder.json goes with train_autoencoder.json
        return Path(c).stem.partition("_")[2]

    # prefer a stage of the same name, then inference configs (evaluate.json on inference.json), then file order
    order = sorted(
        (c for c in candidates if c != name),
        key=lambda c: (
            suffix(c) != suffix(name) or not suffix(name),
            not c.startswith("inference"),
            candidates.index(c),
        ),
    )
    defined = {c: _defined_ids(configs[c]) for c in candidates}
    base: list[str] = []
    missing = _referenced_ids(configs[name]) - defined[name]
    for other in order:
        if missing & defined[other]:
            base.append(other)
            missing -= defined[other]
    base.sort(key=candidates.index)  # merge in file order: earlier stages first
    return base + [name]


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


def missing_properties(workflow: Any) -> list[str]:
    """MONAI's required workflow properties (monai.bundle.properties) whose config id is absent, and optional ones
    that the config refers to under another id: ConfigWorkflow.check_properties without instantiating anything (it
    would load the dataset and build the trainer), and reading "@a#b" and "@a::b" as the same reference."""
    from monai.utils import BundleProperty, BundlePropertyConfig

    def norm(ref: Any) -> Any:
        return ref.replace("#", "::") if isinstance(ref, str) else ref

    parser = workflow.parser
    missing = []
    for name, prop in (workflow.properties or {}).items():
        prop_id, ref_id = prop.get(BundlePropertyConfig.ID), prop.get(BundlePropertyConfig.REF_ID)
        if prop.get(BundleProperty.REQUIRED, False):
            if prop_id not in parser:
                missing.append(name)
            continue
        if ref_id is None:
            continue
        if name in ("evaluator", "val_interval"):  # referred to from a ValidationHandler, if any
            handlers = parser.get("train::handlers", []) if "train::handlers" in parser else []
            refs = [h.get(ref_id) for h in handlers if isinstance(h, dict) and h.get("_target_") == "ValidationHandler"]
        else:
            refs = [parser.get(ref_id, None)]
        for ref in refs:
            if isinstance(ref, str) and not ref.startswith("$") and norm(ref) != "@" + norm(prop_id):
                missing.append(f"{name} ({ref_id} is {ref!r}, MONAI expects '@{prop_id}')")
    return missing


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
            problems.append(f"{name}: the first 'initialize' item must be $brainsynth.engine.training.{INIT_FIRST}")
        kind = "train" if name in configs.train else "infer"
        files = [str(cfg_dir / c) for c in stack]
        try:
            workflow = ConfigWorkflow(
                config_file=files,
                meta_file=str(cfg_dir / "metadata.json"),
                logging_file=False,
                workflow_type=_workflow_type(kind),
            )
            run_id_for(workflow.parser.config, kind)
            missing = missing_properties(workflow)
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
        else:  # e.g. class indices whose vocabularies differ per channel: 0 is valid in every one
            extras[name] = torch.full(shape, int(max(low, min(0, high))), dtype=dtype, device=device)
    for name in names:
        p = params[name]
        if name not in extras and name == "timesteps" and p.default is inspect.Parameter.empty:
            extras[name] = torch.randint(0, 10, (1,), device=device)
    return extras


CPU_MAX_SIDE = 32


def cpu_sized(io: dict) -> tuple[dict, str]:
    """The network I/O with each concrete spatial size over CPU_MAX_SIDE replaced by its power-of-two factor (capped
    at CPU_MAX_SIDE): still a size the declared one is a multiple of, so down-sampling networks accept it, but a
    paper-scale 3D forward pass stays seconds on a CPU. Symbolic sizes ("16*n") are MONAI's own and kept."""
    import copy

    io = copy.deepcopy(io)
    changed = []
    for section in ("inputs", "outputs"):
        for spec in io.get(section, {}).values():
            shape = spec.get("spatial_shape") if isinstance(spec, dict) else None
            if not shape or spec.get("type") != "image":
                continue
            new = [
                d if not isinstance(d, int) or d <= CPU_MAX_SIDE or (d & -d) < 8 else min(d & -d, CPU_MAX_SIDE)
                for d in shape
            ]
            if new != shape:
                changed.append(f"{shape} -> {new}")
                spec["spatial_shape"] = new
    return io, f"; spatial size reduced for CPU: {changed[0]}" if changed else ""


#: networks whose data format is documented but whose forward MONAI's verify_net_in_out cannot check, with why
NET_IN_OUT_EXEMPT = {
    "autoencoder_def": "MONAI's AutoencoderKL.forward returns (reconstruction, mean, sigma) where verify_net_in_out "
    "expects one tensor; its shapes are tested in tests/test_ldm_autoencoder.py",
}


def check_net_in_out(bundle_dir: Path, configs: BundleConfigs) -> tuple[list[str], list[str]]:
    """verify_net_in_out for each ``<net>_data_format`` (``network_data_format`` -> ``network_def``) found in a
    config; returns (problems, what was verified)."""
    import torch
    from monai.bundle import ConfigParser, verify_net_in_out

    from brainsynth.engine.bundle_code import bundle_scripts

    cfg_dir = bundle_dir / "configs"
    formats = {k for k in load_json(cfg_dir / "metadata.json") if k.endswith("_data_format")}
    problems, verified = [], []
    for fmt_key, stack, net_id, io in _networks(bundle_dir, configs, cpu_size=False):
        if not stack:
            problems.append(f"metadata {fmt_key}: no config defines the network it describes ({net_id})")
            continue
        if net_id in NET_IN_OUT_EXEMPT:
            verified.append(f"{net_id}: not run ({NET_IN_OUT_EXEMPT[net_id]})")
            continue
        files = [str(cfg_dir / c) for c in stack]
        io, note = cpu_sized(io)
        try:
            with bundle_scripts(bundle_dir):  # `scripts` is this bundle's, whichever bundle was checked before
                parser = ConfigParser()
                parser.read_config(files)
                network = parser.get_parsed_content(net_id)
                extras = _forward_extras(network, io, "cpu")
                del network
                torch.manual_seed(0)
                verify_net_in_out(
                    net_id=net_id,
                    meta_file=str(cfg_dir / "metadata.json"),
                    config_file=files,
                    device="cpu",
                    extra_forward_args=extras,
                    **{"_meta_#network_data_format": io},
                )
            verified.append(f"{net_id} ({'+'.join(stack)}; extra args: {sorted(extras) or 'none'}{note})")
        except Exception as e:
            problems.append(f"verify_net_in_out {net_id} in {'+'.join(stack)}: {type(e).__name__}: {e}")
    if "network_data_format" not in formats:
        problems.append("metadata.json has no network_data_format")
    return problems, verified


def check_monailabel(bundle_dir: Path) -> list[str]:
    """What MONAI Label's stock monaibundle app needs from configs/inference.json (ci/monailabel/README.md):
    network_def whose weights are models/model.pt, an inferer, and transforms that read the volume it sends under
    the key "image" (``pre_transforms``, else ``preprocessing``)."""
    config = load_json(bundle_dir / "configs" / "inference.json")
    problems = [f"inference.json has no '{k}'" for k in ("network_def", "inferer") if k not in config]
    if "model.pt" not in json.dumps(config):
        problems.append(
            "inference.json never loads models/model.pt (MONAI Label and monai.bundle.load load "
            "network_def's weights from that file and skip a bundle without it)"
        )
    pre = config.get("pre_transforms") or config.get("preprocessing")
    transforms = pre.get("transforms", []) if isinstance(pre, dict) else pre if isinstance(pre, list) else []
    first = transforms[0] if transforms and isinstance(transforms[0], dict) else {}
    if "image" not in json.dumps(first.get("keys", "")):
        problems.append(
            "the first of pre_transforms (else preprocessing) does not read the key 'image', where "
            "MONAI Label puts the input volume; add MONAI-Label-only 'pre_transforms'/'post_transforms'"
        )
    return problems


TRACKING = {
    "TensorBoard logging (TensorBoardStatsHandler)": r"TensorBoardStatsHandler",
    "training progress bar (ignite ProgressBar)": r"ProgressBar",
    "preview PNGs during training (brainsynth.engine.training.TrainingPreview)": r"TrainingPreview",
}


def check_tracking(bundle_dir: Path, configs: BundleConfigs) -> list[str]:
    """Every train config (with the stages it builds on) logs to TensorBoard, shows a progress bar and writes
    preview images every N iterations (brainsynth.engine.training.TrainingPreview)."""
    problems = []
    for name in configs.train:
        stack = config_stack(bundle_dir, name, configs.train)
        text = "\n".join((bundle_dir / "configs" / c).read_text(encoding="utf-8") for c in stack)
        missing = [what for what, pattern in TRACKING.items() if not re.search(pattern, text)]
        if missing:
            problems.append(f"{'+'.join(stack)} lacks: {'; '.join(missing)}")
    return problems


def _networks(
    bundle_dir: Path, configs: BundleConfigs, cpu_size: bool = True
) -> list[tuple[str, list[str], str, dict]]:
    """(metadata format key, config stack, network id, I/O, at a CPU size unless ``cpu_size`` is False) for each
    ``<net>_data_format`` (``network_data_format`` -> ``network_def``); the stack is empty when no config defines
    the network (the id is then the first candidate)."""
    from monai.bundle import ConfigParser

    cfg_dir = bundle_dir / "configs"
    meta = load_json(cfg_dir / "metadata.json")
    found = []
    for fmt_key, io in ((k, v) for k, v in meta.items() if k.endswith("_data_format")):
        net = fmt_key[: -len("_data_format")]
        candidates = ["network_def"] if net == "network" else [f"{net}_def", net]
        for name in configs.infer + configs.evaluate + configs.train:
            stack = config_stack(bundle_dir, name, configs.runnable)
            parser = ConfigParser()
            parser.read_config([str(cfg_dir / c) for c in stack])
            net_id = next((c for c in candidates if c in parser), None)
            if net_id:
                found.append((fmt_key, stack, net_id, cpu_sized(io)[0] if cpu_size else io))
                break
        else:
            found.append((fmt_key, [], candidates[0], io))
    return found


def check_export(bundle_dir: Path, configs: BundleConfigs, out_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """TorchScript export of each described network: ``torch.jit.script`` (what ``monai.bundle ckpt_export``
    does), else ``torch.jit.trace`` with the network's extra inputs (ckpt_export can only trace one input), the
    traced module checked against the eager one on the same seeded call. A network that exports neither way must
    be explained in docs/README.md (a section mentioning "export"). Returns (problems, what was done)."""
    import torch
    from monai.bundle import ConfigParser
    from monai.utils import get_equivalent_dtype

    readme = bundle_dir / "docs" / "README.md"
    documented = readme.is_file() and "export" in readme.read_text(encoding="utf-8").lower()
    problems, done = [], []
    for fmt_key, stack, net_id, io in _networks(bundle_dir, configs):
        if not stack:
            problems.append(f"metadata {fmt_key}: {net_id} is defined in no config")
            continue
        parser = ConfigParser()
        parser.read_config([str(bundle_dir / "configs" / c) for c in stack])
        net = parser.get_parsed_content(net_id).eval()
        spec = next(iter(io["inputs"].values()))
        shape = [int(d) if isinstance(d, int) else 16 for d in spec["spatial_shape"]]
        x = torch.rand(
            1, int(spec["num_channels"]), *shape, dtype=get_equivalent_dtype(spec.get("dtype", "float32"), torch.Tensor)
        )
        extras = _forward_extras(net, io, "cpu")
        outcome = []
        try:
            module = torch.jit.script(net)
            outcome.append("TorchScript script OK")
        except Exception as e:
            module = None
            reason = str(e).strip().splitlines()[0][:80] if str(e).strip() else ""
            outcome.append(f"script fails ({type(e).__name__}: {reason})")
        if module is None:
            try:
                with torch.no_grad():
                    module = torch.jit.trace(net, (x, *extras.values()), check_trace=False)
                    torch.manual_seed(0)
                    eager = net(x, *extras.values())
                    torch.manual_seed(0)
                    traced = module(x, *extras.values())
                first = lambda o: o[0] if isinstance(o, (tuple, list)) else o
                if torch.allclose(first(eager), first(traced), atol=1e-4):
                    outcome.append(f"trace with {['x', *extras]} OK (output equals eager)")
                else:
                    module = None
                    outcome.append("trace runs but its output differs from eager")
            except Exception as e:
                module = None
                outcome.append(f"trace fails ({type(e).__name__})")
        if module is not None and out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            module.save(str(Path(out_dir) / f"{bundle_dir.name}_{net_id}.ts"))
        done.append(f"{net_id}: " + "; ".join(outcome))
        if module is None and not documented:
            problems.append(
                f"{net_id} exports neither by script nor by trace and docs/README.md says nothing about export"
            )
    return problems, done


# MONAI components whose optional dependency a config pulls in by name (MONAI itself only requires torch + numpy)
CONFIG_COMPONENT_PACKAGES = {
    "DiffusionModelUNet": "einops",
    "TensorBoardStatsHandler": "tensorboard",
    "TensorBoardImageHandler": "tensorboard",
    "LoadImage": "nibabel",
    "MLFlowHandler": "mlflow",
}
BASE_PACKAGES = {"monai", "torch", "numpy", "brainsynth"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(files: list[Path]) -> dict[str, Path]:
    """Top-level modules imported anywhere in ``files`` (also inside functions), except imports guarded by
    ``try: ... except ImportError`` (optional by design); maps each to a file that imports it."""
    found: dict[str, Path] = {}

    def visit(node: ast.AST, guarded: bool, path: Path) -> None:
        if isinstance(node, ast.Try):
            catches = {getattr(h.type, "id", None) for h in node.handlers}
            catches |= {
                getattr(e, "id", None) for h in node.handlers if isinstance(h.type, ast.Tuple) for e in h.type.elts
            }
            optional = bool(catches & {"ImportError", "ModuleNotFoundError"})
            for child in node.body:
                visit(child, guarded or optional, path)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded, path)
            return
        if not guarded and isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name.split(".")[0], path)
        elif not guarded and isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.setdefault(node.module.split(".")[0], path)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded, path)

    for f in files:
        visit(ast.parse(Path(f).read_text(encoding="utf-8")), False, Path(f))
    return found


def check_requirements(bundle_dir: Path, library_dir: Path = REPO / "common" / "brainsynth") -> list[str]:
    """Everything an unpacked archive imports beyond MONAI's base requirements (torch, numpy) must be listed in
    metadata.json's required_packages_version: the vendored brainsynth, the bundle's scripts, and the optional
    dependencies of MONAI components its configs use."""
    import importlib.metadata

    meta = load_json(bundle_dir / "configs" / "metadata.json")
    listed = {_normalise(k) for k in (meta.get("required_packages_version") or {})}
    files = sorted(library_dir.rglob("*.py")) + sorted((bundle_dir / "scripts").rglob("*.py"))
    local = {p.stem for p in (bundle_dir / "scripts").glob("*.py")} | {"scripts"}
    distributions = importlib.metadata.packages_distributions()
    needed: dict[str, str] = {}
    for module, where in imported_modules(files).items():
        if module in sys.stdlib_module_names or module in local or module in BASE_PACKAGES:
            continue
        for dist in distributions.get(module, [module]):
            if _normalise(dist) not in {_normalise(b) for b in BASE_PACKAGES}:
                shown = where.relative_to(REPO) if where.is_relative_to(REPO) else where
                needed.setdefault(_normalise(dist), f"imported by {shown}")
    for cfg in sorted((bundle_dir / "configs").glob("*.json")):
        text = cfg.read_text(encoding="utf-8")
        for component, dist in CONFIG_COMPONENT_PACKAGES.items():
            if re.search(rf"\b{component}\b", text):
                needed.setdefault(dist, f"{component} in configs/{cfg.name}")
    return [
        f"required_packages_version lacks {dist!r} ({why})"
        for dist, why in sorted(needed.items())
        if dist not in listed
    ]


def check_overrides_static(bundle_dir: Path, configs: BundleConfigs) -> list[str]:
    from brainsynth.engine.training import check_overrides

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
    cmd = [sys.executable, "-m", *bundle_run_args(bundle_dir, stack, kind), f"--{UNKNOWN_KEY}", "1"]
    proc = subprocess.run(
        cmd, cwd=bundle_dir, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
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
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "models", "eval", "runs", "outputs", "cache")
    shutil.copytree(bundle_dir, dest, ignore=ignore)
    return dest


PROBE_ENV = "BRAINSYNTH_ENGINE_PROBE"


def install_engine_probe() -> None:
    """Instrument this process (called from the sitecustomize that ``probe_environment`` writes): every ignite
    engine run is recorded (iterations, last losses, a checksum of a trainer's weights) and optionally stopped
    after ``max_iterations``; checkpoint writes (torch.save) are counted. The report is rewritten after each engine
    run to ``<report_dir>/probe_<pid>.json``, with the process's distributed rank and world size."""
    import atexit

    import torch
    from ignite.engine import Engine, Events

    settings = json.loads(os.environ[PROBE_ENV])
    report = Path(settings["report_dir"]) / f"probe_{os.getpid()}.json"
    state: dict = {"engines": [], "saves": []}
    original_run, original_save = Engine.run, torch.save

    def write() -> None:
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized()
        state.update(
            rank=dist.get_rank() if ready else int(os.environ.get("RANK", 0)),
            world_size=dist.get_world_size() if ready else int(os.environ.get("WORLD_SIZE", 1)),
        )
        if state["engines"]:
            report.write_text(json.dumps(state))

    def checksum(engine) -> float | None:
        network = getattr(engine, "network", None) or getattr(engine.state, "g_network", None)  # AdversarialTrainer
        if not isinstance(network, torch.nn.Module):
            return None
        return float(sum(p.detach().double().abs().sum() for p in network.parameters()))

    def describe(engine) -> dict | None:
        """What the engine's network was built as: acceleration wrappers, fused attention, memory format."""
        network = getattr(engine, "network", None) or getattr(engine.state, "g_network", None)
        if not isinstance(network, torch.nn.Module):
            return None
        modules = list(network.modules())
        five_d = next((p for p in network.parameters() if p.ndim == 5), None)
        return {
            "checkpoint_wrappers": sum(type(m).__name__ == "CheckpointWrapper" for m in modules),
            "flash_attention_blocks": sum(bool(getattr(m, "use_flash_attention", False)) for m in modules),
            "channels_last_3d": None
            if five_d is None
            else bool(five_d.is_contiguous(memory_format=torch.channels_last_3d) and not five_d.is_contiguous()),
        }

    def counting_run(engine, *args, **kwargs):
        trains = any(
            k.endswith("optimizer") and v is not None  # AdversarialTrainer keeps them in its state
            for k, v in [*vars(engine).items(), *vars(engine.state).items()]
        )
        record = {"engine": type(engine).__name__, "iterations": 0, "losses": [], "trains": trains}
        state["engines"].append(record)

        def count(e):
            record["iterations"] = e.state.iteration
            out = e.state.output
            out = out[0] if isinstance(out, list) and out else out
            values = [v for k, v in out.items() if "loss" in str(k)] if isinstance(out, dict) else [out]
            losses = [
                float(v)
                for v in values  # a decollated batch may carry the loss as a Python number
                if (torch.is_tensor(v) and v.numel() == 1) or isinstance(v, (int, float))
            ]
            if losses:  # the first loss of each iteration (e.g. "loss"; an adversarial trainer's reconstruction)
                record["losses"] = (record["losses"] + [losses[0]])[-5:]
            record["finite"] = record.get("finite", True) and all(math.isfinite(x) for x in losses)
            if settings.get("max_iterations") and e.state.iteration >= settings["max_iterations"]:
                e.terminate()

        engine.add_event_handler(Events.ITERATION_COMPLETED, count)
        try:
            return original_run(engine, *args, **kwargs)
        finally:
            engine.remove_event_handler(count, Events.ITERATION_COMPLETED)
            record["weights_checksum"] = checksum(engine)
            record["network"] = describe(engine)
            write()

    def counting_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):  # files only: torch.distributed pickles through in-memory buffers
            state["saves"].append(Path(str(f)).name)
        return original_save(obj, f, *args, **kwargs)

    Engine.run = counting_run
    torch.save = counting_save
    atexit.register(write)


def probe_environment(report_dir: Path, max_iterations: int | None) -> dict:
    """Environment for a subprocess (``python -m monai.bundle run ...``, also under torchrun) that installs the
    engine probe at interpreter start, through a sitecustomize module on PYTHONPATH."""
    hook = Path(report_dir) / "_hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if os.environ.get({PROBE_ENV!r}):\n"
        f"    sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "    import verify_bundles\n"
        "    verify_bundles.install_engine_probe()\n"
        "    sys.path.pop(0)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    env[PROBE_ENV] = json.dumps({"report_dir": str(report_dir), "max_iterations": max_iterations})
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def read_probe_reports(report_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(report_dir).glob("probe_*.json"))]


def bundle_run_args(bundle_dir: Path, stack: list[str], kind: str) -> list[str]:
    """``monai.bundle run RUN_ID --config_file ...`` (to follow ``python -m``), configs relative to the bundle."""
    run_id = run_id_for(_merged(bundle_dir, stack), kind)
    config_arg = repr([f"configs/{c}" for c in stack]) if len(stack) > 1 else f"configs/{stack[0]}"
    return ["monai.bundle", "run", run_id, "--config_file", config_arg]


def run_workflow(
    bundle_root: Path,
    stack: list[str],
    kind: str,
    max_iterations: int | None,
    extra_args: list[str] | None = None,
    timeout: float = 600,
    python: str = sys.executable,
) -> dict:
    """Run ``python -m monai.bundle run`` (MONAI's own runner) from ``bundle_root`` in a fresh process with the
    engine probe; returns the probe's report (engines, iterations, losses) plus new files and the output."""
    bundle_root = Path(bundle_root)
    before = {p for p in bundle_root.rglob("*") if p.is_file()}
    cmd = [
        python,
        "-m",
        *bundle_run_args(bundle_root, stack, kind),
        "--bundle_root",
        str(bundle_root),
        *(extra_args or []),
    ]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="probe_") as reports:
        proc = subprocess.run(
            cmd,
            cwd=bundle_root,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=probe_environment(Path(reports), max_iterations),
        )
        found = read_probe_reports(Path(reports))
    result = found[0] if found else {"engines": [], "saves": []}
    after = {p for p in bundle_root.rglob("*") if p.is_file()}
    result.update(
        returncode=proc.returncode,
        seconds=time.time() - started,
        output=proc.stdout + proc.stderr,
        command=" ".join(cmd[1:]),
        new_files=sorted(str(p.relative_to(bundle_root)) for p in after - before),
    )
    return result


SMALL_COHORT = 8  # subjects: six training, one validation, one test in the simulated cohort's split


def data_arguments(merged: dict, dataset_dir: Path | None) -> list[str]:
    """``--dataset_dir`` when a dataset is given; otherwise the demo overlay's own simulated cohort (its grid and
    pathologies, which its sizes are tuned to) shrunk to SMALL_COHORT subjects through its ``demo_cohort`` key."""
    if dataset_dir is not None:
        return ["--dataset_dir", str(dataset_dir)]
    cohort = merged.get("demo_cohort")
    if (
        merged.get("dataset_dir") == "demo"
        and isinstance(cohort, dict)
        and cohort.get("n_subjects", SMALL_COHORT + 1) > SMALL_COHORT
    ):
        return ["--demo_cohort", repr({**cohort, "n_subjects": SMALL_COHORT})]
    return []


def sampling_arguments(merged: dict, steps: int | None) -> list[str]:
    """With ``steps``: ``--sampler ddim --num_inference_steps STEPS`` for a config with those keys (the one
    vocabulary: every bundle's inference accepts DDIM), so an inference run is a quick smoke run; otherwise none
    (each config's own sampler, e.g. Med-DDPM's 250-step ancestral one)."""
    if steps is None or not {"sampler", "num_inference_steps"} <= set(merged):
        return []
    return ["--sampler", "ddim", "--num_inference_steps", str(steps)]


def run_checks(
    bundle_dir: Path,
    configs: BundleConfigs,
    work: Path,
    timeout: float,
    dataset_dir: Path | None = None,
    sampling_steps: int | None = None,
) -> list[tuple[str, list[str], float]]:
    """Train configs for one iteration (dependency order), then inference configs on one batch, in one scratch
    copy of the bundle with its demo overlay, on ``dataset_dir`` (default: the overlay's demo data, small), with
    ``sampling_steps`` DDIM steps when given (``sampling_arguments``)."""
    root = scratch_copy(bundle_dir, work)
    results = []
    demo = configs.demo[:1]
    stacks = sorted((config_stack(bundle_dir, name, configs.train) for name in configs.train), key=len)
    for stack in stacks:  # a stage before the stages built on it
        stack = stack + demo
        label = f"train {'+'.join(stack)}"
        r = run_workflow(
            root,
            stack,
            "train",
            max_iterations=1,
            timeout=timeout,
            extra_args=data_arguments(_merged(bundle_dir, stack), dataset_dir),
        )
        problems = _run_problems(r)
        trainers = [e for e in r.get("engines", []) if e["iterations"] and e["trains"]]
        if not problems and not trainers:
            problems.append(f"no trainer ran an iteration (engines: {r.get('engines')})")
        problems += [f"{e['engine']} ran {e['iterations']} iterations, not 1" for e in trainers if e["iterations"] != 1]
        if not problems and not any("tfevents" in f for f in r["new_files"]):
            problems.append("wrote no TensorBoard event file")
        problems += [f"{e['engine']}: a loss was not finite" for e in trainers if not e.get("finite", True)]
        results.append((label, problems, r["seconds"]))
    for name in configs.infer:
        stack = config_stack(bundle_dir, name, configs.runnable) + demo
        label = f"infer {'+'.join(stack)}"
        merged = _merged(bundle_dir, stack)
        r = run_workflow(
            root,
            stack,
            "infer",
            max_iterations=1,
            timeout=timeout,
            extra_args=data_arguments(merged, dataset_dir) + sampling_arguments(merged, sampling_steps),
        )
        problems = _run_problems(r)
        outputs = [f for f in r.get("new_files", []) if f.endswith((".nii.gz", ".nii"))]
        if not problems and not outputs:
            problems.append(f"wrote no NIfTI output (new files: {r.get('new_files')})")
        results.append((f"{label} ({len(outputs)} NIfTI written)", problems, r["seconds"]))
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


def verify_bundle(
    bundle_dir: Path,
    work: Path,
    runs: bool = True,
    schema_path: Path | None = None,
    online: bool = False,
    timeout: float = 600,
    dataset_dir: Path | None = None,
    export_dir: Path | None = None,
    sampling_steps: int | None = None,
) -> list[Check]:
    bundle_dir = Path(bundle_dir)
    b = bundle_dir.name
    configs = classify_configs(bundle_dir)
    checks = [
        _timed(b, "files", lambda: check_files(bundle_dir, configs)),
        _timed(b, "metadata", lambda: check_metadata(bundle_dir, schema_path, online)),
        _timed(b, "configs", lambda: check_configs(bundle_dir, configs)),
        _timed(b, "requirements", lambda: check_requirements(bundle_dir)),
        _timed(b, "tracking", lambda: check_tracking(bundle_dir, configs)),
        _timed(b, "monailabel", lambda: check_monailabel(bundle_dir)),
    ]
    verified: list[str] = []

    def net_in_out():
        problems, done = check_net_in_out(bundle_dir, configs)
        verified.extend(done)
        return problems

    checks.append(_timed(b, "net_in_out", net_in_out))
    if verified:
        checks[-1].detail = "\n".join(filter(None, [checks[-1].detail, "verified: " + "; ".join(verified)]))
    if export_dir is not None:
        exported: list[str] = []

        def export():
            problems, done = check_export(bundle_dir, configs, export_dir)
            exported.extend(done)
            return problems

        checks.append(_timed(b, "export", export))
        checks[-1].detail = "\n".join(filter(None, [checks[-1].detail, *exported]))
    checks.append(
        _timed(
            b,
            "overrides",
            lambda: check_overrides_static(bundle_dir, configs) + check_overrides_cli(bundle_dir, configs),
        )
    )
    if runs:
        try:
            for label, problems, seconds in run_checks(bundle_dir, configs, work, timeout, dataset_dir, sampling_steps):
                checks.append(Check(b, f"run {label}", not problems, "\n".join(problems), seconds))
        except Exception as e:
            checks.append(Check(b, "runs", False, f"{type(e).__name__}: {e}"))
    return checks


def format_report(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{'PASS' if c.ok else 'FAIL'}  {c.bundle:28s} {c.name}  [{c.seconds:.1f} s]")
        if c.detail and (not c.ok or c.name in ("net_in_out", "export")):
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
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        metavar="DIR",
        help="also export each described network to TorchScript into DIR (script, else trace)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="bundles verified at the same time (default: 2, or 1 on a one-core machine)",
    )
    parser.add_argument(
        "--sampling-steps",
        type=int,
        default=None,
        metavar="N",
        help="run the inference configs with DDIM for N steps (a smoke run; default: each config's own sampler)",
    )
    parser.add_argument(
        "--dataset-dir",
        type=Path,
        default=None,
        help="run the workflows on this dataset instead of each demo overlay's simulated cohort",
    )
    args = parser.parse_args(argv)
    available = {p.name: p for p in discover_bundles()}
    names = args.bundles or sorted(available)
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        print(f"error: unknown bundle(s) {unknown}; available: {sorted(available)}", file=sys.stderr)
        return 2
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="verify_bundles_") as tmp:
        work = args.work or Path(tmp)
        from concurrent.futures import ThreadPoolExecutor

        import torch

        torch.set_num_threads(1)  # in-process checks share the cores with the workflow subprocesses
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = pool.map(
                lambda n: verify_bundle(
                    available[n],
                    work,
                    not args.static,
                    args.schema,
                    args.online,
                    args.timeout,
                    args.dataset_dir,
                    args.export,
                    args.sampling_steps,
                ),
                names,
            )
            checks = [c for bundle_checks in results for c in bundle_checks]
    print(format_report(checks))
    print(f"verification of {len(names)} bundle(s) took {time.time() - started:.0f} s")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
