"""``mst-ds status RUN [--json] [--watch S]``: how a run is doing, read from its directory alone.

No ranks, no DeepSpeed: a login node reads ``RUN/metrics.jsonl`` (step, losses, throughput, online k-NN),
``RUN/alerts.jsonl`` (the health verdict), ``RUN/checkpoints`` (the newest complete checkpoint and its
age), ``RUN/run_info.json`` (the schedule's length), ``RUN/exit.json`` (how the last job ended) and
whether a live job holds ``RUN/.lock``. One word says the state:

* ``running``   — a job holds the lock and logged a step recently;
* ``stale``     — no step for more than :data:`STALE_FACTOR` × the usual interval between logged steps
  (at least :data:`STALE_MIN_S`) while a job holds the lock (hung), or no job holds it and none said how
  it ended (killed: SIGKILL, the node, the OOM killer);
* ``finished``  — the last step of the schedule (or ``run.max_steps``) is trained and saved;
* ``preempted`` — stopped with a checkpoint of its last step: a stop signal (exit 75, requeued by the
  SLURM templates) or ``run.time_limit_min`` (exit 0 before the end); relaunch to resume;
* ``failed``    — the job ended with an error (a non-finite loss, a health stop, a refused resume, …).

A study folder (``mst-ds study --out``) gives one row per run.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from mst_ds import checkpoint as ckpt
from mst_ds.config import ConfigError, UsageError, config_from_file
from mst_ds.eval.report import read_jsonl
from mst_ds.run_dir import RunDir, complete_marker

STALE_FACTOR = 10  # K: no logged step for K × the usual interval between logged steps ...
STALE_MIN_S = 300.0  # ... and at least this long (a slow save or monitor pass is not a hang)
RECENT = 20  # logged steps the usual interval and the pace are measured over
FINAL = ("finished", "preempted", "failed")


def lock_holder(run: RunDir) -> str | None:
    """What the live job holding ``RUN/.lock`` wrote (host, pid, start), or None when no job holds it.

    Probed read-only with a shared ``flock`` taken and dropped at once: the file is never written (a job
    starting in that instant could be refused once, as by any second job)."""
    try:
        fd = os.open(run.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown holder"
    finally:
        os.close(fd)


def _json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of the run, None when absent; unreadable: one line (UsageError)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise UsageError(f"{path}: not a readable JSON file ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return data


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file of the run (a line cut by a kill is skipped); absent: []."""
    if not path.is_file():
        return []
    try:
        return [r for r in read_jsonl(path) if isinstance(r, dict)]
    except (UnicodeDecodeError, OSError) as err:
        raise UsageError(f"{path}: not a readable JSONL file ({type(err).__name__})") from None


