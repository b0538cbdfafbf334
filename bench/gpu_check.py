"""One prepared check of the GPU path, for the few minutes a GPU machine is available (≤ 8 min, one GPU).

    python bench/gpu_check.py            # on a CUDA/ROCm machine: DeiT-S paper preset
    python bench/gpu_check.py --cpu      # the same code paths on the tiny preset (CI), GPU-only parts skipped

Sections (each prints its numbers; a failing section prints FAIL and the script exits 1 at the end,
after the others have run, so one call yields everything that works):

1. throughput: the real training step (``mst_ds.train.train_step``: photometric stage on the device,
   engine forward/backward/step, EMA) in bf16 on synthetic uint8 views, at the largest per-GPU batch that
   fits (doubling until out of memory); images/s, FLOPs per image counted by torch's FlopCounterMode on
   one real step, model-FLOPs utilisation, peak memory against ``mst-ds plan``'s estimate;
2. engine overhead: the same model and views in a plain PyTorch loop (autocast bf16, AdamW, clipping,
   EMA) → DeepSpeed ÷ plain step time;
3. MST ÷ DINO: the DINO-only preset's step on the same views;
4. fp16 with dynamic loss scaling, ~30 steps (the V100 path): no non-finite loss, the loss scale
   settles, EMA teacher and DINO center finite [GPU only];
5. SyncBN and the all-reduce path with 2 processes (torchrun) when ≥ 2 GPUs are visible [GPU only];
6. loader: shards of synthetic JPEGs → decode/crop workers → photometric on the device: images/s per
   worker core, and the fraction of the training step spent waiting on data;
7. ``engine.compile`` (torch.compile of the student) on vs off [GPU only, when time is left].

Prints ``BENCH {...}`` lines (bench/_report.py) and a summary table. Timings are measurements, never
assertions; the checks in 4 and 5 are.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from _report import bench_line  # noqa: E402

# Dense bf16/fp16 tensor-core peak per device (TFLOP/s, vendor data sheets; SXM parts). --peak-tflops
# overrides; an unknown device reports achieved TFLOP/s and no MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "V100": 125.0, "A800": 312.0,
               "H800": 989.0, "L40S": 362.0, "MI300X": 1307.0, "MI250X": 383.0, "MI250": 362.0}
# Issue 13's estimate for the paper preset's multi-crop image (2×224 + 6×96, fwd + bwd + teacher). This
# script's count_flops on CPU (batch 2, torch 2.14): 107.96 GFLOP/image for MST, 104.29 for DINO-only.
ISSUE_GFLOP_PER_IMAGE = 113.0

ROWS: list[tuple[str, str, str]] = []  # (section, result, note) for the summary table
FAILED: list[str] = []


def row(section: str, result: str, note: str = "") -> None:
    ROWS.append((section, result, note))
    print(f"  {section}: {result}" + (f"  ({note})" if note else ""), flush=True)


def skip(section: str, why: str) -> None:
    ROWS.append((section, "skipped", why))
    print(f"SKIP {section}: {why}", flush=True)


# --------------------------------------------------------------------------------------------------
# Set-up shared by the sections
# --------------------------------------------------------------------------------------------------
class Ctx:
    """What the sections share: mode, preset, device, the batch found in section 1, the time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cpu = args.cpu
        self.preset = "tiny" if args.cpu else "mst_deit_s_100ep"
        self.dino_preset = "tiny" if args.cpu else "dino_deit_s_100ep"
        self.steps = args.steps or (4 if args.cpu else 20 if args.quick else 50)
        self.max_batch = args.max_batch or (16 if args.cpu else 1024)
        self.start_batch = 8 if args.cpu else 32
        self.peak_tflops = args.peak_tflops
        self.deadline = time.monotonic() + args.budget_min * 60
        self.batch = self.start_batch
        self.step_s: float | None = None  # section 1's seconds per step at self.batch
        self.gpus = 0 if args.cpu else torch.cuda.device_count()

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def sets(self, *extra: str, precision: str = "bf16") -> list[str]:
        # Schedules spread over many steps (the check runs mid-schedule values); loader settings only
        # matter in section 6.
        return [f"engine.precision={precision}", "run.schedule_steps=10000", "data.num_workers=0", *extra]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synthetic_batch(cfg, batch: int, seed: int) -> dict:
    """One micro-batch as the loader yields it: uint8 views (pinned on GPU machines), CPU side."""
    g = torch.Generator().manual_seed(seed)
    a = cfg.augment
    views = [torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g)
             for s in [a.global_crop_size] * 2 + [a.local_crop_size] * a.n_local_crops]
    if torch.cuda.is_available():
        views = [v.pin_memory() for v in views]
    return {"global": views[:2], "local": views[2:]}


