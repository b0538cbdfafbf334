"""Run health (issue 10): collapse and MST diagnostics, the gradient-share probe, and alert rules.

Diagnostics (returned by ``MSTModel.forward`` as detached scalars, averaged over ranks, logged every
``run.log_every`` steps):

* ``teacher_entropy_rel``: mean per-sample entropy of the centred, sharpened teacher distribution ÷ ln K
  (→ 1: uniform collapse);
* ``teacher_usage_entropy_rel``: entropy of the batch-mean teacher distribution ÷ ln K (→ 0: every
  sample on one prototype). Computed per micro-batch and rank, so it is bounded by ln M ÷ ln K with M
  the teacher outputs of one micro-batch (2 × micro-batch); the alert rule divides by ln min(K, M);
* ``agreement``: share of (teacher global view i, student view v ≠ i) pairs — the DINO loss's pairs —
  whose argmax prototypes agree;
* ``teacher_cls_std``: std over the batch of the L2-normalised teacher CLS, averaged over the D
  features (≈ 1/√D when healthy, → 0 on dimensional collapse);
* ``attn_guidance``: teacher attention mass (head-averaged last-block CLS→patch attention) on the masked
  patches ÷ the mass a random mask of the same size would get in expectation (|mask| / N of the
  mass). ≈ 1: masking no better than random; attention-guided masking sits below 1 (it masks the
  lowest-attention patches). NaN when nothing is masked.

Logged by the training loop from these: ``restore_loss_share`` = λ2·L_restore ÷ total loss, and
``restore_grad_share`` = ‖g_restore‖ ÷ (‖g_restore‖ + ‖g_dino‖), the gradients of the weighted losses at
the output of the last layer the two branches share (the student backbone's final norm): the DINO head
reads only the CLS rows and the decoder only the patch rows, so the two gradients are separated by
token position with tensor hooks on the backbone's outputs — no second backward, and the hooks only
read (the trajectory is unchanged). Measured on rank 0's micro-batches of the logged steps.

Alerts: named rules (``RULES``) with thresholds in the ``health`` config section; each fires at most
once per run: one line on rank 0, a record in ``RUN/alerts.jsonl``, the count in the ``alerts`` metric;
with ``run.on_alert: stop`` the loop saves a checkpoint and ends (exit 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mst_ds.run_dir import ALERTS as ALERTS_FILE  # noqa: F401 (tests name it)
from mst_ds.run_dir import RunDir


# --------------------------------------------------------------------------------------------------
# Gradient share at the last shared layer (backward hooks, read only)
# --------------------------------------------------------------------------------------------------
class GradProbe:
    """Squared gradient norms of the DINO and restoration branches where they meet the backbone.

    A forward hook on the student backbone registers, while ``active``, tensor hooks on its outputs:
    ``cls`` (read by the DINO head, every view) and ``patch_tokens`` (read by the decoder, global
    views). Their gradients are exactly the two weighted losses' gradients at the backbone's output.
    """

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.active = False
        self.sq = {"dino": 0.0, "restore": 0.0}
        self._sums: list[tuple[str, Tensor]] = []
        self._handle = backbone.register_forward_hook(self._on_forward)

    def arm(self, on: bool) -> None:
        self.active = on
        self._sums = []

    def _on_forward(self, module, inputs, out) -> None:
        if not (self.active and torch.is_grad_enabled()):
            return
        for name, tensor in (("dino", out.cls), ("restore", out.patch_tokens)):
            if tensor.requires_grad:
                tensor.register_hook(self._reader(name))

    def _reader(self, name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self._sums.append((name, grad.detach().float().pow(2).sum()))  # returns None: grad unchanged

        return hook

    def share(self) -> float:
        """‖g_restore‖ ÷ (‖g_restore‖ + ‖g_dino‖) of the armed step (NaN if nothing was measured)."""
        sq = {"dino": 0.0, "restore": 0.0}
        for name, v in self._sums:
            sq[name] += float(v)
        self._sums = []
        r, d = math.sqrt(sq["restore"]), math.sqrt(sq["dino"])
        return r / (r + d) if r + d > 0 else float("nan")

    def remove(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------------------------------
# Alert rules
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """What the rules need beyond the logged scalars."""

    K: int  # prototypes
    M: int  # teacher outputs per micro-batch and rank (2 × micro-batch)
    D: int  # CLS width
    total_steps: int  # schedule length (rules start at fractions of it)
    attention_masking: bool
    knn_at_start: float | None  # online k-NN top-1 at step 0


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    explain: str  # what it means, for the one-line message
    # (stats, health cfg, context, step) → (value shown, threshold shown, tripped) or None (not applicable)
    check: Callable[[dict[str, float], Any, Context, int], tuple[float, float, bool] | None]
    always: bool = False  # checked from step 1, not only after health.start_fraction


def _get(stats: dict[str, float], key: str) -> float | None:
    v = stats.get(key)
    return float(v) if isinstance(v, int | float) and math.isfinite(float(v)) else None


def _nonfinite(stats, h, c, step):
    loss = stats.get("loss")
    bad = loss is not None and not math.isfinite(float(loss))
    return (float(stats.get("nonfinite_steps", 0)), 0.0, bad or stats.get("nonfinite_steps", 0) > 0)


def _uniform(stats, h, c, step):
    v = _get(stats, "teacher_entropy_rel")
    return None if v is None else (v, h.uniform_collapse, v > h.uniform_collapse)


def _one_prototype(stats, h, c, step):
    v = _get(stats, "teacher_usage_entropy_rel")
    if v is None:
        return None
    ceiling = math.log(min(c.K, c.M)) / math.log(c.K) if min(c.K, c.M) > 1 else 1.0
    rel = v / ceiling
    return (rel, h.one_prototype, rel < h.one_prototype)


def _dim_collapse(stats, h, c, step):
    v = _get(stats, "teacher_cls_std")
    return None if v is None else (v * math.sqrt(c.D), h.dim_collapse, v * math.sqrt(c.D) < h.dim_collapse)


def _flat_attention(stats, h, c, step):
    v = _get(stats, "attn_entropy")
    if v is None or not c.attention_masking or step < h.flat_attention_after_fraction * c.total_steps:
        return None
    return (v, h.flat_attention, v > h.flat_attention)


def _knn_stalled(stats, h, c, step):
    v = _get(stats, "monitor_knn_top1")
    if v is None or c.knn_at_start is None or step < h.knn_after_fraction * c.total_steps:
        return None
    return (v, c.knn_at_start, v <= c.knn_at_start)


RULES: tuple[Rule, ...] = (
    Rule("loss_not_finite", "nonfinite_steps", "a loss was NaN/Inf", _nonfinite, always=True),
    Rule("uniform_collapse", "teacher_entropy_rel",
         "teacher per-sample entropy ÷ ln K above the threshold: the teacher output is near-uniform", _uniform),
    Rule("one_prototype_collapse", "teacher_usage_entropy_rel",
         "entropy of the batch-mean teacher output ÷ ln min(K, M) below the threshold: the batch uses a few prototypes",
         _one_prototype),
    Rule("dimensional_collapse", "teacher_cls_std",
         "std of the normalised teacher CLS × √D below the threshold: the features span few dimensions",
         _dim_collapse),
    Rule("flat_attention", "attn_entropy",
         "teacher CLS attention entropy ÷ ln N above the threshold while attention-guided masking is on: "
         "the masks are effectively random", _flat_attention),
    Rule("knn_not_improving", "monitor_knn_top1",
         "online k-NN top-1 at or below its value at step 0 (the threshold shown)", _knn_stalled, always=True),
)


def read_alerts(run_dir: Path, last_step: int) -> list[dict[str, Any]]:
    """Alerts of RUN/alerts.jsonl up to ``last_step`` (the rest belongs to steps a resume redoes)."""
    path = RunDir(run_dir).alerts
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if rec.get("step", 0) <= last_step:
            out.append(rec)
    return out


class AlertBook:
    """Checks the rules on rank 0; each rule fires once per run (resume keeps what fired before)."""

    def __init__(self, cfg, context: Context, run_dir: Path, *, enabled: bool, start_step: int) -> None:
        from mst_ds import atomic

        self.cfg, self.context, self.run_dir, self.enabled = cfg, context, Path(run_dir), enabled
        self.fired: list[dict[str, Any]] = []
        if enabled:
            self.fired = read_alerts(self.run_dir, start_step if start_step else -1)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(RunDir(self.run_dir).alerts, "".join(json.dumps(r) + "\n" for r in self.fired))

    @property
    def count(self) -> int:
        return len(self.fired)

    def check(self, step: int, stats: dict[str, float]) -> list[dict[str, Any]]:
        """New alerts at ``step`` (printed and appended to alerts.jsonl); [] on other ranks."""
        h = self.cfg.health
        if not (self.enabled and h.enabled):
            return []
        names = {r["rule"] for r in self.fired}
        new = []
        for rule in RULES:
            if rule.name in names or (not rule.always and step < h.start_fraction * self.context.total_steps):
                continue
            res = rule.check(stats, h, self.context, step)
            if res is None or not res[2]:
                continue
            value, threshold, _ = res
            rec = {"step": step, "rule": rule.name, "metric": rule.metric, "value": value, "threshold": threshold,
                   "action": self.cfg.run.on_alert, "message": rule.explain}
            new.append(rec)
            print(f"mst-ds: alert: {rule.name} at step {step}: {rule.metric} {value:.4g} vs {threshold:.4g} — "
                  f"{rule.explain} (run.on_alert={self.cfg.run.on_alert})", file=sys.stderr, flush=True)
        if new:
            with RunDir(self.run_dir).alerts.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
            self.fired += new
        return new


# --------------------------------------------------------------------------------------------------
# The loop's hook: probe, monitor and alerts together
# --------------------------------------------------------------------------------------------------
def _rank0_decides(flag: bool) -> bool:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])
    return flag


def _knn_at_start(run_dir: Path) -> float | None:
    """The online k-NN of step 0 from RUN/metrics.jsonl (a resumed run does not redo step 0)."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if rec.get("step") == 0 and isinstance(rec.get("monitor_knn_top1"), int | float):
            return float(rec["monitor_knn_top1"])
    return None