def _number(record: dict[str, Any], key: str) -> float | None:
    v = record.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _pace(records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(seconds per step, usual seconds between logged steps) over the newest logged steps of the newest
    job (``time`` counts from each job's start, so the run of increasing times is that job's)."""
    recent = [r for r in records[-RECENT:] if _number(r, "time") is not None]
    start = len(recent) - 1
    while start > 0 and recent[start - 1]["time"] < recent[start]["time"]:
        start -= 1
    same_job = recent[max(start, 0):]
    if len(same_job) < 2:
        return None, None
    gaps = [b["time"] - a["time"] for a, b in zip(same_job, same_job[1:])]
    steps = same_job[-1]["step"] - same_job[0]["step"]
    return (same_job[-1]["time"] - same_job[0]["time"]) / steps if steps > 0 else None, statistics.median(gaps)


def _commands(run: RunDir, cfg, world: int) -> dict[str, str]:
    """Copy-pastable commands: resume (the resolved config, any launcher with the same world size) and
    evaluate (k-NN of the newest checkpoint's teacher; export of its backbone)."""
    train = f"mst-ds train --preset {run.config} --run-dir {run.root}"
    if world > 1:
        train = f"torchrun --nproc_per_node {world} -m mst_ds.cli {train.removeprefix('mst-ds ')}"
    return {"resume": train,
            "evaluate": f"mst-ds knn --ckpt {run.root} --train {cfg.data.train or 'TRAIN'} --val {cfg.data.val or 'VAL'}",
            "export": f"mst-ds export {run.root} --out {run.root / 'export' / 'teacher.safetensors'}"}


def run_status(path: str | Path, now: float | None = None) -> dict[str, Any]:
    """The status of the run directory ``path`` as a JSON-ready dict (see the module's docstring)."""
    now = time.time() if now is None else now
    run = RunDir(path)
    if not run.config.is_file():
        raise UsageError(f"{path}: not a run directory (no {run.config.name})")
    cfg = config_from_file(run.config)
    info = _json(run.run_info) or {}
    derived = info.get("derived") if isinstance(info.get("derived"), dict) else {}
    total = derived.get("total_steps")
    end = min(total, cfg.run.max_steps or total) if isinstance(total, int) else cfg.run.max_steps
    world = derived.get("world_size", 1) if isinstance(derived.get("world_size"), int) else 1
    records = [r for r in _jsonl(run.metrics) if isinstance(r.get("step"), int)]
    last = records[-1] if records else {}
    step = last.get("step", 0)
    alerts = _jsonl(run.alerts)
    knn = next((r["monitor_knn_top1"] for r in reversed(records) if _number(r, "monitor_knn_top1") is not None), None)
    tag = ckpt.newest_complete(run.checkpoints) if run.checkpoints.is_dir() else None
    saved = ckpt.step_of(tag) if tag else None
    saved_age = now - complete_marker(run.tag(tag)).stat().st_mtime if tag else None
    holder = lock_holder(run)
    ended = None if holder else _json(run.exit)
    sec_per_step, interval = _pace(records)
    quiet = now - run.metrics.stat().st_mtime if run.metrics.is_file() else None
    done = end is not None and max(step, saved or 0) >= end
    if holder:
        limit = max(STALE_FACTOR * interval, STALE_MIN_S) if interval else None
        state = "stale" if limit is not None and quiet is not None and quiet > limit else "running"
    elif ended is not None:
        code = ended.get("code")
        state = "finished" if code == 0 and done else "preempted" if code in (0, 75) else "failed"
    else:
        state = "finished" if done and saved == end else "stale"
    eta = sec_per_step * (end - step) if state == "running" and sec_per_step and end else None
    verdict = "healthy" if not alerts else f"{len(alerts)} alert(s): " + ", ".join(
        f"{a.get('rule')} (step {a.get('step')})" for a in alerts)
    out: dict[str, Any] = {
        "run": str(run.root), "state": state, "step": step, "total": end, "epoch": last.get("epoch"),
        "eta_s": eta, "last_step_age_s": quiet,
        "losses": {k: last[k] for k in ("loss", "dino", "restore") if _number(last, k) is not None},
        "lr": _number(last, "lr"),
        "throughput": {k: last[k] for k in ("img_per_s", "img_per_s_per_device", "data_wait_share", "peak_mem_gb", "mfu")
                       if _number(last, k) is not None},
        "knn_top1": knn, "health": verdict, "alerts": alerts,
        "checkpoint": {"tag": tag, "step": saved, "age_s": saved_age, "path": str(run.tag(tag))} if tag else None,
        "held_by": holder, "exit": ended, "world_size": world,
    }
    commands = _commands(run, cfg, world)
    out["next"] = {"finished": commands["evaluate"], "running": None}.get(state, commands["resume"])
    out["commands"] = commands
    return out


def _study_runs(path: Path) -> list[Path]:
    """The run directories of a study folder (``OUT/runs/*``) or of a folder of runs (``DIR/*``)."""
    return sorted({c.parent for pattern in ("*/config.yaml", "runs/*/config.yaml") for c in path.glob(pattern)})


def collect(path: str | Path, now: float | None = None) -> list[dict[str, Any]]:
    """One status per run: of the run ``path``, or of every run of the study folder ``path``."""
    p = Path(path)
    if (p / "config.yaml").is_file():
        return [run_status(p, now)]
    runs = _study_runs(p) if p.is_dir() else []
    if not runs:
        raise UsageError(f"{path}: neither a run directory (config.yaml) nor a study folder of runs")
    return [run_status(r, now) for r in runs]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{sec:02d}"


def describe(s: dict[str, Any]) -> str:
    """The status of one run as a few plain lines."""
    losses = ", ".join(f"{k} {v:.4f}" for k, v in s["losses"].items()) or "-"
    tp = s["throughput"]
    speed = (f"{tp['img_per_s']:.1f} img/s ({tp.get('img_per_s_per_device', 0):.1f}/device), data wait "
             f"{100 * tp.get('data_wait_share', 0):.1f}%, peak mem {tp.get('peak_mem_gb', 0):.2f} GiB/device"
             + (f", MFU {100 * tp['mfu']:.1f}%" if "mfu" in tp else "")) if "img_per_s" in tp else "-"
    c = s["checkpoint"]
    lines = [f"{s['run']}: {s['state']} — step {s['step']}/{s['total']} (epoch {s['epoch']}), eta {_duration(s['eta_s'])}, "
             f"last logged step {_duration(s['last_step_age_s'])} ago",
             f"  losses: {losses}; lr {format(s['lr'], '.3g') if s['lr'] is not None else '-'}",
             f"  throughput: {speed}",
             f"  online k-NN top-1: {format(s['knn_top1'], '.1f') if s['knn_top1'] is not None else '-'}; "
             f"health: {s['health']}",
             f"  checkpoint: {c['tag']} ({_duration(c['age_s'])} old)" if c else "  checkpoint: none complete"]
    if s["held_by"]:
        lines.append(f"  held by: {s['held_by']}")
    if s["exit"]:
        lines.append(f"  last job: exit {s['exit'].get('code')}" + (f" ({s['exit']['error']})" if s["exit"].get("error") else ""))
    if s["next"]:
        lines.append(f"  next: {s['next']}")
    return "\n".join(lines)


def table(statuses: list[dict[str, Any]]) -> str:
    """One row per run (a study)."""
    rows = [("run", "state", "step", "eta", "loss", "k-NN", "alerts", "checkpoint")]
    for s in statuses:
        rows.append((Path(s["run"]).name, s["state"], f"{s['step']}/{s['total']}", _duration(s["eta_s"]),
                     f"{s['losses']['loss']:.4f}" if "loss" in s["losses"] else "-",
                     f"{s['knn_top1']:.1f}" if s["knn_top1"] is not None else "-", str(len(s["alerts"])),
                     s["checkpoint"]["tag"] if s["checkpoint"] else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def show(path: str | Path, as_json: bool) -> list[dict[str, Any]]:
    statuses = collect(path)
    if as_json:
        print(json.dumps(statuses[0] if len(statuses) == 1 and (Path(path) / "config.yaml").is_file() else statuses,
                         indent=1))
    elif len(statuses) == 1:
        print(describe(statuses[0]))
    else:
        print(table(statuses))
    sys.stdout.flush()
    return statuses


def run(args) -> int:
    """``mst-ds status RUN [--json] [--watch S]``: exit 0 (a malformed run file: one line, exit 2)."""
    if args.watch is not None and args.watch <= 0:
        raise UsageError("--watch: expected a positive number of seconds")
    try:
        statuses = show(args.run, args.json)
        while args.watch is not None and any(s["state"] not in FINAL for s in statuses):
            time.sleep(args.watch)
            statuses = show(args.run, args.json)
    except UsageError:
        raise
    except ConfigError as err:  # a config.yaml that does not validate
        raise UsageError(f"{args.run}: {err}") from None
    return 0
