"""Issue 33, the reuse rule: a cached or reused result carries the identity of the network and the data
it was computed from and is reused only when both match (defects 2, 3, 4, 5). Each test failed on the
code before the rule (cache keyed by a checkpoint's path/tag/step, an ImageFolder by its class folders'
mtimes, report averaging any results, the model card listing every result of the run)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from mst_ds import checkpoint as ckpt_mod
from mst_ds.cli import main
from mst_ds.eval.identity import data_identity, network_identity
from tests.conftest import digits_folders


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Small real digits ImageFolders: train 20 / class, val 8 / class (10 classes)."""
    return digits_folders(tmp_path_factory, "reuse", 20, 8)


def _knn(train, val, out, *extra):
    return main(["knn", "--train", str(train), "--val", str(val), "--out", str(out), "--num-workers", "0",
                 "--batch-size", "64", "--k", "5", *extra])


def _knn_random(train, val, out, *extra):
    return _knn(train, val, out, "--preset", "tiny", *extra)


def _result(out):
    return json.loads((out / "knn.json").read_text())


# -- defect 2: an ImageFolder's identity is the listing its loader reads ------------------------------
def test_images_added_in_a_nested_folder_are_new_data(digits, tmp_path, one_thread):
    val = tmp_path / "val"
    shutil.copytree(digits / "val", val)
    (val / "3" / "more").mkdir()  # exists before: adding files into it leaves "3"'s mtime alone
    out = tmp_path / "o"
    assert _knn_random(digits / "train", val, out) == 0
    assert _result(out)["n_val"] == 80
    for f in sorted((digits / "val" / "5").iterdir()):
        shutil.copy2(f, val / "3" / "more" / f"x{f.name}")  # 8 more images the loader reads (as class 3)
    assert _knn_random(digits / "train", val, out) == 0
    assert _result(out)["n_val"] == 88  # before: 80, the cached features of the old listing


def test_images_rewritten_in_place_are_new_data(digits, tmp_path, one_thread):
    val = tmp_path / "val"
    shutil.copytree(digits / "val", val)
    out = tmp_path / "o"
    assert _knn_random(digits / "train", val, out) == 0
    first = _result(out)
    # Every image of class 3 replaced by one of class 8, same names: no folder's mtime changes.
    eights = sorted((digits / "val" / "8").iterdir())
    for f, src in zip(sorted((val / "3").iterdir()), eights):
        f.write_bytes(src.read_bytes())
    assert _knn_random(digits / "train", val, out) == 0
    again = _result(out)
    fresh_out = tmp_path / "fresh"
    assert _knn_random(digits / "train", val, fresh_out, "--no-cache") == 0
    assert again["metrics"] == _result(fresh_out)["metrics"]
    assert again["data"]["val"] != first["data"]["val"]


