"""The layout is the architecture: shared code never reaches into a bundle, a bundle never reaches into another
bundle's code, every ``scripts.`` reference of a config names a module of that bundle, and a module of the shared
library used by one bundle only is a conditioning / deformation layer, infrastructure, or says why it is shared."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "common" / "brainsynth"
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir())
#: packages whose modules may serve one bundle: the card's shared layers, infrastructure, the data / cohort layer
ONE_BUNDLE_OK = {"conditioning", "deformation", "engine", "data", "cohort"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def config_text(bundle: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((bundle / "configs").glob("*.json")))


def test_shared_library_never_imports_bundle_code():
    bundle_names = {b.name for b in BUNDLES}
    for path in COMMON.rglob("*.py"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top != "scripts" and top not in bundle_names and not top.endswith("_scripts"), (path, name)
        assert "bundles/" not in path.read_text(), f"{path} names a bundle path"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_bundle_code_never_imports_another_bundle(bundle):
    others = {b.name for b in BUNDLES} - {bundle.name}
    for path in (bundle / "scripts").glob("*.py"):
        for name in imported_modules(path):
            assert name.split(".")[0] not in others | {f"{o}_scripts" for o in others}, (path, name)
        text = path.read_text()
        assert not any(f"bundles/{o}" in text for o in others), f"{path} reaches into another bundle"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_config_scripts_references_exist_in_the_bundle(bundle):
    modules = {p.stem for p in (bundle / "scripts").glob("*.py")}
    referenced = set(re.findall(r"\bscripts\.(\w+)", config_text(bundle)))
    assert referenced, f"{bundle.name}: its configs use none of its own code"
    assert referenced <= modules, (bundle.name, referenced - modules)


def _users(module: str) -> set[str]:
    """Bundles whose configs or scripts name ``module`` (dotted path under brainsynth)."""
    pattern = re.compile(r"\bbrainsynth\." + re.escape(module) + r"\b")
    users = set()
    for bundle in BUNDLES:
        texts = [config_text(bundle)] + [p.read_text() for p in (bundle / "scripts").glob("*.py")]
        if any(pattern.search(t) for t in texts):
            users.add(bundle.name)
    return users


def test_shared_modules_serve_several_bundles_or_say_why():
    for path in COMMON.glob("*/*.py"):
        package = path.parent.name
        if path.stem.startswith("_") or package in ONE_BUNDLE_OK:
            continue
        module = f"{package}.{path.stem}"
        users = _users(module)
        if len(users) <= 1:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "Used by one bundle" in doc, (
                f"brainsynth.{module} serves {users or 'no bundle'} and does not say why it is shared"
            )


def test_every_subpackage_says_what_lives_there():
    for init in COMMON.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) >= 2, init


def test_bundle_scripts_switches_between_bundles_in_one_process():
    """Configs of several bundles parsed in one process each find their own ``scripts`` (verifier, notebooks)."""
    import sys

    from monai.utils import optional_import

    from brainsynth.engine.bundle_code import bundle_scripts

    before = sys.modules.get("scripts")
    by_bundle = {b.name: sorted(p.stem for p in (b / "scripts").glob("*.py") if p.stem != "__init__") for b in BUNDLES}
    for bundle in BUNDLES + BUNDLES[:1]:
        with bundle_scripts(bundle):
            module, ok = optional_import(f"scripts.{by_bundle[bundle.name][0]}")
            assert ok and Path(module.__file__).parent == bundle / "scripts", (bundle.name, module)
    assert sys.modules.get("scripts") is before


def test_study_scripts_take_their_preamble_from_one_place(tmp_path):
    """Every scripts/run_study.sh gets out / overlays / run() from brainsynth.engine.study (no copied preamble), and
    that preamble quotes what the user gives and refuses a missing output folder."""
    import os
    import subprocess
    import sys

    line = 'steps=$(python -m brainsynth.engine.study preamble "$@"); eval "$steps"'
    scripts = sorted((REPO / "bundles").glob("*/scripts/run_study.sh"))
    assert len(scripts) == 3
    for script in scripts:
        text = script.read_text()
        assert line in text and "overlays+=" not in text and "run() {" not in text, script
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    probe = f'set -euo pipefail\n{line}\necho "$out|$overlays"; type run > /dev/null\n'
    done = subprocess.run(
        ["bash", "-c", probe, "study", str(tmp_path / "a b"), "configs/demo.json", "my data.json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{tmp_path / 'a b'}|,'configs/demo.json','my data.json'"
    missing = subprocess.run(["bash", "-c", probe, "study"], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode != 0 and "give the output directory first" in missing.stderr
