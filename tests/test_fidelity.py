"""DINO's reference semantics (SPEC §9) on the real DeepSpeed engine (CPU): the center moves once per
optimizer step from the whole batch; the frozen last layer's AdamW state behaves as DINO's
``p.grad = None`` (no step count during the freeze) at ZeRO 0/1/2 and across resumes; DINO's weight-decay
rule; the scale of the ``mean_ln_k`` restoration reduction at initialisation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from mst_ds import engine as eng
from mst_ds.config import derive, load_config
from mst_ds.losses import restoration_loss
from mst_ds.schedules import Schedules

# --------------------------------------------------------------------------------------------------
# (1) gradient accumulation: k = 4 × micro 16 ≡ k = 1 × batch 64
# --------------------------------------------------------------------------------------------------
# Everything that depends on how a batch is cut is switched off, so the two runs see the same
# computation: no BN (its batch statistics are per micro-batch), no masks and no photometric draws
# (their generators are seeded per micro-batch), no drop path (tiny has none).
DETERMINISTIC = ["model.head.use_bn=false", "decoder.use_bn=false", "mask.enabled=false",
                 "augment.color_jitter_p=0", "augment.grayscale_p=0", "augment.blur_p=[0,0]",
                 "augment.local_blur_p=0", "augment.solarize_p=[0,0]", "data.num_workers=0",
                 "optim.batch_size=64", "run.schedule_steps=40", "engine.precision=fp32"]


def _u8(shape, g):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def _global_batch(cfg, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    G, L = cfg.augment.global_crop_size, cfg.augment.local_crop_size
    return {"global": [_u8((n, 3, G, G), g) for _ in range(2)],
            "local": [_u8((n, 3, L, L), g) for _ in range(cfg.augment.n_local_crops)]}


def _split(batch: dict, k: int) -> list[dict]:
    parts = {key: [v.chunk(k) for v in views] for key, views in batch.items()}
    return [{key: [c[i] for c in chunks] for key, chunks in parts.items()} for i in range(k)]


def _run_accumulated(stage: int, accum: int, steps: int = 3):
    from mst_ds.train import train_step
    from mst_ds.trainer import build_training

    eng.init_distributed()
    cfg = load_config("tiny", [*DETERMINISTIC, f"engine.zero_stage={stage}", f"engine.grad_accum_steps={accum}"]).config
    t, _ = build_training(cfg, derive(cfg, 1, 640))
    losses = [train_step(t, _split(_global_batch(cfg, 64, 100 + i), accum))["loss"] for i in range(steps)]
    return losses, t.engine.module.dino_loss.center.clone(), {n: p.detach().clone() for n, p in t.teacher.named_parameters()}


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_accumulation_moves_the_center_once_per_optimizer_step(deepspeed_cpu, stage):
    loss1, center1, teacher1 = _run_accumulated(stage, 1)
    loss4, center4, teacher4 = _run_accumulated(stage, 4)
    assert center1.abs().sum() > 0
    torch.testing.assert_close(center4, center1, rtol=1e-5, atol=1e-6)
    assert loss4 == pytest.approx(loss1, rel=1e-5, abs=1e-6)
    for n in teacher1:
        torch.testing.assert_close(teacher4[n], teacher1[n], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# (2) the frozen last layer: AdamW as if the layer had no gradient (DINO's p.grad = None)
# --------------------------------------------------------------------------------------------------
FREEZE, TOTAL = 3, 8


class Toy(nn.Module):
    """A body and a DINO-like head last layer (weight-normalised, gain trainable), named as in MSTModel."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Module()
        self.head.last_layer = parametrizations.weight_norm(nn.Linear(8, 5, bias=False))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.head.last_layer(torch.tanh(self.body(x))) - y) ** 2).mean()


def _toy_schedules() -> Schedules:
    return Schedules(total_steps=TOTAL, warmup_steps=2, peak_lr=0.05, min_lr=1e-3, weight_decay=0.04,
                     weight_decay_end=0.4, momentum_teacher=0.996, momentum_teacher_end=1.0, warmup_teacher_temp=0.04,
                     teacher_temp=0.04, teacher_temp_warmup_steps=0, freeze_last_layer_steps=FREEZE)


def _toy_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


