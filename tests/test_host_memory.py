"""The CPU training process keeps the memory a step frees (glibc): the next step does not fault it in again."""

from __future__ import annotations

import ctypes.util
import platform
import resource

import pytest
import torch

from mst_ds.host_memory import keep_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or ctypes.util.find_library("c") is None,
                           reason="mallopt is glibc's")


def _faults_of_a_step() -> int:
    """Minor page faults of this thread while a step-like burst allocates, touches and frees 8 × 24 MiB."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    live = [torch.ones(6 * 2**20) for _ in range(8)]  # 24 MiB each: under the kept mmap threshold
    del live
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


@glibc
def test_a_second_step_reuses_the_memory_the_first_freed():
    assert keep_freed_memory()
    warm = [_faults_of_a_step() for _ in range(3)]  # the heap grows to the burst's size
    # 8 × 24 MiB fresh are ~49,000 faults of 4 KiB pages (glibc's defaults: at every burst); kept: none.
    assert _faults_of_a_step() < 1000, warm
