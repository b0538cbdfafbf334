"""Issue 9 cases 1–3 for the evaluators: classes matched by name, exports that carry their eval
settings, and missing shards that stop a run instead of shrinking it (real digits, tiny preset)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from data_tools.sample_data import write_digits_imagefolder
from data_tools.writer import write_shards
from mst_ds.cli import main
from mst_ds.config import UsageError, load_config
from mst_ds.data.augment import eval_transform
from mst_ds.data.manifest import Manifest
from mst_ds.data.reader import make_eval_loader
from mst_ds.eval.features import extract_features, load_backbone, match_classes
from mst_ds.eval.knn import weighted_knn

SUBSET = ("3", "5", "7")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Real digits: train 40 / class, val 15 / class, a val holding only 3, 5, 7, and one with a class
    train does not have (folder 7 renamed to 'seven')."""
    full = write_digits_imagefolder(tmp_path_factory.mktemp("digits_full"), size=32)
    root = tmp_path_factory.mktemp("digits_trust")
    for split, src, per_class in (("train", full.train, 40), ("val", full.val, 15)):
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            for f in sorted(cls.iterdir())[:per_class]:
                (root / split / cls.name).mkdir(parents=True, exist_ok=True)
                (root / split / cls.name / f.name).write_bytes(f.read_bytes())
    for name in SUBSET:
        shutil.copytree(root / "val" / name, root / "val_357" / name)
    shutil.copytree(root / "val_357", root / "val_renamed")
    (root / "val_renamed" / "7").rename(root / "val_renamed" / "seven")
    return root


def knn(folders, out, val, *extra, train="train"):
    return main(["knn", "--preset", "tiny", "--train", str(folders / train), "--val", str(folders / val),
                 "--out", str(out), "--num-workers", "0", "--batch-size", "64", "--k", "10", *extra])


def test_match_classes_maps_by_name():
    labels = torch.tensor([0, 1, 2, 2, 0])  # val's own indices of ["3", "5", "x"]
    m = match_classes([str(i) for i in range(10)], ["3", "5", "x"], labels, policy="exclude",
                      train_source="t", val_source="v")
    assert m.labels.tolist() == [3, 5, 3] and m.keep.tolist() == [True, True, False, False, True]
    assert m.excluded == {"x": 2}
    with pytest.raises(UsageError, match="val classes unknown to the training data t: x"):
        match_classes([str(i) for i in range(10)], ["3", "5", "x"], labels, policy="error", train_source="t",
                      val_source="v")


def test_knn_on_a_val_subset_matches_classes_by_name(folders, tmp_path, one_thread):
    """Case 1: val with only 3, 5, 7 (ImageFolder labels 0, 1, 2) was scored against train labels 3, 5, 7
    by index (≈ 0 % correct). Now it equals the full-val predictions restricted to those classes."""
    assert knn(folders, tmp_path / "sub", "val_357") == 0
    rec = json.loads((tmp_path / "sub" / "knn.json").read_text())
    assert rec["num_classes"] == 10 and rec["val_classes"] == list(SUBSET) and rec["n_val"] == 45
    assert rec["n_excluded"] == 0
    # The same protocol by hand on the full val folder, restricted to the three classes.
    cfg = load_config("tiny").config
    backbone = load_backbone(None, cfg)
    tf = eval_transform(32, mean=cfg.augment.mean, std=cfg.augment.std)
    feats = {}
    for split in ("train", "val"):
        loader, _ = make_eval_loader(str(folders / split), transform=tf, batch_size=64, num_workers=0)
        feats[split] = extract_features(backbone, loader, show_progress=False)
    res = weighted_knn(*feats["train"], *feats["val"], [10], cfg.eval.knn_temperature, 10)
    y = feats["val"][1]
    rows = (y == 3) | (y == 5) | (y == 7)
    expected = 100.0 * float((res.predictions[10][rows, 0] == y[rows]).sum()) / int(rows.sum())
    assert expected > 30  # far from what index matching gave
    assert abs(rec["metrics"]["knn_k10_top1"] - expected) <= 100.0 / 45 + 1e-9  # at most one near-tie apart


def test_unknown_val_class_is_an_error_or_excluded_and_reported(folders, tmp_path, capsys):
    assert knn(folders, tmp_path / "a", "val_renamed") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown to the training data" in err and "seven" in err
    assert not (tmp_path / "a" / "knn.json").exists()
    assert knn(folders, tmp_path / "b", "val_renamed", "--unknown-classes", "exclude") == 0
    out = capsys.readouterr().out
    assert "excluded 15 val images" in out and "seven" in out
    rec = json.loads((tmp_path / "b" / "knn.json").read_text())
    assert rec["excluded_classes"] == {"seven": 15} and rec["n_excluded"] == 15 and rec["n_val"] == 30
    assert rec["val_classes"] == ["3", "5"]