def build(ctx: Ctx, preset: str, batch: int, *extra: str, world: int = 1, precision: str = "bf16"):
    """The training state of ``mst-ds train`` (engine, teacher, EMA, photometric) for ``batch`` per rank."""
    from mst_ds.config import derive, load_config
    from mst_ds.trainer import build_training

    cfg = load_config(preset, ctx.sets(f"optim.batch_size={batch * world}", *extra, precision=precision)).config
    t, _ = build_training(cfg, derive(cfg, world, 10**7))
    return t


def timed_steps(t, batches: list[dict], steps: int, warmup: int = 2) -> tuple[float, list[dict]]:
    """Median seconds per real training step (device-synchronised) and the steps' logged scalars."""
    from mst_ds.train import train_step

    times, stats = [], []
    for i in range(warmup + steps):
        sync(t.device)
        t0 = time.perf_counter()
        s = train_step(t, [batches[i % len(batches)]])
        sync(t.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            stats.append(s)
    return statistics.median(times), stats


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def peak_tflops(ctx: Ctx) -> float | None:
    if ctx.peak_tflops:
        return ctx.peak_tflops
    if ctx.cpu:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# --------------------------------------------------------------------------------------------------
# 1. Throughput, FLOPs, memory
# --------------------------------------------------------------------------------------------------
def largest_batch(ctx: Ctx) -> int:
    """Double the per-GPU batch (2 real steps each) until out of memory or max_batch → the last that fit."""
    t = build(ctx, ctx.preset, ctx.start_batch)
    fits, batch = 0, ctx.start_batch
    while batch <= ctx.max_batch:
        oom = False
        try:
            timed_steps(t, [synthetic_batch(t.cfg, batch, 0)], steps=1, warmup=1)
            fits = batch
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            oom = True
        if oom:
            break
        batch *= 2
    del t
    free_memory()
    if not fits:
        raise RuntimeError(f"batch {ctx.start_batch} does not fit on this device")
    return fits


def count_flops(t, batch: dict) -> float:
    """FLOPs of one real training step (forward + backward of student, teacher forward, decoder, losses;
    matmul/conv/attention ops as torch's FlopCounterMode counts them)."""
    from torch.utils import flop_counter as fc

    from mst_ds.train import train_step

    aten = torch.ops.aten

    # torch counts the GPU attention kernels (flash / memory-efficient / cuDNN) but not the CPU one:
    # count it the same way, so --cpu and GPU numbers mean the same.
    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward}
    with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        train_step(t, [batch])
    return float(counter.get_total_flops())


