"""launch.sh's CUDA / ROCm detection without a GPU (issue 29, item 1): a stub `python` on PATH answers
launch.sh's two torch probes (torch.cuda.is_available(), torch.version.hip) as a CUDA machine, a ROCm
(DCU) machine or a machine with no visible GPU would, and a stub `deepspeed` records the environment
the launcher would hand to the ranks (DS_ENV_FILE) instead of starting them. What is faked: torch's
answers and the launcher; launch.sh itself runs unchanged."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STUB_PYTHON = """#!/usr/bin/env bash
# launch.sh's probes: exit status as the faked torch would give it.
case "$*" in
  *torch.cuda.is_available*)
    [[ "$STUB_GPU" == broken ]] && { echo "ModuleNotFoundError: No module named 'torch'" >&2; exit 1; }
    [[ "$STUB_GPU" != none ]] ;;
  *torch.version.hip*) [[ "$STUB_GPU" == rocm ]] ;;
  *"-m mst_ds.cli train --check"*) echo "check $*" >> "$STUB_LOG" ;;
  *) echo "stub python: unexpected call: $*" >&2; exit 99 ;;
esac
"""

STUB_DEEPSPEED = """#!/usr/bin/env bash
echo "deepspeed $*" >> "$STUB_LOG"
cat "$DS_ENV_FILE" >> "$STUB_LOG"
"""

# Variables launch.sh only sets when they are not exported already: unset for the test.
CLEARED = ("DS_ACCELERATOR", "NCCL_DEBUG", "HSA_FORCE_FINE_GRAIN_PCIE", "MIOPEN_USER_DB_PATH",
           "MIOPEN_CUSTOM_CACHE_DIR", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "SLURM_JOB_NODELIST", "MASTER_PORT",
           "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")


def launch(tmp_path: Path, gpu: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", STUB_PYTHON), ("deepspeed", STUB_DEEPSPEED)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_GPU=gpu, STUB_LOG=str(log), HOME=str(tmp_path),
               USER="tester", TMPDIR=str(tmp_path),
               VIRTUAL_ENV=str(tmp_path))  # launch.sh then leaves PATH alone (no .venv activation)
    res = subprocess.run([str(ROOT / "launch.sh"), "--preset", "tiny", "--gpus-per-node", "4"],
                         capture_output=True, text=True, env=env, timeout=60)
    return res, (log.read_text().splitlines() if log.exists() else [])


def test_cuda_machine_gets_the_nccl_environment(tmp_path):
    res, log = launch(tmp_path, "cuda")
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("check ") for line in log)  # the pre-flight ran before the launcher
    assert "deepspeed --master_port 29500 --num_gpus 4 --module mst_ds.cli train --preset tiny" in log
    env = dict(line.split("=", 1) for line in log if "=" in line and not line.startswith(("check", "deepspeed")))
    assert env["DS_ACCELERATOR"] == "cuda"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert not {"HSA_FORCE_FINE_GRAIN_PCIE", "MIOPEN_USER_DB_PATH"} & set(env)  # ROCm-only settings
    assert "launch.sh: DS_ACCELERATOR=cuda deepspeed" in res.stderr


def test_rocm_machine_gets_the_rccl_and_miopen_environment(tmp_path):
    res, log = launch(tmp_path, "rocm")
    assert res.returncode == 0, res.stderr
    env = dict(line.split("=", 1) for line in log if "=" in line and not line.startswith(("check", "deepspeed")))
    assert env["DS_ACCELERATOR"] == "cuda"  # ROCm runs torch's CUDA path; RCCL behind "nccl"
    assert env["HSA_FORCE_FINE_GRAIN_PCIE"] == "1"
    assert env["MIOPEN_USER_DB_PATH"] == "/tmp/miopen-tester"  # node-local, not the shared home
    assert env["MIOPEN_CUSTOM_CACHE_DIR"] == env["MIOPEN_USER_DB_PATH"]
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


@pytest.mark.parametrize("gpu", ["none", "broken"])  # broken: torch does not even import
def test_no_visible_gpu_is_one_line_and_nothing_starts(tmp_path, gpu):
    res, log = launch(tmp_path, gpu)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["launch.sh: error: no GPU visible to torch: use --cpu N for CPU processes"]
    assert log == []  # neither the pre-flight nor the launcher ran
