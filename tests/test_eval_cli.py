"""The evaluation commands end to end on real images (scikit-learn digits as an ImageFolder), tiny preset."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from data_tools.sample_data import SplitFolders, write_digits_imagefolder
from mst_ds.cli import main
from mst_ds.config import load_config
from mst_ds.eval.features import load_backbone


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A 50 + 20 per class subset of the real digits split (keeps every test to seconds)."""
    full = write_digits_imagefolder(tmp_path_factory.mktemp("digits_full"), size=32)
    root = tmp_path_factory.mktemp("digits")
    counts = {}
    for split, src, per_class in (("train", full.train, 50), ("val", full.val, 20)):
        n = 0
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                (root / split / cls.name / f.name).write_bytes(f.read_bytes())
                n += 1
        counts[split] = n
    return SplitFolders(root / "train", root / "val", 10, counts["train"], counts["val"])


def knn_args(digits, out, *extra):
    return ["knn", "--preset", "tiny", "--train", str(digits.train), "--val", str(digits.val), "--out", str(out),
            "--num-workers", "0", "--batch-size", "256", *extra]


def test_random_init_knn_without_checkpoint(digits, tmp_path, capsys):
    out = tmp_path / "knn"
    assert main(knn_args(digits, out)) == 0
    rec = json.loads((out / "knn.json").read_text())
    assert rec["ckpt"] == "random" and rec["n_train"] == digits.train_count and rec["n_val"] == digits.val_count
    assert rec["feature_dim"] == 64 and rec["num_classes"] == 10
    assert set(rec["metrics"]) == {"knn_k10_top1", "knn_k10_top5", "knn_k20_top1", "knn_k20_top5"}
    # even a random ViT's features of real digits are far above chance (10 %)
    assert 25 < rec["metrics"]["knn_k20_top1"] < 100
    assert "top-1" in capsys.readouterr().out
    # cached features: a second run with other k reads them and agrees on the shared k
    cached = sorted((out / "features").glob("*.pt"))
    assert len(cached) == 2
    assert main(knn_args(digits, out, "--k", "20,50", "--temperature", "0.07")) == 0
    rec2 = json.loads((out / "knn.json").read_text())
    assert rec2["metrics"]["knn_k20_top1"] == rec["metrics"]["knn_k20_top1"]
    assert sorted((out / "features").glob("*.pt")) == cached


def test_timm_safetensors_export_evaluates_like_the_network_it_holds(digits, tmp_path):
    cfg = load_config("tiny").config
    backbone = load_backbone(None, cfg)  # the random init of the preset (run.seed 0)
    path = tmp_path / "export.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.timm_state_dict().items()}, str(path))
    assert main(knn_args(digits, tmp_path / "a", "--ckpt", str(path))) == 0
    assert main(knn_args(digits, tmp_path / "b")) == 0
    a = json.loads((tmp_path / "a" / "knn.json").read_text())["metrics"]
    b = json.loads((tmp_path / "b" / "knn.json").read_text())["metrics"]
    assert a == b
    # a different seed is a different network
    assert main(knn_args(digits, tmp_path / "c", "--set", "run.seed=5")) == 0
    assert json.loads((tmp_path / "c" / "knn.json").read_text())["metrics"] != b


def test_linear_probe_command_and_resume(digits, tmp_path, capsys):
    out = tmp_path / "lin"
    args = ["linear", "--preset", "tiny", "--train", str(digits.train), "--val", str(digits.val), "--out", str(out),
            "--num-workers", "0", "--probe", "dino", "--protocol", "dino", "--epochs", "8", "--lr-grid", "0.00024", "--lr-sweep", "0.05,10",
            "--no-augment", "--set", "eval.n_last_blocks=2", "--set", "eval.linear_batch_size=128"]
    assert main(args) == 0
    rec = json.loads((out / "linear_dino.json").read_text())
    assert rec["feature_dim"] == 128 and len(rec["heads"]) == 3
    assert [h["base_lr"] for h in rec["heads"]] == [0.00024, 0.05, 10.0]
    assert rec["heads"][1]["lr"] == pytest.approx(0.05 * 128 / 1024)
    # chosen on the held-out training samples, reported on val
    sel = rec["selection"]
    assert sel["on"] == "held-out training samples" and sel["n_holdout"] + sel["n_train"] == digits.train_count
    assert 0.05 * digits.train_count < sel["n_holdout"] < 0.15 * digits.train_count
    assert rec["best"]["holdout_top1"] == max(h["holdout_top1"] for h in rec["heads"])
    assert [h["chosen"] for h in rec["heads"]].count(True) == 1
    assert max(h["top1"] for h in rec["heads"]) > 20  # above chance (10 %) after a few steps on random-init features
    assert (out / "linear_dino_state.pt").exists()
    capsys.readouterr()
    assert main(args) == 0  # finished state on disk: resumes after epoch 3, trains nothing, same numbers
    assert "resuming the linear probe after epoch 8/8" in capsys.readouterr().out
    assert json.loads((out / "linear_dino.json").read_text())["heads"] == rec["heads"]
    # other settings with the same state file: refused, nothing overwritten
    assert main([*args[:-1], "eval.linear_batch_size=64"]) == 2