def section_throughput(ctx: Ctx) -> None:
    from mst_ds.config import derive, load_config
    from mst_ds.plan import activation_estimate, parameter_counts

    ctx.batch = largest_batch(ctx)
    note = "largest that fits, doubling" if not ctx.cpu else f"capped at {ctx.max_batch} on CPU"
    row("1 per-device batch (bf16)", str(ctx.batch), note)
    for attempt in range(3):  # the probe's largest batch may still run out over more steps: halve
        t = build(ctx, ctx.preset, ctx.batch)
        batches = [synthetic_batch(t.cfg, ctx.batch, s) for s in range(2)]
        if t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        oom = False
        try:
            ctx.step_s, stats = timed_steps(t, batches, ctx.steps)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err) or attempt == 2:
                raise
            oom = True
        if not oom:
            break
        t = batches = None  # release the failed attempt before the next one
        free_memory()
        ctx.batch //= 2
        row("1 per-device batch (bf16)", str(ctx.batch), "halved: out of memory over the timed steps")
    peak = torch.cuda.max_memory_allocated(t.device) if t.device.type == "cuda" else None
    ips = ctx.batch / ctx.step_s
    row("1 images/s (real step, bf16)", f"{ips:.1f}", f"{ctx.step_s * 1e3:.1f} ms/step, median of {ctx.steps}")
    assert all(math.isfinite(s["loss"]) for s in stats), "non-finite loss in the bf16 steps"

    flops = count_flops(t, batches[0])
    per_image = flops / ctx.batch / 1e9
    ref = f"issue's estimate ~{ISSUE_GFLOP_PER_IMAGE:.0f} for the paper preset" if not ctx.cpu else "tiny preset"
    row("1 GFLOP per image (counted, fwd+bwd+teacher)", f"{per_image:.2f}", ref)
    achieved = flops / ctx.step_s / 1e12
    peak_tf = peak_tflops(ctx)
    if peak_tf:
        mfu = achieved / peak_tf
        row("1 MFU", f"{mfu:.3f}", f"{achieved:.1f} TFLOP/s of {peak_tf:.0f} peak")
        bench_line(f"MFU, {ctx.preset} bf16 step, batch {ctx.batch}", mfu, ">=", 0.30)
    else:
        row("1 achieved TFLOP/s", f"{achieved:.3f}", "no peak known for this device: --peak-tflops for MFU")

    cfg = load_config(ctx.preset, ctx.sets(f"optim.batch_size={ctx.batch}")).config
    est = activation_estimate(cfg, derive(cfg, 1, 10**7), parameter_counts(cfg)).total
    if peak is not None:
        row("1 peak memory GiB (measured / plan estimate)", f"{peak / 2**30:.2f} / {est / 2**30:.2f}")
        bench_line(f"peak device memory / mst-ds plan estimate ({ctx.preset}, batch {ctx.batch})", peak / est, "<=", 1.25)
    else:
        row("1 plan memory estimate GiB", f"{est / 2**30:.3f}", "no device memory to compare on CPU")
    del t
    free_memory()


# --------------------------------------------------------------------------------------------------
# 2. Engine overhead: the same step in plain PyTorch
# --------------------------------------------------------------------------------------------------
def section_overhead(ctx: Ctx) -> None:
    """Photometric → model (teacher inside) under autocast bf16 → backward → clip → AdamW → EMA, in
    plain PyTorch, against section 1's DeepSpeed step (bf16 weights, fp32 masters)."""
    from mst_ds import engine as eng
    from mst_ds.config import load_config
    from mst_ds.data.augment import Photometric
    from mst_ds.ema import EMATeacher
    from mst_ds.model.mst import MSTModel
    from mst_ds.train import step_generator

    cfg = load_config(ctx.preset, ctx.sets(f"optim.batch_size={ctx.batch}")).config
    dev = eng.device()
    torch.manual_seed(cfg.run.seed)
    model = MSTModel.from_config(cfg).to(dev)
    teacher = model.make_teacher().to(dev)
    opt = torch.optim.AdamW(eng.param_groups(model), lr=1e-4, betas=tuple(cfg.optim.betas))
    ema = EMATeacher(teacher, model, zero_stage=0, low_precision=False)
    photometric = Photometric.from_config(cfg.augment)
    batches = [synthetic_batch(cfg, ctx.batch, s) for s in range(2)]

    def step(i: int) -> float:
        b = batches[i % len(batches)]
        u8 = [v.to(dev, non_blocking=True) for v in b["global"] + b["local"]]
        views = photometric(u8, step_generator(cfg.run.seed, i, 0, 0, 0))
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(views, teacher, cfg.loss.teacher_temp, step_generator(cfg.run.seed, i, 0, 0, 1))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(0.996)
        return float(out["loss"].detach())  # the engine's step reads its scalars back every step too

    times = []
    try:
        for i in range(2 + ctx.steps):
            sync(dev)
            t0 = time.perf_counter()
            step(i)
            sync(dev)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        # A result, not a failure: fp32 weights + autocast copies need more than DeepSpeed's bf16 engine.
        row("2 plain PyTorch step", "out of memory", f"at DeepSpeed's largest batch {ctx.batch}; no ratio")
        return
    plain = statistics.median(times)
    ratio = ctx.step_s / plain
    row("2 plain PyTorch step ms (autocast bf16, AdamW)", f"{plain * 1e3:.1f}", f"DeepSpeed {ctx.step_s * 1e3:.1f} ms")
    bench_line(f"DeepSpeed / plain PyTorch step ({ctx.preset}, batch {ctx.batch})", ratio, "<=", 1.10)


