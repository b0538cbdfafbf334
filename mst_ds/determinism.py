"""``run.deterministic``: the process-wide kernel choices that make a GPU step repeat bit for bit.

On CPU every kernel this project runs is deterministic already: resume is bit-identical with the flag
off (the pinned tests), and the flag changes no bit there (tests/test_deterministic.py). On a GPU,
without it, cuBLAS split-K reductions, cuDNN's autotuner and attention backward passes that accumulate
with atomics make two runs of the same step differ in the last bits, so a resumed run is equal to an
uninterrupted one only to a tolerance (``bench/gpu_check.py`` measures it). With it:

- ``torch.use_deterministic_algorithms(True)`` (strict, not ``warn_only``): deterministic kernels where
  torch has them, a RuntimeError naming the op where it has none. Strict mode is also what switches
  SDPA's flash and memory-efficient backward on CUDA to their deterministic (non-atomic) dQ paths and
  excludes cuDNN attention (the backend table of pytorch/pytorch#182551, checked on CUDA by its author); torch also fills uninitialised memory (``torch.empty``) with NaN then.
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS ≥ 10.2 reproducibility): it must be in the environment
  before the first cuBLAS handle, so it is set before the engine is built, and a process whose CUDA
  was initialised earlier without it is refused in one line.
- ``cudnn.deterministic`` on, ``cudnn.benchmark`` off (also MIOpen's choice on ROCm).
- SDPA backends: cuDNN attention off everywhere; on ROCm also flash and memory-efficient attention,
  whose CK backward ignores the deterministic setting (pytorch/pytorch#197771, open) and whose vendor
  (DTK) builds are unknown: attention runs the math backend there (more memory: B·heads·N² scores).

Cost: on CPU, measured by ``bench/deterministic.py`` (README, "On a cluster" → "Resume"); on a GPU it
is for ``bench/gpu_check.py`` to measure (not measured: no GPU here).

Off (the default) restores torch's defaults for what "on" sets (cudnn.benchmark stays off), so runs in one process (a study, the
tests) do not inherit each other's choice; CUBLAS_WORKSPACE_CONFIG is left as the user exported it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

from mst_ds.config import ConfigError

CUBLAS_CONFIG = ":4096:8"
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")  # the two settings cuBLAS documents as reproducible


@dataclass(frozen=True)
class CudaState:
    """This process's CUDA state the choices depend on, asked once (tests pass their own to reach the GPU
    branches on CPU). Not :class:`mst_ds.engine.Platform` (what the device offers): this is asked before
    the engine exists, and "CUDA already initialised" is a state of the process, not of the device."""

    cuda_initialized: bool  # a CUDA context exists already: cuBLAS may have read its workspace setting
    rocm: bool  # torch built for ROCm (HIP): DCUs, AMD GPUs

    @classmethod
    def of_this_process(cls) -> CudaState:
        return cls(cuda_initialized=torch.cuda.is_initialized(), rocm=torch.version.hip is not None)


def apply(on: bool, *, env: MutableMapping[str, str] = os.environ, cuda: CudaState | None = None) -> None:
    """Select deterministic kernels (``on``) or torch's defaults; once per run, before the engine."""
    where = cuda or CudaState.of_this_process()
    if on:
        _cublas_workspace(env, where)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_cudnn_sdp(not on)
    atomic_backward = on and where.rocm  # CK / vendor attention backward: no deterministic path honoured
    torch.backends.cuda.enable_flash_sdp(not atomic_backward)
    torch.backends.cuda.enable_mem_efficient_sdp(not atomic_backward)
    torch.backends.cuda.enable_math_sdp(True)


def _cublas_workspace(env: MutableMapping[str, str], where: CudaState) -> None:
    """CUBLAS_WORKSPACE_CONFIG: keep a reproducible value the user exported, refuse any other, else set it."""
    value = env.get("CUBLAS_WORKSPACE_CONFIG")
    if value in DETERMINISTIC_CUBLAS:
        return
    if value is not None:
        raise ConfigError(f"run.deterministic: CUBLAS_WORKSPACE_CONFIG={value} is not reproducible; "
                          f"unset it or export one of {', '.join(DETERMINISTIC_CUBLAS)}")
    if where.cuda_initialized:
        raise ConfigError("run.deterministic: CUDA was initialised before CUBLAS_WORKSPACE_CONFIG could be "
                          f"set; export CUBLAS_WORKSPACE_CONFIG={CUBLAS_CONFIG} before starting")
    env["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_CONFIG
