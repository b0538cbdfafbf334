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
    from mst_ds.trainer import write_run_files

    first = load_config("tiny").config
    second = load_config("tiny", ["optim.base_lr=0.001"]).config
    write_run_files(tmp_path, first, derive(first), {"train_batch_size": 64}, "fp32")
    write_run_files(tmp_path, first, derive(first), {"train_batch_size": 64}, "fp32")
    assert not list(tmp_path.glob("config.*.yaml"))  # same config: nothing kept aside
    write_run_files(tmp_path, second, derive(second), {"train_batch_size": 64}, "fp32")
    assert config_from_file(tmp_path / "config.yaml").hash() == second.hash()
    assert config_from_file(tmp_path / f"config.{first.hash()}.yaml").hash() == first.hash()


def test_timm_folder_export_loads_strictly_and_evaluates_like_the_run(trained_run, digits_shards, tmp_path, capsys):
    """`--format timm-folder`: timm.create_model("local-dir:DIR", pretrained=True) loads it strictly and
    gives the features `mst-ds knn --ckpt RUN` computed; knn / linear / attn accept the folder."""
    import timm
    from PIL import Image

    from mst_ds.data.augment import eval_transform
    from mst_ds.data.reader import make_eval_loader

    common = ["--train", str(digits_shards), "--val", str(digits_shards), "--num-workers", "0"]
    assert main(["knn", "--ckpt", str(trained_run), *common, "--out", str(tmp_path / "run_eval")]) == 0
    out = tmp_path / "mst_tiny"
    assert main(["export", str(trained_run), "--out", str(out), "--format", "timm-folder"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    pcfg = config["pretrained_cfg"]
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["model_args"]["embed_dim"] == 64 and config["model_args"]["patch_size"] == 8
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["crop_mode"] == "center" and 0.8 < pcfg["crop_pct"] < 0.9
    assert len(pcfg["mean"]) == len(pcfg["std"]) == 3 and "license" not in pcfg
    card = (out / "README.md").read_text()
    assert "tiny" in card and "config hash" in card and "local-dir:" in card and "knn_k20_top1" not in card

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # strict load: every key, every shape
    assert model.num_classes == 0
    cached = torch.load(next((tmp_path / "run_eval" / "features").glob("*.pt")), weights_only=True)
    # The same images, the run's eval transform, in the knn cache's (key) order.
    cfg = ckpt.run_config(trained_run)
    loader, _ = make_eval_loader(str(digits_shards), transform=eval_transform(32, mean=cfg.augment.mean, std=cfg.augment.std),
                                 batch_size=512, num_workers=0)
    feats, keys = [], []
    with torch.no_grad():
        for x, _, k in loader:
            feats.append(model(x))
            keys += list(k)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    torch.testing.assert_close(torch.cat(feats)[order], cached["feats"], rtol=1e-5, atol=1e-5)

    # the evaluators take the folder: the run's own numbers
    assert main(["knn", "--ckpt", str(out), *common, "--out", str(tmp_path / "dir_eval")]) == 0
    a = json.loads((tmp_path / "run_eval" / "knn.json").read_text())["metrics"]
    assert json.loads((tmp_path / "dir_eval" / "knn.json").read_text())["metrics"] == a
    assert main(["linear", "--ckpt", str(out), *common, "--probe", "cls", "--iters", "20",
                 "--out", str(tmp_path / "dir_lin")]) == 0
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "x.png")
    assert main(["attn", "--ckpt", str(out), str(tmp_path / "x.png"), "--out", str(tmp_path / "attn")]) == 0
    assert any((tmp_path / "attn").iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # nothing added

    # with results in RUN/eval, the card lists them; a re-export replaces only its own files
    run_copy = tmp_path / "run_copy"  # (the session's run is shared: its eval/ stays as it is)
    shutil.copytree(trained_run, run_copy)
    (run_copy / "eval").mkdir(exist_ok=True)
    shutil.copy(tmp_path / "run_eval" / "knn.json", run_copy / "eval" / "knn.json")
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(run_copy), "--out", str(out), "--format", "timm-folder"]) == 0
    assert "knn_k20_top1" in (out / "README.md").read_text() and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["README.md", "config.json", "model.safetensors"])
def test_export_never_overwrites_a_file_it_did_not_write(trained_run, tmp_path, capsys, target):
    out = tmp_path / "dir"
    out.mkdir()
    (out / target).write_text("someone else's\n")
    capsys.readouterr()
    assert main(["export", str(trained_run), "--out", str(out), "--format", "timm-folder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by mst-ds export" in err[0]
    assert (out / target).read_text() == "someone else's\n" and len(list(out.iterdir())) == 1
    single = tmp_path / "m.safetensors"
    single.with_suffix(".json").write_text("{}")
    assert main(["export", str(trained_run), "--out", str(single)]) == 2
    assert not single.exists() and single.with_suffix(".json").read_text() == "{}"
