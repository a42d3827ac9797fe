"""Each bundle's docs follow the model zoo's README template and use the one vocabulary of keys."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
#: the model zoo's README sections, as headings of each bundle's docs/README.md
SECTIONS = ["Model overview", "Data", "Training configuration", "Performance", "System configuration", "Limitations",
            "MONAI model-zoo checks and TensorRT", "Citation", "References"]  # fmt: skip
#: keys that were renamed into the one vocabulary and must not come back
RETIRED_KEYS = ["subjects_split", "slice_batch_size", "reference_split", "recon_split", "demo_data"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_docs_follow_the_model_zoo_template(bundle):
    text = (REPO / "bundles" / bundle / "docs" / "README.md").read_text()
    headings = [h.strip() for h in re.findall(r"^## (.+)$", text, flags=re.M)]
    missing = [s for s in SECTIONS if not any(h.startswith(s) for h in headings)]
    assert not missing, f"{bundle}/docs/README.md lacks the sections {missing}"
    assert "TensorRT is not supported" in text


@pytest.mark.parametrize("path", ["README.md", *[f"bundles/{b}/docs/README.md" for b in BUNDLES]])
def test_docs_use_the_one_vocabulary(path):
    text = (REPO / path).read_text()
    found = [k for k in RETIRED_KEYS if k in text]
    assert not found, f"{path} still uses retired keys {found}"


def test_readme_test_command_is_what_ci_runs():
    """The README's test command is, word for word, the command .ci/run executes (less pip's -q)."""
    ci = next(line for line in (REPO / ".ci" / "run").read_text().splitlines() if "python -m pytest" in line)
    command = ci.replace(" -q", "").strip()
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert any(command in block.splitlines() for block in blocks), f"README.md has no bash line `{command}`"
