"""Issue 31: warm start (model.init_from) from this project's export, a timm folder or a DINO checkpoint:
the first step's teacher equals the source, the optimizer starts fresh, unmatched keys are one line, and
the source's identity (path, sha256) is recorded in run_info.json and the export's model card."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import TRAIN_SETS, train_in_process

from mst_ds import checkpoint as ckpt
from mst_ds import job
from mst_ds.cli import main
from mst_ds.config import ConfigError, load_config
from mst_ds.eval.features import load_backbone
from mst_ds.trainer import setup


@pytest.fixture(scope="module")
def export(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "teacher.safetensors"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    return out


def _started(tmp_path, shards, *sets):
    """setup() of a fresh run (distributed start, model, warm start, engine) → Training, before step 1."""
    cfg = load_config("tiny", [*TRAIN_SETS, f"data.train={shards}", *sets]).config
    run_dir = tmp_path / "warm"
    lock = job.RunLock(run_dir)
    try:
        t, tag, _ = setup(cfg, run_dir, lock)
    finally:
        lock.release()
    assert tag is None
    return t, cfg, run_dir


def _features(backbone, x):
    backbone.eval()
    with torch.no_grad():
        return backbone(x).cls


def test_the_first_steps_teacher_is_the_export(export, digits_shards, tmp_path):
    t, cfg, run_dir = _started(tmp_path, digits_shards, f"model.init_from={export}")
    x = torch.randn(3, 3, 32, 32)
    expected = _features(load_backbone(str(export), cfg), x)
    assert torch.equal(_features(t.teacher.backbone, x), expected)  # what step 1's teacher forward sees
    assert torch.equal(_features(t.engine.module.backbone, x), expected)  # the student starts equal
    assert t.step == 0 and t.schedules.at(0).lr < t.derived.peak_lr  # step 0 of fresh schedules (lr warm-up)
    info = json.loads((run_dir / "run_info.json").read_text())["init_from"]
    assert info["sha256"] == hashlib.sha256(export.read_bytes()).hexdigest() and info["kind"] == "safetensors"
    assert info["source_keys_not_loaded"] == [] and info["tensors_loaded"] > 10


def test_a_dino_checkpoint_is_read_weights_only_with_its_head(trained_run, digits_shards, tmp_path, capsys):
    """DINO's training-checkpoint layout (module.backbone.*, head with weight_g / weight_v); one extra
    key is named in the one line about unmatched keys."""
    teacher, _ = ckpt.load_teacher_student(trained_run)
    dino = {"module." + k.replace("backbone.vit.", "backbone.").replace("parametrizations.weight.original0", "weight_g")
            .replace("parametrizations.weight.original1", "weight_v"): v
            for k, v in teacher.items() if k != "backbone.mask_token"}  # DINO's ViT has no mask token
    dino["module.backbone.extra_token"] = torch.zeros(2)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": dino, "student": dino, "epoch": 3}, path)
    t, cfg, _ = _started(tmp_path, digits_shards, f"model.init_from={path}", "model.init_from_parts=backbone+head")
    assert all(torch.equal(v, teacher[k]) for k, v in t.teacher.state_dict().items() if k.startswith(("backbone.vit", "head.")))
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warm start from")]
    assert len(said) == 1 and "extra_token" in said[0] and "1 source key(s) not loaded" in said[0]


def test_a_file_that_is_not_weights_only_is_refused_in_one_line(tmp_path):
    from mst_ds.model.mst import MSTModel
    from mst_ds.warm_start import warm_start

    path = tmp_path / "code.pth"
    torch.save({"teacher": {"x": torch.zeros(1)}, "hook": ConfigError("pickled object")}, path)
    model = MSTModel.from_config(load_config("tiny").config)
    with pytest.raises(ConfigError, match="not a weights-only torch checkpoint") as err:
        warm_start(model, path, "backbone")
    assert "\n" not in str(err.value)


def test_the_source_is_recorded_in_the_export_model_card(export, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=2", f"model.init_from={export}") == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "folder"), "--format", "timm-folder"]) == 0
    card = (tmp_path / "folder" / "README.md").read_text()
    assert hashlib.sha256(export.read_bytes()).hexdigest() in card and str(export) in card
