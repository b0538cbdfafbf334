"""The default linear probe reads what its features allow (issue 32): on real trained checkpoints (tiny
and small, trained briefly here on the digits) it reaches at least k-NN top-1 − 1 point and at least
scikit-learn's LogisticRegression on the very same cached features − 2 points. Its L-BFGS solver
reaches scikit-learn's optimum; ``auto`` picks it up to its row limit. And the probe state carries
the identity of its network and data (issue 33, defect 1); user files in --out are never replaced (defect 7)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_tools.sample_data import write_digits_imagefolder
from data_tools.writer import write_shards
from mst_ds.cli import main
from mst_ds.eval.identity import data_identity
from mst_ds.eval.linear import GridProbe, lbfgs_grid, resolve_solver, train_grid
from tests.conftest import TRAIN_SETS


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory):
    """The whole real digits split (1,438 / 359) as folders, and the training split as shards."""
    root = tmp_path_factory.mktemp("digits_probe")
    folders = write_digits_imagefolder(root / "folder", size=32)
    write_shards(folders.train, root / "shards", split="train", max_count=240, progress=False)
    return folders, root / "shards"


def _train(run_dir: Path, shards: Path, preset: str, steps: int) -> Path:
    from mst_ds.config import load_config
    from mst_ds.train import train

    cfg = load_config(preset, [*TRAIN_SETS, f"data.train={shards}", f"run.max_steps={steps}",
                               f"run.schedule_steps={steps}", "optim.batch_size=32",
                               f"checkpoint.every_steps={steps}"]).config
    assert train(cfg, run_dir, progress=False) == 0
    return run_dir


def _sklearn_top1(out: Path, train: Path, val: Path) -> float:
    """LogisticRegression (C = 1 and 100, the better on val: generous to the baseline) on the features
    `mst-ds knn` / `mst-ds linear` cached in OUT/features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cached = {}
    for f in (out / "features").glob("*.pt"):
        saved = torch.load(f, weights_only=True)
        cached[saved["source"]] = saved
    tr, va = cached[str(train)], cached[str(val)]
    best = 0.0
    for c in (1.0, 100.0):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        clf.fit(tr["feats"].numpy(), tr["labels"].numpy())
        best = max(best, 100.0 * float((clf.predict(va["feats"].numpy()) == va["labels"].numpy()).mean()))
    return best


def _probe_vs_baselines(run_dir: Path, folders, out: Path) -> tuple[float, float, float]:
    common = ["--ckpt", str(run_dir), "--train", str(folders.train), "--val", str(folders.val), "--out", str(out),
              "--num-workers", "0"]
    assert main(["knn", *common]) == 0
    assert main(["linear", "--probe", "cls", *common]) == 0
    knn = json.loads((out / "knn.json").read_text())["metrics"]["knn_k20_top1"]
    rec = json.loads((out / "linear_cls.json").read_text())
    # 1,308 training rows to fit: the default solver is L-BFGS (auto), every weight decay of its grid one cell
    assert rec["protocol"] == "fast" and rec["writer"] == "mst-ds linear" and rec["solver"] == "lbfgs"
    assert len(rec["heads"]) == 11 and rec["best"]["refit"] and rec["best"]["base_lr"] is None
    return rec["best"]["top1"], knn, _sklearn_top1(out, folders.train, folders.val)


@pytest.fixture(scope="module")
def tiny_run(digits_split, tmp_path_factory, deepspeed_cpu) -> Path:
    return _train(tmp_path_factory.mktemp("runs") / "tiny", digits_split[1], "tiny", 30)


def test_default_probe_reaches_knn_tiny(digits_split, tiny_run, tmp_path):
    folders, _ = digits_split
    linear, knn, sk = _probe_vs_baselines(tiny_run, folders, tmp_path / "eval")
    print(f"tiny: linear {linear:.2f}  k-NN {knn:.2f}  sklearn {sk:.2f}")  # measured: 88.02, 49.30, 88.30
    assert linear >= knn - 1.0


