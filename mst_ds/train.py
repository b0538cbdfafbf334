"""``mst-ds train``: MST pre-training on the DeepSpeed engine (Algorithm 1), resumable bit-exactly.

One process per rank (launched by ``deepspeed``/``torchrun``/``launch.sh``, or bare for one CPU process).
The step (:func:`train_step`) is Algorithm 1: schedules → photometric views → engine forward (teacher
once, attention-guided masks, student, decoder, losses) → backward → step → EMA teacher → metrics.

Reproducibility: every random draw of a step comes from generators seeded by (seed, step, micro-batch,
rank) or from the per-rank global RNG, which checkpoints save; the loader resumes by skipping the
micro-batches already consumed in the epoch. A run killed at any moment and relaunched with the same
command ends bit-identical to one that never stopped.

Steps are counted from 1 in messages, metrics and checkpoint tags (step N = the N-th optimizer step;
``t.step`` = steps done, which is also the 0-based index of the step being run for the schedules).
Fault injection for the tests: ``Training.faults`` (:mod:`mst_ds.faults`, read from the environment
once when :func:`train` starts): ``nan@N``, ``kill_in_save@N``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mst_ds import atomic, job
from mst_ds import checkpoint as ckpt
from mst_ds import engine as eng
from mst_ds.config import ConfigError, Derived, MSTConfig, config_diff, config_from_file, load_config
from mst_ds.data.manifest import Manifest, fingerprint_difference
from mst_ds.data.reader import derive_for_training
from mst_ds.ema import EMATeacher
from mst_ds.faults import Faults
from mst_ds.health import RunHealth
from mst_ds.metrics import MODEL_SCALARS, MetricsLogger, peak_memory_mb
from mst_ds.run_dir import RunDir

# Scalars all-reduced (averaged over ranks) at every micro-batch; two more slots flag a non-finite loss
# and a stop signal (SIGTERM/SIGUSR1) on some rank.
_STAT_KEYS = MODEL_SCALARS


class NonFiniteLoss(RuntimeError):
    pass


def seed_for(*parts: int) -> int:
    """A stable 63-bit seed from integers (crc32 chain; never Python's hash())."""
    h = 0
    for p in parts:
        h = zlib.crc32(int(p).to_bytes(8, "little", signed=False), h)
    return (h << 31) ^ zlib.crc32(repr(parts).encode())


def step_generator(seed: int, step: int, micro: int, rank: int, purpose: int) -> torch.Generator:
    """CPU generator of one micro-batch's draws (purpose 0: photometric, 1: masks)."""
    return torch.Generator().manual_seed(seed_for(seed, step, micro, rank, purpose))


# --------------------------------------------------------------------------------------------------
# The training state
# --------------------------------------------------------------------------------------------------
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
    step: int = 0  # optimizer steps done
    skipped: int = 0  # overflow-skipped steps (fp16 loss scale)
    nonfinite: int = 0  # steps skipped by nan_policy=skip
    corrupt: int = 0
    data_id: dict[str, Any] | None = None  # data_identity(cfg), recorded in every checkpoint
    faults: Faults = field(default_factory=Faults)  # test-only fault injection; none by default


def _all_mean(values: torch.Tensor) -> torch.Tensor:
    """(k,) float64 → mean over ranks (sum for the flag slot is recovered by × world)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def _stat_vector(loss: torch.Tensor, losses: dict[str, torch.Tensor], stop_vote: float) -> torch.Tensor:
    """(len(_STAT_KEYS) + 2,) float64 on the loss's device (NCCL reduces device tensors only):
    the logged scalars, then 1.0 if this rank's loss is not finite, then this rank's stop vote."""
    values = [loss.detach()] + [losses[k].detach() for k in _STAT_KEYS[1:]]
    flag = (~torch.isfinite(loss.detach())).to(loss.device)
    vote = torch.tensor(stop_vote, dtype=torch.float64, device=loss.device)
    return torch.stack([v.to(loss.device, torch.float64).reshape(()) for v in values] + [flag.double(), vote])


def _grad_norm(engine) -> float:
    g = engine.get_global_grad_norm()
    return float(g) if g is not None else float("nan")


def train_step(t: Training, batches: list[dict[str, Any]], stop: job.StopSignals | None = None) -> dict[str, float]:
    """One optimizer step of Algorithm 1 over ``grad_accum_steps`` micro-batches → logged scalars.

    batches: micro-batches of dict(global=[uint8 (B,3,G,G)]*2, local=[uint8 (B,3,L,L)]*n).
    Raises NonFiniteLoss (all ranks together) when a loss is NaN/Inf and nan_policy is "stop".
    ``stop``: its vote rides in the step's all-reduce; ``stop.agreed`` is set on every rank alike.
    """
    cfg, step = t.cfg, t.step
    s = t.schedules.at(step)
    eng.apply_schedule(t.engine.optimizer, t.gate, s)  # lr / wd per group; last-layer freeze (DINO's semantics)
    dino_loss = t.engine.module.dino_loss
    sums = torch.zeros(len(_STAT_KEYS), dtype=torch.float64, device=t.device)
    norm0 = None
    for micro, batch in enumerate(batches):
        u8 = [v.to(t.device, non_blocking=True) for v in batch["global"] + batch["local"]]
        views = t.photometric(u8, step_generator(cfg.run.seed, step, micro, t.rank, 0))
        losses = t.engine(views, t.teacher, s.teacher_temp, step_generator(cfg.run.seed, step, micro, t.rank, 1))
        loss = losses["loss"] * float("nan") if (t.rank == 0 and t.faults.at("nan", step + 1)) else losses["loss"]
        # One small collective: the logged scalars, the non-finite vote and the stop vote.
        local = _all_mean(_stat_vector(loss, losses, stop.vote() if stop is not None else 0.0))
        if stop is not None and local[-1] > 0:
            stop.agreed = True
        if local[-2] > 0:  # some rank saw a non-finite loss: every rank decides the same
            if cfg.engine.nan_policy == "stop":
                raise NonFiniteLoss(f"non-finite loss at step {step + 1} (micro-batch {micro}) on "
                                    f"{round(float(local[-2]) * t.world)} rank(s)")
            t.nonfinite += 1  # skip: no backward, no step, no EMA (grad_accum_steps is 1, checked)
            dino_loss.discard_pending_center()
            t.step += 1
            return {"nonfinite_steps": t.nonfinite}
        t.engine.backward(loss)
        if micro == len(batches) - 1:
            norm0 = eng.grad_norm_stage0(t.engine)
            if cfg.optim.clip_mode == "per_param" and cfg.optim.clip_grad > 0:
                eng.clip_per_param(t.engine, cfg.optim.clip_grad)  # DINO's clip_gradients; DeepSpeed's is off
        t.engine.step()
        sums += local[:-2]
    if not t.engine.was_step_applied():
        t.skipped += 1  # fp16 overflow: DeepSpeed skipped the update and lowered the loss scale
    dino_loss.update_center()  # once per optimizer step, from the whole global batch (DINO)
    t.ema.update(s.momentum)  # f_t = m·f_t + (1 − m)·f_s, momentum of this step
    t.step += 1
    stats = dict(zip(_STAT_KEYS, (sums / len(batches)).cpu().tolist()))
    stats.update(lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum, teacher_temp=s.teacher_temp,
                 grad_norm=norm0 if norm0 is not None else _grad_norm(t.engine), loss_scale=eng.loss_scale(t.engine),
                 skipped_steps=t.skipped, nonfinite_steps=t.nonfinite)
    return stats


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------
def check_training_data(cfg: MSTConfig) -> None:
    """Fail on a missing or unreadable manifest, a missing shard, or missing monitor data, before paying
    for DeepSpeed's start (one line, exit 2)."""
    from mst_ds.data.reader import open_manifest
    from mst_ds.eval.features import check_labelled

    if not cfg.data.train:
        raise ConfigError("data.train: no training shards given (write them with `mst-shards write`, then --set data.train=DIR)")
    open_manifest(cfg.data.train)
    for name in ("bank", "query"):
        source = getattr(cfg.eval.monitor, name)
        if source is not None:
            try:
                check_labelled(source)
            except ConfigError as err:
                raise ConfigError(f"eval.monitor.{name}: {err}") from None


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_files(run_dir: Path, cfg: MSTConfig, derived: Derived, ds_config: dict, precision: str) -> None:
    """Resolved config, final DeepSpeed JSON and provenance, written by rank 0 at every (re)start.

    A relaunch with an allowed config change keeps the previous config as config.<its hash>.yaml, so the
    checkpoints written under it can still be described."""
    import deepspeed

    run = RunDir(run_dir)
    if run.config.exists():
        previous = config_from_file(run.config)
        if previous.hash() != cfg.hash():
            atomic.write_text(run.config_of(previous.hash()), previous.to_yaml())
    atomic.write_text(run.config, cfg.to_yaml())
    atomic.write_json(run.ds_config, ds_config, indent=1)
    info = {"git_sha": git_sha(), "config_hash": cfg.hash(), "precision": precision, "derived": derived.as_dict(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "argv": sys.argv, "time": time.time()}
    atomic.write_json(run.run_info, info, indent=1)
    atomic.write_text(run.git_sha, info["git_sha"] + "\n")


def _broadcast(obj: Any) -> Any:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def data_identity(cfg: MSTConfig) -> dict[str, Any]:
    """The training data's fingerprint (:meth:`Manifest.fingerprint`), recorded in every checkpoint."""
    return Manifest.load(cfg.data.train).fingerprint()


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
                check_files: bool = True) -> tuple[str | None, dict[str, Any] | None]:
    """(tag, meta) of the checkpoint to resume from, or (None, None). Refuses a different config or
    other training data (unless checkpoint.allow_config_change). With ``check_files``, a damaged
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


def check(cfg: MSTConfig, run_dir: Path, *, probe_lock: bool = True) -> None:
    """Everything a launch can get wrong before any rank starts (one line, exit 2): the config, the
    training data, the run directory's lock and resume compatibility; then DeepSpeed's CPU comm op is
    built once, so ranks never compile it side by side."""
    check_training_data(cfg)
    if probe_lock:
        job.probe(run_dir)
    find_resume(cfg, RunDir(run_dir).checkpoints, data_identity(cfg), check_files=False)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        job.build_comm_op()


def build_training(cfg: MSTConfig, derived: Derived, *, load_universal: bool = False) -> tuple[Training, dict]:
    """Model, teacher (copied before ``deepspeed.initialize``), engine, EMA → (Training, ds_config).

    torch.distributed must be started (:func:`mst_ds.engine.init_distributed`).
    """
    from mst_ds.data.augment import Photometric
    from mst_ds.model.mst import MSTModel
    from mst_ds.schedules import Schedules

    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.engine.nan_policy == "skip" and cfg.engine.grad_accum_steps != 1:
        raise ConfigError("engine.nan_policy: skip needs engine.grad_accum_steps=1 (a partly accumulated step cannot be undone)")
    precision = eng.resolve_precision(cfg.engine.precision, eng.DeviceInfo.current())
    dev = eng.device()
    ckpt.seed_everything(cfg.run.seed)  # identical initial weights on every rank
    model = MSTModel.from_config(cfg)
    model, _ = eng.convert_sync_bn(model, world, cfg.engine.sync_bn, dev)
    teacher = model.make_teacher().to(dev)  # before deepspeed.initialize (SPEC §7)
    engine, ds_config = eng.build_engine(model.to(dev), cfg, derived, precision, load_universal=load_universal)
    low = precision in ("bf16", "fp16")
    t = Training(cfg=cfg, derived=derived, engine=engine, teacher=teacher,
                 ema=EMATeacher(teacher, engine.module, zero_stage=cfg.engine.zero_stage, low_precision=low),
                 schedules=Schedules.from_config(cfg, derived), photometric=Photometric.from_config(cfg.augment),
                 gate=eng.GradientGate(eng.frozen_params(engine.module)), device=dev, rank=rank, world=world,
                 precision=precision)
    return t, ds_config


def setup(cfg: MSTConfig, run_dir: Path, lock: job.RunLock) -> tuple[Training, str | None, dict[str, Any] | None]:
    """Distributed start, the run-directory lock (rank 0), the training state, run files; the resume
    point (tag, meta) if any."""
    rank, world = eng.init_distributed()
    derived = derive_for_training(cfg, world)
    ckpt_dir = RunDir(run_dir).checkpoints
    found: tuple[Any, Any, Any] | str = (None, None, None)
    if rank == 0:
        try:
            lock.acquire()  # held by rank 0 for the run's life: a second job on RUN is refused
            data_id = data_identity(cfg)
            found = (*find_resume(cfg, ckpt_dir, data_id), data_id)
        except ConfigError as err:
            found = str(err)
    found = _broadcast(found)  # every rank stops on a refused resume, not only rank 0
    if isinstance(found, str):
        job.stop_together(ConfigError(found), rank)  # rank 0 says why, in one line
    tag, meta, data_id = found
    universal = meta is not None and ckpt.needs_universal(meta, world, cfg.engine.zero_stage)
    t, ds_config = build_training(cfg, derived, load_universal=universal)
    t.data_id = data_id
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_files(run_dir, cfg, derived, ds_config, t.precision)
    return t, tag, meta


def resume(t: Training, ckpt_dir: Path, tag: str, meta: dict[str, Any]) -> None:
    """Load engine + teacher + counters (+ this rank's RNG when the world size is unchanged)."""
    same_world = meta["world_size"] == t.world
    if ckpt.needs_universal(meta, t.world, t.cfg.engine.zero_stage):
        tag = ckpt.convert_to_universal(ckpt_dir, tag, t.rank)
    state = ckpt.load(t.engine, ckpt_dir, tag, rank=t.rank, same_world=same_world)
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
        ckpt.seed_everything(seed_for(t.cfg.run.seed, t.step, t.rank, 2))


def save(t: Training, ckpt_dir: Path, spe: int) -> str:
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
                     keep_last=t.cfg.checkpoint.keep_last, rank=t.rank, faults=t.faults)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def _micro_batches(loader, accum: int):
    """Group the loader's micro-batches into optimizer steps of ``accum``."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


def train(cfg: MSTConfig, run_dir: Path, *, progress: bool = True, stop: job.StopSignals | None = None,
          faults: Faults | None = None) -> int:
    """Train (or resume) to the end of the schedule / max_steps → exit code (0 ok, 1 non-finite loss,
    job.EXIT_STOPPED stopped by ``stop``'s signals with a checkpoint of the last step).
    ``faults``: test-only fault injection, by default read from the environment here, once."""
    run_dir = Path(run_dir)
    lock = job.RunLock(run_dir)
    try:
        return _train(cfg, run_dir, lock, progress=progress, stop=stop or job.StopSignals(),
                      faults=faults or Faults.from_env())
    finally:
        lock.release()


def _train(cfg: MSTConfig, run_dir: Path, lock: job.RunLock, *, progress: bool, stop: job.StopSignals,
           faults: Faults) -> int:
    from mst_ds.data.corrupt import CorruptLog
    from mst_ds.data.reader import make_train_loader

    t, tag, meta = setup(cfg, run_dir, lock)
    t.faults = faults
    ckpt_dir = RunDir(run_dir).checkpoints
    if tag is not None:
        resume(t, ckpt_dir, tag, meta)
    d = t.derived
    end = min(d.total_steps, cfg.run.max_steps or d.total_steps)

    def loader_at(step: int):
        epoch, pos = divmod(step, spe)
        return epoch, make_train_loader(cfg.data.train, cfg, rank=t.rank, world_size=t.world, micro_batch=d.micro_batch,
                                        epoch=epoch, skip_batches=pos * d.grad_accum_steps)

    spe = d.steps_per_epoch  # the loader's plan (derive_for_training): schedules and epochs agree
    log = MetricsLogger(run_dir, enabled=t.rank == 0, start_step=t.step, total_steps=end,
                        steps_per_epoch=spe, progress=progress, cfg=cfg)
    corrupt = CorruptLog(run_dir, rank=t.rank, total=t.corrupt, start_step=t.step)
    started = time.monotonic()
    deadline = started + cfg.run.time_limit_min * 60 if cfg.run.time_limit_min else None
    health = RunHealth(t, run_dir, end=end)  # diagnostics, online k-NN, alerts (issue 10)
    try:
        health.start(t, log)
        while t.step < end:
            epoch, loader = loader_at(t.step)
            if len(loader) < d.grad_accum_steps:
                raise RuntimeError(f"the loader of epoch {epoch} has no batch left at step {t.step} (plan mismatch)")
            tick, tick_step, paused = time.monotonic(), t.step, 0.0  # paused: monitor and saves, not training
            for batches in _micro_batches(loader, d.grad_accum_steps):
                health.arm(t.step + 1)
                try:
                    stats = train_step(t, batches, stop)
                except NonFiniteLoss as err:
                    health.nonfinite(t.step + 1)
                    if t.rank == 0:
                        print(f"mst-ds: error: {err}; stopping without saving (last good checkpoint: "
                              f"{ckpt.newest_complete(ckpt_dir) or 'none'})", file=sys.stderr)
                    return 1
                corrupt.collect(loader, t.step, epoch)
                # Rank 0's clock decides for all (ranks must stop at the same step); without a time
                # limit there is no collective here, so a cluster run pays no extra sync per step.
                time_up = deadline is not None and bool(_broadcast(time.monotonic() > deadline))
                epoch_end = t.step % spe == 0
                log_now = t.step % cfg.run.log_every == 0 or t.step == end
                if health.observe(t, stats, epoch=epoch, epoch_end=epoch_end, log_now=log_now):
                    t.corrupt = corrupt.sync()  # all ranks: the same steps
                    now = time.monotonic()
                    paused += stats.get("monitor_s", 0.0)
                    stats.update(corrupt_samples=t.corrupt, peak_mem_mb=peak_memory_mb(t.device),
                                 img_per_s=(t.step - tick_step) * d.global_batch / max(now - tick - paused, 1e-9))
                    tick, tick_step, paused = now, t.step, 0.0
                    log.log(t.step, epoch, stats)
                log.progress(t.step, epoch, stats)
                every = cfg.checkpoint.every_steps and t.step % cfg.checkpoint.every_steps == 0
                at_epoch = epoch_end and cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0
                if every or at_epoch or t.step == end or time_up or health.stop or stop.agreed:
                    t.corrupt = corrupt.sync()  # the saved total covers every record in corrupt.jsonl
                    saving = time.monotonic()
                    save(t, ckpt_dir, spe)
                    paused += time.monotonic() - saving
                if health.stop:
                    if t.rank == 0:
                        print(f"mst-ds: error: stopped at step {t.step} on a health alert (run.on_alert=stop; "
                              f"{RunDir(run_dir).alerts}); checkpoint {ckpt.tag_for(t.step)} saved", file=sys.stderr)
                    return 1
                if time_up:
                    return 0
                if stop.agreed and t.step < end:
                    if t.rank == 0:
                        print(f"mst-ds: stopped by {stop.requested or 'a stop signal on another rank'} after step "
                              f"{t.step}; checkpoint {ckpt.tag_for(t.step)} saved, relaunch to resume "
                              f"(exit {job.EXIT_STOPPED})", file=sys.stderr, flush=True)
                    return job.EXIT_STOPPED
                if t.step >= end or epoch_end:
                    break
    finally:
        log.close()
    return 0


def run(args) -> int:
    """``mst-ds train --preset NAME [--set k=v ...] [--run-dir DIR]``."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = load_config(args.preset, args.sets).config
    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.run.output_dir) / cfg.run.name
    launched = "LOCAL_RANK" in os.environ or os.environ.get("SLURM_PROCID", "0") != "0"
    # Before DeepSpeed loads its comm op: every rank loads from where the pre-flight built (one note, not N).
    job.use_extensions_dir(announce=getattr(args, "check", False) or not launched,
                           required=os.environ.get("DS_ACCELERATOR") == "cpu")
    if getattr(args, "check", False):
        check(cfg, run_dir, probe_lock=os.environ.get("MST_DS_NODE_RANK", "0") == "0")
        return 0
    check_training_data(cfg)
    stop = job.StopSignals().install()  # SIGTERM/SIGUSR1: finish the step, save it, exit EXIT_STOPPED
    if "LOCAL_RANK" in os.environ:  # started by a launcher: die with it, never train on as an orphan
        job.die_with_launcher(stop)
    return train(cfg, run_dir, stop=stop)