# --------------------------------------------------------------------------------------------------
# 3. MST ÷ DINO
# --------------------------------------------------------------------------------------------------
def section_dino(ctx: Ctx) -> None:
    extra = ["mask.enabled=false", "decoder.enabled=false", "loss.restore_weight=0"] if ctx.cpu else []
    t = build(ctx, ctx.dino_preset, ctx.batch, *extra)
    t.engine.module.attn_diagnostics = False  # the pure DINO reference, as bench/step_cost.py
    dino_s, _ = timed_steps(t, [synthetic_batch(t.cfg, ctx.batch, s) for s in range(2)], ctx.steps)
    row("3 DINO-only step ms", f"{dino_s * 1e3:.1f}", f"MST {ctx.step_s * 1e3:.1f} ms")
    bench_line(f"MST / DINO-only training step ({ctx.preset}, batch {ctx.batch})", ctx.step_s / dino_s, "<=", 1.15)
    del t
    free_memory()


# --------------------------------------------------------------------------------------------------
# 4. fp16 with dynamic loss scaling
# --------------------------------------------------------------------------------------------------
def section_fp16(ctx: Ctx, steps: int = 30) -> None:
    batch = min(ctx.batch, 64)
    t = build(ctx, ctx.preset, batch, precision="fp16")
    _, stats = timed_steps(t, [synthetic_batch(t.cfg, batch, s) for s in range(2)], steps, warmup=0)
    nonfinite = sum(not math.isfinite(s["loss"]) for s in stats)
    scales = [s["loss_scale"] for s in stats]
    changes = sum(a != b for a, b in zip(scales[-10:], scales[-9:]))
    teacher_ok = all(bool(torch.isfinite(p).all()) for p in t.teacher.parameters())
    center_ok = bool(torch.isfinite(t.engine.module.dino_loss.center).all())
    row("4 fp16: loss scale first → last", f"{scales[0]:g} → {scales[-1]:g}",
        f"{stats[-1]['skipped_steps']} overflow-skipped of {steps}, batch {batch}")
    row("4 fp16: losses / EMA teacher / center finite", f"{steps - nonfinite}/{steps} / {teacher_ok} / {center_ok}")
    bench_line("fp16: non-finite losses in 30 steps", nonfinite, "==", 0)
    bench_line("fp16: loss-scale changes in the last 10 steps", changes, "==", 0)
    assert teacher_ok and center_ok, "fp16: EMA teacher or DINO center not finite"
    del t
    free_memory()


# --------------------------------------------------------------------------------------------------
# 5. SyncBN + all-reduce, 2 processes
# --------------------------------------------------------------------------------------------------
def syncbn_worker(ctx: Ctx, batch: int, out: str) -> None:
    """Run by torchrun on 2 GPUs: SyncBN converted, a few real steps on different data per rank, then the
    replicas must agree and an all-reduce must add up."""
    import torch.distributed as dist

    from mst_ds import engine as eng

    rank, world = eng.init_distributed()
    t = build(ctx, ctx.preset, batch, world=world)
    n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in t.engine.module.modules())
    step_s, stats = timed_steps(t, [synthetic_batch(t.cfg, batch, 100 * rank + s) for s in range(2)], 5)
    x = torch.tensor([rank + 1.0], device=t.device)
    dist.all_reduce(x)

    def checksum(module) -> torch.Tensor:
        return torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)

    sums = torch.cat([checksum(t.engine.module), checksum(t.teacher)])
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    if rank == 0:
        Path(out).write_text(json.dumps({
            "world": world, "syncbn_layers": n_sync, "all_reduce": float(x), "step_s": step_s, "batch": batch,
            "replicas_equal": all(torch.equal(gathered[0], g) for g in gathered[1:]),
            "losses": [s["loss"] for s in stats]}))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section_syncbn(ctx: Ctx) -> None:
    batch = min(ctx.batch, 64)
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/syncbn.json"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
               __file__, "--syncbn-worker", out, "--worker-batch", str(batch)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60, min(240, ctx.left_s())))
        if res.returncode != 0:
            raise RuntimeError(f"2-GPU worker failed (exit {res.returncode}): {res.stderr[-1500:]}")
        r = json.loads(Path(out).read_text())
    row("5 SyncBN layers / all-reduce 1+2 / replicas equal", f"{r['syncbn_layers']} / {r['all_reduce']:g} / {r['replicas_equal']}",
        f"2 GPUs × batch {batch}: {2 * batch / r['step_s']:.1f} images/s")
    assert r["all_reduce"] == 3.0, f"all-reduce of 1 + 2 gave {r['all_reduce']}"
    assert r["syncbn_layers"] > 0, "no SyncBatchNorm layer after conversion (engine.sync_bn is on)"
    assert r["replicas_equal"], "the 2 ranks' student/teacher parameters differ after 5 steps"
    assert all(math.isfinite(v) for v in r["losses"]), "non-finite loss on 2 GPUs"
    if ctx.step_s:
        single = ctx.batch / ctx.step_s
        bench_line("2-GPU images/s / 2 × 1-GPU images/s (data-parallel scaling)", (2 * batch / r["step_s"]) / (2 * single),
                   ">=", 0.85)


