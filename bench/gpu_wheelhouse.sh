#!/usr/bin/env bash
# Build, here (network to PyPI), every wheel a bare GPU image lacks for bench/gpu_check.py, into
# bench/wheelhouse/ (git-ignored, < 64 MiB, so it travels with the working tree):
#   - DeepSpeed as a py3-none-any wheel with no prebuilt ops (DS_BUILD_OPS=0: ops JIT-build on use);
#   - the binary dependencies for CPython 3.10-3.13 on manylinux x86_64 (pydantic_core, PyYAML, xxhash,
#     msgpack) and the abi3 / py3 ones (psutil, safetensors, ninja);
#   - the pure-Python rest, and this project itself.
# torch, torchvision (with Pillow) and numpy are NOT included: the GPU image has them. Everything is
# installed with --no-deps from bench/gpu_requirements.txt, so the image's torch is never replaced.
#
#   bench/gpu_wheelhouse.sh            # build or refresh (reuses wheels already there)
#   bench/gpu_check.sh --cpu --quick   # on the GPU machine: venv + offline install + the check
#
# PYTHON: the interpreter whose environment has torch and setuptools (DeepSpeed's setup.py imports torch).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
WH="${WHEELHOUSE:-$HERE/wheelhouse}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
REQS="$HERE/gpu_requirements.txt"
mkdir -p "$WH"
pip_() { "$PYTHON" -m pip --disable-pip-version-check "$@"; }

# Binary wheels: one per CPython 3.10-3.13 (name==version lines marked "# binary" in the requirements).
binary=$(grep -E '# binary$' "$REQS" | sed 's/ *#.*//')
pure=$(grep -E '^[A-Za-z]' "$REQS" | grep -v -E '# (binary|built)$' | sed 's/ *#.*//')

for py in 310 311 312 313; do
  # shellcheck disable=SC2086
  pip_ download --quiet --no-deps --only-binary=:all: --dest "$WH" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --python-version "${py:0:1}.${py:1}" \
    --implementation cp --abi "cp$py" --abi abi3 --abi none $binary
done
# shellcheck disable=SC2086
pip_ download --quiet --no-deps --only-binary=:all: --dest "$WH" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any --python-version 3.10 \
  --implementation cp --abi cp310 --abi abi3 --abi none $pure

ds=$(grep -E '^deepspeed==' "$REQS" | sed 's/ *#.*//')
if ! ls "$WH"/deepspeed-"${ds#deepspeed==}"*-py3-none-any.whl >/dev/null 2>&1; then
  # No prebuilt ops: nothing CUDA-specific is compiled here, the wheel is pure Python.
  DS_BUILD_OPS=0 DS_BUILD_STRING="" pip_ wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed \
    --wheel-dir "$WH" "$ds"
fi

# The project itself (replaces an older build of the same version).
rm -f "$WH"/mst_ds-*.whl
pip_ wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WH" "$ROOT"

size=$(du -sb "$WH" | cut -f1)
echo "wheelhouse: $WH, $(ls "$WH" | wc -l) wheels, $((size / 1024 / 1024)) MiB"
if [ "$size" -ge $((64 * 1024 * 1024)) ]; then
  echo "gpu_wheelhouse: error: $((size / 1024 / 1024)) MiB is over the 64 MiB a carried tree may hold" >&2
  exit 1
fi
