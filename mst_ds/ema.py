"""The EMA teacher update ``f_t = m·f_t + (1 − m)·f_s`` (Algorithm 1), outside the DeepSpeed engine.

The teacher is a plain fp32 module copied from the student *before* ``deepspeed.initialize`` (SPEC §7)
and never wrapped by DeepSpeed. Parameters are paired by name: the teacher's names are a subset of the
student's (the student also has the mask token and the decoder).

Where the student's exact fp32 values live depends on the engine:

* fp32 / torch-autocast, ZeRO 0–2: the module's own parameters (complete on every rank);
* bf16 / fp16 at ZeRO-1/2: the module holds low-precision copies; each rank holds the fp32 masters of
  its partition of every parameter group. :class:`ZeroPartitionMasters` all-gathers each group's local
  fp32 partition into one flat fp32 buffer per group — one collective per group and step (3 for
  ``mst_deit_s_100ep``), where ``safe_get_full_fp32_param`` made one all-reduce per parameter (181
  there) — and views it per parameter: the same values, bit for bit (tests/test_ema_partitions.py);
* bf16 / fp16 at ZeRO-3: ``deepspeed.utils.safe_get_full_fp32_param`` (a collective — every rank calls
  it in the same order);
* fp16 and bf16 at ZeRO-0 (DeepSpeed's ``FP16_UnfusedOptimizer``, bf16 too with a torch optimizer, or
  ``FP16_Optimizer``): ``safe_get_full_fp32_param`` returns None there; the masters are read from the
  wrapper's groups (:func:`fp16_optimizer_masters`);
* ZeRO-3 fp32: parameters are partitioned; ``GatheredParameters(modifier_rank=None)`` gathers them
  read-only for the update.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def paired_parameters(teacher: nn.Module, student: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """[(name, teacher param, student param)] for every teacher parameter; the names must match."""
    student_params = dict(student.named_parameters())
    missing = [n for n, _ in teacher.named_parameters() if n not in student_params]
    if missing:
        raise ValueError(f"teacher parameters without a student counterpart: {missing[:5]}")
    return [(n, p, student_params[n]) for n, p in teacher.named_parameters()]


def fp16_optimizer_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """{id(module parameter): its fp32 master} for DeepSpeed's ZeRO-0 fp16 / bf16 wrappers (empty otherwise).

    ``FP16_UnfusedOptimizer`` pairs ``fp16_groups[i][j]`` with ``fp32_groups[i][j]``; ``FP16_Optimizer``
    (fused Adam only) keeps one flat fp32 tensor per group, ``fp32_groups_flat[i]``, in parameter order.
    Both update the masters in place, so the tensors returned stay current."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    out: dict[int, torch.Tensor] = {}
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            out.update((id(p), m) for p, m in zip(low, high))
    elif isinstance(optimizer, FP16_Optimizer):
        for low, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            out.update((id(p), m.view_as(p)) for p, m in zip(low, flat.split([p.numel() for p in low])))
    return out