# --------------------------------------------------------------------------------------------------
# 6. Loader: JPEG shards → workers → photometric on the device
# --------------------------------------------------------------------------------------------------
def make_jpegs(root: Path, n: int, size: tuple[int, int]) -> None:
    """Smooth random photographs-alike (low-frequency colour fields + noise), 2 classes, JPEG q90."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    unique: list[bytes] = []
    for i in range(n):
        if len(unique) < 256:  # the rest repeat these bytes (decoding costs the same; writing is faster)
            base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
            buf = io.BytesIO()
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            unique.append(buf.getvalue())
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:05d}.jpg").write_bytes(unique[i % len(unique)])


def section_loader(ctx: Ctx) -> None:
    from data_tools.writer import write_shards
    from mst_ds.config import load_config
    from mst_ds.data.reader import make_train_loader
    from mst_ds.train import train_step

    workers = 1 if ctx.cpu else max(1, min(8, (os.cpu_count() or 2) - 2))
    batch = min(ctx.batch, 8 if ctx.cpu else 128)
    per_epoch = 6  # batches per epoch and worker stream
    n = batch * per_epoch * workers
    size = (64, 48) if ctx.cpu else (500, 375)  # ImageNet's typical 500×375 on GPU machines
    sets = (f"optim.batch_size={batch}", f"data.num_workers={workers}", "data.shuffle_buffer=0")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        make_jpegs(tmp / "folder", n, size)
        write_shards(tmp / "folder", tmp / "shards", split="train", max_count=max(16, n // (2 * workers)), progress=False)
        cfg = load_config(ctx.preset, ctx.sets(*sets)).config
        cfg.data.num_workers = workers  # ctx.sets' default of 0 comes first; the section's count wins
        loader = make_train_loader(str(tmp / "shards"), cfg, rank=0, world_size=1, micro_batch=batch, epoch=0)
        seen, t_first = 0, None
        for b in loader:  # workers' start-up excluded: from the first batch on
            if t_first is None:
                t_first = time.perf_counter()
            else:
                seen += len(b["key"])
        loader_ips = seen / (time.perf_counter() - t_first)
        row("6 loader images/s (decode + crops, workers)", f"{loader_ips:.1f}",
            f"{workers} worker(s): {loader_ips / workers:.1f} per core; {n} JPEGs {size[0]}×{size[1]}")

        t = build(ctx, ctx.preset, batch, *sets[1:])
        t.cfg.data.num_workers = workers
        loader = make_train_loader(str(tmp / "shards"), t.cfg, rank=0, world_size=1, micro_batch=batch, epoch=1)
        wait = busy = 0.0
        it = iter(loader)
        for i in range(len(loader)):
            t0 = time.perf_counter()
            b = next(it)
            t1 = time.perf_counter()
            train_step(t, [b])
            sync(t.device)
            if i >= 2:  # start-up and the first steps' allocations excluded
                wait, busy = wait + t1 - t0, busy + time.perf_counter() - t1
        frac = wait / max(wait + busy, 1e-9)
        row("6 training on the loader: step time waiting on data", f"{frac:.1%}",
            f"batch {batch}, {workers} worker(s); the step alone ran {batch / max(busy / max(len(loader) - 2, 1), 1e-9):.0f} images/s")
        bench_line(f"fraction of the training step waiting on data ({workers} loader worker(s), batch {batch})", frac, "<=", 0.05)
        del t
        free_memory()


# --------------------------------------------------------------------------------------------------
# 7. engine.compile
# --------------------------------------------------------------------------------------------------
def section_compile(ctx: Ctx) -> None:
    t = build(ctx, ctx.preset, ctx.batch, "engine.compile=true")
    batches = [synthetic_batch(t.cfg, ctx.batch, s) for s in range(2)]
    t0 = time.perf_counter()
    timed_steps(t, batches, steps=1, warmup=2)  # compilation happens here
    first = time.perf_counter() - t0
    step_s, _ = timed_steps(t, batches, max(10, ctx.steps // 2), warmup=0)
    speedup = ctx.step_s / step_s
    row("7 engine.compile step ms (off → on)", f"{ctx.step_s * 1e3:.1f} → {step_s * 1e3:.1f}", f"compile + 3 steps took {first:.0f} s")
    bench_line(f"engine.compile speed-up ({ctx.preset}, batch {ctx.batch})", speedup, ">=", 1.05)
    del t
    free_memory()


# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny preset on CPU (CI); GPU-only sections print a skip line")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 50; 4 with --cpu)")
    ap.add_argument("--quick", action="store_true", help="20 timed steps instead of 50 (bench/run_all --quick)")
    ap.add_argument("--max-batch", type=int, default=None, help="largest per-device batch tried (default 1024; 16 with --cpu)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    ap.add_argument("--budget-min", type=float, default=8.0, help="sections that would start after this many minutes are skipped")
    ap.add_argument("--syncbn-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("gpu_check: error: no GPU visible to torch (use --cpu to run the CPU code paths)", file=sys.stderr)
        return 2
    ctx = Ctx(args)
    if args.syncbn_worker:
        syncbn_worker(ctx, args.worker_batch, args.syncbn_worker)
        return 0

    import deepspeed

    from mst_ds import engine as eng

    eng.init_distributed()  # a world of one
    dev = "CPU" if args.cpu else f"{ctx.gpus} × {torch.cuda.get_device_name()}"
    backend = "ROCm " + torch.version.hip if torch.version.hip else ("CUDA " + str(torch.version.cuda) if not args.cpu else "cpu")
    print(f"gpu_check: torch {torch.__version__}, deepspeed {deepspeed.__version__}, {backend}, {dev}; preset "
          f"{ctx.preset}, budget {args.budget_min:g} min", flush=True)

    sections = [
        ("1 throughput", section_throughput, None, 0),
        ("2 engine overhead", section_overhead, None, 30),
        ("3 MST / DINO", section_dino, None, 30),
        ("4 fp16 loss scaling", section_fp16, "fp16 is not supported on CPU", 45),
        ("5 SyncBN, 2 processes", section_syncbn,
         "needs 2 GPUs (SyncBN refuses CPU tensors)" if args.cpu else
         (f"{ctx.gpus} GPU visible, needs 2" if ctx.gpus < 2 else None), 90),
        ("6 loader", section_loader, None, 60),
        ("7 engine.compile", section_compile, "measured on GPUs only (compile time on CPU exceeds the CI budget)", 150),
    ]
    ctx.deadline = time.monotonic() + args.budget_min * 60  # from here: imports and JIT builds not counted
    for name, fn, gpu_only_reason, needs_s in sections:
        if args.cpu and gpu_only_reason and name[0] in "457":
            skip(name, gpu_only_reason)
            continue
        if gpu_only_reason and name[0] == "5":
            skip(name, gpu_only_reason)
            continue
        if name[0] != "1" and ctx.step_s is None:
            skip(name, "section 1 did not run")
            continue
        if ctx.left_s() < needs_s:
            skip(name, f"time budget ({args.budget_min:g} min) spent")
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            fn(ctx)
        except Exception as err:  # one section's failure must not lose the others' numbers
            FAILED.append(name)
            ROWS.append((name, "FAIL", f"{type(err).__name__}: {str(err)[:200]}"))
            print(f"FAIL {name}: {type(err).__name__}: {err}", flush=True)
            traceback.print_exc()
        free_memory()  # the section's models are gone with its frame
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gpu_check on {dev} ({ctx.preset})")
    for col in ("check", "result", "note"):
        table.add_column(col, overflow="fold")
    for r in ROWS:
        table.add_row(*r)
    Console(width=140).print(table)
    if FAILED:
        print(f"gpu_check: error: {len(FAILED)} section(s) failed: {', '.join(FAILED)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