def test_data_identity_follows_the_listing_not_the_folder_mtimes(digits, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(digits / "val", val)
    before = data_identity(str(val))
    f = sorted((val / "0").iterdir())[0]
    st = f.stat()
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert data_identity(str(val)) != before
    assert data_identity(str(val))["files"] == 80


# -- defect 3: the feature cache is keyed by the weights ----------------------------------------------
def _perturb_teacher(tag_dir):
    """Other teacher weights under the same tag name and step (a run deleted and retrained at one path,
    or a rolled-back step relaunched): the checkpoint stays intact (its marker records the new size)."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    states = ckpt_mod.safe_load(path)
    gen = torch.Generator().manual_seed(1)
    for k, v in states["teacher"].items():
        if k.startswith("backbone.") and v.is_floating_point():
            states["teacher"][k] = v + 0.5 * torch.randn(v.shape, generator=gen)
    torch.save(states, path)
    meta = json.loads((tag_dir / "complete.json").read_text())
    meta["files"]["mp_rank_00_model_states.pt"] = path.stat().st_size
    (tag_dir / "complete.json").write_text(json.dumps(meta))


def test_feature_cache_is_not_served_to_other_weights_at_the_same_tag(trained_run, digits, tmp_path, one_thread):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    out = tmp_path / "o"
    assert _knn(digits / "train", digits / "val", out, "--ckpt", str(run)) == 0
    first = _result(out)
    _perturb_teacher(run / "checkpoints" / "step00000004")
    assert _knn(digits / "train", digits / "val", out, "--ckpt", str(run)) == 0
    again = _result(out)
    assert _knn(digits / "train", digits / "val", tmp_path / "fresh", "--ckpt", str(run), "--no-cache") == 0
    assert again["model"]["step"] == first["model"]["step"] == 4
    assert again["model"]["weights"] != first["model"]["weights"]
    assert again["metrics"] == _result(tmp_path / "fresh")["metrics"]  # before: first's, from the cache
    assert len(list((out / "features").glob("*.pt"))) == 4  # the old entries are not overwritten, just unused


def test_network_identity_ignores_the_path_and_sees_the_files(trained_run, tmp_path):
    from mst_ds.config import load_config

    cfg = ckpt_mod.run_config(trained_run)
    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)  # copy2 keeps mtimes: the same files, another place
    assert network_identity(str(trained_run), cfg, "teacher") == network_identity(str(moved), cfg, "teacher")
    assert network_identity(str(trained_run), cfg, "teacher") != network_identity(str(trained_run), cfg, "student")
    step2 = network_identity(str(trained_run / "checkpoints" / "step00000002"), cfg, "teacher")
    assert step2["step"] == 2 and step2 != network_identity(str(trained_run), cfg, "teacher")
    rnd = load_config("tiny").config
    assert network_identity(None, rnd, "teacher")["which"] == "random"


# -- defect 4: report aggregates only results of the same data, step and --which ----------------------
def test_report_refuses_one_network_on_two_val_sets(digits, tmp_path, capsys, one_thread):
    val2 = tmp_path / "val2"
    shutil.copytree(digits / "val", val2)
    for f in sorted((val2 / "4").iterdir())[:4]:
        f.unlink()
    assert _knn_random(digits / "train", digits / "val", tmp_path / "a") == 0
    assert _knn_random(digits / "train", val2, tmp_path / "b") == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different data" in err[0]  # before: "mean ± s.e. over seeds", n 2, exit 0
    assert not (tmp_path / "rep").exists()


def test_report_refuses_one_network_counted_twice_and_other_steps(digits, tmp_path, capsys, one_thread):
    assert _knn_random(digits / "train", digits / "val", tmp_path / "a") == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 2
    assert "results of one network" in capsys.readouterr().err
    rec = _result(tmp_path / "b")
    rec["model"] = {**rec["model"], "weights": "files:other", "step": 7}
    (tmp_path / "b" / "knn.json").write_text(json.dumps(rec))
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 2
    assert "different steps" in capsys.readouterr().err


# -- defect 5: a folder export's model card lists only its own network's results ----------------------
def test_model_card_lists_only_the_exported_checkpoints_results(trained_run, digits, tmp_path, one_thread):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    assert _knn(digits / "train", digits / "val", run / "eval", "--ckpt", str(run)) == 0  # step 4's k-NN
    assert main(["export", str(run / "checkpoints" / "step00000002"), "--out", str(tmp_path / "s2"),
                 "--format", "timm-folder"]) == 0
    card = (tmp_path / "s2" / "README.md").read_text()
    assert "knn_k5_top1" not in card and "No k-NN or linear result of this checkpoint" in card  # before: step 4's
    assert main(["export", str(run), "--out", str(tmp_path / "s4"), "--format", "timm-folder"]) == 0
    assert "knn_k5_top1" in (tmp_path / "s4" / "README.md").read_text()
    assert main(["export", str(run), "--out", str(tmp_path / "st"), "--format", "timm-folder", "--which", "student"]) == 0
    assert "knn_k5_top1" not in (tmp_path / "st" / "README.md").read_text()  # the teacher's result
