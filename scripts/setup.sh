#!/usr/bin/env bash
# Set-up of a fresh machine: a virtual environment in .venv with the tested torch pair and the project.
# Idempotent: rerunning only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# torchvision needs exactly this torch (SPEC: the pair lies on this machine's disk; elsewhere pip fetches it).
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, torchvision, deepspeed, timm, webdataset, mst_ds" >/dev/null 2>&1 \
  || { echo "setup: installation incomplete (import failed)" >&2; exit 1; }
echo "setup: ok ($(python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "deepspeed", v("deepspeed"), "timm", v("timm"))'))"
