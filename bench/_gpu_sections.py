"""The GPU check's sections. Each runs in its own process (bench/_gpu_runner.py), reads its mode from
``Ctx`` and appends its rows to the results file as it measures them (``Ctx.row``). With ``--cpu`` every
section runs its CPU path (tiny preset, few steps): the device is the CPU and "device vs CPU" compares two
CPU runs (which must then agree bit for bit); a check that only a GPU can answer writes a skipped row
with the reason.

Tolerances (device vs CPU, fp32): photometric views ≤ 1e-4 absolute (on [0, 1]-scaled floats),
attention-guided masks identical given the same attention, forward losses ≤ 1e-4 relative, EMA teacher
and DINO center ≤ 1e-5 absolute, 5 fp32 training steps' losses ≤ 1e-3 relative. On CPU vs CPU: 0.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from _gpu_runner import append_row

ROOT = Path(__file__).resolve().parent.parent
# The device's dense 16-bit peak: mst_ds.cost's cited table (the one `mst-ds plan` prices with);
# --peak-tflops overrides; an unknown device reports achieved TFLOP/s and no MFU.
# The launcher's rank environment, never inherited by a section's own start.
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Ctx:
    """A section's mode, where its rows go, and the folder sections share (shards, the run)."""

    cpu: bool
    quick: bool
    work: Path
    out: Path
    run: str
    section: str
    peak_tflops: float | None = None

    @property
    def preset(self) -> str:
        return "tiny" if self.cpu else "mst_deit_s_100ep"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.cpu else "cuda")

    def row(self, check: str, status: str, value=None, note: str = "") -> None:
        """Append one result row (status: pass / fail / info / skipped) and echo it to the log."""
        append_row(self.out, {"run": self.run, "section": self.section, "check": check, "status": status,
                              "value": value, "note": note})
        print(f"  {check}: {status} {value if value is not None else ''} {note}", flush=True)

    def expect(self, check: str, ok: bool, value=None, note: str = "") -> bool:
        self.row(check, "pass" if ok else "fail", value, note)
        return ok

    def gpu_only(self, check: str, why: str = "GPU only") -> bool:
        """True on a GPU; on --cpu writes the skipped row."""
        if self.cpu:
            self.row(check, "skipped", note=why)
        return not self.cpu


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def uint8_views(cfg, batch: int, seed: int, pin: bool = False) -> dict:
    """One micro-batch as the loader yields it: dict(global=2 × uint8 (B,3,G,G), local=n × uint8 (B,3,L,L))."""
    g = torch.Generator().manual_seed(seed)
    a = cfg.augment
    views = [torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g)
             for s in [a.global_crop_size] * 2 + [a.local_crop_size] * a.n_local_crops]
    if pin:
        views = [v.pin_memory() for v in views]
    return {"global": views[:2], "local": views[2:]}


def config(ctx: Ctx, *sets: str, preset: str | None = None):
    from mst_ds.config import load_config

    base = ["run.schedule_steps=10000", "data.num_workers=0", "run.loggers=[]"]
    return load_config(preset or ctx.preset, [*base, *sets]).config


def build(cfg, world: int = 1):
    """The training state of ``mst-ds train`` for this config (torch.distributed started here)."""
    from mst_ds import engine as eng
    from mst_ds.config import derive
    from mst_ds.trainer import build_training

    eng.init_distributed()
    t, _ = build_training(cfg, derive(cfg, world, 10**7))
    return t


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def max_abs(xs, ys) -> float:
    return max((float((x.detach().float().cpu() - y.detach().float().cpu()).abs().max()) for x, y in zip(xs, ys)),
               default=0.0)


# --------------------------------------------------------------------------------------------------
# env: what runs here
# --------------------------------------------------------------------------------------------------
def section_env(ctx: Ctx) -> None:
    import deepspeed

    import mst_ds.cli  # noqa: F401  (every import the commands need resolves)
    import mst_ds.eval.knn  # noqa: F401
    import mst_ds.train  # noqa: F401

    dev = "CPU" if ctx.cpu else f"{torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
    backend = ("ROCm " + torch.version.hip) if torch.version.hip else ("CUDA " + str(torch.version.cuda))
    ctx.row("python / torch / deepspeed", "info", f"{sys.version.split()[0]} / {torch.__version__} / {deepspeed.__version__}")
    ctx.row("device", "info", dev, "" if ctx.cpu else backend)
    ctx.expect("GPUs visible", ctx.cpu or torch.cuda.is_available(), torch.cuda.device_count())


