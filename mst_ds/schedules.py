"""Per-step schedules (pure functions of the global optimizer step; no state).

lr: linear warm-up from 0 to the peak lr over ``warmup_steps``, then cosine to ``optim.min_lr`` [S §7, D];
weight decay: cosine 0.04 → 0.4 [D]; teacher momentum: cosine 0.996 → 1 [D]; teacher temperature:
0.04 → 0.07 then constant [D], one value per epoch as DINO (``loss.teacher_temp_schedule``); the head's last layer is frozen
for the first ``freeze_last_layer_steps`` [D], and its AdamW state restarts at the first free step
(DINO's ``p.grad = None`` leaves no state behind, SPEC §9). Step counts come from :func:`mst_ds.config.derive`.

Convention: steps run 0 … total_steps−1; the warm-up ends (value = base) at step ``warmup_steps`` and
the cosine reaches ``final`` exactly at the last step, total_steps−1 (and stays there beyond).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mst_ds.config import Derived, MSTConfig


def cosine_schedule(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> float:
    """Linear warm-up ``warmup_start → base`` over steps [0, warmup_steps), then half a cosine from
    ``base`` (at step warmup_steps) to ``final`` (at step total_steps−1)."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    span = total_steps - 1 - warmup_steps
    if span <= 0:
        return final if step > warmup_steps else base
    progress = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start → end`` linearly over [0, warmup_steps], then constant ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    weight_decay: float
    momentum: float  # teacher EMA momentum
    teacher_temp: float
    last_layer_frozen: bool
    last_layer_released: bool  # the first step after a freeze: restart the last layer's AdamW state

    def as_dict(self) -> dict[str, float | bool]:
        return asdict(self)


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    momentum_teacher_end: float
    warmup_teacher_temp: float
    teacher_temp: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    epochs: int = 1
    teacher_temp_warmup_epochs: int | None = None  # per_epoch schedule (DINO); None = per step

    @classmethod
    def from_config(cls, cfg: MSTConfig, derived: Derived) -> Schedules:
        return cls(
            total_steps=derived.total_steps,
            warmup_steps=derived.warmup_steps,
            peak_lr=derived.peak_lr,
            min_lr=cfg.optim.min_lr,
            weight_decay=cfg.optim.weight_decay,
            weight_decay_end=cfg.optim.weight_decay_end,
            momentum_teacher=cfg.schedule.momentum_teacher,
            momentum_teacher_end=cfg.schedule.momentum_teacher_end,
            warmup_teacher_temp=cfg.loss.warmup_teacher_temp,
            teacher_temp=cfg.loss.teacher_temp,
            teacher_temp_warmup_steps=derived.teacher_temp_warmup_steps,
            freeze_last_layer_steps=derived.freeze_last_layer_steps,
            epochs=cfg.schedule.epochs,
            teacher_temp_warmup_epochs=(int(cfg.loss.warmup_teacher_temp_epochs)
                                        if cfg.loss.teacher_temp_schedule == "per_epoch" else None),
        )

    def teacher_temp_at(self, step: int) -> float:
        """DINO's per-epoch value (linspace(start, end, W)[epoch], then end) or linear per step. The epoch
        of a step is floor(step · epochs / total_steps): the same stretch as every epoch-denominated knob."""
        w = self.teacher_temp_warmup_epochs
        if w is None:
            return linear_warmup(step, self.teacher_temp_warmup_steps, self.warmup_teacher_temp, self.teacher_temp)
        epoch = step * self.epochs // self.total_steps
        if epoch >= w:
            return self.teacher_temp
        if w == 1:
            return self.warmup_teacher_temp  # np.linspace(a, b, 1) = [a]
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * epoch / (w - 1)

    def at(self, step: int) -> ScheduleValues:
        """All schedule values at global optimizer step ``step`` (0-based)."""
        return ScheduleValues(
            lr=cosine_schedule(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps),
            weight_decay=cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            momentum=cosine_schedule(step, self.total_steps, self.momentum_teacher, self.momentum_teacher_end),
            teacher_temp=self.teacher_temp_at(step),
            last_layer_frozen=step < self.freeze_last_layer_steps,
            last_layer_released=0 < self.freeze_last_layer_steps == step,
        )

    def milestones(self) -> dict[str, int]:
        """The steps ``mst-ds plan`` shows: start, end of warm-up, middle, last."""
        return {"step 0": 0, "end of warm-up": self.warmup_steps, "middle": (self.total_steps - 1) // 2,
                "last step": self.total_steps - 1}
