"""``mst-ds plan`` and ``mst-ds presets``: what a run will be, before it runs (prints only, writes nothing).

plan: the resolved config with each value's source, parameter counts per module, per-rank and global
batch, steps per epoch, schedule values at the milestones, an *estimate* of per-device memory, and the
balance of the two losses at initialisation (one measured forward of the untrained model; ``--no-model``
skips it with the parameter counts), and the training cost: FLOPs per image counted from the config and
GPU-hours on ``--device`` (mst_ds.cost; ``--measure-cpu`` adds measured CPU time). ``plan --study``: the
grid of a study and its cost (mst_ds.study.plan).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from mst_ds.config import (
    PRESET_DIR,
    ConfigError,
    Derived,
    LoadedConfig,
    MSTConfig,
    derive,
    flatten,
    list_presets,
    load_config,
    read_yaml,
)
from mst_ds.cost import Pricing, comm_per_step, flops_per_image, parameter_count, run_steps
from mst_ds.schedules import Schedules
from mst_ds.study import plan as plan_study
from mst_ds.study import plan_pricing, step_cost

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "autocast_bf16": 2, "auto": 2}


def run(args: argparse.Namespace) -> int:
    if args.command == "presets":
        return presets()
    return plan(args)


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------
def _describe(path) -> str:
    """The first comment line of a recipe file."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def presets() -> int:
    table = Table(title="Presets (mst_ds/configs)")
    for col in ("preset", "parent", "description"):
        table.add_column(col, overflow="fold")
    for name in list_presets():
        path = PRESET_DIR / f"{name}.yaml"
        table.add_row(name, str(read_yaml(path).get("parent") or "—"), _describe(path))
    Console().print(table)
    return 0


# --------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def config_table(loaded: LoadedConfig) -> Table:
    table = Table(title="Resolved config (source: default = pydantic default = the paper's recipe)")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_column("source")
    for key, value in flatten(loaded.config.to_dict()).items():
        source = loaded.sources.get(key, "default")
        style = None if source == "default" else "bold"
        table.add_row(key, _fmt(value), source, style=style)
    return table


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def build_model(cfg: MSTConfig):
    """The untrained student, built on the CPU (imports torch/timm: only when asked)."""
    from mst_ds.model import MSTModel

    return MSTModel.from_config(cfg)


def parameter_counts(cfg: MSTConfig, model=None) -> dict[str, int]:
    """Parameters per module of the student (and the teacher it implies), built on the CPU."""
    model = model if model is not None else build_model(cfg)
    mask_token = model.backbone.mask_token.numel()
    backbone = _numel(model.backbone) - mask_token
    head = _numel(model.head)
    decoder = _numel(model.decoder)
    return {"backbone (ViT)": backbone, "mask token": mask_token, "DINO head": head, "decoder": decoder,
            "student total (trained)": backbone + mask_token + head + decoder,
            "teacher (EMA of backbone + head + mask token)": backbone + head + mask_token}


def parameter_table(counts: dict[str, int]) -> Table:
    table = Table(title="Parameters")
    table.add_column("module")
    table.add_column("parameters", justify="right")
    for name, n in counts.items():
        table.add_row(name, f"{n:,} ({n / 1e6:.2f} M)")
    return table


def batch_table(d: Derived) -> Table:
    table = Table(title="Batch and steps")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("world size (ranks)", d.world_size),
        ("global batch (images / optimizer step)", d.global_batch),
        ("gradient accumulation", d.grad_accum_steps),
        ("micro-batch per rank (images / forward)", d.micro_batch),
        ("views per image (2 global + local)", d.n_views),
        ("data set size", d.dataset_size),
        ("steps per epoch", d.steps_per_epoch),
        ("total steps", d.total_steps),
        ("warm-up steps", d.warmup_steps),
        ("teacher-temperature warm-up steps", d.teacher_temp_warmup_steps),
        ("last layer frozen for steps", d.freeze_last_layer_steps),
        ("peak lr (base_lr × batch / 256)", f"{d.peak_lr:.6g}"),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    return table


def schedule_table(s: Schedules) -> Table:
    table = Table(title="Schedules (wd: weight decay; momentum: teacher EMA; t-temp: teacher temperature; frozen: head last layer)")
    for col in ("milestone", "step", "lr", "wd", "momentum", "t-temp", "frozen"):
        table.add_column(col, justify="right")
    for label, step in s.milestones().items():
        v = s.at(step)
        table.add_row(label, str(step), f"{v.lr:.4g}", f"{v.weight_decay:.4g}", f"{v.momentum:.6g}",
                      f"{v.teacher_temp:.4g}", str(v.last_layer_frozen))
    return table