# --------------------------------------------------------------------------------------------------
# parity: the device against the CPU on identical inputs and generators (fp32)
# --------------------------------------------------------------------------------------------------
def _steps_record(ctx: Ctx, n: int) -> dict:
    """``n`` fp32 training steps of the tiny preset on this process's device → losses and a checksum."""
    from mst_ds.train import train_step

    t = build(config(ctx, "engine.precision=fp32", "optim.batch_size=4", preset="tiny"))
    losses = [train_step(t, [uint8_views(t.cfg, 4, s)])["loss"] for s in range(n)]
    checksum = float(sum(p.detach().double().sum() for p in t.teacher.parameters()))
    return {"losses": losses, "teacher_sum": checksum}


def section_parity(ctx: Ctx) -> None:
    from mst_ds.config import load_config
    from mst_ds.data.augment import Photometric
    from mst_ds.ema import EMATeacher
    from mst_ds.masking import Masker
    from mst_ds.model.mst import MSTModel
    from mst_ds.train import step_generator

    dev = ctx.device
    tol = 0.0 if ctx.cpu else None  # CPU vs CPU must agree bit for bit
    cfg = load_config("tiny", ["engine.precision=fp32"]).config
    views = uint8_views(cfg, 4, 0)
    u8 = views["global"] + views["local"]

    # 1. photometric views from the same generator
    phot = Photometric.from_config(cfg.augment)
    on_dev = phot([v.to(dev) for v in u8], step_generator(0, 0, 0, 0, 0))
    on_cpu = phot(list(u8), step_generator(0, 0, 0, 0, 0))
    d = max_abs(on_dev, on_cpu)
    ctx.expect("photometric views max |Δ|", d <= (tol if tol is not None else 1e-4), d, "≤ 1e-4 (0 on CPU)")

    # 2. masks given the same attention
    masker = Masker(cfg.mask)
    n = 49  # patches of a 7 × 7 grid; attention (B, heads, N) as the teacher's last block gives it
    attn = torch.rand(8, 3, n, generator=torch.Generator().manual_seed(1)).softmax(-1)
    m_dev = masker(attn.to(dev), 8, n, torch.Generator().manual_seed(2))
    m_cpu = masker(attn, 8, n, torch.Generator().manual_seed(2))
    same = torch.equal(m_dev.mask.cpu(), m_cpu.mask) and torch.equal(m_dev.token.cpu(), m_cpu.token)
    ctx.expect("attention-guided masks equal", same, same)

    # 3. fp32 forward and both losses; 4. EMA and center update
    torch.manual_seed(0)
    model_cpu = MSTModel.from_config(cfg)
    teacher_cpu = model_cpu.make_teacher()
    model_dev = MSTModel.from_config(cfg)
    model_dev.load_state_dict(model_cpu.state_dict())
    model_dev.to(dev)
    teacher_dev = model_dev.make_teacher()
    teacher_dev.load_state_dict(teacher_cpu.state_dict())
    out_cpu = model_cpu(on_cpu, teacher_cpu, 0.04, step_generator(0, 0, 0, 0, 1))
    out_dev = model_dev([v.to(dev) for v in on_cpu], teacher_dev, 0.04, step_generator(0, 0, 0, 0, 1))
    for key in ("loss", "dino", "restore"):
        r = rel(float(out_dev[key]), float(out_cpu[key]))
        ctx.expect(f"forward {key} rel. Δ", r <= (tol if tol is not None else 1e-4), r,
                   f"{float(out_dev[key]):.6g} vs CPU {float(out_cpu[key]):.6g}; ≤ 1e-4")
    for model in (model_cpu, model_dev):
        with torch.no_grad():  # one student change, the same on both
            for p in model.parameters():
                p.add_(0.01)
        model.dino_loss.update_center()
    EMATeacher(teacher_cpu, model_cpu, zero_stage=0, low_precision=False).update(0.99)
    EMATeacher(teacher_dev, model_dev, zero_stage=0, low_precision=False).update(0.99)
    d = max_abs(teacher_dev.parameters(), teacher_cpu.parameters())
    ctx.expect("EMA teacher max |Δ|", d <= (tol if tol is not None else 1e-5), d, "≤ 1e-5")
    d = max_abs([model_dev.dino_loss.center], [model_cpu.dino_loss.center])
    ctx.expect("DINO center max |Δ|", d <= (tol if tol is not None else 1e-5), d, "≤ 1e-5")

    # 5. 5 fp32 training steps: this device here, the CPU in a child process (its own accelerator)
    steps = 3 if ctx.quick else 5
    ref = ctx.work / "parity_cpu_steps.json"
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    # --cpu: the same thread count as this process on --cpu (a reduction's order follows the threads)
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--cpu-steps", str(ref), "--steps", str(steps)],
                   env=env, check=True, timeout=600)
    import json

    cpu_rec = json.loads(ref.read_text())
    here = _steps_record(ctx, steps)
    worst = max(rel(a, b) for a, b in zip(here["losses"], cpu_rec["losses"]))
    ctx.expect(f"{steps} fp32 train_steps: losses max rel. Δ", worst <= (tol if tol is not None else 1e-3), worst,
               f"≤ 1e-3 (0 on CPU); last {here['losses'][-1]:.6g} vs CPU {cpu_rec['losses'][-1]:.6g}")
    r = rel(here["teacher_sum"], cpu_rec["teacher_sum"])
    ctx.expect(f"{steps} fp32 train_steps: teacher checksum rel. Δ", r <= (tol if tol is not None else 1e-4), r)


