"""Checkpoints of a training run: which one to resume from (compatibility of config and data, the
newest intact one when the newest is damaged, a rollback's newer tags set aside), what a save holds
(engine, teacher, student buffers, counters, loader position) and how a resume restores it. The files
themselves: :mod:`mst_ds.checkpoint`.

``t`` is the training state, :class:`mst_ds.trainer.Training` (the trainer builds it and sits above).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from mst_ds import checkpoint as ckpt
from mst_ds.config import ConfigError, MSTConfig, config_diff, config_from_file
from mst_ds.data.manifest import Manifest, fingerprint_difference
from mst_ds.run_dir import RunDir


def data_identity(cfg: MSTConfig, manifest: Manifest | None = None) -> dict[str, Any]:
    """The training data's fingerprint (:meth:`Manifest.fingerprint`), recorded in every checkpoint
    (``manifest``: the one already read from ``cfg.data.train``)."""
    return (Manifest.load(cfg.data.train) if manifest is None else manifest).fingerprint()


def _written_config(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved config a checkpoint was written with: its meta, else the run's config files."""
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    for path in (RunDir(run_dir).config_of(meta["config_hash"]), RunDir(run_dir).config):
        if path.is_file():
            old = config_from_file(path)
            if old.hash() == meta["config_hash"]:
                return old.to_dict()
    return None