def test_default_probe_reaches_sklearn_tiny(digits_split, tiny_run, tmp_path):
    folders, _ = digits_split
    linear, knn, sk = _probe_vs_baselines(tiny_run, folders, tmp_path / "eval")
    # measured: 88.02 vs 88.30 (L-BFGS); SGD: 87.74 (8,000 iterations + refit), 85.52 (4,000, no refit)
    assert linear >= sk - 2.0


def test_default_probe_reaches_knn_and_sklearn_small(digits_split, tmp_path, deepspeed_cpu):
    """In the default set since the probe meets both criteria here (44 s on a quiet 2-core machine)."""
    folders, shards = digits_split
    run = _train(tmp_path / "small", shards, "small", 60)
    linear, knn, sk = _probe_vs_baselines(run, folders, tmp_path / "eval")
    print(f"small: linear {linear:.2f}  k-NN {knn:.2f}  sklearn {sk:.2f}")
    assert linear >= knn - 1.0
    # measured: 91.64 vs 90.25 (L-BFGS); the SGD grid reached 86.35 (8,000 iterations + refit)
    assert linear >= sk - 2.0


def test_lbfgs_cells_reach_scikit_learns_optimum():
    """Each weight decay's cell is scikit-learn's LogisticRegression with C = 1 / (wd · N) on the same
    standardised rows: the same class probabilities (both solve the same strictly convex problem)."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g) * torch.linspace(0.1, 10.0, 12) + 3.0  # unscaled, off-centre
    y = (x[:, 0] * 10 + x[:, 1] - x[:, 2] * 0.1 + torch.randn(400, generator=g) * 2 > 30).long() + (x[:, 3] > 3).long()
    wds = [1e-1, 1e-2, 1e-3]
    probe = lbfgs_grid(x, y, 3, wds, max_iters=1000)
    assert probe.lrs == [None] * 3 and not probe.diverged.any() and all(it < 1000 for it in probe.iters_run)
    z = ((x - probe.mean) / probe.std).double().numpy()
    for h, wd in enumerate(wds):
        clf = LogisticRegression(C=1.0 / (wd * len(y)), tol=1e-10, max_iter=10_000).fit(z, y.numpy())
        ours = probe.logits(x)[h].softmax(-1)
        torch.testing.assert_close(ours, torch.from_numpy(clf.predict_proba(z)).float(), atol=2e-4, rtol=0)
    # a stronger decay is a smaller solution (a cell is not another cell's copy)
    norms = probe.weight.flatten(1).norm(dim=1)
    assert norms[0] < norms[1] < norms[2]


def test_auto_solver_takes_lbfgs_up_to_its_row_limit():
    """auto: L-BFGS up to eval.linear_lbfgs_max_rows training rows, SGD above; an lr flag asks for SGD;
    an explicit solver is kept."""
    from mst_ds.config import load_config

    limit = load_config("tiny", []).config.eval.linear_lbfgs_max_rows
    assert limit == 60_000
    assert resolve_solver("auto", lr_flags=False, n_rows=1308, lbfgs_max_rows=limit) == "lbfgs"  # the digits
    assert resolve_solver("auto", lr_flags=False, n_rows=3600, lbfgs_max_rows=limit) == "lbfgs"  # the MNIST studies
    assert resolve_solver("auto", lr_flags=False, n_rows=limit, lbfgs_max_rows=limit) == "lbfgs"
    assert resolve_solver("auto", lr_flags=False, n_rows=limit + 1, lbfgs_max_rows=limit) == "sgd"
    assert resolve_solver("auto", lr_flags=False, n_rows=1_153_050, lbfgs_max_rows=limit) == "sgd"  # ImageNet-1k
    assert resolve_solver("auto", lr_flags=True, n_rows=1308, lbfgs_max_rows=limit) == "sgd"
    assert resolve_solver("lbfgs", lr_flags=False, n_rows=1_153_050, lbfgs_max_rows=limit) == "lbfgs"
    assert resolve_solver("sgd", lr_flags=False, n_rows=10, lbfgs_max_rows=limit) == "sgd"


def test_grid_heads_are_independent_and_a_divergent_head_stops_alone():
    """One head trained alone equals the same head inside the grid (to float rounding); an lr that overflows
    float32 (3e38 × a gradient > 1 is inf, then NaN) marks only its own head. (1e30 does not: softmax's
    gradient is bounded, so the weights grow huge but stay finite — a bad head, not a dead one, and the
    held-out choice passes it over.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    kw = dict(iters=50, batch_size=64, momentum=0.9, seed=3)
    grid = train_grid(x, y, 4, [0.1, 3e38, 0.5], [0.0, 0.0, 1e-3], **kw)
    alone = train_grid(x, y, 4, [0.5], [1e-3], **kw)
    assert grid.diverged.tolist() == [False, True, False]
    # equal to float rounding, not bit for bit: the batched einsum blocks H = 3 and H = 1 differently
    # (measured max |diff| ~1e-6); a NaN or another head's update leaking in would be far off
    torch.testing.assert_close(grid.weight[2], alone.weight[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grid.bias[2], alone.bias[0], rtol=1e-5, atol=1e-5)
    scores = grid.evaluate(x, y)
    assert scores[1]["diverged"] and scores[0]["top1"] > 90 and scores[2]["top1"] > 90
    assert isinstance(grid, GridProbe)


def test_probe_data_identity_sees_files_added_in_sub_folders_and_rewritten_in_place(tmp_path):
    """The probe's training-data identity (the reuse rule's data_identity) changes with a nested file
    added or a file rewritten in place at the same size."""
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
    before = data_identity(str(tmp_path))
    (tmp_path / "a" / "more").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "more" / "y.png")
    added = data_identity(str(tmp_path))
    assert added != before
    f = tmp_path / "a" / "x.png"
    st = f.stat()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert data_identity(str(tmp_path)) != added


def test_dino_probe_state_of_another_network_is_not_resumed(digits_split, tiny_run, tmp_path, capsys):
    """Defect 1 (issue 33): a state trained on the teacher, then --which student into the same --out: the
    state is not resumed (it was another network); the result equals a fresh student probe."""
    folders, _ = digits_split
    common = ["linear", "--ckpt", str(tiny_run), "--train", str(folders.train), "--val", str(folders.val),
              "--num-workers", "0", "--probe", "cls", "--protocol", "dino", "--no-augment", "--epochs", "2",
              "--lr-grid", "0.5", "--holdout", "0"]
    out = tmp_path / "same"
    assert main([*common, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(out)]) == 0  # the same network and data: resumed
    assert "resuming the linear probe after epoch 2/2" in capsys.readouterr().out
    assert main([*common, "--which", "student", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "trained on another network or training data; starting the probe over" in said and "resuming" not in said
    assert main([*common, "--which", "student", "--out", str(tmp_path / "fresh")]) == 0
    reused = json.loads((out / "linear_cls.json").read_text())
    fresh = json.loads((tmp_path / "fresh" / "linear_cls.json").read_text())
    assert reused["heads"] == fresh["heads"] and reused["which"] == "student"
    assert reused["identity"]["network"]["which"] == "student"


def test_a_users_result_file_is_never_replaced(digits_split, tmp_path, capsys):
    """Defect 7 (issue 33): --out holding a linear_cls.json this command did not write: one line, exit 2,
    the file untouched; --force replaces it; a result of our own is replaced without --force."""
    folders, _ = digits_split
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "linear_cls.json"
    mine.write_text('{"my": "notes"}')
    args = ["linear", "--preset", "tiny", "--probe", "cls", "--train", str(folders.train), "--val", str(folders.val),
            "--num-workers", "0", "--iters", "50", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by mst-ds linear" in err[0] and "--force" in err[0]
    assert mine.read_text() == '{"my": "notes"}'
    assert main([*args, "--force"]) == 0
    assert json.loads(mine.read_text())["writer"] == "mst-ds linear"
    assert main(args) == 0  # our own result: replaced
