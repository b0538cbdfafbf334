"""Checkpoint layout, completeness, state dicts for eval, and `mst-ds export` → timm."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mst_ds import checkpoint as ckpt
from mst_ds.cli import UsageError, main


def test_latest_never_points_to_an_incomplete_checkpoint(tmp_path):
    d = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        tag = d / ckpt.tag_for(step)
        tag.mkdir(parents=True)
        if complete:
            (tag / ckpt.COMPLETE).write_text(json.dumps({"step": step, "samples": step, "world_size": 1,
                                                         "zero_stage": 0, "config_hash": "h", "files": {}}))
    (d / "latest").write_text(ckpt.tag_for(6))  # e.g. a DeepSpeed-written latest of a killed save
    assert ckpt.newest_complete(d) == ckpt.tag_for(4)
    (d / "latest").write_text(ckpt.tag_for(2))
    assert ckpt.newest_complete(d) == ckpt.tag_for(2)  # latest wins while it is complete
    ckpt.prune(d, keep_last=1)
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == [ckpt.tag_for(4)]
    assert ckpt.resolve(tmp_path) == (d, ckpt.tag_for(4))
    shutil.rmtree(d / ckpt.tag_for(4))
    with pytest.raises(UsageError, match="no complete checkpoint"):
        ckpt.resolve(tmp_path)


def test_resolve_accepts_run_checkpoints_and_tag_dirs(trained_run):
    tag_dir = trained_run / "checkpoints" / "step00000002"
    assert ckpt.resolve(trained_run) == (trained_run / "checkpoints", "step00000004")
    assert ckpt.resolve(trained_run / "checkpoints") == (trained_run / "checkpoints", "step00000004")
    assert ckpt.resolve(tag_dir) == (trained_run / "checkpoints", "step00000002")


def test_teacher_and_student_state_dicts(trained_run):
    teacher, student = ckpt.load_teacher_student(trained_run)
    assert set(teacher) < set(student)  # the student also has the mask token's decoder, center, ...
    assert all(v.dtype == torch.float32 for v in teacher.values() if v.is_floating_point())
    assert any("decoder" in k for k in student) and not any("decoder" in k for k in teacher)
    # teacher = EMA of the student: close, but not equal after 4 steps at m ≈ 0.996
    k = "backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(teacher[k], student[k]) and torch.allclose(teacher[k], student[k], atol=0.05)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export_loads_in_timm_with_the_checkpoint_features(trained_run, tmp_path, which):
    import timm

    from mst_ds.config import config_from_file
    from mst_ds.model.backbone import Backbone

    out = tmp_path / f"{which}.safetensors"
    assert main(["export", str(trained_run), "--out", str(out), "--which", which]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(meta["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              **meta["model_args"]).eval()

    cfg = config_from_file(trained_run / "config.yaml")
    teacher, student = ckpt.load_teacher_student(trained_run)
    state = teacher if which == "teacher" else student
    ours = Backbone.from_config(cfg.model, drop_path_rate=0.0)
    ours.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    ours.eval()
    x = torch.randn(3, 3, cfg.augment.global_crop_size, cfg.augment.global_crop_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x).cls, rtol=1e-5, atol=1e-5)


def test_export_bad_input_is_one_line_exit_2(tmp_path, trained_run, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["export", str(trained_run), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("mst-ds: error:") for line in err)


def test_a_killed_save_leaves_the_previous_checkpoint_resumable(trained_run, tmp_path):
    """Simulate the state a SIGKILL during the save of step 6 leaves (the slow test kills for real)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    half = run / "checkpoints" / "step00000006"
    shutil.copytree(run / "checkpoints" / "step00000004", half)
    (half / ckpt.COMPLETE).unlink()
    assert ckpt.resolve(run) == (run / "checkpoints", "step00000004")


def test_run_files_keep_the_previous_config_on_an_allowed_change(tmp_path):
    from mst_ds.config import config_from_file, derive, load_config
    from mst_ds.train import write_run_files

    first = load_config("tiny").config
    second = load_config("tiny", ["optim.base_lr=0.001"]).config
    write_run_files(tmp_path, first, derive(first), {"train_batch_size": 64}, "fp32")
    write_run_files(tmp_path, first, derive(first), {"train_batch_size": 64}, "fp32")
    assert not list(tmp_path.glob("config.*.yaml"))  # same config: nothing kept aside
    write_run_files(tmp_path, second, derive(second), {"train_batch_size": 64}, "fp32")
    assert config_from_file(tmp_path / "config.yaml").hash() == second.hash()
    assert config_from_file(tmp_path / f"config.{first.hash()}.yaml").hash() == first.hash()
