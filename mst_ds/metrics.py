"""Training metrics: a rich progress line on rank 0, ``RUN/metrics.jsonl`` and the experiment trackers
of ``run.loggers`` (TensorBoard by default; W&B, MLflow: :mod:`mst_ds.trackers`).

Only rank 0 writes. On resume, records past the resumed step are dropped from the JSONL and purged
from TensorBoard, so a run killed and resumed has the same history as one that never stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from mst_ds import atomic
from mst_ds.config import MSTConfig
from mst_ds.run_dir import RunDir
from mst_ds.scalars import HEALTH_SCALARS, MODEL_SCALARS, MONITOR_SCALARS, SCALARS  # noqa: F401 (named here too)
from mst_ds.trackers import open_trackers


def peak_memory_mb(dev: torch.device) -> float:
    """Peak accelerator memory of this rank (CUDA/ROCm), else the process's peak RSS, in MiB."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
                 steps_per_epoch: int, progress: bool = True, cfg: MSTConfig | None = None) -> None:
        self.enabled = enabled
        self.jsonl = RunDir(run_dir).metrics
        self._trackers: list = []
        self._progress = None
        self._start = time.monotonic()
        self._start_step = start_step
        if not enabled:
            return
        truncate_jsonl(self.jsonl, start_step if start_step else -1)  # a fresh start rewrites step 0 too
        self._trackers = open_trackers(run_dir, cfg, start_step)
        self.steps_per_epoch = steps_per_epoch
        if progress:
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

    def progress(self, step: int, epoch: int, scalars: dict[str, float]) -> None:
        if self._progress is None:
            return
        nan = float("nan")
        info = (f"ep {epoch} · loss {scalars.get('loss', nan):.4f} · dino {scalars.get('dino', nan):.4f}"
                f" · restore {scalars.get('restore', nan):.4f} · {scalars.get('img_per_s', 0):.1f} img/s"
                f" · H(t) {scalars.get('teacher_entropy_rel', nan):.2f} · H(attn) {scalars.get('attn_entropy', nan):.3f}")
        if "monitor_knn_top1" in scalars:
            self._knn = scalars["monitor_knn_top1"]
        if getattr(self, "_knn", None) is not None:
            info += f" · k-NN {self._knn:.1f}"
        if scalars.get("alerts"):
            info += f" · [red]{int(scalars['alerts'])} alert(s)[/]"
        self._progress.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


class Throughput:
    """Images per second of training between two logged steps: the online monitor's and the saves' time
    (``pause``) is not training time."""

    def __init__(self, step: int) -> None:
        self.restart(step)

    def restart(self, step: int) -> None:
        self.tick, self.step, self.paused = time.monotonic(), step, 0.0

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def img_per_s(self, step: int, global_batch: int) -> float:
        now = time.monotonic()
        rate = (step - self.step) * global_batch / max(now - self.tick - self.paused, 1e-9)
        self.tick, self.step, self.paused = now, step, 0.0
        return rate
