"""Run-health diagnostics on known tensors, the gradient-share probe on the real tiny MSTModel, and the
alert rules on crafted values (fast, no engine; the engine runs are in test_health_alerts.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mst_ds.config import load_config
from mst_ds.health import RULES, AlertBook, Context, GradProbe
from mst_ds.model import MSTModel
from mst_ds.model.diagnostics import attention_guidance, forward_diagnostics
from mst_ds.scalars import DIAGNOSTICS, MODEL_SCALARS, MONITOR_SCALARS, SCALARS


def test_attention_guidance_is_one_for_flat_attention_and_below_one_on_low_attention_patches():
    B, H, N = 3, 2, 16
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, :4] = True
    flat = torch.full((B, H, N), 1.0 / 17)  # CLS rows include the CLS itself: renormalised over patches
    assert float(attention_guidance(flat, mask)) == pytest.approx(1.0)
    peaked = torch.ones(B, H, N)
    peaked[:, :, :4] = 0.1  # masked patches get 0.1 of a normal patch's attention
    expected = (4 * 0.1 / (4 * 0.1 + 12)) / (4 / 16)
    assert float(attention_guidance(peaked, mask)) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(float(attention_guidance(peaked, torch.zeros(B, N, dtype=torch.bool))))
    assert math.isnan(float(attention_guidance(None, mask)))


def test_collapse_diagnostics_on_known_distributions():
    B, K, D = 4, 8, 16
    uniform = torch.full((2 * B, K), 1.0 / K)
    one_hot_same = torch.zeros(2 * B, K)
    one_hot_same[:, 3] = 1.0
    students = [torch.randn(B, K) for _ in range(4)]
    cls = torch.randn(2 * B, D)
    d = forward_diagnostics(students, uniform, cls, None, torch.zeros(2 * B, 4, dtype=torch.bool))
    assert float(d["teacher_entropy_rel"]) == pytest.approx(1.0)
    assert float(d["teacher_usage_entropy_rel"]) == pytest.approx(1.0)
    d = forward_diagnostics(students, one_hot_same, cls.new_ones(2 * B, D), None, torch.zeros(2 * B, 4, dtype=torch.bool))
    assert float(d["teacher_entropy_rel"]) == pytest.approx(0.0, abs=1e-6)
    assert float(d["teacher_usage_entropy_rel"]) == pytest.approx(0.0, abs=1e-6)
    assert float(d["teacher_cls_std"]) == 0.0  # every sample the same feature: dimensional collapse
    # Agreement: student views whose argmax is prototype 3 agree with the teacher; the DINO pairs are
    # (teacher view i, student view v != i): 2 teachers x 3 other views = 6 pairs.
    agreeing = [torch.zeros(B, K).index_fill_(1, torch.tensor([3]), 1.0) for _ in range(2)] + \
               [torch.zeros(B, K).index_fill_(1, torch.tensor([5]), 1.0) for _ in range(2)]
    d = forward_diagnostics(agreeing, one_hot_same, cls, None, torch.zeros(2 * B, 4, dtype=torch.bool))
    assert float(d["agreement"]) == pytest.approx(2 / 6)  # only (0, 1) and (1, 0) agree
    # A healthy spread of features: std of normalised random features is about 1/sqrt(D).
    many = torch.randn(4096, D)
    d = forward_diagnostics(students, uniform, many, None, torch.zeros(2 * B, 4, dtype=torch.bool))
    assert float(d["teacher_cls_std"]) * math.sqrt(D) == pytest.approx(1.0, rel=0.05)


def test_model_returns_the_diagnostics():
    cfg = load_config("tiny").config
    torch.manual_seed(0)
    model = MSTModel.from_config(cfg)
    teacher = model.make_teacher()
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    out = model(views, teacher, 0.04, torch.Generator().manual_seed(1))
    assert set(out) == set(MODEL_SCALARS)  # the names the loop all-reduces and logs
    for key in DIAGNOSTICS:
        assert out[key].ndim == 0 and not out[key].requires_grad, key
    assert 0 <= float(out["teacher_entropy_rel"]) <= 1 and 0 <= float(out["agreement"]) <= 1
    assert float(out["attn_guidance"]) < 1.0  # attention-guided: the masked patches have the lowest attention


def _forward(model, teacher, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    return model(views, teacher, 0.04, torch.Generator().manual_seed(1))


def test_gradient_probe_separates_the_two_losses_and_leaves_gradients_unchanged():
    cfg = load_config("tiny").config
    torch.manual_seed(0)
    model = MSTModel.from_config(cfg).eval()  # eval: no center update, so every forward is the same
    teacher = model.make_teacher()
    plain = copy.deepcopy(model)
    probe = GradProbe(model.backbone)

    # Joint backward with the probe armed vs the same backward without any hook: identical gradients.
    probe.arm(True)
    _forward(model, teacher)["loss"].backward()
    joint = {name for name, _ in probe._sums}
    joint_sq = {"dino": sum(float(v) for n, v in probe._sums if n == "dino"),
                "restore": sum(float(v) for n, v in probe._sums if n == "restore")}
    share = probe.share()
    _forward(plain, teacher)["loss"].backward()
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n
    assert joint == {"dino", "restore"}

    # Each loss alone (the other weight 0; its branch stays in the graph with zero gradient): the
    # probe's two parts are exactly the two weighted losses' gradients.
    alone = {}
    for part, weights in (("dino", (1.0, 0.0)), ("restore", (0.0, 0.6))):
        single = copy.deepcopy(plain)
        single.cfg.loss.dino_weight, single.cfg.loss.restore_weight = weights
        single_probe = GradProbe(single.backbone)
        single_probe.arm(True)
        _forward(single, teacher)["loss"].backward()
        alone[part] = sum(float(v) for n, v in single_probe._sums if n == part)
    assert alone["dino"] == pytest.approx(joint_sq["dino"], rel=1e-5)
    assert alone["restore"] == pytest.approx(joint_sq["restore"], rel=1e-5)
    r, d = math.sqrt(alone["restore"]), math.sqrt(alone["dino"])
    assert share == pytest.approx(r / (r + d), rel=1e-5) and 0 < share < 1

    probe.arm(False)  # disarmed: no hook, nothing measured
    _forward(model, teacher)["loss"].backward()
    assert math.isnan(probe.share())


def _book(tmp_path, **health):
    sets = [f"health.{k}={v}" for k, v in health.items()]
    cfg = load_config("tiny", sets).config
    ctx = Context(K=256, M=128, D=64, total_steps=100, attention_masking=True, knn_at_start=50.0)
    return AlertBook(cfg, ctx, tmp_path, enabled=True, start_step=0)


HEALTHY = {"loss": 5.0, "nonfinite_steps": 0, "teacher_entropy_rel": 0.4, "teacher_usage_entropy_rel": 0.8,
           "teacher_cls_std": 0.1, "attn_entropy": 0.9, "monitor_knn_top1": 60.0}


@pytest.mark.parametrize("rule, bad", [
    ("loss_not_finite", {"loss": float("nan")}),
    ("loss_not_finite", {"nonfinite_steps": 1}),
    ("uniform_collapse", {"teacher_entropy_rel": 0.95}),
    ("one_prototype_collapse", {"teacher_usage_entropy_rel": 0.05}),
    ("dimensional_collapse", {"teacher_cls_std": 0.002}),
    ("flat_attention", {"attn_entropy": 0.999}),
    ("knn_not_improving", {"monitor_knn_top1": 50.0}),
])
def test_each_rule_fires_once_on_its_bad_value_and_not_on_healthy_values(tmp_path, rule, bad, capsys):
    book = _book(tmp_path, start_fraction=0.1, knn_after_fraction=0.3)
    assert book.check(50, dict(HEALTHY)) == []
    fired = book.check(50, {**HEALTHY, **bad})
    assert [a["rule"] for a in fired] == [rule]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mst-ds: alert: {rule} at step 50")
    assert book.check(60, {**HEALTHY, **bad}) == []  # once per run
    assert book.count == 1
    assert (tmp_path / "alerts.jsonl").read_text().count(rule) == 1
    # A resume at step 55 keeps it; one at step 40 drops it (that step is redone).
    assert _resumed(tmp_path, 55).count == 1 and _resumed(tmp_path, 40).count == 0


def _resumed(tmp_path, step):
    cfg = load_config("tiny").config
    ctx = Context(K=256, M=128, D=64, total_steps=100, attention_masking=True, knn_at_start=50.0)
    return AlertBook(cfg, ctx, tmp_path, enabled=True, start_step=step)


def test_rules_wait_for_their_start(tmp_path):
    book = _book(tmp_path, start_fraction=0.1, knn_after_fraction=0.3)
    bad = {**HEALTHY, "teacher_entropy_rel": 0.99, "monitor_knn_top1": 40.0}
    assert book.check(5, bad) == []  # before 10 % of 100 steps; the k-NN rule waits for 30 %
    assert [a["rule"] for a in book.check(20, bad)] == ["uniform_collapse"]
    assert [a["rule"] for a in book.check(30, bad)] == ["knn_not_improving"]
    assert {r.name for r in RULES} == {"loss_not_finite", "uniform_collapse", "one_prototype_collapse",
                                       "dimensional_collapse", "flat_attention", "knn_not_improving"}


def test_flat_attention_is_not_an_alert_without_attention_guided_masking(tmp_path):
    cfg = load_config("tiny", ["mask.strategy=random"]).config
    ctx = Context(K=256, M=128, D=64, total_steps=100, attention_masking=False, knn_at_start=None)
    book = AlertBook(cfg, ctx, tmp_path, enabled=True, start_step=0)
    assert book.check(50, {**HEALTHY, "attn_entropy": 1.0}) == []


def test_plan_states_monitor_cadence_and_estimated_cost(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from mst_ds import cli
    from mst_ds.config import derive
    from mst_ds.eval import monitor

    cfg = load_config("mst_deit_s_100ep").config
    # DeiT-S: teacher 2 x 197 tokens + student 3 x (2 x 197 + 6 x 37) = 2242 tokens vs 197 per eval image.
    assert monitor.training_cost_per_image(cfg, 16) == pytest.approx(2242 / 197)
    d = derive(cfg, 128)
    share = monitor.cost_share(cfg, dataset_size=d.dataset_size, steps_per_epoch=d.steps_per_epoch,
                               monitor_images=50_000, patch=16)
    assert share == pytest.approx(50_000 / (50_000 + 1_281_167 * 2242 / 197))
    assert share < 0.03  # the target at the default cadence (once per epoch)

    for c in range(2):
        (tmp_path / "mon" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (c * 100, i, 0)).save(tmp_path / "mon" / f"c{c}" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plan", "--preset", "tiny", "--no-model", "--set", f"eval.monitor.bank={tmp_path / 'mon'}",
                     "--set", "eval.monitor.every_steps=100"]) == 0
    out = capsys.readouterr().out
    assert "Online k-NN monitor" in out and "every 100 steps" in out and "estimated share" in out
    assert cli.main(["plan", "--preset", "mst_deit_s_100ep", "--no-model"]) == 0
    assert "off (no eval.monitor.bank given)" in capsys.readouterr().out


def test_demo_health_table_shows_start_end_and_alerts(tmp_path):
    import json

    from rich.console import Console

    from mst_ds.demo import health_table

    (tmp_path / "config.yaml").write_text(load_config("tiny").config.to_yaml())
    recs = [{"step": 0, "monitor_knn_top1": 49.3, "monitor_time_share": 0.99},
            {"step": 5, "teacher_entropy_rel": 0.2, "teacher_cls_std": 0.05, "attn_entropy": 1.0},
            {"step": 10, "teacher_entropy_rel": 0.4, "teacher_cls_std": 0.025, "attn_entropy": 0.9,
             "monitor_knn_top1": 76.6, "monitor_time_share": 0.05}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "alerts.jsonl").write_text(json.dumps({"step": 10, "rule": "flat_attention"}) + "\n")
    console = Console(width=200, record=True)
    console.print(health_table(tmp_path))
    text = " ".join(console.export_text().split())
    assert "alerts: flat_attention (step 10)" in text
    assert "49.300 (step 0)" in text and "76.600 (step 10)" in text and "k=20" in text
    assert "0.400 (step 5)" in text and "0.200 (step 10)" in text  # CLS std × √64
    assert "0.050 (step 10)" in text and "0.990" not in text  # the monitor share: end only


def test_every_scalar_a_reader_selects_is_one_the_run_logs():
    """Health rules, report curves, the study's table and the demo's health table select logged scalars by
    name: each name is one of mst_ds.scalars (the forward's diagnostics are DIAGNOSTICS exactly)."""
    from mst_ds import demo, study
    from mst_ds.eval import report

    logged = set(SCALARS) | set(MONITOR_SCALARS)
    derived = {"teacher_cls_std_sqrt_d"}  # the demo's table scales teacher_cls_std by sqrt(D)
    selected = {r.metric for r in RULES} | {k for keys in report.CURVES.values() for k in keys} \
        | set(study.HEALTH_KEYS) | {row[0] for row in demo.HEALTH_ROWS}
    assert selected - derived <= logged, sorted(selected - derived - logged)
    B, K = 2, 5
    d = forward_diagnostics([torch.randn(B, K)] * 3, torch.softmax(torch.randn(2 * B, K), -1), torch.randn(2 * B, 4),
                            None, torch.zeros(2 * B, 4, dtype=torch.bool))
    assert set(d) == set(DIAGNOSTICS)