class ZeroPartitionMasters:
    """Every parameter's full fp32 master at ZeRO-1/2 from each rank's local fp32 partition, one
    all-gather per parameter group.

    DeepSpeed's ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``) flattens each group's low-precision
    parameters (in ``round_robin_bit16_groups`` order, each at ``round_robin_bit16_offsets``, padded to a
    multiple of the world size) and keeps this rank's equal-sized slice of it in fp32,
    ``single_partition_of_fp32_groups[i]`` (what AdamW steps, in place). Gathering the slices in rank
    order rebuilds the group's flat fp32 buffer (numel = world × partition); a parameter's master is its
    narrow view. The buffers are allocated once (one fp32 copy of the trainable weights per rank) and the
    views stay valid; the partitions are read anew at every gather (a checkpoint load writes them in place,
    but a new tensor would be read too)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        parts = optimizer.single_partition_of_fp32_groups
        self.flat = [torch.empty(part.numel() * dist.get_world_size(group=g), dtype=part.dtype, device=part.device)
                     for part, g in zip(parts, optimizer.real_dp_process_group)]
        self.views: dict[int, torch.Tensor] = {}
        for i, params in enumerate(optimizer.round_robin_bit16_groups):
            for p, offset in zip(params, self._offsets(optimizer, i)):
                self.views[id(p)] = self.flat[i].narrow(0, offset, p.numel()).view(p.shape)

    @staticmethod
    def _offsets(optimizer: Any, i: int) -> list[int]:
        """Start of each parameter of group ``i`` in its flat buffer. DeepSpeed ≥ 0.19 pads between
        parameters and records the offsets; earlier releases packed them back to back."""
        recorded = getattr(optimizer, "round_robin_bit16_offsets", None)
        if recorded is not None:
            return list(recorded[i])
        sizes = [p.numel() for p in optimizer.round_robin_bit16_groups[i]]
        return [sum(sizes[:k]) for k in range(len(sizes))]

    @classmethod
    def of(cls, optimizer: Any) -> ZeroPartitionMasters | None:
        """For a ZeRO-1/2 optimizer whose fp32 partitions live with the parameters (no CPU offload) and
        are equal-sized; None otherwise (the per-parameter path then)."""
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if not isinstance(optimizer, DeepSpeedZeroOptimizer) or getattr(optimizer, "cpu_offload", False):
            return None
        for i, part in enumerate(optimizer.single_partition_of_fp32_groups):
            if optimizer.bit16_groups_flat[i].numel() != part.numel() * dist.get_world_size(
                    group=optimizer.real_dp_process_group[i]):
                return None
        return cls(optimizer)

    @torch.no_grad()
    def gather(self) -> dict[int, torch.Tensor]:
        """One all-gather per group (every rank, same order) → {id(module parameter): its fp32 master}."""
        opt = self.optimizer
        for flat, part, group in zip(self.flat, opt.single_partition_of_fp32_groups, opt.real_dp_process_group):
            dist.all_gather_into_tensor(flat, part.detach(), group=group)
        return self.views


class EMATeacher:
    """Updates ``teacher`` towards ``student`` (the module inside the engine) once per optimizer step.

    ``optimizer``: the engine's (its fp32 masters under ZeRO-0 fp16, :func:`fp16_optimizer_masters`)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, *, zero_stage: int, low_precision: bool,
                 optimizer: Any = None) -> None:
        self.teacher = teacher
        self.pairs = paired_parameters(teacher, student)
        self.zero_stage = zero_stage
        self.low_precision = low_precision
        self.masters = fp16_optimizer_masters(optimizer) if low_precision and optimizer is not None else {}
        self.partitions = ZeroPartitionMasters.of(optimizer) if low_precision and optimizer is not None else None

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        t_params = [t for _, t, _ in self.pairs]
        s_params = [s for _, _, s in self.pairs]
        if self.low_precision:
            if self.partitions is not None:  # ZeRO-1/2: one collective per group
                self.masters = self.partitions.gather()
            self._lerp(t_params, [self._fp32_master(n, s) for n, _, s in self.pairs], momentum)
        elif self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(s_params, modifier_rank=None):
                self._lerp(t_params, s_params, momentum)
        else:
            self._lerp(t_params, s_params, momentum)

    def _fp32_master(self, name: str, p: nn.Parameter) -> torch.Tensor:
        """The exact fp32 value of student parameter ``name`` under a bf16/fp16 engine.

        Frozen parameters (requires_grad False) have no optimizer master; their module copy is exact
        enough because it never changes. A trainable one without a master is an error, never a silent
        fallback to its rounded copy. The masters gathered by ZeRO-0's wrappers or
        :class:`ZeroPartitionMasters` come first; ZeRO-3 asks ``safe_get_full_fp32_param``."""
        from deepspeed.utils import safe_get_full_fp32_param

        if not p.requires_grad:
            return p.detach().float()
        full = self.masters.get(id(p))
        if full is None and self.partitions is None:
            full = safe_get_full_fp32_param(p)
        if full is None:
            raise RuntimeError(f"EMA teacher: no fp32 master for student parameter {name} in this optimizer")
        return full.float()

    @staticmethod
    def _lerp(t_params: list[torch.Tensor], s_params: list[torch.Tensor], momentum: float) -> None:
        """t ← m·t + (1 − m)·s, fused over the lists (shapes: each t like its s)."""
        sources = [s.detach().to(t.dtype).reshape(t.shape) for t, s in zip(t_params, s_params)]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, sources, alpha=1.0 - momentum)
