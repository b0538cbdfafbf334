"""The run's lifecycle around the loop of :mod:`mst_ds.train`: check a launch, build the training state
(model, teacher, DeepSpeed engine, EMA, schedules, views), start a run (distributed start, the run lock,
the resume point agreed by every rank, the run files). Resume and save: :mod:`mst_ds.checkpoint_manager`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mst_ds import atomic, job, trackers
from mst_ds import checkpoint as ckpt
from mst_ds import engine as eng
from mst_ds.checkpoint_manager import data_identity, find_resume
from mst_ds.config import ConfigError, Derived, MSTConfig, config_from_file
from mst_ds.data.augment import Photometric
from mst_ds.data.manifest import Manifest
from mst_ds.data.reader import derive_for_training, open_manifest
from mst_ds.ema import EMATeacher
from mst_ds.eval.features import check_labelled
from mst_ds.faults import Faults
from mst_ds.host_memory import keep_freed_memory
from mst_ds.model.mst import MSTModel
from mst_ds.run_dir import RunDir
from mst_ds.schedules import Schedules
from mst_ds.warm_start import warm_start, weights_file


@dataclass
class Training:
    cfg: MSTConfig
    derived: Derived
    engine: Any
    teacher: torch.nn.Module
    ema: EMATeacher
    schedules: Any
    photometric: Any
    gate: eng.GradientGate
    device: torch.device
    rank: int
    world: int
    precision: str
    platform: eng.Platform = field(default_factory=lambda: eng.Platform("cpu"))  # what the accelerator offers
    step: int = 0  # optimizer steps done
    skipped: int = 0  # overflow-skipped steps (fp16 loss scale)
    nonfinite: int = 0  # steps skipped by nan_policy=skip
    corrupt: int = 0
    data_id: dict[str, Any] | None = None  # data_identity(cfg), recorded in every checkpoint
    manifest: Manifest | None = None  # the training data's, read once (setup)
    faults: Faults = field(default_factory=Faults)  # test-only fault injection; none by default
    init_source: dict[str, Any] | None = None  # model.init_from's identity (warm start of a fresh run)


def check_training_data(cfg: MSTConfig) -> Manifest:
    """Fail on a missing or unreadable manifest, a missing shard, or missing monitor data, before paying
    for DeepSpeed's start (one line, exit 2)."""
    if not cfg.data.train:
        raise ConfigError("data.train: no training shards given (write them with `mst-shards write`, then --set data.train=DIR)")
    manifest = open_manifest(cfg.data.train)
    if cfg.model.init_from and not weights_file(Path(cfg.model.init_from)).is_file():
        raise ConfigError(f"model.init_from: {cfg.model.init_from}: no such file (or a folder without its weights)")
    for name in ("bank", "query"):
        source = getattr(cfg.eval.monitor, name)
        if source is not None:
            try:
                check_labelled(source)
            except ConfigError as err:
                raise ConfigError(f"eval.monitor.{name}: {err}") from None
    return manifest


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_files(run_dir: Path, cfg: MSTConfig, derived: Derived, ds_config: dict, precision: str,
                    init_source: dict[str, Any] | None = None) -> None:
    """Resolved config, final DeepSpeed JSON and provenance, written by rank 0 at every (re)start; the
    warm start's source (``init_source``, a fresh run's) is kept over the restarts.

    A relaunch with an allowed config change keeps the previous config as config.<its hash>.yaml, so the
    checkpoints written under it can still be described."""
    import deepspeed  # not at the top: DeepSpeed picks its accelerator when imported (after run() sets DS_ACCELERATOR)

    run = RunDir(run_dir)
    if run.config.exists():
        previous = config_from_file(run.config)
        if previous.hash() != cfg.hash():
            atomic.write_text(run.config_of(previous.hash()), previous.to_yaml())
    if init_source is None and run.run_info.is_file():
        try:
            init_source = json.loads(run.run_info.read_text()).get("init_from")
        except (json.JSONDecodeError, AttributeError):
            init_source = None  # an unreadable run_info.json of ours is rewritten below
    atomic.write_text(run.config, cfg.to_yaml())
    atomic.write_json(run.ds_config, ds_config, indent=1)
    info = {"git_sha": git_sha(), "config_hash": cfg.hash(), "precision": precision, "derived": derived.as_dict(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "argv": sys.argv, "time": time.time()}
    if init_source is not None:
        info["init_from"] = init_source
    atomic.write_json(run.run_info, info, indent=1)
    atomic.write_text(run.git_sha, info["git_sha"] + "\n")


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (unchanged in a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def check(cfg: MSTConfig, run_dir: Path, *, probe_lock: bool = True) -> None:
    """Everything a launch can get wrong before any rank starts (one line, exit 2): the config, the
    training data, the run directory's lock and resume compatibility; then DeepSpeed's CPU comm op is
    built once, so ranks never compile it side by side."""
    manifest = check_training_data(cfg)
    if probe_lock:
        job.probe(run_dir)
    trackers.check(run_dir, cfg)  # run.loggers installed, trackers.json readable: not on rank 0 after start
    find_resume(cfg, RunDir(run_dir).checkpoints, data_identity(cfg, manifest), check_files=False)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        job.build_comm_op()


def build_training(cfg: MSTConfig, derived: Derived, *, load_universal: bool = False,
                   warm: bool = False, platform: eng.Platform | None = None) -> tuple[Training, dict]:
    """Model, teacher (copied before ``deepspeed.initialize``), engine, EMA → (Training, ds_config).
    ``warm``: a fresh run, whose weights come from ``model.init_from`` when given (the teacher copies them).

    torch.distributed must be started (:func:`mst_ds.engine.init_distributed`, which bound the device).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.engine.nan_policy == "skip" and cfg.engine.grad_accum_steps != 1:
        raise ConfigError("engine.nan_policy: skip needs engine.grad_accum_steps=1 (a partly accumulated step cannot be undone)")
    platform = platform or eng.Platform.current()
    precision = eng.resolve_precision(cfg.engine.precision, platform)
    dev = eng.device(platform)
    if dev.type == "cpu":  # no caching allocator: keep the step's freed memory instead of re-faulting it
        keep_freed_memory()
    ckpt.seed_everything(cfg.run.seed)  # identical initial weights on every rank
    model = MSTModel.from_config(cfg)
    init_source = warm_start(model, cfg.model.init_from, cfg.model.init_from_parts, say=rank == 0) \
        if warm and cfg.model.init_from else None
    model, _ = eng.convert_sync_bn(model, world, cfg.engine.sync_bn, dev)
    # before deepspeed.initialize (SPEC §7); fp32 weights, its forward in the run's compute dtype (as DINO)
    teacher = model.make_teacher(eng.autocast_dtype(precision)).to(dev)
    engine, ds_config = eng.build_engine(model.to(dev), cfg, derived, precision, load_universal=load_universal)
    low = precision in ("bf16", "fp16")
    t = Training(cfg=cfg, derived=derived, engine=engine, teacher=teacher,
                 ema=EMATeacher(teacher, engine.module, zero_stage=cfg.engine.zero_stage, low_precision=low,
                                optimizer=engine.optimizer),
                 schedules=Schedules.from_config(cfg, derived), photometric=Photometric.from_config(cfg.augment),
                 gate=eng.GradientGate(eng.frozen_params(engine.module)), device=dev, rank=rank, world=world,
                 precision=precision, init_source=init_source, platform=platform)
    return t, ds_config


def setup(cfg: MSTConfig, run_dir: Path, lock: job.RunLock, manifest: Manifest | None = None,
          platform: eng.Platform | None = None) -> tuple[Training, str | None, dict[str, Any] | None]:
    """Distributed start (this rank's device bound first: every collective after it), the run-directory
    lock (rank 0), the training state, run files; the resume point (tag, meta) if any. ``manifest``: the
    training data's, when the caller read it already; ``platform``: the accelerator's (asked if None)."""
    platform = platform or eng.Platform.current()
    rank, world = eng.init_distributed(platform)
    precision = eng.resolve_precision(cfg.engine.precision, platform)
    if manifest is None and cfg.data.train:
        manifest = open_manifest(cfg.data.train)  # read once per process, passed on
    derived = derive_for_training(cfg, world, manifest)
    ckpt_dir = RunDir(run_dir).checkpoints
    found: tuple[Any, Any, Any] | str = (None, None, None)
    if rank == 0:
        try:
            lock.acquire()  # held by rank 0 for the run's life: a second job on RUN is refused
            data_id = data_identity(cfg, manifest)
            found = (*find_resume(cfg, ckpt_dir, data_id, precision=precision), data_id)
        except ConfigError as err:
            found = str(err)
    found = broadcast(found)  # every rank stops on a refused resume, not only rank 0
    if isinstance(found, str):
        job.stop_together(ConfigError(found), rank)  # rank 0 says why, in one line
    tag, meta, data_id = found
    universal = meta is not None and ckpt.needs_universal(meta, world, cfg.engine.zero_stage)
    t, ds_config = build_training(cfg, derived, load_universal=universal, warm=tag is None, platform=platform)
    t.data_id, t.manifest = data_id, manifest
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_files(run_dir, cfg, derived, ds_config, t.precision, t.init_source)
    return t, tag, meta