# --------------------------------------------------------------------------------------------------
# zero: ZeRO stages × precisions — loss scale, EMA of the fp32 masters, per-parameter clipping
# --------------------------------------------------------------------------------------------------
def _fp32_masters(t) -> list[torch.Tensor]:
    """The student's fp32 values as the optimizer holds them (fp32 module parameters where no master)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for _, _, s in t.ema.pairs:
        full = safe_get_full_fp32_param(s) if s.requires_grad else None
        out.append((full if full is not None else s.detach()).float().cpu().reshape(-1))
    return out


def _one_combo(ctx: Ctx, stage: int, precision: str, clip: str) -> None:
    from mst_ds import engine as eng
    from mst_ds.train import step_generator, train_step

    name = f"ZeRO-{stage} {precision}"
    cfg = config(ctx, f"engine.zero_stage={stage}", f"engine.precision={precision}", "optim.batch_size=4",
                 f"optim.clip_mode={clip}", "optim.clip_grad=0.001", preset="tiny")
    t = build(cfg)
    batch = uint8_views(cfg, 4, stage)
    # The step by hand up to the clip (as train_step does it), to read the clipped gradients.
    s = t.schedules.at(0)
    eng.apply_schedule(t.engine.optimizer, t.gate, s)
    u8 = [v.to(t.device) for v in batch["global"] + batch["local"]]
    losses = t.engine(t.photometric(u8, step_generator(0, 0, 0, 0, 0)), t.teacher, s.teacher_temp,
                      step_generator(0, 0, 0, 0, 1))
    t.engine.backward(losses["loss"])
    scale = eng.loss_scale(t.engine)
    if clip == "per_param":
        from deepspeed.utils import safe_get_full_grad

        clipped = eng.clip_per_param(t.engine, cfg.optim.clip_grad)
        norms = [float(g.norm()) / scale for p in t.engine.module.parameters() if p.requires_grad
                 and (g := safe_get_full_grad(p)) is not None]
        worst = max(norms) / cfg.optim.clip_grad
        tol = 1e-3 if precision == "fp32" else 1e-2  # the clipped gradient is stored back in the engine's dtype
        ctx.expect(f"{name}: per-param clip max ‖g‖/c", worst <= 1.0 + tol, worst,
                   f"{clipped} of {len(norms)} clipped; ≤ 1 + {tol:g}")
    t.engine.step()
    t.engine.module.dino_loss.update_center()
    t.ema.update(s.momentum)
    t.step = 1
    # The next step through train_step: EMA against an EMA of the fp32 masters.
    before = [p.detach().float().cpu().reshape(-1).clone() for _, p, _ in t.ema.pairs]
    stats = train_step(t, [uint8_views(cfg, 4, stage + 10)])
    masters = _fp32_masters(t)
    m = stats["momentum"]
    expect = [b * m + (1 - m) * s for b, s in zip(before, masters)]
    d = max_abs([p.reshape(-1) for _, p, _ in t.ema.pairs], expect)
    ctx.expect(f"{name}: EMA vs EMA of fp32 masters", d <= 1e-6, d, "max |Δ| ≤ 1e-6")
    ok = math.isfinite(float(losses["loss"])) and math.isfinite(stats["loss"])
    ctx.expect(f"{name}: loss finite / loss scale", ok, [stats["loss"], stats["loss_scale"]],
               "scale as DeepSpeed reports it (1 unless fp16)")
    if precision == "fp16":
        ctx.expect(f"{name}: loss scale > 1", stats["loss_scale"] > 1, stats["loss_scale"])


def section_zero(ctx: Ctx) -> None:
    combos = [(s, p) for s in (0, 1, 2, 3) for p in ("fp32", "bf16")]
    if ctx.quick:
        combos = [(0, "fp32"), (2, "bf16"), (3, "bf16")]
    combos += [(0, "fp16"), (2, "fp16")]
    for stage, precision in combos:
        name = f"ZeRO-{stage} {precision}"
        if precision == "fp16" and not ctx.gpu_only(name, "fp16 is not supported on CPU"):
            continue
        try:
            _one_combo(ctx, stage, precision, "global" if stage == 3 else "per_param")
        except Exception as err:  # one combination's failure is a row; the others still run
            ctx.row(name, "fail", note=f"{type(err).__name__}: {str(err)[:300]}")
    for precision in ("auto", "autocast_bf16"):
        from mst_ds.train import train_step

        try:
            t = build(config(ctx, f"engine.precision={precision}", "optim.batch_size=4", preset="tiny"))
            loss = train_step(t, [uint8_views(t.cfg, 4, 0)])["loss"]
            ctx.expect(f"precision {precision}: one step", math.isfinite(loss), loss, f"resolved to {t.precision}")
        except Exception as err:
            ctx.row(f"precision {precision}: one step", "fail", note=f"{type(err).__name__}: {str(err)[:300]}")


# --------------------------------------------------------------------------------------------------
# resume: `mst-ds train` through the launcher — steps, save, SIGKILL, resume, compare
# --------------------------------------------------------------------------------------------------
def make_jpegs(root: Path, n: int, size: tuple[int, int]) -> None:
    """Smooth random photograph-alikes (low-frequency colour fields + noise), 2 classes, JPEG q90."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:05d}.jpg").write_bytes(buf.getvalue())