def _reference(model0: Toy) -> list[dict[str, torch.Tensor]]:
    """Plain torch AdamW, DINO's loop: during the freeze the last layer's grad is None after backward."""
    model = copy.deepcopy(model0)
    opt = torch.optim.AdamW(eng.param_groups(model), lr=0.0)
    sched = _toy_schedules()
    out = []
    for step in range(TOTAL):
        s = sched.at(step)
        eng.set_group_values(opt, s.lr, s.weight_decay, frozen=False)  # lr unused by a grad-less layer
        opt.zero_grad(set_to_none=True)
        model(*_toy_data(step)).backward()
        if s.last_layer_frozen:
            for p in model.head.last_layer.parameters():
                p.grad = None
        opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def _toy_engine(model: Toy, stage: int):
    import deepspeed

    ds = eng.load_template("base.json")
    ds.update(train_batch_size=8, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1,
              gradient_clipping=0.0)
    ds["zero_optimization"]["stage"] = stage
    opt = torch.optim.AdamW(eng.param_groups(model), lr=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine, eng.GradientGate(eng.frozen_params(engine.module))


def _full(p: torch.Tensor) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    return (full if full is not None else p).detach().clone()


def _engine_run(model0: Toy, stage: int, resume_at: int | None, tmp_path) -> list[dict[str, torch.Tensor]]:
    """The same loop on the DeepSpeed engine with the project's gate + restart (eng.apply_schedule);
    ``resume_at``: save after that many steps and continue in a fresh engine loaded from the checkpoint."""
    engine, gate = _toy_engine(copy.deepcopy(model0), stage)
    sched = _toy_schedules()
    out = []
    for step in range(TOTAL):
        if step == resume_at:
            engine.save_checkpoint(str(tmp_path), tag="ckpt")
            gate.remove()
            engine, gate = _toy_engine(Toy(), stage)  # other initial weights: everything comes from the file
            path, _ = engine.load_checkpoint(str(tmp_path), tag="ckpt")
            assert path is not None
        eng.apply_schedule(engine.optimizer, gate, sched.at(step))
        engine.backward(engine(*_toy_data(step)))
        engine.step()
        out.append({n: _full(p) for n, p in engine.module.named_parameters()})
    counts = eng.optimizer_step_counts(engine.optimizer)
    assert set(counts[eng.LAST_LAYER] + counts.get(eng.LAST_LAYER_NOT_REGULARIZED, [])) == {TOTAL - FREEZE}
    assert set(counts[eng.REGULARIZED]) == {TOTAL}
    return out


@pytest.mark.parametrize("stage,resume_at", [(0, None), (1, None), (2, None), (3, None), (2, FREEZE - 1), (2, FREEZE),
                                             (0, FREEZE), (1, FREEZE - 1)])
def test_last_layer_after_the_freeze_equals_adamw_without_its_gradient(deepspeed_cpu, tmp_path, stage, resume_at):
    eng.init_distributed()
    torch.manual_seed(0)
    model0 = Toy()
    ref = _reference(model0)
    got = _engine_run(model0, stage, resume_at, tmp_path)
    last = [n for n in ref[0] if n.startswith("head.last_layer.")]
    assert len(last) == 2  # weight direction and trainable gain
    start = dict(model0.named_parameters())
    for step in range(TOTAL):
        for n in ref[step]:
            torch.testing.assert_close(got[step][n], ref[step][n], rtol=0, atol=1e-6, msg=f"{n} at step {step}")
        if step < FREEZE:
            assert all(torch.equal(ref[step][n], start[n].detach()) for n in last)
    assert not torch.equal(ref[FREEZE][last[0]], start[last[0]].detach())  # it did move once free


def test_step_counting_restart_matters():
    """Without the restart (what lr 0 + the gate alone gave) the first free update differs from DINO's
    (smaller here after 3 frozen steps; 2.6× larger after 1,251, issue 11): the test above can fail."""
    torch.manual_seed(0)
    model = Toy()
    ref = _reference(model)
    gated = copy.deepcopy(model)
    opt = torch.optim.AdamW(eng.param_groups(gated), lr=0.0)
    sched = _toy_schedules()
    for step in range(FREEZE + 1):
        s = sched.at(step)
        eng.set_group_values(opt, s.lr, s.weight_decay, frozen=s.last_layer_frozen)
        opt.zero_grad()
        gated(*_toy_data(step)).backward()
        if s.last_layer_frozen:
            for p in gated.head.last_layer.parameters():
                p.grad.zero_()
        opt.step()
    name = "head.last_layer.parametrizations.weight.original1"
    moved_ref = (ref[FREEZE][name] - ref[FREEZE - 1][name]).abs().max()
    moved_gated = (dict(gated.named_parameters())[name].detach() - ref[FREEZE - 1][name]).abs().max()
    assert not 0.8 < float(moved_gated / moved_ref) < 1.25  # bias correction of step F + 1 instead of 1


# --------------------------------------------------------------------------------------------------
# (3) weight decay: DINO's rule on DeiT-S
# --------------------------------------------------------------------------------------------------
def _dino_rule(model: nn.Module) -> tuple[set[str], set[str]]:
    """DINO's get_params_groups, as SPEC §9 states it: decayed unless the name ends in .bias or 1-D."""
    reg, not_reg = set(), set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_reg if name.endswith(".bias") or p.ndim == 1 else reg).add(name)
    return reg, not_reg


