"""Element-wise steps compiled into one fused loop each on CPU (torch.compile, inductor's C++ backend).

Eager PyTorch runs an element-wise chain such as the hue rotation as ~40 separate passes over the
image; on CPU that is the photometric stage's cost (issue 21, P3). Compiled, each chain is one loop.
The results are bit-identical to eager: every op in these chains is a single IEEE-rounded operation
(add, mul, div, fmod, min/max, compare, select) evaluated in eager's order, and inductor builds its
C++ with ``-ffp-contract=off`` (no fused multiply-add) and without unsafe math (:data:`EXACT`). Reductions and
convolutions are left out on purpose: their summation order is each implementation's own.

Only CPU tensors use this; on an accelerator eager kernels already cost little beside the step, and
a GPU compiler may contract a·b + c into one rounding. If compiling fails (no C++ compiler on the
machine, say) the eager function runs instead, with one warning: the numbers are the same either way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch

# Inductor's defaults, pinned so that an environment variable cannot turn them on: a·b + c contracted
# into one rounding (FMA) changes the last bit of the blend and hue steps (the test fails with it), and
# -fno-unsafe-math-optimizations also undoes the -fno-signed-zeros in inductor's flag list.
EXACT = {"cpp.enable_floating_point_contract_flag": "off", "cpp.enable_unsafe_math_opt_flag": False}


class FusedCPU:
    """Call ``fns[name]`` compiled (fused); the first compile of each costs ~1–4 s (cached on disk)."""

    def __init__(self, fns: Mapping[str, Callable[..., torch.Tensor]]):
        self._eager = dict(fns)
        self._compiled: dict[str, Callable[..., torch.Tensor]] = {}  # built on first use: GPU runs never import the compiler
        self.error: str | None = None  # why compiling failed; eager from then on

    def __call__(self, name: str, *args: torch.Tensor) -> torch.Tensor:
        if self.error is None:
            fn = self._compiled.get(name)
            if fn is None:
                try:  # dynamic: one compile serves every batch and view size
                    fn = self._compiled[name] = torch.compile(self._eager[name], dynamic=True, options=EXACT)
                except Exception as e:  # noqa: BLE001 — torch.compile refusing this platform: eager does the same work
                    self._give_up(e)
            if fn is not None:
                try:
                    return fn(*args)
                except torch._dynamo.exc.TorchDynamoException as e:  # compiling failed (no C++ compiler, …)
                    self._give_up(e)
        return self._eager[name](*args)

    def _give_up(self, e: Exception) -> None:
        text = str(e).strip()
        self.error = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        warnings.warn(f"fused CPU kernels unavailable, running eager (same numbers, slower): {self.error}",
                      RuntimeWarning, stacklevel=3)
