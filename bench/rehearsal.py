"""A 16-rank rehearsal on CPU of what only scale shows (gloo, `tiny`, ZeRO-2, 2 loader workers per rank,
≥ 32 shards), for what a 128-rank × 7-worker cluster run does with ~5 shards per worker:

1. the data split: every rank's loader (its 2 workers) yields the same number of equal batches, and each
   sample comes at most once per epoch across all ranks (all of them when the counts divide);
2. `mst-ds train` at 16 ranks (DeepSpeed launcher) saves; the run resumes at 4 ranks through the universal
   checkpoint and continues the schedule (the resumed steps' learning rates are the schedule's);
3. per rank and step: the bytes each collective moves (DeepSpeed's comms logger, message sizes; on the wire
   as a ring moves them: reduce-scatter / all-gather (W−1) × chunk, all-reduce 2(W−1)/W × size), against
   what `mst-ds plan --world-size W` estimates for the same settings (mst_ds.cost.comm_per_step) and what
   it prints for the paper's run at 128 ranks; peak resident memory per rank (the rank's own process).

    python bench/rehearsal.py                 # 16 → 4 ranks (minutes on 2 cores)
    python bench/rehearsal.py --ranks 4 --resume-ranks 2 --shards 8   # the machinery, small

Prints a table and one JSON line ``REHEARSAL {...}``; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from _gpu_sections import make_jpegs  # noqa: E402
from _report import bench_line  # noqa: E402

from mst_ds.cost import comm_per_step  # noqa: E402
from mst_ds.job import use_extensions_dir  # noqa: E402

PER_SHARD = 4
MICRO = 2  # images per rank and step


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(tmp: Path, n_shards: int) -> Path:
    from data_tools.writer import write_shards

    make_jpegs(tmp / "folder", n_shards * PER_SHARD, (40, 40))
    write_shards(tmp / "folder", tmp / "shards", split="train", max_count=PER_SHARD, progress=False)
    return tmp / "shards"


def sets(shards: Path, batch: int, steps: int, template: Path) -> list[str]:
    """The run's settings; ``batch`` global (the same at every world size: the resume keeps the schedule)."""
    return [f"optim.batch_size={batch}", "data.num_workers=2", "engine.zero_stage=2", "engine.precision=fp32",
            f"data.train={shards}", f"run.max_steps={steps}", "checkpoint.every_steps=2", "run.log_every=1",
            "run.loggers=[]", f"engine.template={template}", "data.shuffle_buffer=0"]


def check_split(shards: Path, ranks: int, template: Path) -> dict:
    """Every rank's epoch-0 loader with its real workers → batches per rank, batch sizes, repeats."""
    from mst_ds.config import load_config
    from mst_ds.data.reader import make_train_loader, open_manifest

    cfg = load_config("tiny", sets(shards, MICRO * ranks, 2, template)).config
    total = open_manifest(str(shards)).total
    per_rank, sizes, keys = [], set(), []
    for rank in range(ranks):
        n = 0
        for batch in make_train_loader(str(shards), cfg, rank=rank, world_size=ranks, micro_batch=MICRO, epoch=0):
            n += 1
            sizes.add(len(batch["key"]))
            keys += list(batch["key"])
        per_rank.append(n)
    return {"batches_per_rank": sorted(set(per_rank)), "batch_sizes": sorted(sizes), "samples": total,
            "seen": len(keys), "distinct": len(set(keys))}