def _grouped(model: nn.Module, rule: str) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in eng.param_groups(model, rule=rule)}
    decayed = set().union(*(groups.get(k, set()) for k in eng.DECAYED_GROUPS))
    return decayed, set().union(*groups.values()) - decayed


def test_weight_decay_groups_follow_dinos_rule_on_deit_s():
    from mst_ds.model import MSTModel

    cfg = load_config("mst_deit_s_100ep").config
    assert cfg.optim.no_decay_rule == "dino"
    model = MSTModel.from_config(cfg)
    assert _grouped(model, "dino") == _dino_rule(model)
    decayed_timm, _ = _grouped(model, "timm")
    changed = _grouped(model, "dino")[0] - decayed_timm
    assert changed == {"backbone.vit.cls_token", "backbone.vit.pos_embed", "backbone.mask_token"}
    named = dict(model.named_parameters())
    assert sum(named[n].numel() for n in ("backbone.vit.cls_token", "backbone.vit.pos_embed")) == 76_032
    assert _grouped(model, "timm")[0] <= _grouped(model, "dino")[0]  # timm only removes from decay


def test_engine_uses_the_configured_rule():
    from mst_ds.model import MSTModel

    for rule in ("dino", "timm"):
        cfg = load_config("tiny", [f"optim.no_decay_rule={rule}"]).config
        model = MSTModel.from_config(cfg)
        decayed, _ = _grouped(model, cfg.optim.no_decay_rule)
        assert ("backbone.vit.pos_embed" in decayed) == (rule == "dino")


# --------------------------------------------------------------------------------------------------
# (4) the mean_ln_k reduction puts the restoration on the DINO loss's scale at initialisation
# --------------------------------------------------------------------------------------------------
def test_mean_ln_k_scale_of_an_uninformed_prediction():
    """A zero prediction of unit-variance (normalised) pixels: mean L1 = √(2/π), × ln K."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 3, 64, 64, generator=g)
    for k in (256, 65536):
        got = restoration_loss(torch.zeros_like(target), target, reduction="mean_ln_k", num_prototypes=k).item()
        assert got == pytest.approx(math.sqrt(2 / math.pi) * math.log(k), rel=0.02)
    with pytest.raises(ValueError):
        restoration_loss(target, target, reduction="mean_ln_k")


def test_mean_ln_k_is_comparable_to_dino_at_init_and_mean_is_not():
    """One forward of the untrained tiny model (what `mst-ds plan` prints): DINO ≈ ln K, the mean_ln_k
    restoration (the default) within a factor 1.5 of it, while mean is an order of magnitude smaller."""
    from mst_ds import plan

    cfg = load_config("tiny").config
    b = plan.loss_balance(cfg, plan.build_model(cfg), 0.04, batch=8)
    assert b.dino == pytest.approx(math.log(cfg.model.head.out_dim), rel=0.15)
    assert 1 / 1.5 < b.restore["mean_ln_k"] / b.dino < 1.5
    assert b.restore["mean"] / b.dino < 0.25
    assert b.restore["mean_ln_k"] == pytest.approx(b.restore["mean"] * b.ln_k, rel=1e-6)
    assert b.configured == ("mean_ln_k", pytest.approx(b.restore["mean_ln_k"], rel=1e-6))


def test_model_trains_with_mean_ln_k():
    from mst_ds.model import MSTModel

    cfg = load_config("tiny", ["loss.restore_reduction=mean_ln_k"]).config
    model = MSTModel.from_config(cfg)
    vs = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    out = model(vs, model.make_teacher(), 0.04)
    assert out["restore_weighted"] == pytest.approx(0.6 * out["restore"].item())
    assert out["restore"] > 0.5 * math.log(cfg.model.head.out_dim)
