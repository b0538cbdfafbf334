"""Experiment trackers of a training run (``run.loggers``): TensorBoard (default), Weights & Biases, MLflow.

Rank 0 only (the :class:`mst_ds.metrics.MetricsLogger` that owns them exists there). Each tracker
gets every logged scalar under ``train/<name>`` at its optimizer step, and, once, the run's resolved
config and identity (run directory, config hash, git sha of ``run_info.json``).

* ``tensorboard``: ``RUN/tb``; on resume the events past the resumed step are purged.
* ``wandb`` (``pip install '.[wandb]'``): project ``run.tracker_project``, name ``run.name``, files
  under ``RUN/wandb``. Offline without a network: ``WANDB_MODE=offline`` (W&B's own setting), later
  ``wandb sync RUN/wandb/offline-run-*``.
* ``mlflow`` (``pip install '.[mlflow]'``): experiment ``run.tracker_project`` on MLflow's own
  ``MLFLOW_TRACKING_URI`` (a local ``file:`` store works offline); the resolved config as params and
  as the artifact ``config.yaml``.

Resume continues the same tracked run: the tracker run ids are kept in ``RUN/trackers.json``
(written when a tracker run is created). W&B ignores steps at or before the last one it has (a run
resumed from an earlier checkpoint repeats those steps; the JSONL and TensorBoard are rewritten
exactly, W&B keeps its first values); MLflow appends the repeated steps' values.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path
from typing import Any

from mst_ds import atomic
from mst_ds.config import MSTConfig, UsageError
from mst_ds.run_dir import CONFIG, RunDir

IDS_FILE = "trackers.json"
LOGGERS = ("tensorboard", "wandb", "mlflow")


def _ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / IDS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        raise UsageError(f"{path}: unreadable (not JSON); it names the tracker runs to resume") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise UsageError(f"{path}: expected {{tracker: run id}}")
    return data


def _remember(run_dir: Path, name: str, run_id: str) -> None:
    atomic.write_json(run_dir / IDS_FILE, {**_ids(run_dir), name: run_id}, indent=1)


def identity(run_dir: Path, cfg: MSTConfig) -> dict[str, Any]:
    """What names this run wherever its numbers go."""
    info: dict[str, Any] = {}
    try:
        info = json.loads(RunDir(run_dir).run_info.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    return {"run_dir": str(run_dir.resolve()), "run_name": cfg.run.name, "config_hash": cfg.hash(),
            "git_sha": info.get("git_sha") if isinstance(info, dict) else None, "seed": cfg.run.seed}


class TensorBoard:
    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops TensorBoard events past the resume point.
        self._tb = SummaryWriter(str(RunDir(run_dir).tensorboard), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._tb.add_scalar(f"train/{k}", v, step)
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


def check(run_dir: Path, cfg: MSTConfig) -> None:
    """The pre-flight of ``train --check`` (before any rank starts): every logger of ``run.loggers`` is
    installed and ``RUN/trackers.json``, when present, is readable — one line each, else."""
    for name in cfg.run.loggers:
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"run.loggers lists {name}, which is not installed: pip install '.[{name}]'")
    _ids(run_dir)


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise UsageError(f"run.loggers lists {name}, which is not installed: pip install '.[{name}]'") from None


class WandB:
    def __init__(self, run_dir: Path, cfg: MSTConfig) -> None:
        wandb = _import("wandb")
        run_id = _ids(run_dir).get("wandb") or secrets.token_hex(4)  # W&B ids: lowercase alphanumerics
        (run_dir / "wandb").mkdir(exist_ok=True)
        self._run = wandb.init(project=cfg.run.tracker_project, name=cfg.run.name, id=run_id, resume="allow",
                               dir=str(run_dir), config={**cfg.to_dict(), "identity": identity(run_dir, cfg)},
                               settings=wandb.Settings(console="off", x_disable_stats=True))
        _remember(run_dir, "wandb", run_id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


class MLflow:
    def __init__(self, run_dir: Path, cfg: MSTConfig) -> None:
        mlflow = _import("mlflow")
        self._mlflow = mlflow
        run_id = _ids(run_dir).get("mlflow")
        if run_id is None:
            mlflow.set_experiment(cfg.run.tracker_project)
            run = mlflow.start_run(run_name=cfg.run.name)
            _remember(run_dir, "mlflow", run.info.run_id)
            flat = _flatten(cfg.to_dict())
            mlflow.log_params({k: json.dumps(v)[:500] for k, v in flat.items()})  # MLflow's value limit
            mlflow.set_tags({f"mst_ds.{k}": str(v) for k, v in identity(run_dir, cfg).items()})
            mlflow.log_text(cfg.to_yaml(), CONFIG)
        else:
            mlflow.start_run(run_id=run_id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._mlflow.log_metrics({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_trackers(run_dir: Path, cfg: MSTConfig | None, start_step: int) -> list:
    """The trackers of ``run.loggers`` (TensorBoard alone without a config)."""
    names = cfg.run.loggers if cfg is not None else ["tensorboard"]
    trackers: list = []
    try:
        for name in names:
            if name == "tensorboard":
                trackers.append(TensorBoard(run_dir, start_step))
            elif name == "wandb":
                trackers.append(WandB(run_dir, cfg))
            else:
                trackers.append(MLflow(run_dir, cfg))
    except BaseException:
        for t in trackers:
            t.close()
        raise
    return trackers
