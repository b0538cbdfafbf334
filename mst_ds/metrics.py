"""Training metrics: progress on rank 0, ``RUN/metrics.jsonl`` and the experiment trackers of
``run.loggers`` (TensorBoard by default; W&B, MLflow: :mod:`mst_ds.trackers`).

Progress: a rich live bar when stdout is a terminal; otherwise (a job's output file, a pipe) one full plain
line per logged step, at most one every ``run.log_every_s`` seconds, and always the last step's
(:func:`log_line`), so a job's output file shows the run while it trains. Only rank 0 writes. On resume, records past the resumed step are dropped from the JSONL and purged
from TensorBoard, so a run killed and resumed has the same history as one that never stopped.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mst_ds import atomic
from mst_ds.config import MSTConfig
from mst_ds.cost import peak_of_device_name
from mst_ds.run_dir import RunDir
from mst_ds.scalars import HEALTH_SCALARS, MFU, MODEL_SCALARS, MONITOR_SCALARS, SCALARS  # noqa: F401 (named here too)
from mst_ds.trackers import open_trackers


def device_peak_tflops(dev: torch.device, precision: str, configured: float | None) -> float | None:
    """The device's peak TFLOPS for MFU: ``configured`` (run.peak_tflops) if given, else the table's entry
    for this CUDA/ROCm device at bf16/fp16; None where unknown (CPU)."""
    if configured:
        return configured
    if dev.type != "cuda" or precision not in ("bf16", "fp16", "autocast_bf16"):
        return None
    return peak_of_device_name(torch.cuda.get_device_name(dev))


def peak_memory_gb(dev: torch.device) -> float:
    """Peak accelerator memory of this rank (CUDA/ROCm), else the process's peak RSS, in GiB."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only records with step ≤ last_step (resume after a kill rewrites the rest)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by the kill: everything after it is gone too
    atomic.write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """Rank-0 sink for scalars: JSONL, TensorBoard, rich progress (``enabled`` False on other ranks)."""

    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int, total_steps: int,
                 steps_per_epoch: int, progress: bool = True, cfg: MSTConfig | None = None,
                 terminal: bool | None = None) -> None:
        """``progress``: show progress at all; ``terminal``: as a live bar (default: stdout is a terminal)
        or as plain lines (:func:`log_line`)."""
        self.enabled = enabled
        self.jsonl = RunDir(run_dir).metrics
        self._trackers: list = []
        self._progress = None
        self._start = time.monotonic()
        self._start_step = start_step
        self._total = total_steps
        self._lines = False
        self._last_line = -math.inf
        self._knn: float | None = None
        self._every_s = cfg.run.log_every_s if cfg is not None else 0.0
        if not enabled:
            return
        truncate_jsonl(self.jsonl, start_step if start_step else -1)  # a fresh start rewrites step 0 too
        self._trackers = open_trackers(run_dir, cfg, start_step)
        self.steps_per_epoch = steps_per_epoch
        if progress and not (sys.stdout.isatty() if terminal is None else terminal):
            self._lines = True
        elif progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def log(self, step: int, epoch: int, scalars: dict[str, float]) -> None:
        """Write one record (step = optimizer steps done) to the JSONL and TensorBoard."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "epoch": epoch, "time": round(time.monotonic() - self._start, 3)}
        record.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()})
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = {k: float(v) for k, v in scalars.items()}
        for tracker in self._trackers:
            tracker.log(step, values)

    def progress(self, step: int, epoch: int, scalars: dict[str, float], *, logged: bool = True) -> None:
        """After every step: the live bar; or, on a logged step (``logged``) at least ``run.log_every_s``
        after the previous one, and on the last step, one plain line on stdout."""
        if "monitor_knn_top1" in scalars:
            self._knn = scalars["monitor_knn_top1"]
        if self._lines:
            now = time.monotonic()
            if logged and (now - self._last_line >= self._every_s or step >= self._total):
                self._last_line = now
                print(log_line(step, self._total, epoch, scalars, eta_s=self.eta_s(step, now), knn=self._knn),
                      flush=True)
            return
        if self._progress is None:
            return
        nan = float("nan")
        info = (f"ep {epoch} · loss {scalars.get('loss', nan):.4f} · dino {scalars.get('dino', nan):.4f}"
                f" · restore {scalars.get('restore', nan):.4f} · {scalars.get('img_per_s', 0):.1f} img/s"
                f" · H(t) {scalars.get('teacher_entropy_rel', nan):.2f} · H(attn) {scalars.get('attn_entropy', nan):.3f}")
        if self._knn is not None:
            info += f" · k-NN {self._knn:.1f}"
        if scalars.get("alerts"):
            info += f" · [red]{int(scalars['alerts'])} alert(s)[/]"
        self._progress.update(self._task, completed=step, info=info)

    def eta_s(self, step: int, now: float) -> float | None:
        """Seconds to the last step at this process's pace so far (saves and the monitor included)."""
        done = step - self._start_step
        return (now - self._start) / done * (self._total - step) if done > 0 else None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{sec:02d}"


