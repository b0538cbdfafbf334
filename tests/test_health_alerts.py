"""Run health on the real engine (tiny preset, one process, a few steps): each alert rule trips on a
config made to trip it, `run.on_alert: stop` stops with a checkpoint, and the online k-NN monitor keeps
a resumed run bit-identical."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_in_process

from mst_ds import checkpoint as ckpt
from mst_ds.health import ALERTS_FILE
from mst_ds.metrics import HEALTH_SCALARS, MODEL_SCALARS


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _alerts(run_dir) -> list[str]:
    path = run_dir / ALERTS_FILE
    return [json.loads(line)["rule"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def monitor_data(digits_shards):
    """The held-out digits (359) as an ImageFolder: the monitor cuts it into bank and query."""
    return digits_shards.parent / "folder" / "val"


# Every rule checked from the first step; the k-NN rule from the first monitored step.
FROM_START = ("health.start_fraction=0", "health.knn_after_fraction=0", "health.flat_attention_after_fraction=0")


@pytest.mark.parametrize("rules, sets", [
    # A teacher temperature far too high: the teacher output is uniform.
    (("uniform_collapse",), ("loss.teacher_temp=2.0", "loss.warmup_teacher_temp=2.0")),
    # An lr far too high with the teacher a copy of the student: within 3 steps every image gets the
    # same features (std of the normalised CLS × √D measured 0.03) and the same one-hot teacher output.
    # The crafted collapse uses the pre-issue-19 balance and init (mean reduction, timm's cls token and
    # position-embedding resampling): with mean_ln_k's stronger restoration the DINO outputs still collapse
    # onto one prototype but the CLS features stay apart (measured std × √D 0.15 at step 4, threshold 0.05).
    (("dimensional_collapse", "one_prototype_collapse"),
     ("optim.base_lr=100", "schedule.momentum_teacher=0", "schedule.momentum_teacher_end=0",
      "schedule.warmup_epochs=0", "run.max_steps=4", "loss.restore_reduction=mean", "model.cls_token_init=timm", "model.pos_embed_interp=timm")),
])
def test_rule_trips_on_its_crafted_config(rules, sets, digits_shards, tmp_path, deepspeed_cpu):
    run_dir = tmp_path / "run"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=2", *FROM_START, *sets) == 0
    assert set(rules) <= set(_alerts(run_dir))
    recs = _records(run_dir)
    assert recs[-1]["alerts"] == len(_alerts(run_dir)) >= 1
    assert set(MODEL_SCALARS) | set(HEALTH_SCALARS) <= recs[-1].keys()


def test_the_tiny_preset_at_init_trips_only_flat_attention(digits_shards, tmp_path, deepspeed_cpu):
    """The control for the crafted configs: the same first steps with the preset's own settings trip
    none of the collapse rules (only the flat attention every untrained network has)."""
    run_dir = tmp_path / "control"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=2", *FROM_START) == 0
    assert _alerts(run_dir) == ["flat_attention"]


@pytest.mark.parametrize("policy, rc", [("skip", 0), ("stop", 1)])
def test_nonfinite_loss_trips_the_alert(policy, rc, digits_shards, tmp_path, deepspeed_cpu, monkeypatch):
    monkeypatch.setenv("MST_DS_FAULT", "nan@2")
    run_dir = tmp_path / "nan"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=3", f"engine.nan_policy={policy}", *FROM_START) == rc
    assert "loss_not_finite" in _alerts(run_dir)


def test_knn_not_improving_trips_when_nothing_learns(digits_shards, monitor_data, tmp_path, deepspeed_cpu):
    """lr ≈ 0: the teacher does not move, the online k-NN stays at its step-0 value."""
    run_dir = tmp_path / "frozen"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=2", *FROM_START, "optim.base_lr=1e-12",
                            "optim.min_lr=0", f"eval.monitor.bank={monitor_data}", "eval.monitor.every_steps=2",
                            "eval.monitor.num_workers=0", "eval.monitor.k=10") == 0
    recs = _records(run_dir)
    assert recs[0]["step"] == 0 and "loss" not in recs[0]
    assert recs[-1]["monitor_knn_top1"] == recs[0]["monitor_knn_top1"]
    assert "knn_not_improving" in _alerts(run_dir)


def test_on_alert_stop_saves_a_checkpoint_and_exits_1(digits_shards, tmp_path, deepspeed_cpu, capsys):
    run_dir = tmp_path / "stop"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=4", *FROM_START, "run.on_alert=stop") == 1
    assert _alerts(run_dir)[0] == "flat_attention"
    assert ckpt.newest_complete(run_dir / "checkpoints") == ckpt.tag_for(1)
    err = capsys.readouterr().err
    assert "mst-ds: alert: flat_attention at step 1" in err and "stopped at step 1 on a health alert" in err


def test_monitor_keeps_resume_bit_identical(digits_shards, monitor_data, trained_run, tmp_path):
    """2 steps + relaunch to 4 == 4 steps straight, with the online k-NN evaluated every 2 steps."""
    sets = (f"eval.monitor.bank={monitor_data}", "eval.monitor.every_steps=2", "eval.monitor.num_workers=0",
            "eval.monitor.k=10")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_in_process(whole, digits_shards, "run.max_steps=4", *sets) == 0
    assert train_in_process(split, digits_shards, "run.max_steps=2", *sets) == 0
    assert train_in_process(split, digits_shards, "run.max_steps=4", *sets) == 0
    a, b = _records(whole), _records(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in a if "monitor_knn_top1" in r] == [0, 2, 4]
    for key in ("loss", "monitor_knn_top1", "teacher_entropy_rel", "attn_guidance", "restore_grad_share"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    t_a, s_a = ckpt.load_teacher_student(whole)
    t_b, s_b = ckpt.load_teacher_student(split)
    assert all(torch.equal(t_a[k], t_b[k]) for k in t_a) and all(torch.equal(s_a[k], s_b[k]) for k in s_a)
    # The monitor did not change the trajectory either: the same 4 steps without it (conftest's run).
    assert [r["loss"] for r in _records(trained_run)] == [r["loss"] for r in a[1:]]
    t_c, s_c = ckpt.load_teacher_student(trained_run)
    assert all(torch.equal(t_a[k], t_c[k]) for k in t_a) and all(torch.equal(s_a[k], s_c[k]) for k in s_a)


def test_monitor_keeps_decoded_images_and_gives_the_same_numbers(monitor_data, tmp_path):
    """The monitor's images are decoded once and kept (they fit): a second evaluation reads no file and
    gives the numbers of a monitor that decodes every time; over the memory bound nothing is kept."""
    import shutil

    from mst_ds.config import UsageError, load_config
    from mst_ds.eval.monitor import OnlineKNN
    from mst_ds.model import MSTModel

    folder = tmp_path / "val"
    shutil.copytree(monitor_data, folder)
    cfg = load_config("tiny", [f"eval.monitor.bank={folder}", "eval.monitor.k=5"]).config
    torch.manual_seed(0)
    teacher = MSTModel.from_config(cfg).make_teacher().backbone
    cpu = torch.device("cpu")
    every_time = OnlineKNN(cfg, rank=0, world=1, device=cpu, keep_bytes=0)
    too_small = OnlineKNN(cfg, rank=0, world=1, device=cpu, keep_bytes=1)
    kept = OnlineKNN(cfg, rank=0, world=1, device=cpu)
    reference = every_time.evaluate(teacher)
    assert cfg.eval.monitor.batch_size == 64  # the tiny preset's (faster on CPU): batch 256 gives the same numbers
    wide = load_config("tiny", [f"eval.monitor.bank={folder}", "eval.monitor.k=5", "eval.monitor.batch_size=256"]).config
    assert OnlineKNN(wide, rank=0, world=1, device=cpu, keep_bytes=0).evaluate(teacher) == reference
    assert too_small.evaluate(teacher) == reference and not too_small.kept and str(folder) in too_small.too_big
    assert kept.evaluate(teacher) == reference and str(folder) in kept.kept
    shutil.rmtree(folder)  # the kept monitor must not need the files any more
    assert kept.evaluate(teacher) == reference
    with pytest.raises(UsageError, match="no such data"):  # one that decodes every time does
        every_time.evaluate(teacher)
