"""Host memory of a training process on CPU: keep what the step frees for the next step (glibc malloc).

With glibc's defaults a CPU training step pays for its activation memory twice: freed blocks at the top
of the heap above the trim threshold go back to the OS, blocks above the (moving) mmap threshold are
fresh mappings, and every new step zero-fills those pages again through minor page faults, which are
slow in a VM. Measured on the DeiT-S shapes of ``bench/`` (2-core KVM, one thread): 18,000-54,000
page faults in the decoder's forward alone at every step (0 when the same decoder ran by itself), its
forward 0.06-0.26 s inside the step against 0.037 s alone; with the settings below 0 faults, 0.037 s,
the plain-PyTorch step 0.62 -> 0.49 s and the MST step's restoration branch 0.22 -> 0.005-0.02 of a DINO step.

:func:`keep_freed_memory` fixes the mmap threshold at glibc's largest (32 MiB; only larger blocks are
mapped) and turns trimming off, so the process keeps its peak: what CUDA's caching allocator does on a
GPU. Numbers do not change (allocation never touches values). Training calls it on CPU only.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TOP_PAD = 64 * 2**20  # the heap grows in steps of at least this much (address space; pages are touched on use)
NO_TRIM = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Keep freed blocks in this process (and in loader workers forked from it) → whether glibc took the
    settings (False elsewhere: musl, macOS; nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, NO_TRIM), (M_TOP_PAD, TOP_PAD)))
