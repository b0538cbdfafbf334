"""Schedules at step 0, the end of warm-up, the middle and the last step."""

from __future__ import annotations

import pytest

from mst_ds.config import derive, load_config
from mst_ds.schedules import Schedules, cosine_schedule, linear_warmup


def paper_schedules() -> tuple[Schedules, object]:
    cfg = load_config("mst_deit_s_100ep").config
    d = derive(cfg, world_size=8, dataset_size=1_281_167)
    return Schedules.from_config(cfg, d), d


def test_paper_schedule_milestones():
    s, d = paper_schedules()
    assert (d.steps_per_epoch, d.total_steps, d.warmup_steps) == (1251, 125_100, 12_510)
    v0, vw, vl = s.at(0), s.at(d.warmup_steps), s.at(d.total_steps - 1)
    assert v0.lr == 0 and v0.weight_decay == pytest.approx(0.04) and v0.momentum == pytest.approx(0.996)
    assert v0.teacher_temp == pytest.approx(0.04) and v0.last_layer_frozen
    assert vw.lr == pytest.approx(2e-3) and not vw.last_layer_frozen
    assert s.at(d.warmup_steps // 2).lr == pytest.approx(1e-3, rel=1e-3)
    assert vl.lr == pytest.approx(1e-6) and vl.weight_decay == pytest.approx(0.4) and vl.momentum == pytest.approx(1.0)
    assert vl.teacher_temp == pytest.approx(0.07)
    # teacher temperature: DINO's linspace(0.04, 0.07, 30) per epoch (step 18,765 is in epoch 15), then constant
    assert s.at(d.teacher_temp_warmup_steps // 2).teacher_temp == pytest.approx(0.04 + 0.03 * 15 / 29, rel=1e-12)
    assert s.at(d.steps_per_epoch * 29).teacher_temp == pytest.approx(0.07)  # DINO's last warm-up epoch
    assert s.at(d.teacher_temp_warmup_steps).teacher_temp == pytest.approx(0.07)
    # last layer frozen during epoch 0 exactly
    assert s.at(d.steps_per_epoch - 1).last_layer_frozen and not s.at(d.steps_per_epoch).last_layer_frozen
    # middle of the cosine: halfway between peak and min
    mid = d.warmup_steps + (d.total_steps - 1 - d.warmup_steps) / 2
    assert cosine_schedule(mid, d.total_steps, 2e-3, 1e-6, d.warmup_steps) == pytest.approx((2e-3 + 1e-6) / 2)


def test_lr_decreases_monotonically_after_warmup_and_is_pure():
    s, d = paper_schedules()
    steps = range(d.warmup_steps, d.total_steps, 997)
    lrs = [s.at(t).lr for t in steps]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.at(5000) == s.at(5000)  # no state: same step, same values


def test_schedule_functions_edges():
    assert cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=4, warmup_start=0.2) == pytest.approx(0.2)
    assert cosine_schedule(2, 10, 1.0, 0.0, warmup_steps=4) == pytest.approx(0.5)
    assert cosine_schedule(9, 10, 1.0, 0.0, warmup_steps=4) == pytest.approx(0.0)
    assert cosine_schedule(50, 10, 1.0, 0.1) == pytest.approx(0.1)  # past the end: stays at final
    assert cosine_schedule(0, 1, 1.0, 0.1) == 1.0  # a one-step run
    assert linear_warmup(3, 0, 0.04, 0.07) == 0.07 and linear_warmup(1, 2, 0.0, 1.0) == 0.5


def test_tiny_schedule_follows_schedule_steps_override():
    cfg = load_config("tiny", ["run.schedule_steps=100"]).config
    d = derive(cfg, world_size=2)
    s = Schedules.from_config(cfg, d)
    assert d.total_steps == 100 and d.warmup_steps == 10  # 2 of 20 epochs
    assert s.at(10).lr == pytest.approx(d.peak_lr) and s.at(99).lr == pytest.approx(cfg.optim.min_lr)


def test_last_layer_is_released_exactly_once_after_the_freeze():
    s, d = paper_schedules()
    released = [t for t in range(0, 3 * d.steps_per_epoch) if s.at(t).last_layer_released]
    assert released == [d.freeze_last_layer_steps] == [d.steps_per_epoch]
    none = Schedules.from_config(*(lambda c: (c, derive(c, world_size=8, dataset_size=1_281_167)))(
        load_config("mst_deit_s_100ep", ["schedule.freeze_last_layer_epochs=0"]).config))
    assert not any(none.at(t).last_layer_released or none.at(t).last_layer_frozen for t in range(3))
