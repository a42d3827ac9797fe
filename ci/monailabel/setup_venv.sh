#!/usr/bin/env bash
# Create (or reuse) the virtual environment for MONAI Label 0.8.5, apart from the project's: MONAI Label pins
# numpy 1.26, which the project's environment must not be forced to. Prints the venv's python on the last line.
#   bash ci/monailabel/setup_venv.sh     # venv in $MONAILABEL_VENV (default ~/.cache/brainsynth/monailabel-venv)
set -euo pipefail
VENV="${MONAILABEL_VENV:-$HOME/.cache/brainsynth/monailabel-venv}"
MONAILABEL_VERSION="${MONAILABEL_VERSION:-0.8.5}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
ready() {
    "$VENV/bin/python" -c "import monailabel, torchvision.ops, sys; sys.exit(monailabel.__version__ != '$MONAILABEL_VERSION')" 2>/dev/null
}
if [ ! -x "$VENV/bin/python" ] || ! ready; then
    python -m venv "$VENV"
    # torch and torchvision as the matching pair PyPI publishes: MONAI Label imports torchvision's compiled ops,
    # which fail against a CPU-only torch from a local wheel folder, so local wheel folders are ignored here.
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" install -q "torch==2.13.0" "torchvision==0.28.0" >&2
    # MONAI Label with the MONAI the bundles are made for; pydicom 2 (MONAI Label's pydicom-seg does not import
    # under pydicom 3, so its DICOM clients stay on their pydicom-2 releases); then what the bundles list in
    # required_packages_version that MONAI Label does not already bring.
    "$VENV/bin/pip" install -q "monailabel==$MONAILABEL_VERSION" "monai==1.6.1" \
        "pydicom>=2.4,<3" "pynetdicom>=2.0.2,<3" "dicomweb-client>=0.59.1,<0.60" \
        einops nibabel scipy SimpleITK nilearn pillow tqdm fire pytorch-ignite tensorboard >&2
    ready || { echo "MONAI Label environment in $VENV is not usable" >&2; exit 1; }
fi
echo "$VENV/bin/python"
