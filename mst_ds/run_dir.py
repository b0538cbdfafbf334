"""The run directory's layout: the one module that knows its file names.

``mst-ds train --run-dir RUN`` writes::

    RUN/config.yaml             resolved config (config.<hash>.yaml: the one before an allowed change)
    RUN/ds_config.json          the final DeepSpeed JSON
    RUN/run_info.json           provenance (git sha, versions, derived sizes, argv)
    RUN/git_sha.txt
    RUN/.lock                   held by rank 0 while a job trains in RUN
    RUN/exit.json               how the last job on RUN ended (exit code, why); none while one trains
    RUN/metrics.jsonl, RUN/tb/  scalars (rank 0)
    RUN/alerts.jsonl            health alerts
    RUN/corrupt.jsonl           samples skipped as corrupt
    RUN/checkpoints/TAG/        step%08d[_universal], complete when TAG/complete.json exists
    RUN/checkpoints/latest      the newest complete tag
    RUN/eval/                   evaluation outputs (knn.json, linear.json, ...)
    RUN/study_done.json         a study's "this run is trained and evaluated"

Pure standard library: ``mst-ds report`` and ``plan`` read runs without importing torch.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
RUN_INFO = "run_info.json"
GIT_SHA = "git_sha.txt"
LOCK = ".lock"
EXIT = "exit.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
ALERTS = "alerts.jsonl"
CORRUPT = "corrupt.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "complete.json"
EVAL = "eval"
STUDY_DONE = "study_done.json"

UNIVERSAL_SUFFIX = "_universal"
TAG_RE = re.compile(r"step\d{8}(_universal)?")


def tag_for(step: int) -> str:
    """Checkpoint tag of optimizer step ``step`` (counted from 1)."""
    return f"step{step:08d}"


def complete_marker(tag_dir: Path) -> Path:
    """The file whose presence makes a checkpoint tag complete."""
    return Path(tag_dir) / COMPLETE


class RunDir:
    """Paths of one run directory; holds no state beyond its root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    @classmethod
    def of(cls, path: str | Path) -> RunDir | None:
        """The run RUN, RUN/checkpoints or RUN/checkpoints/TAG belongs to (the directory holding config.yaml)."""
        p = Path(path)
        for cand in (p, p.parent, p.parent.parent):
            if cand.is_dir() and (cand / CONFIG).is_file():
                return cls(cand)
        return None

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    def config_of(self, config_hash: str) -> Path:
        """The config a relaunch with an allowed change set aside (written under hash ``config_hash``)."""
        return self.root / f"config.{config_hash}.yaml"

    @property
    def ds_config(self) -> Path:
        return self.root / DS_CONFIG

    @property
    def run_info(self) -> Path:
        return self.root / RUN_INFO

    @property
    def git_sha(self) -> Path:
        return self.root / GIT_SHA

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def exit(self) -> Path:
        return self.root / EXIT

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def alerts(self) -> Path:
        return self.root / ALERTS

    @property
    def corrupt(self) -> Path:
        return self.root / CORRUPT

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def tag(self, tag: str) -> Path:
        return self.checkpoints / tag

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL

    @property
    def study_done(self) -> Path:
        return self.root / STUDY_DONE