def launch(run_dir: Path, ranks: int, batch: int, shards: Path, steps: int, template: Path,
           meas: Path) -> subprocess.CompletedProcess:
    """The DeepSpeed launcher with ``ranks`` CPU processes, each bench/_rehearsal_rank.py (= `mst-ds train`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), REHEARSAL_DIR=str(meas),
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    meas.mkdir(parents=True, exist_ok=True)
    flags = [x for s in sets(shards, batch, steps, template) for x in ("--set", s)]
    check = [sys.executable, "-m", "mst_ds.cli", "train", "--check", "--preset", "tiny", "--run-dir", str(run_dir), *flags]
    subprocess.run(check, env=env, check=True, capture_output=True, text=True, timeout=900)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_port()), "--num_gpus", str(ranks),
           str(HERE / "_rehearsal_rank.py"), "train", "--preset", "tiny", "--run-dir", str(run_dir), *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)  # in our group: a kill reaches the ranks


def wire_bytes(op: str, size: int, world: int) -> float:
    """Bytes one rank sends (and receives) for one call with message ``size`` under a ring algorithm."""
    if op.startswith(("all_gather", "reduce_scatter")):
        return (world - 1) * size  # the logged size is one rank's chunk
    if op.startswith("all_reduce"):
        return 2 * (world - 1) / world * size
    return size  # broadcast and the rest: the message once


def comm_table(meas: Path, steps: int) -> dict:
    """Per op: calls and ring bytes per rank per step (rank 0's log); every rank's ring bytes per step
    (all ops but the start-up broadcasts) and peak RSS, in rank order."""
    files = sorted((json.loads(p.read_text()) for p in meas.glob("rank*.json")), key=lambda f: f["rank"])
    r0 = next(f for f in files if f["rank"] == 0)
    world = r0["world"]

    def ring(op: str, sizes: dict) -> float:
        return sum(wire_bytes(op, int(s), world) * c for s, c in sizes.items()) / steps

    ops = {}
    for op, sizes in r0["ops"].items():
        calls = sum(sizes.values())
        msg = sum(int(s) * c for s, c in sizes.items())
        ops[op] = {"calls": calls, "message_bytes": msg, "ring_bytes_per_step": ring(op, sizes)}
    per_rank = [sum(ring(op, sizes) for op, sizes in f["ops"].items() if op != "broadcast") for f in files]
    return {"world": world, "ops": ops, "bytes_per_step_per_rank": per_rank,
            "max_rss_mib": [round(f["max_rss_kib"] / 1024, 1) for f in files]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=16)
    ap.add_argument("--resume-ranks", type=int, default=4)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="4 → 2 ranks on 8 shards (bench/run_all --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks, args.resume_ranks, args.shards = 4, 2, 8
    use_extensions_dir(announce=False)  # one build of DeepSpeed's CPU comm op for every rank (as launch.sh)

    from mst_ds.config import load_config
    from mst_ds.data.reader import derive_for_training
    from mst_ds.engine import load_template, param_groups
    from mst_ds.model.mst import MSTModel
    from mst_ds.schedules import Schedules

    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rehearsal_") as tmp:
        tmp = Path(tmp)
        template = tmp / "comms.json"
        template.write_text(json.dumps({**load_template("base.json"),
                                        "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}))
        shards = make_shards(tmp, args.shards)
        split = check_split(shards, args.ranks, template)
        equal = len(split["batches_per_rank"]) == 1 and split["batch_sizes"] == [MICRO]
        once = split["seen"] == split["distinct"]
        covered = split["distinct"] == split["samples"] or split["seen"] != split["samples"]
        if not (equal and once and covered):
            failed.append(f"data split {split}")
        print(f"data split at {args.ranks} ranks × 2 workers, {args.shards} shards: {split}", flush=True)

        run = tmp / "run"
        batch = MICRO * args.ranks
        t0 = time.monotonic()
        res = launch(run, args.ranks, batch, shards, 2, template, tmp / "meas16")
        wall = {"train": round(time.monotonic() - t0, 1)}
        if res.returncode != 0:
            print(res.stdout[-3000:], res.stderr[-3000:])
            print(f"rehearsal: error: {args.ranks}-rank run exited {res.returncode}", file=sys.stderr)
            return 1
        comm = comm_table(tmp / "meas16", 2)
        t0 = time.monotonic()
        res = launch(run, args.resume_ranks, batch, shards, 4, template, tmp / "meas4")
        wall["resume"] = round(time.monotonic() - t0, 1)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        cfg = load_config("tiny", sets(shards, batch, 4, template)).config
        sched = Schedules.from_config(cfg, derive_for_training(cfg, args.ranks))
        steps = [r.get("step") for r in records]
        lr_ok = all(abs(r.get("lr", float("nan")) - sched.at(r["step"] - 1).lr) <= 1e-12 for r in records)
        resumed = res.returncode == 0 and steps[-2:] == [3, 4] and lr_ok
        if not resumed:
            failed.append(f"resume at {args.resume_ranks} ranks: exit {res.returncode}, steps {steps}, lr as scheduled {lr_ok}")
            print(res.stdout[-3000:], res.stderr[-3000:])

    model = MSTModel.from_config(cfg)
    trained = sum(p.numel() for g in param_groups(model) for p in g["params"])
    step_bytes = sum(o["ring_bytes_per_step"] for op, o in comm["ops"].items() if op != "broadcast")
    plan_rows = comm_per_step(cfg, args.ranks, 1)
    plan_bytes = sum(r.bytes for r in plan_rows)
    paper = load_config("mst_deit_s_100ep").config
    at128 = sum(r.bytes for r in comm_per_step(paper, 128, 1))
    ratio = step_bytes / plan_bytes
    print(f"\nRehearsal: {args.ranks} ranks (gloo, tiny, ZeRO-2 fp32, 2 workers/rank, {args.shards} shards), 2 steps")
    print(f"{'collective (rank 0)':<28} {'calls':>6} {'MiB/rank/step (ring)':>22}")
    for op, o in sorted(comm["ops"].items()):
        print(f"{op:<28} {o['calls']:>6} {o['ring_bytes_per_step'] / 2**20:>22.3f}")
    per_rank = comm["bytes_per_step_per_rank"]
    print(f"per step, all but the start-up broadcasts: {step_bytes / 2**20:.3f} MiB sent per rank (ranks: min "
          f"{min(per_rank) / 2**20:.3f}, max {max(per_rank) / 2**20:.3f}); `mst-ds plan --world-size {args.ranks}` "
          f"estimates {plan_bytes / 2**20:.3f} MiB ({trained:,} trained parameters): measured ÷ plan = {ratio:.3f}")
    for r in plan_rows:
        print(f"  plan: {r.what}, {r.collective}: {r.bytes / 2**20:.3f} MiB")
    print(f"peak RSS per rank MiB: min {min(comm['max_rss_mib'])}, max {max(comm['max_rss_mib'])}")
    print(f"`mst-ds plan --world-size 128` for the paper's run (mst_deit_s_100ep): {at128 / 2**20:.1f} MiB sent per rank "
          "per step")
    print(f"resume at {args.resume_ranks} ranks (universal checkpoint): steps {steps}, lr as scheduled: {lr_ok}")
    print(f"wall time (launch, pre-flight included): {args.ranks} ranks × 2 steps {wall['train']} s, "
          f"{args.resume_ranks} ranks × 2 steps {wall['resume']} s")
    print("REHEARSAL " + json.dumps({"split": split, "comm": comm, "trained_params": trained, "plan_bytes": plan_bytes,
                                     "measured_bytes": step_bytes, "measured_over_plan": ratio,
                                     "paper_mib_per_step_at_128": at128 / 2**20, "resumed": resumed, "wall_s": wall}, default=str))
    if not bench_line(f"ZeRO-2 bytes per rank per step: |measured / mst-ds plan's estimate - 1| ({args.ranks} CPU ranks)",
                      abs(ratio - 1), "<=", 0.1):
        failed.append(f"measured bytes per step {ratio:.3f} × the plan's estimate")
    if failed:
        print("rehearsal: error: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
