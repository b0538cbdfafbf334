#!/usr/bin/env bash
# Set-up of a fresh machine: a virtual environment in .venv with a torch build for the platform and the
# project. Idempotent: rerunning only installs what is missing.
#
#   scripts/setup.sh [--torch PLATFORM] [--dry-run]        (or MST_TORCH=PLATFORM scripts/setup.sh)
#
#   (none)    torch 2.14.1 / torchvision 0.29.1 from PyPI: the tested pair (CPU here; PyPI's CUDA build
#             has kernels for sm_75 and newer, no V100)
#   cu126     the same pair from PyTorch's CUDA 12.6 index: the last CUDA line with sm_70 kernels (V100);
#             NVIDIA driver >= 525
#   cu130     the same pair from the CUDA 13.0 index (sm_75 and newer, driver >= 580)
#   cu118     torch 2.7.1 / torchvision 0.22.1 (CUDA 11.8, sm_70 included) for V100 nodes whose driver
#             is older than CUDA 12 wants (>= 450.80); 2.7 is the project's torch floor
#   rocm6.x   torch 2.9.1 / torchvision 0.24.1 from the ROCm 6.4 index (the last torch built for ROCm 6)
#   keep      the torch, torchvision (and DeepSpeed, if any) already in $PYTHON's environment, e.g. a
#             vendor DTK stack on Sugon DCUs: .venv sees them (--system-site-packages), they are pinned
#             while the rest installs, and a version below pyproject.toml's floor is refused
#   --dry-run prints what would be installed and exits without touching anything
#
# Which of these ran where: README, "On a cluster" → "Install".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
die() { echo "setup: error: $*" >&2; exit 2; }

platform=${MST_TORCH:-default} dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --torch) platform="${2:?--torch needs a platform}"; shift 2 ;;
    --torch=*) platform="${1#--torch=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

# platform → torch, torchvision (torchvision needs exactly its torch) and the wheel index.
index="" venv_args=()
case "$platform" in
  default) torch=2.14.1 vision=0.29.1 ;;
  cu126|cu130) torch=2.14.1 vision=0.29.1 index="https://download.pytorch.org/whl/$platform" ;;
  cu118) torch=2.7.1 vision=0.22.1 index="https://download.pytorch.org/whl/cu118" ;;
  rocm6.x|rocm6.4) platform=rocm6.x torch=2.9.1 vision=0.24.1 index="https://download.pytorch.org/whl/rocm6.4" ;;
  keep) torch="" vision="" venv_args=(--system-site-packages) ;;
  *) die "--torch $platform: expected one of cu118, cu126, cu130, rocm6.x, keep (or none for PyPI's build)" ;;
esac

# keep: read the environment's versions and check them against pyproject.toml's floors (one source).
command -v "$PY" >/dev/null || die "no '$PY' on PATH (set PYTHON to the interpreter to use)"
pins=()
if [[ "$platform" == keep ]]; then
  floor() { sed -n "s/^ *\"$1>=\([0-9.]*\).*/\1/p" pyproject.toml; }
  found="$("$PY" - "$(floor torch)" "$(floor torchvision)" "$(floor deepspeed)" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version

def release(v):  # "2.7.0+das.opt1" -> (2, 7, 0): local labels do not count against a floor
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])

for name, low, required in zip(("torch", "torchvision", "deepspeed"), sys.argv[1:], (True, True, False)):
    try:
        v = version(name)
    except PackageNotFoundError:
        if required:
            sys.exit(f"setup: error: --torch keep: no {name} in {sys.executable}'s environment (a PyPI "
                     f"{name} would not match the vendor's build: install the vendor's first)")
        continue
    if release(v) < release(low):
        sys.exit(f"setup: error: --torch keep: {name} {v} is below the floor {low} (pyproject.toml); "
                 f"this code calls APIs it lacks")
    print(f"{name}=={v}")
EOF
)" || exit 2  # the reason is already on stderr, in one line
  mapfile -t pins <<< "$found"
else
  pins=("torch==$torch" "torchvision==$vision")
fi

if (( dry_run )); then
  echo "setup: platform $platform (dry run: nothing installed)"
  echo "venv: .venv from $PY${venv_args:+ ${venv_args[*]}}"
  if [[ "$platform" == keep ]]; then
    echo "keep: ${pins[*]} (from the environment)"
  else
    echo "install: ${pins[*]}${index:+ --index-url $index}"
  fi
  if [[ "$platform" == keep ]]; then
    echo "install: -e .[test] (constrained to ${pins[*]})"
  else
    echo "install: -e .[test]"
  fi
  exit 0
fi

if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv "${venv_args[@]}" .venv
elif [[ "$platform" == keep ]] && ! grep -qi '^include-system-site-packages *= *true' .venv/pyvenv.cfg; then
  die "--torch keep: .venv exists without the environment's packages (made by another --torch); move it aside first"
fi
. .venv/bin/activate
quiet=(-q --disable-pip-version-check)
constraints=()
if [[ "$platform" == keep ]]; then
  # pip must not replace the vendor's builds with PyPI's while it installs the rest.
  pinfile="$(mktemp "${TMPDIR:-/tmp}/mst_ds_pins.XXXXXX")"
  trap 'rm -f "$pinfile"' EXIT
  printf '%s\n' "${pins[@]}" > "$pinfile"
  constraints=(-c "$pinfile")
else
  python -m pip install "${quiet[@]}" ${index:+--index-url "$index"} "${pins[@]}" 2>&1 | grep -v "^WARNING: Location" || true
fi
python -m pip install "${quiet[@]}" "${constraints[@]}" -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, torchvision, deepspeed, timm, webdataset, mst_ds" >/dev/null 2>&1 \
  || { echo "setup: installation incomplete (import failed)" >&2; exit 1; }
echo "setup: ok ($(python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "deepspeed", v("deepspeed"), "timm", v("timm"))'))"
