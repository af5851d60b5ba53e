#!/usr/bin/env bash
# Install gn_detection and a real, unmodified Detectron2 into a virtual environment (default .venv).
#
# Detectron2 is not on the package index under its own name; its official install builds from GitHub.
# The index does carry `sal-detectron2==0.7.2`, a build of upstream Detectron2's main branch, as a wheel
# tagged for CPython 3.10 with the compiled `_C` extension inside. Its Python code runs unchanged on newer
# Pythons without `_C` (ROIAlign/NMS come from torchvision, COCOeval from pycocotools), and GN Mask R-CNN
# needs nothing else from `_C`. So we drop the `.so`, retag the wheel as pure Python and install it.
#
# An environment where `import detectron2` already works (e.g. your own source build with CUDA ops) is
# left alone: point PYTHON at its interpreter and only gn_detection is installed into it.
#
# Usage: dev/install.sh                 # creates/updates .venv
#        PYTHON=/path/to/python dev/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
D2_REQ=sal-detectron2==0.7.2
D2_WHEEL=sal_detectron2-0.7.2   # the wheel's file-name prefix
# Detectron2's own requirements that sal-detectron2's metadata leaves out (upstream setup.py pins these),
# and setuptools<81 because detectron2.model_zoo imports pkg_resources.
D2_EXTRA_DEPS=("fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "setuptools<81")

PYTHON=${PYTHON:-.venv/bin/python}
if [ "$PYTHON" = .venv/bin/python ] && [ ! -x "$PYTHON" ]; then
  echo "[install] creating .venv"
  python3 -m venv .venv
fi
[ -x "$(command -v "$PYTHON")" ] || { echo "[install] PYTHON=$PYTHON is not an executable Python interpreter" >&2; exit 1; }
pip_install() { "$PYTHON" -m pip install -q --disable-pip-version-check "$@"; }

if "$PYTHON" -c "import detectron2" 2>/dev/null; then
  echo "[install] detectron2 already importable by $PYTHON: leaving it as it is"
else
  "$PYTHON" -c "import torch, torchvision" 2>/dev/null || {
    echo "[install] installing ${TORCH_PINS[*]}"; pip_install "${TORCH_PINS[@]}"; }
  echo "[install] building a pure-Python wheel of $D2_REQ"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  pip_install wheel
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.10 -d "$work/download" "$D2_REQ"
  "$PYTHON" -m wheel unpack -d "$work/unpacked" "$work"/download/"$D2_WHEEL"-*.whl
  tree="$work/unpacked/$D2_WHEEL"
  find "$tree" -name '*.so' -delete
  sed -i -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' -e 's/^Tag: .*/Tag: py3-none-any/' \
    "$tree/$D2_WHEEL.dist-info/WHEEL"
  mkdir -p "$work/wheel"
  "$PYTHON" -m wheel pack -d "$work/wheel" "$tree"   # `wheel pack` rewrites RECORD with fresh hashes
  pip_install "$work"/wheel/*.whl "${D2_EXTRA_DEPS[@]}"
fi

echo "[install] installing gn_detection (editable) and its test requirements"
# With setuptools >= 64 (pyproject.toml's build requirement) in the environment (the .venv has it: Detectron2
# imports pkg_resources), build in it rather than in an isolated one that pip fills from the package index: a
# rerun (make demo, make test) then needs no network when nothing changed.
# (setuptools before 70.1 also needs wheel for an editable build; the .venv has it, installed above)
if "$PYTHON" -c "import setuptools, sys, wheel; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null
then
  pip_install --no-build-isolation -e ".[test]"
else
  pip_install -e ".[test]"
fi
"$PYTHON" -c "import detectron2, gn_detection; print('[install] ok: detectron2', detectron2.__version__)"
