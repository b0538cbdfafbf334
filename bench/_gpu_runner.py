"""The GPU check's runner: each section a subprocess in its own process group with its own timeout, rows
appended to one JSONL file as they are produced, a wall-clock budget that holds, the table rebuilt from
the file. Imports no torch: a section's crash, hang, host OOM or sticky CUDA error stays in its process.

A row is one JSON object per line::

    {"run": RUN_ID, "section": NAME, "check": TEXT, "status": "pass"|"fail"|"info"|"skipped", "value": ..., "note": TEXT}

and the runner closes each section with ``check: "(section)"`` and a status of pass / fail / timeout /
skipped, its seconds, and on failure the last lines of its log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SECTION_ROW = "(section)"
# Seconds kept back from the budget for killing the last section and printing the table.
RESERVE_S = 5.0


@dataclass(frozen=True)
class Section:
    """One subprocess: ``argv`` run with ``timeout_s`` (cut to what the budget has left); skipped when a
    section in ``needs`` did not pass, or when fewer than ``min_s`` seconds of the budget are left."""

    name: str
    argv: Sequence[str]
    timeout_s: float
    needs: tuple[str, ...] = ()
    min_s: float = 10.0
    env: dict[str, str] = field(default_factory=dict)


def append_row(out: Path, row: dict) -> None:
    """One line, appended and flushed at once (O_APPEND: a line is never interleaved with another's)."""
    line = (json.dumps(row, default=str) + "\n").encode()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_rows(out: Path, run: str | None = None) -> list[dict]:
    """The file's rows (of run ``run`` when given); a torn last line (a kill mid-write) is left out."""
    rows = []
    for line in out.read_text().splitlines() if out.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and (run is None or row.get("run") == run):
            rows.append(row)
    return rows


def _tail(path: Path, lines: int = 12, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the section's whole process group (its workers, launchers and their ranks included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_section(sec: Section, out: Path, run: str, log: Path, timeout_s: float) -> tuple[str, float]:
    """Run one section → (status, seconds). Its stdout/stderr go to ``log``; the closing row is appended."""
    t0 = time.monotonic()
    env = {**os.environ, **sec.env, "GPU_CHECK_RUN": run, "GPU_CHECK_OUT": str(out), "GPU_CHECK_SECTION": sec.name}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(list(sec.argv), stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "pass" if rc == 0 else "fail"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        except BaseException:  # this runner stopped (SIGTERM → SystemExit, Ctrl-C): the row says so
            append_row(out, {"run": run, "section": sec.name, "check": SECTION_ROW, "status": "killed",
                             "value": round(time.monotonic() - t0, 1), "note": "the runner itself was stopped"})
            raise
        finally:
            _kill_group(proc)  # also after a normal exit: nothing it started may outlive it
    seconds = time.monotonic() - t0
    rows = [r for r in read_rows(out, run) if r.get("section") == sec.name and r.get("check") != SECTION_ROW]
    if status == "pass" and any(r.get("status") == "fail" for r in rows):
        status = "fail"
    note = {"timeout": f"killed after {timeout_s:.0f} s (process group)", "pass": ""}.get(status, f"exit {rc}")
    if status != "pass":
        note += "\n" + _tail(log)
    append_row(out, {"run": run, "section": sec.name, "check": SECTION_ROW, "status": status,
                     "value": round(seconds, 1), "note": note.strip()})
    return status, seconds


def run_all(sections: Sequence[Section], out: Path, budget_s: float, logs: Path, *, run: str | None = None,
            echo=print) -> tuple[str, list[dict]]:
    """Every section in order within ``budget_s`` (wall clock, from now) → (run id, this run's rows).

    A SIGTERM to this runner (a caller's timeout) kills the running section's process group first: a
    section lives in its own session and would otherwise outlive its runner."""
    signal.signal(signal.SIGTERM, _stop)
    run = run or uuid.uuid4().hex[:12]
    deadline = time.monotonic() + budget_s
    logs.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for sec in sections:
        left = deadline - time.monotonic() - RESERVE_S
        missing = [n for n in sec.needs if status.get(n) != "pass"]
        if missing:
            why = "needs " + ", ".join(f"{n} ({status.get(n, 'not run')})" for n in missing)
        elif left < sec.min_s:
            why = f"time budget: {max(left, 0):.0f} s left of {budget_s:.0f} s"
        else:
            why = ""
        if why:
            status[sec.name] = "skipped"
            append_row(out, {"run": run, "section": sec.name, "check": SECTION_ROW, "status": "skipped", "note": why})
            echo(f"gpu_check: {sec.name}: skipped ({why})")
            continue
        echo(f"gpu_check: {sec.name} ...")
        status[sec.name], seconds = run_section(sec, out, run, logs / f"{sec.name}.log", min(sec.timeout_s, left))
        echo(f"gpu_check: {sec.name}: {status[sec.name]} ({seconds:.0f} s)")
    return run, read_rows(out, run)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " / ".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def table(rows: list[dict], width: int = 150) -> str:
    """The rows as a plain-text table (no third-party dependency: it must print on a bare machine)."""
    lines = [f"{'section':<12} {'check':<46} {'status':<8} {'value':<22} note"]
    for r in rows:
        check = "— section —" if r.get("check") == SECTION_ROW else str(r.get("check", ""))
        note = str(r.get("note", "")).splitlines()
        line = f"{str(r.get('section', '')):<12} {check[:46]:<46} {str(r.get('status', '')):<8} {_cell(r.get('value'))[:22]:<22} "
        lines.append((line + (note[0] if note else ""))[:width])
        lines += [" " * 14 + n[: width - 14] for n in note[1:]]
    return "\n".join(lines)


def failures(rows: list[dict]) -> list[str]:
    """Sections that did not pass (skips for the budget or a failed dependency included)."""
    return [r["section"] for r in rows if r.get("check") == SECTION_ROW and r.get("status") != "pass"]
