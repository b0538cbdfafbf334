"""The EMA teacher update ``f_t = m·f_t + (1 − m)·f_s`` (Algorithm 1), outside the DeepSpeed engine.

The teacher is a plain fp32 module copied from the student *before* ``deepspeed.initialize`` (SPEC §7)
and never wrapped by DeepSpeed. Parameters are paired by name: the teacher's names are a subset of the
student's (the student also has the mask token and the decoder).

Where the student's exact fp32 values live depends on the engine:

* fp32 / torch-autocast, ZeRO 0–2: the module's own parameters (complete on every rank);
* bf16 / fp16 with a ZeRO optimizer: the module holds low-precision copies; the fp32 masters come from
  ``deepspeed.utils.safe_get_full_fp32_param`` (a collective — every rank calls it in the same order);
* ZeRO-3 fp32: parameters are partitioned; ``GatheredParameters(modifier_rank=None)`` gathers them
  read-only for the update.
"""

from __future__ import annotations

import torch
from torch import nn


def paired_parameters(teacher: nn.Module, student: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """[(name, teacher param, student param)] for every teacher parameter; the names must match."""
    student_params = dict(student.named_parameters())
    missing = [n for n, _ in teacher.named_parameters() if n not in student_params]
    if missing:
        raise ValueError(f"teacher parameters without a student counterpart: {missing[:5]}")
    return [(n, p, student_params[n]) for n, p in teacher.named_parameters()]


class EMATeacher:
    """Updates ``teacher`` towards ``student`` (the module inside the engine) once per optimizer step."""

    def __init__(self, teacher: nn.Module, student: nn.Module, *, zero_stage: int, low_precision: bool) -> None:
        self.teacher = teacher
        self.pairs = paired_parameters(teacher, student)
        self.zero_stage = zero_stage
        self.low_precision = low_precision

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        t_params = [t for _, t, _ in self.pairs]
        s_params = [s for _, _, s in self.pairs]
        if self.low_precision:
            self._lerp(t_params, [self._fp32_master(s) for s in s_params], momentum)
        elif self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(s_params, modifier_rank=None):
                self._lerp(t_params, s_params, momentum)
        else:
            self._lerp(t_params, s_params, momentum)

    @staticmethod
    def _fp32_master(p: nn.Parameter) -> torch.Tensor:
        """The exact fp32 value of a student parameter under a bf16/fp16 engine.

        Frozen parameters (requires_grad False) have no optimizer master; their module copy is exact
        enough because it never changes.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        return (full if full is not None else p.detach()).float()

    @staticmethod
    def _lerp(t_params: list[torch.Tensor], s_params: list[torch.Tensor], momentum: float) -> None:
        """t ← m·t + (1 − m)·s, fused over the lists (shapes: each t like its s)."""
        sources = [s.detach().to(t.dtype).reshape(t.shape) for t, s in zip(t_params, s_params)]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, sources, alpha=1.0 - momentum)
