#!/usr/bin/env bash
# On a bare GPU machine (torch, torchvision and numpy installed; no network): a venv that reuses them
# (--system-site-packages), everything else installed offline from bench/wheelhouse (built here by
# bench/gpu_wheelhouse.sh), then bench/gpu_check.py with these arguments.
#   bench/gpu_check.sh [--quick] [--budget-min 8] [--only SECTION ...]
# GPU_CHECK_VENV: where the venv goes (default $TMPDIR/mst_ds_gpu_venv); PYTHON: the image's interpreter.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/mst_ds_gpu_venv}"
[[ -d "$here/wheelhouse" ]] || { echo "gpu_check.sh: error: $here/wheelhouse missing (run bench/gpu_wheelhouse.sh where there is network)" >&2; exit 2; }
[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
  --find-links "$here/wheelhouse" -r "$here/gpu_requirements.txt"
[[ "${1:-}" == "--install-only" ]] && exit 0
exec "$venv/bin/python" "$here/gpu_check.py" "$@"
