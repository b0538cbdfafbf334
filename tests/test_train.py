"""`mst-ds train` end to end in this process on real shards: run files, metrics, exact resume,
refused config changes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import train_in_process

from mst_ds import checkpoint as ckpt
from mst_ds.config import ConfigError
from mst_ds.metrics import SCALARS


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_holds_config_ds_json_sha_and_metrics(trained_run):
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert cfg["optim"]["batch_size"] == 8 and cfg["model"]["arch"]
    ds = json.loads((trained_run / "ds_config.json").read_text())
    assert ds["gradient_clipping"] == 3.0 and ds["train_batch_size"] == 8
    info = json.loads((trained_run / "run_info.json").read_text())
    assert info["git_sha"] and info["derived"]["world_size"] == 1
    recs = _records(trained_run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert set(SCALARS) <= recs[-1].keys()
    assert all(r["lr"] >= 0 and r["loss"] > 0 for r in recs)
    assert list((trained_run / "tb").glob("events.out.tfevents.*"))
    assert (trained_run / "git_sha.txt").read_text().strip() == info["git_sha"]


def test_checkpoints_are_complete_and_latest_points_to_the_newest(trained_run):
    ckpt_dir = trained_run / "checkpoints"
    assert ckpt.complete_tags(ckpt_dir) == ["step00000002", "step00000004"]
    assert (ckpt_dir / "latest").read_text() == "step00000004"
    meta = ckpt.read_meta(ckpt_dir / "step00000004")
    assert (meta["step"], meta["world_size"], meta["zero_stage"]) == (4, 1, 2)
    assert (ckpt_dir / "step00000004" / "rng_rank00000.pt").exists()


def test_resume_mid_epoch_is_bit_identical(trained_run, digits_shards, tmp_path):
    """2 steps, stop, relaunch to 4 steps == the uninterrupted 4-step run (losses and weights)."""
    run_dir = tmp_path / "resumed"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=2") == 0
    assert train_in_process(run_dir, digits_shards, "run.max_steps=4") == 0
    assert [r["loss"] for r in _records(run_dir)] == [r["loss"] for r in _records(trained_run)]
    t_a, s_a = ckpt.load_teacher_student(trained_run)
    t_b, s_b = ckpt.load_teacher_student(run_dir)
    assert t_a.keys() == t_b.keys() and s_a.keys() == s_b.keys()
    assert all(torch.equal(t_a[k], t_b[k]) for k in t_a)
    assert all(torch.equal(s_a[k], s_b[k]) for k in s_a)


def test_resume_is_bit_identical_under_zero3_bf16(digits_shards, tmp_path, deepspeed_cpu):
    """Same check with partitioned parameters and bf16 weights (fp32 masters, teacher from masters)."""
    sets = ("engine.zero_stage=3", "engine.precision=bf16")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_in_process(whole, digits_shards, "run.max_steps=4", *sets) == 0
    assert train_in_process(split, digits_shards, "run.max_steps=2", *sets) == 0
    assert train_in_process(split, digits_shards, "run.max_steps=4", *sets) == 0
    assert [r["loss"] for r in _records(split)] == [r["loss"] for r in _records(whole)]
    t_a, s_a = ckpt.load_teacher_student(whole)
    t_b, s_b = ckpt.load_teacher_student(split)
    assert all(torch.equal(t_a[k], t_b[k]) for k in t_a) and all(torch.equal(s_a[k], s_b[k]) for k in s_a)


def test_keep_last_prunes_old_checkpoints(digits_shards, tmp_path, deepspeed_cpu):
    run_dir = tmp_path / "keep"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=3", "checkpoint.every_steps=1",
                            "checkpoint.keep_last=1") == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == ["step00000003"]


def test_a_different_config_is_refused_unless_allowed(trained_run, digits_shards, tmp_path):
    import shutil

    run_dir = tmp_path / "changed"
    shutil.copytree(trained_run, run_dir)
    with pytest.raises(ConfigError, match="allow_config_change"):
        train_in_process(run_dir, digits_shards, "run.max_steps=4", "loss.restore_weight=0.4")
    with pytest.raises(ConfigError, match="resume is off"):
        train_in_process(run_dir, digits_shards, "run.max_steps=4", "checkpoint.resume=false")


# Issue 18 (a structure-only refactor): the 4-step tiny run of conftest, pinned bit for bit (digests
# generated from the unmodified code of main at d6b1422).
PINNED_PLATFORM = "torch 2.14.1+cu130 AVX512 cpus 2"
PINNED = {"metrics": "e1b1715a3fd3fa3b", "checkpoint_files": "c7d739d11ffdbdb0", "teacher": "08bd1e7833d0714d",
          "student": "59d53316357b65c7", "export": "c20d2d30b84e3b9c"}


def test_a_fixed_one_rank_run_is_bit_identical_to_the_pinned_one(trained_run, tmp_path):
    from conftest import assert_pinned

    assert_pinned(trained_run, tmp_path / "teacher.safetensors", PINNED_PLATFORM, PINNED)


def test_the_training_manifest_is_read_once_per_process(digits_shards, tmp_path, monkeypatch, deepspeed_cpu):
    """Setup (sizes, steps per epoch), the data identity and the loaders share one read of the manifest
    (issue 18: it was read four times before the first step); its shards are still checked each epoch."""
    from mst_ds.data.manifest import Manifest

    reads, load = [], Manifest.load.__func__
    monkeypatch.setattr(Manifest, "load", classmethod(lambda cls, *a, **kw: reads.append(a[0]) or load(cls, *a, **kw)))
    assert train_in_process(tmp_path / "run", digits_shards, "run.max_steps=2") == 0
    assert [str(r) for r in reads] == [str(digits_shards)]