# auto's choice is checked in test_linear_probe.py (the record says which solver ran)
@pytest.mark.parametrize("solver", [["--solver", "sgd", "--iters", "300"], ["--solver", "lbfgs"]], ids=["sgd", "lbfgs"])
def test_linear_grid_is_chosen_on_held_out_training_data_never_on_val(solver, digits, tmp_path, capsys):
    """The default grid of either solver picks its head on held-out training samples: scrambling the val
    labels (class folders renamed in a cycle) changes the val numbers but not which head is chosen."""
    import shutil

    scrambled = tmp_path / "val_scrambled"
    names = sorted(p.name for p in digits.val.iterdir())
    for i, name in enumerate(names):
        shutil.copytree(digits.val / name, scrambled / names[(i + 1) % len(names)])
    common = ["linear", "--preset", "tiny", "--train", str(digits.train), "--num-workers", "0", "--probe", "cls",
              *solver, "--set", "eval.linear_batch_size=64"]
    assert main([*common, "--val", str(digits.val), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--val", str(scrambled), "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "linear_cls.json").read_text())
    b = json.loads((tmp_path / "b" / "linear_cls.json").read_text())
    assert len(a["heads"]) >= 10  # the default grid
    assert a["solver"] == solver[1]
    chosen = [h["chosen"] for h in a["heads"]]
    assert chosen == [h["chosen"] for h in b["heads"]] and chosen.count(True) == 1
    assert a["best"]["top1"] > 25 > 15 > b["best"]["top1"]  # scrambled labels: near chance, same head
    # more than one head and no held-out data: refused, one line
    capsys.readouterr()
    assert main([*common, "--val", str(digits.val), "--out", str(tmp_path / "c"), "--holdout", "0"]) == 2
    assert "no held-out training data" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--solver", "lbfgs", "--lr-grid", "0.1"], "--lr-grid"),
    (["--solver", "lbfgs", "--iters", "100"], "--iters"),
    (["--protocol", "dino", "--solver", "sgd"], "--solver"),
    (["--solver", "lbfgs", "--wd-grid", "1e-3,-1"], "--wd-grid"),
    (["--set", "eval.linear_lbfgs_wd_grid=[-1e-3]"], "linear_lbfgs_wd_grid"),
])
def test_linear_solver_flags_it_would_ignore_are_refused_in_one_line(flags, named, digits, tmp_path, capsys):
    args = ["linear", "--preset", "tiny", "--train", str(digits.train), "--val", str(digits.val), "--num-workers", "0",
            "--probe", "cls", "--out", str(tmp_path / "o"), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "linear_cls.json").exists()


def test_linear_probe_with_augmentation(digits, tmp_path):
    out = tmp_path / "lin_aug"
    assert main(["linear", "--preset", "tiny", "--train", str(digits.train), "--val", str(digits.val), "--out", str(out),
                 "--num-workers", "0", "--probe", "cls", "--protocol", "dino", "--epochs", "1", "--lr-sweep", "1.0"]) == 0
    rec = json.loads((out / "linear_cls.json").read_text())
    assert rec["augment"] is True and rec["feature_dim"] == 64 and rec["n_val"] == digits.val_count
    assert all(h["top1"] is not None for h in rec["heads"])