class RunHealth:
    """What the training loop calls: arm the gradient probe, run the online k-NN when due, add the
    health scalars to a logged step, check the alert rules (rank 0) and agree on a stop."""

    def __init__(self, t, run_dir: Path, *, end: int) -> None:
        from mst_ds.eval.monitor import OnlineKNN

        cfg = t.cfg
        self.cfg, self.end, self.rank = cfg, end, t.rank
        self.log_every = cfg.run.log_every
        self.probe_every = cfg.health.grad_probe_every
        self.probe = GradProbe(t.engine.module.backbone) if self.probe_every else None
        self.monitor = OnlineKNN(cfg, rank=t.rank, world=t.world, device=t.device) if cfg.eval.monitor.bank else None
        self._started = None
        knn0 = _knn_at_start(Path(run_dir)) if t.rank == 0 and t.step > 0 else None
        context = Context(K=cfg.model.head.out_dim, M=2 * t.derived.micro_batch, D=t.engine.module.backbone.embed_dim,
                          total_steps=t.derived.total_steps, attention_masking=cfg.mask.enabled and cfg.mask.strategy == "attention",
                          knn_at_start=knn0)
        self.alerts = AlertBook(cfg, context, Path(run_dir), enabled=t.rank == 0, start_step=t.step)
        self.stop = False

    def _clock(self) -> float:
        import time

        now = time.monotonic()
        if self._started is None:
            self._started = now
        return now - self._started

    def start(self, t, log) -> None:
        """At a fresh start (step 0): the monitor's baseline, logged as the step-0 record."""
        self._clock()
        if self.monitor is None or t.step != 0:
            return
        stats = self._evaluate(t)
        if t.rank == 0:
            self.alerts.context = dataclasses.replace(self.alerts.context, knn_at_start=stats["monitor_knn_top1"])
        log.log(0, 0, stats)

    def _evaluate(self, t) -> dict[str, float]:
        before = self.monitor.seconds
        result = self.monitor.evaluate(t.teacher.backbone) or {}
        elapsed = self._clock()
        return {**result, "monitor_s": self.monitor.seconds - before,
                "monitor_time_share": self.monitor.seconds / max(elapsed, 1e-9)}

    def arm(self, step: int) -> None:
        """Before step ``step`` (1-based): measure the gradient share if that step is logged."""
        if self.probe is not None:
            self.probe.arm(step % (self.log_every * self.probe_every) == 0 or step == self.end)

    def observe(self, t, stats: dict[str, float], *, epoch: int, epoch_end: bool, log_now: bool) -> bool:
        """After a step: monitor when due, health scalars and alert checks on logged steps → log this step?"""
        step = t.step
        if self.monitor is not None and self.monitor.due(step, epoch_end=epoch_end, epoch=epoch, last=step == self.end):
            stats.update(self._evaluate(t))
            log_now = True
        if not log_now:
            return False
        if "dino_weighted" in stats:
            total = stats["dino_weighted"] + stats["restore_weighted"]
            stats["restore_loss_share"] = stats["restore_weighted"] / total if total else float("nan")
        if self.probe is not None and self.probe.active:
            stats["restore_grad_share"] = self.probe.share()
            self.probe.arm(False)
        new = self.alerts.check(step, stats)
        stats["alerts"] = self.alerts.count
        if self.cfg.run.on_alert == "stop":
            self.stop = _rank0_decides(bool(new))
        return True

    def nonfinite(self, step: int) -> None:
        """The loop stops on a non-finite loss (nan_policy stop): record the alert before it does."""
        self.alerts.check(step, {"loss": float("nan")})