def find_resume(cfg: MSTConfig, ckpt_dir: Path, data_id: dict[str, Any] | None = None, *,
                check_files: bool = True, precision: str | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """(tag, meta) of the checkpoint to resume from, or (None, None). Refuses a different config,
    other training data or another resolved precision than ``precision`` (``engine.precision: auto``
    is fp16 on a V100, bf16 on an A100: the same config) unless checkpoint.allow_config_change. With ``check_files``, a damaged
    newest checkpoint is renamed aside (TAG.damaged) and the newest intact one is used, saying so."""
    if not ckpt.complete_tags(ckpt_dir):
        return None, None
    if not cfg.checkpoint.resume:
        raise ConfigError(f"checkpoint.resume: {ckpt_dir} holds checkpoints and resume is off; use a new --run-dir")
    if not check_files:  # the pre-flight: markers only (reading every file is the ranks' work)
        tag, damaged = ckpt.newest_complete(ckpt_dir), [(t, ckpt.marker_problem(ckpt_dir / t) or "")
                                                         for t in ckpt.complete_tags(ckpt_dir)[-1:]]
    else:
        tag, damaged = ckpt.newest_intact(ckpt_dir)
    if tag is None:
        bad, why = damaged[0]
        raise ConfigError(f"checkpoint: no intact checkpoint in {ckpt_dir} ({bad}: {why}); move the damaged "
                          f"ones away to start over, or use a new --run-dir")
    if check_files:
        for bad, why in damaged:
            aside = ckpt.set_aside(ckpt_dir, bad)
            print(f"mst-ds: warning: checkpoint {bad} is damaged ({why}); moved it to {aside}, resuming from {tag}",
                  file=sys.stderr, flush=True)
    meta = ckpt.read_meta(ckpt_dir / tag)
    allow = cfg.checkpoint.allow_config_change
    if meta["config_hash"] != cfg.hash() and not allow:
        old = _written_config(ckpt_dir.parent, meta)
        what = ", ".join(config_diff(old, cfg.to_dict())) if old is not None else (
            f"config {meta['config_hash']}, this run is {cfg.hash()}")
        raise ConfigError(f"checkpoint: {ckpt_dir / tag} was written with other settings ({what}); use a new "
                          f"--run-dir or --set checkpoint.allow_config_change=true")
    if data_id is not None and isinstance(meta.get("data"), dict) and meta["data"].get("digest") != data_id["digest"] \
            and not allow:
        raise ConfigError(f"data.train: {cfg.data.train} is not the data {tag} was trained on "
                          f"({fingerprint_difference(meta['data'], data_id)}); use a new --run-dir, or --set "
                          f"checkpoint.allow_config_change=true to continue on it")
    saved = meta.get("precision")
    if precision is not None and saved is not None and saved != precision and not allow:
        raise ConfigError(f"checkpoint: {ckpt_dir / tag} was trained in {saved}, this run would train in {precision} "
                          f"(engine.precision: {cfg.engine.precision} on this device); resume where {saved} runs, or "
                          f"--set checkpoint.allow_config_change=true")
    if check_files:
        supersede_newer(ckpt_dir, tag)
    return tag, meta


def supersede_newer(ckpt_dir: Path, tag: str) -> None:
    """A resume from ``tag`` while newer tags exist is a rollback (``latest`` was pointed back): the
    newer tags belong to an abandoned trajectory. They are renamed ``TAG.superseded`` (kept, never
    deleted), so that every tag left, and ``latest``, is on the trajectory the run continues."""
    for newer in ckpt.newer_than(ckpt_dir, tag):
        aside = ckpt.set_aside(ckpt_dir, newer, "superseded")
        print(f"mst-ds: warning: {newer} is newer than {tag}, where this run resumes ({ckpt.LATEST} names an "
              f"older step: a rollback); moved it to {aside}", file=sys.stderr, flush=True)


def resume(t: Any, ckpt_dir: Path, tag: str, meta: dict[str, Any]) -> None:
    """Load engine + teacher + counters (+ this rank's RNG when the world size is unchanged)."""
    same_world = meta["world_size"] == t.world
    if ckpt.needs_universal(meta, t.world, t.cfg.engine.zero_stage):
        tag = ckpt.convert_to_universal(ckpt_dir, tag, t.rank)
    state = ckpt.load(t.engine, ckpt_dir, tag, rank=t.rank, same_world=same_world, gpus=t.platform.device_count)
    t.teacher.load_state_dict(state["teacher"])
    with torch.no_grad():
        for name, buf in t.engine.module.named_buffers():
            buf.copy_(state["student_buffers"][name])
    # The position is the samples seen: with an allowed change of the global batch the schedules
    # continue from the same point of the data, not from the same step number.
    t.step = state["samples"] // t.derived.global_batch
    t.skipped, t.nonfinite = state["skipped"], state["nonfinite"]
    t.corrupt = state.get("corrupt_samples", 0)  # run total over ranks (RUN/corrupt.jsonl holds the samples)
    if not same_world:
        # Per-rank RNG streams cannot be carried over to other ranks: restart them from the position.
        ckpt.seed_everything(ckpt.seed_for(t.cfg.run.seed, t.step, t.rank, 2))


def save(t: Any, ckpt_dir: Path, spe: int) -> str:
    """A complete checkpoint of step t.step (all ranks); spe = optimizer steps per loader epoch."""
    accum = t.derived.grad_accum_steps
    epoch = t.step // spe
    # Student buffers (the DINO center, BN running statistics) travel in client_state too: the universal
    # checkpoint (resume on another world size) restores parameters and optimizer state only.
    buffers = {n: b.detach().cpu().clone() for n, b in t.engine.module.named_buffers()}
    client = {"teacher": t.teacher.state_dict(), "student_buffers": buffers, "step": t.step, "epoch": epoch,
              "skipped": t.skipped, "corrupt_samples": t.corrupt,
              "nonfinite": t.nonfinite, "samples": t.step * t.derived.global_batch, "config_hash": t.cfg.hash()}
    meta = {"world_size": t.world, "zero_stage": t.cfg.engine.zero_stage, "precision": t.precision,
            "config_hash": t.cfg.hash(), "epoch": epoch, "samples": t.step * t.derived.global_batch,
            "data": t.data_id, "config": t.cfg.to_dict()}
    if t.faults.at("kill_in_save", t.step):
        t.engine.save_checkpoint(str(ckpt_dir), tag=ckpt.tag_for(t.step), client_state=client, save_latest=False)
        os.kill(os.getpid(), signal.SIGKILL)
    return ckpt.save(t.engine, ckpt_dir, step=t.step, client_state=client, meta=meta,
                     loader_position={"epoch": t.step // spe, "skip_batches": (t.step % spe) * accum},
                     keep_last=t.cfg.checkpoint.keep_last, rank=t.rank, gpus=t.platform.device_count, faults=t.faults)