@pytest.mark.parametrize("case", ["missing_ckpt", "other_arch", "unlabelled", "missing_data"])
def test_bad_inputs_give_one_line_and_exit_2(case, digits, tmp_path, capsys):
    train, val, extra = str(digits.train), str(digits.val), []
    if case == "missing_ckpt":
        extra = ["--ckpt", str(tmp_path / "no_such_run")]
        expect = "no such checkpoint"
    elif case == "other_arch":
        cfg = load_config("tiny", ["model.timm_kwargs.embed_dim=32", "model.timm_kwargs.num_heads=2"]).config
        other = load_backbone(None, cfg)
        path = tmp_path / "other.safetensors"
        save_file({k: v.contiguous() for k, v in other.timm_state_dict().items()}, str(path))
        extra = ["--ckpt", str(path)]
        expect = "another architecture"
    elif case == "unlabelled":
        flat = tmp_path / "flat"
        flat.mkdir()
        for f in sorted(digits.train.glob("*/*.png"))[:30]:
            (flat / f.name).write_bytes(f.read_bytes())
        train = str(flat)
        expect = "without labels"
    else:
        val = str(tmp_path / "nowhere")
        expect = "no such data"
    rc = main(["knn", "--preset", "tiny", "--train", train, "--val", val, "--out", str(tmp_path / "o"),
               "--num-workers", "0", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("mst-ds: error:") and expect in err[0], err


def test_features_are_the_same_under_two_processes_worth_of_splits(digits):
    """Each rank reads a disjoint part; gathered and ordered by key, the rows equal the one-process ones."""
    from mst_ds.data.augment import eval_transform
    from mst_ds.eval.features import extract_features, open_eval_data

    cfg = load_config("tiny").config
    backbone = load_backbone(None, cfg)
    tf = eval_transform(32)
    whole, _ = open_eval_data(str(digits.val), transform=tf, batch_size=64, num_workers=0)
    f1, y1, k1 = extract_features(backbone, whole, show_progress=False, return_keys=True)
    parts = []
    for rank in range(2):
        loader, _ = open_eval_data(str(digits.val), transform=tf, batch_size=64, num_workers=0, rank=rank, world_size=2)
        parts.append(extract_features(backbone, loader, show_progress=False, return_keys=True))
    keys = parts[0][2] + parts[1][2]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    f2 = torch.cat([parts[0][0], parts[1][0]])[order]
    assert [keys[i] for i in order] == k1
    torch.testing.assert_close(f2, f1, atol=1e-5, rtol=0)
    assert torch.equal(torch.cat([parts[0][1], parts[1][1]])[order], y1)


def test_a_trained_run_through_every_command(trained_run, digits_shards, tmp_path):
    """A real DeepSpeed checkpoint (conftest's 4-step tiny run) and real shards: knn on teacher and
    student, the timm export giving the teacher's numbers, attention figures next to random init, and
    the report with the run's training curves."""
    import shutil

    from mst_ds.export import export_backbone

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = ["--train", str(digits_shards), "--val", str(digits_shards), "--num-workers", "0", "--batch-size", "256"]
    assert main(["knn", "--ckpt", str(run), *data]) == 0  # default preset: the run's config.yaml wins
    teacher = json.loads((run / "eval" / "knn.json").read_text())
    assert teacher["model"]["step"] == 4 and teacher["model"]["which"] == "teacher"
    assert teacher["n_train"] == 1438 and teacher["feature_dim"] == 64
    assert main(["knn", "--ckpt", str(run / "checkpoints" / "step00000002"), "--out", str(tmp_path / "s2"),
                 "--which", "student", *data]) == 0
    student = json.loads((tmp_path / "s2" / "knn.json").read_text())
    assert student["model"]["step"] == 2 and student["metrics"] != teacher["metrics"]
    export_backbone(run, tmp_path / "teacher.safetensors", "teacher")
    assert main(["knn", "--ckpt", str(tmp_path / "teacher.safetensors"), "--preset", "tiny",
                 "--out", str(tmp_path / "exp"), *data]) == 0
    assert json.loads((tmp_path / "exp" / "knn.json").read_text())["metrics"] == teacher["metrics"]
    img = sorted(digits_shards.parent.glob("folder/val/*/*.png"))[:1]
    assert main(["attn", "--preset", "tiny", str(img[0]), str(digits_shards), "--max-images", "3",
                 "--ckpt", "random", "--ckpt", str(run), "--out", str(tmp_path / "attn")]) == 0
    index = json.loads((tmp_path / "attn" / "attention.json").read_text())
    assert index["models"] == ["random init", "run"] and len(index["heads"]) == 2 * 3  # 1 file + 2 from shards
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["metrics"]["knn_k20_top1"]["mean"] == teacher["metrics"]["knn_k20_top1"]
    assert (tmp_path / "rep" / "loss.png").exists() and (tmp_path / "rep" / "lr.png").exists()


@pytest.mark.slow
def test_two_processes_match_one(digits, tmp_path, deepspeed_cpu):
    """`torchrun --nproc_per_node 2`: gathered features give the one-process k-NN numbers, and the
    all-reduced linear heads (cached features) the one-process heads."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    common = ["--preset", "tiny", "--train", str(digits.train), "--val", str(digits.val), "--num-workers", "0",
              "--no-cache"]
    lin = ["--protocol", "dino", "--epochs", "2", "--no-augment", "--lr-sweep", "0.05", "--set", "eval.linear_batch_size=64"]
    for cmd, extra in (("knn", []), ("linear", lin)):
        one, two = tmp_path / f"{cmd}1", tmp_path / f"{cmd}2"
        assert main([cmd, *common, *extra, "--out", str(one)]) == 0
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "mst_ds.cli", cmd, *common, *extra, "--out", str(two)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        name = "knn.json" if cmd == "knn" else "linear_dino.json"
        a, b = json.loads((one / name).read_text()), json.loads((two / name).read_text())
        assert b["world_size"] == 2
        if cmd == "knn":
            assert a["metrics"] == b["metrics"]
        else:  # same samples per step, gradients averaged over ranks: equal up to float rounding
            for ha, hb in zip(a["heads"], b["heads"]):
                assert ha["top1"] == pytest.approx(hb["top1"], abs=0.6)