RESTORE_REDUCTIONS = ("mean", "sum_per_image", "mean_ln_k")


@dataclass
class LossBalance:
    """The two loss terms at initialisation, measured by one forward of the untrained model."""

    dino: float  # unweighted DINO loss
    ln_k: float  # its value for a uniform student: ln K
    restore: dict[str, float]  # unweighted L1 per reduction (whole-image target)
    configured: tuple[str, float]  # (config's reduction, its value as the training forward computes it)
    dino_weight: float
    restore_weight: float
    batch: int


def loss_balance(cfg: MSTConfig, model, teacher_temp: float, *, batch: int = 2, seed: int = 0) -> LossBalance | None:
    """DINO vs λ2 × restoration at initialisation: one training-mode forward of the untrained student
    and teacher on ``batch`` images of standard-normal noise per view (the scale of normalised pixels),
    seed ``seed``. Measured, not analytic; the restoration is evaluated under every reduction from the
    same decoder output. None when the decoder is off (no restoration term)."""
    import torch

    from mst_ds.losses import restoration_loss

    if model.decoder is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    a = cfg.augment

    def noise(size: int):
        return torch.randn(batch, 3, size, size, generator=gen)

    views = [noise(a.global_crop_size) for _ in range(2)] + [noise(a.local_crop_size) for _ in range(a.n_local_crops)]
    captured = {}
    handle = model.decoder.register_forward_hook(lambda _m, _i, out: captured.setdefault("pred", out))
    teacher = model.make_teacher()
    model.train()
    try:
        with torch.no_grad():
            out = model(views, teacher, teacher_temp, torch.Generator().manual_seed(seed + 1))
    finally:
        handle.remove()
        model.dino_loss.discard_pending_center()
    target = torch.cat(views[:2])
    k = cfg.model.head.out_dim
    restore = {r: float(restoration_loss(captured["pred"], target, reduction=r, num_prototypes=k)) for r in RESTORE_REDUCTIONS}
    return LossBalance(dino=float(out["dino"]), ln_k=math.log(k), restore=restore,
                       configured=(cfg.loss.restore_reduction, float(out["restore"])),
                       dino_weight=cfg.loss.dino_weight, restore_weight=cfg.loss.restore_weight, batch=batch)


def loss_balance_table(b: LossBalance, cfg: MSTConfig) -> Table:
    table = Table(title=f"Loss balance at initialisation — MEASURED: one forward of the untrained model on {b.batch} "
                        f"images of normalised noise (N(0,1) pixels), seed 0; DINO ≈ ln K = {b.ln_k:.3f} for a "
                        f"uniform student (loss.restore_reduction: derivation in its description)")
    for col in ("reduction", "λ1·DINO", "L1", "λ2·L1", "L1 share"):
        table.add_column(col, justify="right")
    dino_w = b.dino_weight * b.dino
    for r, value in b.restore.items():
        rw = b.restore_weight * value
        share = rw / (dino_w + rw) if dino_w + rw > 0 else float("nan")
        mark = " (configured)" if r == b.configured[0] else ""
        table.add_row(r + mark, f"{dino_w:.4g}", f"{value:.4g}", f"{rw:.4g}", f"{100 * share:.1f} %",
                      style="bold" if mark else None)
    if cfg.loss.restore_target != "image":
        table.add_row(f"{b.configured[0]} on masked patches (configured target)", f"{dino_w:.4g}",
                      f"{b.configured[1]:.4g}", f"{b.restore_weight * b.configured[1]:.4g}", "", style="bold")
    return table


@dataclass
class MemoryEstimate:
    rows: list[tuple[str, float]]  # (what, bytes)
    bytes_per_element: int

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)


def _vit_dims(cfg: MSTConfig) -> tuple[int, int, int, int]:
    """(dim, depth, heads, patch) of the configured ViT, from timm's kwargs or the arch name."""
    kw = cfg.model.timm_kwargs
    known = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
    dim, depth, heads = next((v for k, v in known.items() if f"_{k}_" in cfg.model.arch), (384, 12, 6))
    patch = next((int(p[5:]) for p in cfg.model.arch.split("_") if p.startswith("patch") and p[5:].isdigit()), 16)
    return (int(kw.get("embed_dim", dim)), int(kw.get("depth", depth)), int(kw.get("num_heads", heads)),
            int(kw.get("patch_size", patch)))