def shards(ctx: Ctx) -> Path:
    """Synthetic JPEG shards in the shared work folder (made once per check)."""
    from data_tools.writer import write_shards

    out = ctx.work / "shards"
    if not (out / "manifest.json").exists():
        make_jpegs(ctx.work / "folder", 96, (64, 48))
        write_shards(ctx.work / "folder", out, split="train", max_count=16, progress=False)
    return out


def resume_sets(steps: int, data: Path, deterministic: bool) -> list[str]:
    """The `--set`s of the resume section's run (``deterministic``: with ``run.deterministic=true``)."""
    return ["optim.batch_size=8", "run.log_every=1", "checkpoint.every_steps=2", "run.schedule_steps=40",
            f"run.max_steps={steps}", f"data.train={data}", "data.num_workers=0", "run.loggers=[]",
            "engine.precision=fp32", *(["run.deterministic=true"] * deterministic)]


def resume_passes(ctx: Ctx) -> list[bool]:
    """Which kill/resume passes run (``run.deterministic`` off / on): on a GPU both, the flag's pass must
    repeat bit for bit; on CPU, bit-identical either way, the flag's pass only without --quick."""
    return [False] if ctx.cpu and ctx.quick else [False, True]


def _launch(ctx: Ctx, run_dir: Path, steps: int, fault: str = "", deterministic: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    # launch.sh and the DeepSpeed launcher run `python` / `deepspeed` from PATH: this interpreter's.
    env.update(PYTHONPATH=str(ROOT), VIRTUAL_ENV=sys.prefix, PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    if fault:
        env["MST_DS_FAULT"] = fault
    where = ["--cpu", "1"] if ctx.cpu else ["--gpus-per-node", "1"]
    cmd = [str(ROOT / "launch.sh"), *where, "--preset", "tiny", "--run-dir", str(run_dir)]
    for s in resume_sets(steps, shards(ctx), deterministic):
        cmd += ["--set", s]
    # In the section's process group: a timeout's killpg reaches launch.sh, the launcher and the ranks.
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def section_resume(ctx: Ctx) -> None:
    """Two launches of one run: the first trains steps 1-N and is SIGKILLed half-way through step N's save
    (after step N's metrics are written); the second resumes from step N − 2's checkpoint. The first
    launch's steps N − 1 and N are an uninterrupted run's, the resumed ones must equal them: bit for bit
    on CPU and with ``run.deterministic`` (a second pair of launches, resume_passes), else by tolerance."""
    steps = 4 if ctx.cpu else 6  # each CPU launch pays ~10 s of imports in 3 processes
    for deterministic in resume_passes(ctx):
        if not _kill_and_resume(ctx, ctx.work / ("run_deterministic" if deterministic else "run"), steps, deterministic):
            return
    ctx.gpu_only("CUDA RNG state restored", "no CUDA RNG on CPU")


def _kill_and_resume(ctx: Ctx, run: Path, steps: int, deterministic: bool) -> bool:
    """One kill/resume pass → whether both launches did what they must (the comparison is its own row)."""
    flag = " (run.deterministic)" if deterministic else ""
    res = _launch(ctx, run, steps, fault=f"kill_in_save@{steps}", deterministic=deterministic)
    before = _losses(run) if (run / "metrics.jsonl").exists() else []
    ok = res.returncode != 0 and len(before) == steps
    if not ctx.expect(f"SIGKILL in the step-{steps} save after {steps} steps{flag}: non-zero exit", ok, res.returncode,
                      f"{len(before)} steps logged" + ("" if ok else "; " + (res.stdout + res.stderr)[-300:])):
        return False
    res = _launch(ctx, run, steps, deterministic=deterministic)
    if not ctx.expect(f"resume after SIGKILL{flag}: exit 0", res.returncode == 0, res.returncode,
                      "" if res.returncode == 0 else (res.stdout + res.stderr)[-300:]):
        return False
    after = _losses(run)
    # Steps N−1..N: recomputed from the step N−2 checkpoint (the resume truncates the log past it).
    tail_a, tail_b = before[-2:], after[-2:]
    bits = len(after) == steps and tail_a == tail_b
    worst = max((rel(x, y) for x, y in zip(tail_b, tail_a)), default=float("nan"))
    name = f"resumed steps {steps - 1}-{steps} == uninterrupted{flag} (bits)"
    if ctx.cpu or deterministic:
        ctx.expect(name, bits, worst, "max rel. Δ")
    else:  # without run.deterministic a GPU run may pick other kernels: bits are reported, the tolerance decides
        ctx.row(name, "info", bits)
        ctx.expect(f"resumed steps {steps - 1}-{steps} max rel. Δ", worst <= 1e-3, worst, "≤ 1e-3")
    return True


def section_knn(ctx: Ctx) -> None:
    """The run's checkpoint (written on the device) read by `mst-ds knn` on the CPU."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    folder = ctx.work / "folder"
    cmd = [sys.executable, "-m", "mst_ds.cli", "knn", "--ckpt", str(ctx.work / "run"), "--train", str(folder),
           "--val", str(folder), "--out", str(ctx.work / "knn"), "--k", "5", "--num-workers", "0"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    said = (res.stdout if res.returncode == 0 else res.stderr).strip().splitlines()  # the result, or why not
    ctx.expect("mst-ds knn on CPU reads the checkpoint", res.returncode == 0, res.returncode, said[-1][-300:] if said else "")


# --------------------------------------------------------------------------------------------------
# monitor: the online k-NN monitor (mst_ds.eval.monitor) on a few hundred images
# --------------------------------------------------------------------------------------------------
def section_monitor(ctx: Ctx) -> None:
    """The teacher's k-NN on a small labelled ImageFolder, on the device and on the CPU: top-1 equal
    (bits on CPU; within one query on a GPU), the RNG states untouched, the kept decoded images giving the
    same result at the next evaluation, and the evaluation's images per second."""
    import copy

    from mst_ds.eval.monitor import OnlineKNN
    from mst_ds.model.mst import MSTModel

    n = 200 if ctx.quick else 400
    folder = ctx.work / "monitor_folder"
    if not folder.exists():
        make_jpegs(folder, n, (64, 48))
    cfg = config(ctx, f"eval.monitor.bank={folder}", "eval.monitor.num_workers=0", "eval.monitor.k=10", preset="tiny")
    torch.manual_seed(0)
    teacher = MSTModel.from_config(cfg).make_teacher().backbone
    on_cpu = copy.deepcopy(teacher)
    teacher.to(ctx.device)
    mon = OnlineKNN(cfg, rank=0, world=1, device=ctx.device)
    states = [torch.get_rng_state()] + ([] if ctx.cpu else [torch.cuda.get_rng_state()])
    sync(ctx.device)
    t0 = time.perf_counter()
    first = mon.evaluate(teacher)
    sync(ctx.device)
    seconds = time.perf_counter() - t0
    after = [torch.get_rng_state()] + ([] if ctx.cpu else [torch.cuda.get_rng_state()])
    ctx.row(f"k-NN top-1 on {n} images (device)", "info", round(first["monitor_knn_top1"], 2),
            f"{seconds:.2f} s for the first evaluation (decode included), {n / seconds:.0f} images/s")
    ctx.expect("RNG states untouched by an evaluation", all(torch.equal(a, b) for a, b in zip(states, after)))
    again = mon.evaluate(teacher)
    ctx.expect("next evaluation (decoded images kept) equal", again == first, round(mon.seconds - seconds, 2),
               "seconds of the second evaluation")
    ref = OnlineKNN(cfg, rank=0, world=1, device=torch.device("cpu")).evaluate(on_cpu)
    d = abs(first["monitor_knn_top1"] - ref["monitor_knn_top1"])
    one_query = 100 / (n * cfg.eval.monitor.query_fraction) * 1.5  # ~a query's share (the cut is by key hash)
    ctx.expect("top-1 device vs CPU |Δ| (points)", d == 0 if ctx.cpu else d <= one_query, d,
               "0 on CPU" if ctx.cpu else f"≤ {one_query:.2f} (about one query)")


# --------------------------------------------------------------------------------------------------
# kernels: SyncBN at world 1 vs BN, which SDPA backend, host syncs per step
# --------------------------------------------------------------------------------------------------
def section_kernels(ctx: Ctx) -> None:
    import torch.distributed as dist

    from mst_ds import engine as eng

    eng.init_distributed()
    dev = ctx.device
    for dtype in (torch.float32, torch.bfloat16):
        name = f"SyncBN vs BN {str(dtype).split('.')[-1]} max |Δ|"
        if not ctx.gpu_only(name, "SyncBatchNorm refuses CPU tensors"):
            continue
        # The kernels themselves (batch_norm_stats, gather, elemt) with the world-1 group, as every rank
        # runs them at scale; the module alone would fall back to batch_norm at world 1.
        from torch.nn.modules._functions import SyncBatchNorm as SyncBNFn

        x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
        ref = torch.nn.BatchNorm1d(256).to(dev, dtype).train()(x)
        w, b = torch.ones(256, device=dev, dtype=dtype), torch.zeros(256, device=dev, dtype=dtype)
        rm, rv = torch.zeros(256, device=dev, dtype=dtype), torch.ones(256, device=dev, dtype=dtype)
        got = SyncBNFn.apply(x, w, b, rm, rv, 1e-5, 0.1, dist.group.WORLD, 1)
        d = max_abs([got], [ref])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        ctx.expect(name, d <= tol, d, f"{dist.get_backend()} world 1; ≤ {tol:g}")

    from mst_ds.train import train_step

    # Fused attention (the `tiny` preset runs it unfused on CPU), so that SDPA picks a backend to name.
    cfg = config(ctx, "optim.batch_size=8", "model.fused_attn=true", "engine.precision=" + ("fp32" if ctx.cpu else "bf16"))
    t = build(cfg)
    batch = uint8_views(cfg, 8, 0, pin=not ctx.cpu)
    train_step(t, [batch])  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(t, [batch])
    names = sorted({e.name for e in prof.events() if "attention" in e.name.lower() or "sdpa" in e.name.lower()
                    or "flash" in e.name.lower()})
    forward = [n for n in names if "backward" not in n and n.startswith("aten::_")]
    ctx.expect("SDPA backend (aten op that ran)", bool(forward), ", ".join(forward) or "none found")
    if ctx.gpu_only("host syncs per training step", "CUDA sync debug mode is GPU only"):
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_step(t, [batch])
        torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        ctx.row("host syncs per training step", "info", len(syncs), ", ".join(where)[:300])


# --------------------------------------------------------------------------------------------------
# throughput: the engine's step against a plain PyTorch loop with the same teacher precision
# --------------------------------------------------------------------------------------------------
class _TeacherIn(torch.nn.Module):
    """The teacher run in ``dtype`` whatever autocast the student runs under (fp32: autocast off)."""

    def __init__(self, teacher: torch.nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.inner, self.dtype = teacher, dtype

    def forward(self, views, **kw):
        dev = views[0].device.type
        if self.dtype is None:
            with torch.autocast(dev, enabled=False):
                return self.inner([v.float() for v in views], **kw)
        with torch.autocast(dev, dtype=self.dtype):
            return self.inner(views, **kw)


def _timed(step, n: int, dev: torch.device, warmup: int = 2) -> float:
    """Median seconds of ``step(i)`` (device-synchronised)."""
    times = []
    for i in range(warmup + n):
        sync(dev)
        t0 = time.perf_counter()
        step(i)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _plain_step_s(ctx: Ctx, cfg, batches: list[dict], teacher_dtype: torch.dtype | None, n: int) -> float:
    """Photometric → model (student under autocast bf16, teacher in ``teacher_dtype``) → backward →
    clip → AdamW → EMA, in plain PyTorch."""
    from mst_ds import engine as eng
    from mst_ds.data.augment import Photometric
    from mst_ds.ema import EMATeacher
    from mst_ds.model.mst import MSTModel
    from mst_ds.train import step_generator

    dev = ctx.device
    torch.manual_seed(cfg.run.seed)
    model = MSTModel.from_config(cfg).to(dev)
    teacher = model.make_teacher().to(dev)
    opt = torch.optim.AdamW(eng.param_groups(model), lr=1e-4, betas=tuple(cfg.optim.betas))
    ema = EMATeacher(teacher, model, zero_stage=0, low_precision=False)
    phot = Photometric.from_config(cfg.augment)
    wrapped = _TeacherIn(teacher, teacher_dtype)

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        u8 = [v.to(dev, non_blocking=True) for v in b["global"] + b["local"]]
        views = phot(u8, step_generator(cfg.run.seed, i, 0, 0, 0))
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(views, wrapped, cfg.loss.teacher_temp, step_generator(cfg.run.seed, i, 0, 0, 1))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.dino_loss.update_center()
        ema.update(0.996)
        float(out["loss"].detach())  # the engine's step reads its scalars back every step too

    return _timed(step, n, dev)


def section_throughput(ctx: Ctx) -> None:
    from mst_ds.config import derive
    from mst_ds.cost import flops_per_image, peak_of_device_name
    from mst_ds.plan import activation_estimate, parameter_counts
    from mst_ds.train import train_step

    batch = 8 if ctx.cpu else (64 if ctx.quick else 128)
    n = 3 if ctx.cpu else (10 if ctx.quick else 30)
    cfg = config(ctx, f"optim.batch_size={batch}", "engine.precision=bf16")
    t = build(cfg)
    batches = [uint8_views(cfg, batch, s, pin=not ctx.cpu) for s in range(2)]
    if not ctx.cpu:
        torch.cuda.reset_peak_memory_stats()
    engine_s = _timed(lambda i: train_step(t, [batches[i % 2]]), n, ctx.device)
    ips = batch / engine_s
    ctx.expect("MST img/s (engine, bf16)", math.isfinite(ips) and ips > 0, round(ips, 1),
               f"batch {batch}, {engine_s * 1e3:.0f} ms/step, median of {n}")
    est = activation_estimate(cfg, derive(cfg, 1, 10**7), parameter_counts(cfg)).total
    if ctx.gpu_only("peak memory / plan estimate", "no device memory counter on CPU"):
        peak = torch.cuda.max_memory_allocated()
        ctx.row("peak memory / plan estimate", "info", round(peak / est, 3), f"{peak / 2**30:.2f} / {est / 2**30:.2f} GiB")
    name = torch.cuda.get_device_name() if not ctx.cpu else ""
    peak_tf = ctx.peak_tflops or peak_of_device_name(name)
    counted = _count_flops(t, batches[0])
    ctx.row("GFLOP per image (counted)", "info", round(counted / batch / 1e9, 3), "fwd + bwd + teacher, FlopCounterMode")
    # MFU over the model FLOPs `mst-ds plan` prices with (no recomputation counted), so plan's GPU-hours
    # and this MFU describe one quantity.
    flops = flops_per_image(cfg) * batch
    ctx.row("GFLOP per image (plan's count)", "info", round(flops / batch / 1e9, 3), "mst_ds.cost.flops_per_image")
    achieved = flops / engine_s / 1e12
    ctx.row("MFU" if peak_tf else "achieved TFLOP/s", "info", round(achieved / peak_tf, 4) if peak_tf else round(achieved, 4),
            f"{achieved:.2f} TFLOP/s of {peak_tf:g}" if peak_tf else "no peak known for this device (--peak-tflops)")
    t = None  # freed before the plain loops
    # The engine runs its teacher under bf16 autocast (fp32 weights, Teacher.compute_dtype), as DINO.
    same = _plain_step_s(ctx, cfg, batches, torch.bfloat16, n)
    ctx.row("DeepSpeed ÷ plain PyTorch (teacher bf16 both)", "info", round(engine_s / same, 3),
            f"plain {same * 1e3:.0f} ms: student and teacher autocast bf16")
    fp32 = _plain_step_s(ctx, cfg, batches, None, n)
    ctx.row("plain teacher bf16 ÷ teacher fp32", "info", round(same / fp32, 3),
            f"{same * 1e3:.0f} ms vs {fp32 * 1e3:.0f} ms: the teacher's precision alone")


def _count_flops(t, batch: dict) -> float:
    """FLOPs of one real training step as torch's FlopCounterMode counts them (CPU attention counted
    like the GPU kernels, so both modes mean the same)."""
    from torch.utils import flop_counter as fc

    from mst_ds.train import train_step

    aten = torch.ops.aten

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward}
    with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        train_step(t, [batch])
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------
# loader: the clusters' per-rank workers and batch, waiting fraction of the step
# --------------------------------------------------------------------------------------------------
def section_loader(ctx: Ctx) -> None:
    from mst_ds.data.reader import make_train_loader
    from mst_ds.train import train_step

    setups = [(1, 8)] if ctx.cpu else [(7, 8), (5, 32)]  # (workers, batch per rank) of the two clusters
    src = shards(ctx)
    for workers, batch in setups:
        cfg = config(ctx, f"optim.batch_size={batch}", f"data.num_workers={workers}", "data.shuffle_buffer=0",
                     f"data.train={src}", "engine.precision=" + ("fp32" if ctx.cpu else "bf16"))
        t = build(cfg)
        wait = busy = 0.0
        loader = make_train_loader(str(src), cfg, rank=0, world_size=1, micro_batch=batch, epoch=0)
        for i, b in enumerate(loader):
            t1 = time.perf_counter()
            if i >= 1:
                wait += t1 - t0  # noqa: F821  (t0 set at the end of the previous step)
            train_step(t, [b])
            sync(t.device)
            t0 = time.perf_counter()
            if i >= 1:
                busy += t0 - t1
        frac = wait / max(wait + busy, 1e-9)
        ctx.row(f"loader wait share ({workers} workers × {batch})", "info", round(frac, 3),
                "of the step time, after the first batch")
        del t


SECTIONS = {"env": section_env, "parity": section_parity, "zero": section_zero, "resume": section_resume,
            "knn": section_knn, "monitor": section_monitor, "kernels": section_kernels, "throughput": section_throughput,
            "loader": section_loader}


def run_section(name: str, ctx: Ctx) -> int:
    """Run one section in this process → exit code (1 when it raised; its failed rows decide the rest)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        SECTIONS[name](ctx)
    except Exception as err:
        ctx.row("(raised)", "fail", note=f"{type(err).__name__}: {str(err)[:400]}")
        raise
    return 0