def log_line(step: int, total: int, epoch: int, s: dict[str, float], *, eta_s: float | None,
             knn: float | None) -> str:
    """One plain progress line of a logged step (DINO's MetricLogger line, with throughput): step/total,
    epoch, ETA, the losses, lr, images per second in all and per device, the data-wait share, peak memory
    per device, MFU (where known), the last online k-NN top-1 and the alert count. Never cut."""
    nan = float("nan")
    parts = [f"train step {step}/{total} ({100 * step / max(total, 1):.1f}%)", f"epoch {epoch}",
             f"eta {_duration(eta_s)}",
             f"loss {s.get('loss', nan):.4f} (dino {s.get('dino', nan):.4f}, restore {s.get('restore', nan):.4f})",
             f"lr {s.get('lr', nan):.3g}"]
    if "img_per_s" in s:
        parts.append(f"{s['img_per_s']:.1f} img/s ({s.get('img_per_s_per_device', nan):.1f}/device)")
    if "data_wait_share" in s:
        parts.append(f"data wait {100 * s['data_wait_share']:.1f}%")
    if "peak_mem_gb" in s:
        parts.append(f"peak mem {s['peak_mem_gb']:.2f} GiB/device")
    if MFU in s:
        parts.append(f"MFU {100 * s[MFU]:.1f}%")
    parts.append(f"k-NN {knn:.1f}" if knn is not None else "k-NN -")
    parts.append(f"alerts {int(s.get('alerts', 0))}")
    return " | ".join(parts)


class Throughput:
    """Throughput of training between two logged steps: the online monitor's and the saves' time
    (``pause``) is not training time; ``wait`` adds time the loop spent waiting for the loader.

    ``flops_per_image`` (model FLOPs of one training image: teacher forward, student forward and backward,
    decoder) and ``peak_tflops`` (one device's peak) give the MFU; either None: no MFU."""

    def __init__(self, step: int, *, world: int = 1, flops_per_image: float | None = None,
                 peak_tflops: float | None = None) -> None:
        self.world, self.flops, self.peak = world, flops_per_image, peak_tflops
        self.restart(step)

    def restart(self, step: int) -> None:
        self.tick, self.step, self.paused, self.waited = time.monotonic(), step, 0.0, 0.0

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def wait(self, seconds: float) -> None:
        self.waited += seconds

    def rates(self, step: int, global_batch: int) -> dict[str, float]:
        """Since the previous call (or restart) → img_per_s, img_per_s_per_device, data_wait_share (of the
        training wall time, this rank) and mfu (where FLOPs and peak are known)."""
        now = time.monotonic()
        wall = max(now - self.tick - self.paused, 1e-9)
        rate = (step - self.step) * global_batch / wall
        out = {"img_per_s": rate, "img_per_s_per_device": rate / self.world,
               "data_wait_share": min(self.waited / wall, 1.0)}
        if self.flops and self.peak:
            out[MFU] = rate / self.world * self.flops / (self.peak * 1e12)
        self.tick, self.step, self.paused, self.waited = now, step, 0.0, 0.0
        return out