def activation_estimate(cfg: MSTConfig, d: Derived, params: dict[str, int] | None) -> MemoryEstimate:
    """A rough per-device memory estimate (bytes), not a measurement.

    Activations saved for backward per transformer block and image, T tokens of width D, a heads
    (Korthikanti et al. 2022, 16-bit): 34·T·D + 5·a·T² bytes; the T² term (attention matrix) is dropped
    for fused attention, and everything scales with bytes/element ÷ 2. Student: B·(2 global + n local)
    sequences through all blocks. Head: hidden + K-wide logits/softmax per view (float32 loss).
    Decoder: ≈ 2·c_in values per input pixel + 3·c_out per output pixel per stage, 2 global views.
    Model states: 16 bytes per trained parameter (weights, grads, AdamW moments, mixed-precision masters) ÷ ZeRO partitioning, plus
    a float32 teacher. The teacher's activations are not kept (no grad).
    """
    e = BYTES_PER_ELEMENT[cfg.engine.precision]
    dim, depth, heads, patch = _vit_dims(cfg)
    B = d.micro_batch
    seqs = [(cfg.augment.global_crop_size // patch) ** 2 + 1] * 2 + \
        [(cfg.augment.local_crop_size // patch) ** 2 + 1] * cfg.augment.n_local_crops

    def block(T: int) -> float:
        attn = 0 if cfg.model.fused_attn else 5 * heads * T * T
        return (34 * T * dim + attn) * e / 2

    rows: list[tuple[str, float]] = [("student ViT activations", B * depth * sum(block(T) for T in seqs))]
    h = cfg.model.head
    rows.append(("student head activations + float32 logits",
                 B * len(seqs) * (e * (3 * h.hidden_dim * max(1, h.nlayers - 1) + h.bottleneck_dim) + (e + 8) * h.out_dim)))
    if cfg.decoder.enabled:
        side = cfg.augment.global_crop_size // patch
        widths = [dim, *cfg.decoder.channels]
        dec = 0.0
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            up = 2 if i < len(widths) - 2 else 1  # the last stage stays at half resolution (sub-pixel output)
            dec += 2 * c_in * side * side + 3 * c_out * (up * side) ** 2
            side *= up
        dec += 2 * 12 * side * side  # 3·4-channel sub-pixel output and the full-resolution image
        rows.append(("decoder activations (2 global views)", 2 * B * dec * e))
    if params is not None:
        trained = params["student total (trained)"]
        stage = cfg.engine.zero_stage
        w = d.world_size
        per_param = (2 if stage < 3 else 2 / w) + (2 if stage < 2 else 2 / w) + (12 if stage < 1 else 12 / w)
        rows.append((f"model states (ZeRO-{stage}, {w} ranks)", trained * per_param))
        rows.append(("teacher weights (float32)", params["teacher (EMA of backbone + head + mask token)"] * 4))
    return MemoryEstimate(rows, e)


def memory_table(est: MemoryEstimate, cfg: MSTConfig) -> Table:
    table = Table(title=f"Memory per device — ESTIMATE ({est.bytes_per_element} bytes/element, precision "
                        f"{cfg.engine.precision}; formula in mst_ds.plan.activation_estimate)")
    table.add_column("what")
    table.add_column("GiB", justify="right")
    for what, b in est.rows:
        table.add_row(what, f"{b / 2**30:.3f}")
    table.add_row("total (estimate; framework buffers and fragmentation come on top)", f"{est.total / 2**30:.3f}",
                  style="bold")
    return table


REFERENCE_MONITOR_IMAGES = 10_000  # the estimate shown when no monitor data is given


def monitor_table(cfg: MSTConfig, d: Derived) -> Table:
    """The online k-NN monitor's cadence and estimated cost (issue 10; mst_ds.eval.monitor)."""
    from mst_ds.eval import monitor as mon

    m = cfg.eval.monitor
    table = Table(title="Online k-NN monitor (eval.monitor) — cost is an ESTIMATE (tokens processed; formula in "
                        "mst_ds.eval.monitor.training_cost_per_image)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    cadence = [f"every {m.every_steps} steps"] if m.every_steps else []
    cadence += [f"every {m.every_epochs} epoch(s) at the epoch end"] if m.every_epochs else []
    images = mon.count_images(m.bank) + (mon.count_images(m.query) if m.query else 0) if m.bank else None
    n = images if images is not None else REFERENCE_MONITOR_IMAGES
    patch = _vit_dims(cfg)[3]
    share = mon.cost_share(cfg, dataset_size=d.dataset_size, steps_per_epoch=d.steps_per_epoch, monitor_images=n, patch=patch)
    rows = [
        ("state", f"on: {m.bank}" + (f" + {m.query}" if m.query else f" (query: {m.query_fraction:.0%} cut by key)")
         if m.bank else "off (no eval.monitor.bank given)"),
        ("cadence", ", ".join(cadence + ["step 0 and the last step"])),
        ("evaluations per epoch", f"{mon.evaluations_per_epoch(cfg, d.steps_per_epoch):.3g}"),
        ("training compute per image (in eval forwards)", f"{mon.training_cost_per_image(cfg, patch):.1f}"),
        (f"monitor images per evaluation{'' if images is not None else ' (if a set of this size were given)'}", f"{n:,}"),
        ("estimated share of the run's compute", f"{100 * share:.2f} %"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


def _derive(args: argparse.Namespace, cfg: MSTConfig, world: int) -> Derived:
    """The numbers a training run would use: from the manifest and loader plan when data.train is set
    (an unreadable manifest is an error, as for `mst-ds train`), else data.num_samples or --dataset-size."""
    if args.dataset_size is not None:
        return derive(cfg, world, args.dataset_size)
    from mst_ds.data.reader import derive_for_training

    return derive_for_training(cfg, world)


def comm_table(cfg: MSTConfig, d: Derived) -> Table:
    """Bytes one rank sends per optimizer step (it receives as much): mst_ds.cost.comm_per_step."""
    params = parameter_count(cfg)
    rows = comm_per_step(cfg, d.world_size, d.grad_accum_steps, params)
    table = Table(title=f"Communication per rank and optimizer step — ESTIMATE ({d.world_size} ranks, ZeRO-"
                        f"{cfg.engine.zero_stage}, {cfg.engine.precision}; ring collectives, formula in "
                        "mst_ds.cost.comm_per_step)")
    table.add_column("what")
    table.add_column("collective")
    table.add_column("MiB sent per rank", justify="right")
    for r in rows:
        table.add_row(r.what, r.collective, f"{r.bytes / 2**20:,.2f}")
    total = sum(r.bytes for r in rows)
    table.add_row(f"total ({params.student:,} trained parameters; as much is received)", "",
                  f"{total / 2**20:,.2f}", style="bold")
    return table


def cost_table(cfg: MSTConfig, d: Derived, price: Pricing, cpu_s_per_image: float | None) -> Table:
    """The run's training compute (mst_ds.cost.flops_per_image) and its price in GPU-hours."""
    steps = run_steps(cfg, d.total_steps)
    images = steps * d.global_batch
    flops = flops_per_image(cfg)
    hours = price.hours(images, flops)
    table = Table(title=f"Training cost — GFLOP counted from the config (teacher fwd + student fwd/bwd + head + "
                        f"decoder per image, mst_ds.cost); {price.device.upper()} GPU-hours at {price.describe()}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [("optimizer steps", f"{steps:,}"), ("images", f"{images:,}"), ("GFLOP / image", f"{flops / 1e9:.2f}"),
            ("PFLOP / run", f"{images * flops / 1e15:,.4g}"),
            (f"{price.device.upper()} GPU-hours / run", f"{hours:,.4g}"),
            (f"wall-clock hours on {d.world_size} device(s)", f"{hours / d.world_size:,.4g}")]
    if cpu_s_per_image is not None:
        rows.append(("CPU hours / run here (one process, measured now)", f"{images * cpu_s_per_image / 3600:,.4g}"))
    for k, v in rows:
        table.add_row(k, v)
    return table


def plan(args: argparse.Namespace) -> int:
    if args.study:
        return plan_study(args)
    console = Console()
    loaded = load_config(args.preset, args.sets)
    cfg = loaded.config
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    derived = _derive(args, cfg, world)
    schedules = Schedules.from_config(cfg, derived)
    price = plan_pricing(args)
    try:
        flops_per_image(cfg)
        uncounted = None
    except ConfigError as err:  # an architecture the count does not know: said, not guessed
        uncounted = str(err)
    cpu_s = step_cost(cfg) if args.measure_cpu and uncounted is None else None
    model = None if args.no_model else build_model(cfg)
    params = None if model is None else parameter_counts(cfg, model)
    balance = None if model is None else loss_balance(cfg, model, schedules.at(0).teacher_temp)

    console.print(config_table(loaded))
    if params is not None:
        console.print(parameter_table(params))
    console.print(batch_table(derived))
    console.print(schedule_table(schedules))
    console.print(memory_table(activation_estimate(cfg, derived, params), cfg))
    if derived.world_size > 1 and uncounted is None:
        console.print(comm_table(cfg, derived))
    console.print(monitor_table(cfg, derived))
    if uncounted is None:
        console.print(cost_table(cfg, derived, price, cpu_s))
    else:
        console.print(f"[yellow]training cost not shown (nor the communication):[/] {uncounted}")
    if balance is not None:
        console.print(loss_balance_table(balance, cfg))
    if derived.total_steps < 2 or math.isclose(derived.peak_lr, 0.0):
        console.print("[yellow]note:[/] fewer than 2 schedule steps")
    return 0
