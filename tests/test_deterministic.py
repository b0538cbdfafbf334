"""``run.deterministic`` (issue 29, item 5): the flag sets what it claims, on every platform branch.

What is faked: the two facts about the process that only a GPU machine has (a CUDA context already
exists; torch is a ROCm build) come in as ``determinism.CudaState``; the environment is a dict. torch's
setters themselves are the real ones (they are global flags, settable on a CPU build)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_in_process

from mst_ds import determinism
from mst_ds.config import ConfigError, load_config
from mst_ds.determinism import CudaState
from mst_ds.scalars import SCALARS

CUDA = CudaState(cuda_initialized=False, rocm=False)
ROCM = CudaState(cuda_initialized=False, rocm=True)


@pytest.fixture(autouse=True)
def torch_defaults():
    """Every test starts and ends on torch's defaults (the flag is process-wide)."""
    determinism.apply(False, env={})
    yield
    determinism.apply(False, env={})


def settings() -> dict[str, bool]:
    b = torch.backends
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": b.cudnn.deterministic, "cudnn_benchmark": b.cudnn.benchmark,
            "flash_sdp": b.cuda.flash_sdp_enabled(), "mem_efficient_sdp": b.cuda.mem_efficient_sdp_enabled(),
            "cudnn_sdp": b.cuda.cudnn_sdp_enabled(), "math_sdp": b.cuda.math_sdp_enabled()}


def test_on_cuda_selects_deterministic_kernels_and_sets_the_cublas_workspace():
    torch.backends.cudnn.benchmark = True  # as a user script might have left it
    env: dict[str, str] = {}
    determinism.apply(True, env=env, cuda=CUDA)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    # Strict mode (not warn_only) is what routes SDPA's flash / memory-efficient backward to their
    # deterministic paths on CUDA, so both stay on; cuDNN attention is off.
    assert settings() == {"deterministic_algorithms": True, "warn_only": False, "cudnn_deterministic": True,
                          "cudnn_benchmark": False, "flash_sdp": True, "mem_efficient_sdp": True,
                          "cudnn_sdp": False, "math_sdp": True}


def test_on_rocm_attention_runs_the_math_backend():
    determinism.apply(True, env={}, cuda=ROCM)
    s = settings()
    assert s["deterministic_algorithms"] and s["cudnn_deterministic"] and not s["cudnn_benchmark"]
    assert (s["flash_sdp"], s["mem_efficient_sdp"], s["cudnn_sdp"], s["math_sdp"]) == (False, False, False, True)


def test_off_restores_torchs_defaults():
    determinism.apply(True, env={}, cuda=ROCM)
    env: dict[str, str] = {}
    determinism.apply(False, env=env, cuda=ROCM)
    assert env == {}
    assert settings() == {"deterministic_algorithms": False, "warn_only": False, "cudnn_deterministic": False,
                          "cudnn_benchmark": False, "flash_sdp": True, "mem_efficient_sdp": True,
                          "cudnn_sdp": True, "math_sdp": True}


def test_a_reproducible_workspace_the_user_exported_is_kept():
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    determinism.apply(True, env=env, cuda=CudaState(cuda_initialized=True, rocm=False))
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}


@pytest.mark.parametrize("env, cuda, message", [
    ({"CUBLAS_WORKSPACE_CONFIG": ":0:0"}, CUDA,
     "run.deterministic: CUBLAS_WORKSPACE_CONFIG=:0:0 is not reproducible; unset it or export one of :4096:8, :16:8"),
    ({}, CudaState(cuda_initialized=True, rocm=False),
     "run.deterministic: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG could be set; "
     "export CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting"),
])
def test_a_workspace_that_cannot_be_reproducible_is_refused_in_one_line(env, cuda, message):
    with pytest.raises(ConfigError) as err:
        determinism.apply(True, env=env, cuda=cuda)
    assert str(err.value) == message
    assert not torch.are_deterministic_algorithms_enabled()  # refused before anything was switched


def test_the_flag_is_off_by_default_and_not_part_of_the_runs_identity():
    off = load_config("tiny").config
    on = load_config("tiny", ["run.deterministic=true"]).config
    assert off.run.deterministic is False and on.run.deterministic is True
    assert on.hash() == off.hash()  # kernels, not the method: a run may be resumed with it switched


@pytest.mark.slow
def test_cpu_training_is_bit_identical_with_the_flag(tmp_path, digits_shards, deepspeed_cpu):
    """The real engine, 3 steps each way in this process: every logged number equal to the last bit, and
    no op of the step lacks a deterministic CPU kernel (strict mode would raise)."""
    logs = {}
    for flag in ("false", "true"):
        run = tmp_path / flag
        assert train_in_process(run, digits_shards, "run.max_steps=3", f"run.deterministic={flag}") == 0
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timings = ("img_per_s", "peak_mem_mb")
        logs[flag] = [{k: rec[k] for k in SCALARS if k in rec and k not in timings} for rec in lines if "loss" in rec]
    assert len(logs["true"]) == 3
    assert logs["true"] == logs["false"]