def test_linear_probe_matches_classes_by_name(folders, tmp_path):
    def probe(val, out):
        args = ["linear", "--preset", "tiny", "--train", str(folders / "train"), "--val", str(folders / val),
                "--out", str(tmp_path / out), "--num-workers", "0", "--probe", "cls", "--iters", "300",
                "--set", "eval.linear_batch_size=64", "--lr-sweep", "1"]
        assert main(args) == 0
        return json.loads((tmp_path / out / "linear_cls.json").read_text())

    full, sub = probe("val", "full"), probe("val_357", "sub")
    assert sub["num_classes"] == full["num_classes"] == 10 and sub["n_val"] == 45
    assert full["best"]["top1"] > 20  # twice chance: random-init features (24.7 measured with DINO's cls init)
    # Index matching scored 3/5/7 against head outputs 0/1/2: near zero. Matched, the subset scores
    # like the full set (same heads, a subset of its rows).
    assert sub["best"]["top1"] > 0.5 * full["best"]["top1"]


# --------------------------------------------------------------------------------------------------
# Case 3: a missing shard stops k-NN and training with one line (exit 2) instead of shrinking the data
# --------------------------------------------------------------------------------------------------
@pytest.fixture()
def shards_one_missing(folders, tmp_path):
    out = tmp_path / "shards"
    write_shards(folders / "train", out, split="train", max_count=64, progress=False)
    gone = Manifest.load(out).shards[1].name
    (out / gone).unlink()
    return out, gone


def test_knn_with_a_missing_shard_is_one_line_exit_2(folders, shards_one_missing, tmp_path, capsys):
    shards, gone = shards_one_missing
    assert main(["knn", "--preset", "tiny", "--train", str(shards), "--val", str(folders / "val"),
                 "--out", str(tmp_path / "o"), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and gone in err and "missing" in err


def test_training_with_a_missing_shard_stops_before_starting(shards_one_missing, tmp_path, capsys):
    shards, gone = shards_one_missing
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--set", f"data.train={shards}", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and gone in err
    assert not run.exists()  # stopped before DeepSpeed started or wrote anything


# --------------------------------------------------------------------------------------------------
# Case 2: an export carries its eval settings
# --------------------------------------------------------------------------------------------------
def test_export_carries_its_eval_settings(trained_run, folders, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["mst_ds"])
    settings = meta["eval_settings"]
    assert settings["eval.image_size"] == 32 and settings["eval.knn_k"] == [10, 20]
    assert settings["model.timm_kwargs"]["patch_size"] == 8 and meta["patch_size"] == 8
    assert settings["augment.mean"] == [0.485, 0.456, 0.406] and meta["source"]["which"] == "teacher"
    assert len(meta["source"]["config_hash"]) >= 8

    def run_knn(ckpt, name, *extra):
        code = main(["knn", "--ckpt", str(ckpt), "--train", str(folders / "train"), "--val", str(folders / "val_357"),
                     "--out", str(tmp_path / name), "--num-workers", "0", "--batch-size", "64", *extra])
        return code, (json.loads((tmp_path / name / "knn.json").read_text()) if code == 0 else None)

    # Without --preset: the export's image size and k list, the same numbers as the run itself.
    code, from_export = run_knn(out, "export")
    assert code == 0 and from_export["image_size"] == 32 and set(from_export["results"]) == {"10", "20"}
    code, from_run = run_knn(trained_run, "run")
    assert code == 0 and from_export["metrics"] == from_run["metrics"]
    # A --preset that disagrees with the export: one line naming both values.
    capsys.readouterr()
    code, _ = run_knn(out, "conflict", "--preset", "mst_deit_s_100ep")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "model.arch" in err and "vit_tiny_patch16_224" in err and "deit_small_patch16_224" in err
    code, agreeing = run_knn(out, "agree", "--preset", "tiny")
    assert code == 0 and agreeing["metrics"] == from_export["metrics"]
    # An export without settings (older or foreign file) needs --preset.
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(out)), str(bare))
    capsys.readouterr()
    code, _ = run_knn(bare, "bare")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--preset" in err
    code, with_preset = run_knn(bare, "bare_tiny", "--preset", "tiny")
    assert code == 0 and with_preset["metrics"] == from_export["metrics"]


def test_undecodable_val_image_is_counted_or_an_error(folders, tmp_path, capsys):
    from data_tools import sample_data

    val = tmp_path / "val"
    shutil.copytree(folders / "val_357", val)
    (val / "5" / "zz_bad.png").write_bytes(sample_data.undecodable_jpeg_bytes(sample_data.generated_image(1, 32, 32)))
    assert main(["knn", "--preset", "tiny", "--train", str(folders / "train"), "--val", str(val), "--out",
                 str(tmp_path / "a"), "--num-workers", "0", "--k", "10"]) == 0
    rec = json.loads((tmp_path / "a" / "knn.json").read_text())
    assert rec["corrupt_samples"] == {"train": 0, "val": 1} and rec["n_val"] == 45
    assert "1 images fail to decode" in capsys.readouterr().err
    assert main(["knn", "--preset", "tiny", "--train", str(folders / "train"), "--val", str(val), "--out",
                 str(tmp_path / "b"), "--num-workers", "0", "--k", "10", "--set", "data.corrupt_policy=error"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zz_bad.png" in err
