"""`python bench/gpu_check.py --cpu`: the prepared GPU check runs its code paths on the tiny preset (the
real training step, the plain-PyTorch and DINO-only steps, FLOP counting, the JPEG-shard loader) and
prints a skip line for each GPU-only section. Timings are not asserted, only that every number came out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_mode_runs_every_section_that_cpu_can(deepspeed_cpu):
    # Not this process's rendezvous (an earlier test may have started torch.distributed here).
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "FAIL" not in out
    bench = [json.loads(line[len("BENCH "):]) for line in out.splitlines() if line.startswith("BENCH ")]
    names = " | ".join(b["name"] for b in bench)
    for expected in ("DeepSpeed / plain PyTorch step", "MST / DINO-only training step", "waiting on data"):
        assert expected in names, names
    for b in bench:
        assert set(b) == {"name", "ratio", "target", "met"} and b["ratio"] > 0
    for section in ("4 fp16 loss scaling", "5 SyncBN, 2 processes", "7 engine.compile"):
        assert f"SKIP {section}:" in out
    # Section 1 measured a real step and counted its FLOPs.
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  1 ")}
    per_image = float(lines["1 GFLOP per image (counted, fwd+bwd+teacher)"].split(":")[1].split()[0])
    assert per_image > 0
    assert float(lines["1 images/s (real step, bf16)"].split(":")[1].split()[0]) > 0


def test_engine_compile_wraps_the_student_in_place(deepspeed_cpu):
    """engine.compile=true: DeepSpeed's engine.compile() on the student, the same parameter objects (so
    the EMA teacher and checkpoints see the trained weights); off by default. (Compiling runs at the first
    forward; its speed is measured by gpu_check on GPUs.)"""
    from mst_ds import engine as eng
    from mst_ds.config import derive, load_config
    from mst_ds.trainer import build_training

    eng.init_distributed()
    assert load_config("tiny").config.engine.compile is False
    cfg = load_config("tiny", ["engine.compile=true", "engine.precision=fp32", "optim.batch_size=8",
                               "run.schedule_steps=40"]).config
    t, _ = build_training(cfg, derive(cfg, 1, 64))
    assert t.engine.is_compiled
    student = {id(p) for p in t.engine.module.parameters()}
    assert all(id(s) in student for _, _, s in t.ema.pairs)
