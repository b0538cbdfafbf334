"""report: mean ± standard error over seeds on known inputs, and the curve figures."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from mst_ds.cli import main
from mst_ds.config import load_config
from mst_ds.eval.report import aggregate, mean_and_se


def test_standard_error_on_known_values():
    mean, se = mean_and_se([74.0, 75.0, 76.0, 79.0])
    assert mean == 76.0
    # sample variance (ddof=1) = (4 + 1 + 0 + 9) / 3 = 14/3; SE = sqrt(14/3) / 2
    assert se == pytest.approx(math.sqrt(14 / 3) / 2, rel=1e-12)
    assert mean_and_se([72.1]) == (72.1, None)
    assert mean_and_se([5.0, 5.0])[1] == 0.0


def test_aggregate_over_runs_with_missing_metrics():
    agg = aggregate({"a": {"knn_k20_top1": 70.0, "linear_cls_top1": 60.0},
                     "b": {"knn_k20_top1": 72.0},
                     "c": {"knn_k20_top1": 74.0}})
    assert agg["knn_k20_top1"]["mean"] == 72.0 and agg["knn_k20_top1"]["n"] == 3
    assert agg["knn_k20_top1"]["se"] == pytest.approx(2.0 / math.sqrt(3))
    assert agg["linear_cls_top1"]["n"] == 1 and agg["linear_cls_top1"]["se"] is None


def _fake_run(root, name, seed, knn, linear, steps=20):
    run = root / name
    (run / "eval").mkdir(parents=True)
    cfg = load_config("tiny", [f"run.seed={seed}", f"run.name={name}"]).config
    (run / "config.yaml").write_text(cfg.to_yaml())
    ident = {"model": {"weights": f"files:{name}", "which": "teacher", "step": steps}, "data": {"train": {"digest": "t"},
                                                                                              "val": {"digest": "v"}}}
    (run / "eval" / "knn.json").write_text(json.dumps({"command": "knn", **ident, "metrics": {"knn_k20_top1": knn}}))
    (run / "eval" / "linear_cls.json").write_text(json.dumps({"command": "linear", **ident,
                                                              "metrics": {"linear_cls_top1": linear}}))
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(0, steps, 5):
            f.write(json.dumps({"step": s, "loss": 5 - 0.1 * s, "dino": 4 - 0.1 * s, "restore": 1.0,
                                "lr": 1e-4 * s, "mask_ratio": 0.15}) + "\n")
        f.write('{"step": 99, "loss": 1')  # a line cut by a kill
    return run


def test_report_command_writes_markdown_json_and_curves(tmp_path, capsys):
    runs = [_fake_run(tmp_path, f"seed{s}", s, knn, lin) for s, knn, lin in ((0, 40.0, 50.0), (1, 42.0, 51.0), (2, 47.0, 55.0))]
    out = tmp_path / "rep"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    knn = rep["metrics"]["knn_k20_top1"]
    assert knn["mean"] == pytest.approx(43.0)
    assert knn["se"] == pytest.approx(math.sqrt(((3**2) + 1 + 16) / 2) / math.sqrt(3))
    assert rep["notes"] == []  # the runs differ only in their seed
    md = (out / "report.md").read_text()
    assert "| knn_k20_top1 | 43.00 ± 2.08 | 3 |" in md
    for name in ("loss.png", "lr.png", "mask_ratio.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    with Image.open(out / "loss.png") as im:
        assert im.size == (1500, 360)  # three panels (loss, dino, restore) of 5 × 3.6 in at 100 dpi


def test_report_flags_runs_that_differ_in_more_than_the_seed(tmp_path):
    a = _fake_run(tmp_path, "a", 0, 40.0, 50.0)
    b = _fake_run(tmp_path, "b", 1, 41.0, 52.0)
    cfg = load_config("tiny", ["run.seed=1", "loss.restore_weight=0.2"]).config
    (b / "config.yaml").write_text(cfg.to_yaml())
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "r")]) == 0
    assert "differ in more than the seed" in json.loads((tmp_path / "r" / "report.json").read_text())["notes"][0]


def test_report_without_results_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("mst-ds: error:") for line in err)


def test_report_draws_health_curves_and_lists_alerts(tmp_path):
    run = _fake_run(tmp_path, "healthy", 0, 40.0, 50.0)
    sick = _fake_run(tmp_path, "sick", 1, 30.0, 45.0)
    for r, knn_end in ((run, 62.0), (sick, 48.0)):
        with open(r / "metrics.jsonl", "a") as f:
            f.write("\n" + json.dumps({"step": 0, "monitor_knn_top1": 49.0}) + "\n")
            for s in (10, 20):
                f.write(json.dumps({"step": s, "teacher_entropy_rel": 0.5, "teacher_usage_entropy_rel": 0.9,
                                    "agreement": 0.3, "teacher_cls_std": 0.1, "attn_entropy": 0.95,
                                    "attn_guidance": 0.7, "restore_loss_share": 0.1, "restore_grad_share": 0.2,
                                    "monitor_knn_top1": knn_end}) + "\n")
    (run / "alerts.jsonl").write_text("")
    (sick / "alerts.jsonl").write_text(json.dumps({"step": 20, "rule": "uniform_collapse", "metric": "teacher_entropy_rel",
                                                   "value": 0.95, "threshold": 0.9, "action": "warn", "message": "m"}) + "\n")
    out = tmp_path / "rep"
    assert main(["report", str(run), str(sick), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["online_knn_top1_last"]["values"] == {str(run): 62.0, str(sick): 48.0}
    assert rep["metrics"]["alerts"]["mean"] == 0.5
    assert [a["rule"] for a in rep["alerts"]["sick (seed 1)"]] == ["uniform_collapse"] and rep["alerts"]["healthy (seed 0)"] == []
    md = (out / "report.md").read_text()
    assert "- `sick (seed 1)`: uniform_collapse at step 20 (teacher_entropy_rel 0.95 vs 0.9)" in md
    assert "- `healthy (seed 0)`: none" in md
    for name, panels in (("online_knn.png", 1), ("collapse.png", 4), ("attention.png", 2), ("loss_share.png", 2)):
        with Image.open(out / name) as im:
            assert im.size == (500 * panels, 360), name


def test_alerts_file_name_is_the_one_health_writes():
    from mst_ds.eval.report import ALERTS_FILE
    from mst_ds.health import ALERTS_FILE as written

    assert ALERTS_FILE == written


def test_report_summarises_the_loss_share_over_the_run(tmp_path):
    run = _fake_run(tmp_path, "r", 0, 40.0, 50.0)
    with open(run / "metrics.jsonl", "a") as f:
        for step, share in ((10, 0.4), (20, 0.3), (30, float("nan")), (40, 0.2)):
            f.write("\n" + json.dumps({"step": step, "restore_loss_share": share}))
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    m = json.loads((out / "report.json").read_text())["metrics"]
    assert m["restore_loss_share_first"]["mean"] == 0.4 and m["restore_loss_share_last"]["mean"] == 0.2
    assert abs(m["restore_loss_share_mean"]["mean"] - 0.3) < 1e-12  # the NaN step is not counted
    assert "| restore_loss_share_mean | 0.30 ± n/a | 1 |" in (out / "report.md").read_text()
