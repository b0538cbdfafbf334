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
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mst_ds import atomic, cost, determinism, job
from mst_ds import checkpoint as ckpt
from mst_ds import engine as eng
from mst_ds.checkpoint_manager import resume, save
from mst_ds.config import ConfigError, MSTConfig, load_config
from mst_ds.data.corrupt import CorruptLog
from mst_ds.data.manifest import Manifest
from mst_ds.data.reader import make_train_loader
from mst_ds.faults import Faults
from mst_ds.health import RunHealth
from mst_ds.metrics import MODEL_SCALARS, MetricsLogger, Throughput, device_peak_tflops, peak_memory_gb
from mst_ds.run_dir import RunDir
from mst_ds.trainer import Training, broadcast, check, check_training_data, setup

# Scalars all-reduced (averaged over ranks) at every micro-batch; two more slots flag a non-finite loss
# and a stop signal (SIGTERM/SIGUSR1) on some rank.
_STAT_KEYS = MODEL_SCALARS


class NonFiniteLoss(RuntimeError):
    pass


def step_generator(seed: int, step: int, micro: int, rank: int, purpose: int) -> torch.Generator:
    """CPU generator of one micro-batch's draws (purpose 0: photometric, 1: masks)."""
    return torch.Generator().manual_seed(ckpt.seed_for(seed, step, micro, rank, purpose))


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------
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


def _timed(items, clock: Throughput):
    """``items`` unchanged; the time each ``next`` blocks (waiting for the loader) goes to ``clock.wait``."""
    it = iter(items)
    while True:
        start = time.monotonic()
        try:
            item = next(it)
        except StopIteration:
            return
        clock.wait(time.monotonic() - start)
        yield item


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value's maximum over the ranks (one small all-reduce; every rank calls it at the same steps)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    box = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return box.cpu().tolist()


def flops_per_image(cfg: MSTConfig) -> float | None:
    """Model FLOPs of one training image in one MST step (:func:`mst_ds.cost.flops_per_image`, the count
    ``plan`` prices with; checked against torch's FlopCounterMode in tests); None for an architecture the
    count does not model (no MFU then, the run goes on)."""
    try:
        return cost.flops_per_image(cfg)
    except ConfigError:
        return None


def train(cfg: MSTConfig, run_dir: Path, *, progress: bool = True, stop: job.StopSignals | None = None,
          faults: Faults | None = None, manifest: Manifest | None = None) -> int:
    """Train (or resume) to the end of the schedule / max_steps → exit code (0 ok, 1 non-finite loss,
    job.EXIT_STOPPED stopped by ``stop``'s signals with a checkpoint of the last step).
    ``faults``: test-only fault injection, by default read from the environment here, once.
    ``manifest``: the training data's, when the caller read it already (else read here, once)."""
    run_dir = Path(run_dir)
    lock = job.RunLock(run_dir)
    code, why = 1, None
    try:
        code = _train(cfg, run_dir, lock, progress=progress, stop=stop or job.StopSignals(),
                      faults=faults or Faults.from_env(), manifest=manifest)
        return code
    except BaseException as err:
        code, why = _exit_code(err), (str(err).splitlines() or [type(err).__name__])[0]
        raise
    finally:
        if lock.fd is not None:  # this process holds the run (rank 0): say how the job ended, for `mst-ds status`
            atomic.write_json(RunDir(run_dir).exit, {"code": code, "error": why, "time": time.time()})
        lock.release()


def _exit_code(err: BaseException) -> int:
    """The exit code ``mst-ds`` ends with when ``err`` leaves :func:`train` (see mst_ds.cli.main)."""
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else 1
    return 130 if isinstance(err, KeyboardInterrupt) else 2 if isinstance(err, ConfigError) else 1


def _train(cfg: MSTConfig, run_dir: Path, lock: job.RunLock, *, progress: bool, stop: job.StopSignals,
           faults: Faults, manifest: Manifest | None) -> int:
    determinism.apply(cfg.run.deterministic)  # before any CUDA work: cuBLAS reads its workspace setting once
    t, tag, meta = setup(cfg, run_dir, lock, manifest)
    t.faults = faults
    if tag is not None:
        resume(t, RunDir(run_dir).checkpoints, tag, meta)
    return Loop(t, RunDir(run_dir), stop, progress=progress).run()


class Loop:
    """The loop of one run after setup and resume (DINO's ``train_one_epoch``, per loader epoch): for each
    step, step, observe, log, maybe save, then the stop checks. Every rank runs it alike; whatever ends the
    loop is decided the same at the same step on every rank (a collective or a step number)."""

    def __init__(self, t: Training, run: RunDir, stop: job.StopSignals, *, progress: bool) -> None:
        cfg, d = t.cfg, t.derived
        self.t, self.run_dir, self.stop = t, run, stop
        self.end = min(d.total_steps, cfg.run.max_steps or d.total_steps)
        self.spe = d.steps_per_epoch  # the loader's plan (derive_for_training): schedules and epochs agree
        self.log = MetricsLogger(run.root, enabled=t.rank == 0, start_step=t.step, total_steps=self.end,
                                 steps_per_epoch=self.spe, progress=progress, cfg=cfg)
        self.corrupt = CorruptLog(run.root, rank=t.rank, total=t.corrupt, start_step=t.step)
        self.deadline = time.monotonic() + cfg.run.time_limit_min * 60 if cfg.run.time_limit_min else None
        self.health = RunHealth(t, run.root, end=self.end)  # diagnostics, online k-NN, alerts (issue 10)
        # MFU where a device peak is known (a GPU in the table, or run.peak_tflops); only rank 0 logs it.
        peak = device_peak_tflops(t.device, t.precision, cfg.run.peak_tflops) if t.rank == 0 else None
        self.clock = Throughput(t.step, world=t.world, peak_tflops=peak,
                                flops_per_image=flops_per_image(cfg) if peak else None)
        if t.rank == 0:  # a job holds the run now: the previous job's ending no longer describes it
            if run.exit.is_file() and not run.exit.is_symlink():  # the record this code writes, never a link's target
                run.exit.unlink()

    def run(self) -> int:
        """Train to ``end`` → exit code (0, 1 on a non-finite loss or a health stop, job.EXIT_STOPPED)."""
        try:
            self.health.start(self.t, self.log)
            while self.t.step < self.end:
                code = self.train_one_epoch()
                if code is not None:
                    return code
        finally:
            self.log.close()
        return 0

    def train_one_epoch(self) -> int | None:
        """The steps of the loader epoch ``t.step`` lies in, up to its end or ``end`` → an exit code to
        stop with, or None to go on."""
        t = self.t
        epoch, loader = self.loader_at(t.step)
        self.clock.restart(t.step)
        for batches in _timed(_micro_batches(loader, t.derived.grad_accum_steps), self.clock):
            stats = self.step(batches)
            if stats is None:
                return 1
            self.corrupt.collect(loader, t.step, epoch)
            time_up = self.time_up()
            epoch_end = t.step % self.spe == 0
            self.observe(stats, epoch, epoch_end)
            if self.save_due(epoch, epoch_end) or time_up or self.health.stop or self.stop.agreed:
                self.save_checkpoint()
            code = self.stop_code(time_up)
            if code is not None:
                return code
            if t.step >= self.end or epoch_end:
                break
        return None

    def loader_at(self, step: int):
        """(epoch, the training loader positioned at ``step``: the epoch's consumed micro-batches skipped)."""
        t, d = self.t, self.t.derived
        epoch, pos = divmod(step, self.spe)
        loader = make_train_loader(t.cfg.data.train, t.cfg, rank=t.rank, world_size=t.world, micro_batch=d.micro_batch,
                                   epoch=epoch, skip_batches=pos * d.grad_accum_steps, manifest=t.manifest,
                                   pin_memory=t.platform.kind != "cpu")
        if len(loader) < d.grad_accum_steps:
            raise RuntimeError(f"the loader of epoch {epoch} has no batch left at step {step} (plan mismatch)")
        return epoch, loader

    def step(self, batches: list[dict[str, Any]]) -> dict[str, float] | None:
        """:func:`train_step` → its scalars, or None after a non-finite loss (said on rank 0; no save)."""
        t = self.t
        self.health.arm(t.step + 1)
        try:
            return train_step(t, batches, self.stop)
        except NonFiniteLoss as err:
            self.health.nonfinite(t.step + 1)
            if t.rank == 0:
                print(f"mst-ds: error: {err}; stopping without saving (last good checkpoint: "
                      f"{ckpt.newest_complete(self.run_dir.checkpoints) or 'none'})", file=sys.stderr)
            return None

    def time_up(self) -> bool:
        """Rank 0's clock decides for all (ranks must stop at the same step); without a time limit there is
        no collective here, so a cluster run pays no extra sync per step."""
        return self.deadline is not None and bool(broadcast(time.monotonic() > self.deadline))

    def observe(self, stats: dict[str, float], epoch: int, epoch_end: bool) -> None:
        """Health (diagnostics, monitor, alerts) on every step; on logged steps the run's counters and
        throughput join the scalars and go to metrics.jsonl and the trackers; the progress line."""
        t = self.t
        log_now = t.step % t.cfg.run.log_every == 0 or t.step == self.end
        logged = self.health.observe(t, stats, epoch=epoch, epoch_end=epoch_end, log_now=log_now)
        if logged:
            t.corrupt = self.corrupt.sync()  # all ranks: the same steps
            self.clock.pause(stats.get("monitor_s", 0.0))
            stats.update(corrupt_samples=t.corrupt, **self.throughput())
            self.log.log(t.step, epoch, stats)
        self.log.progress(t.step, epoch, stats, logged=logged)

    def throughput(self) -> dict[str, float]:
        """Throughput since the last logged step; the data-wait share and peak memory are the highest of
        any rank (the slowest loader, the fullest device: one small all-reduce, on logged steps only)."""
        t = self.t
        rates = self.clock.rates(t.step, t.derived.global_batch)
        rates["data_wait_share"], rates["peak_mem_gb"] = _max_over_ranks(
            [rates["data_wait_share"], peak_memory_gb(t.device)], t.device)
        return rates

    def save_due(self, epoch: int, epoch_end: bool) -> bool:
        """The schedule of checkpoint.every_steps / every_epochs, and the last step."""
        t, c = self.t, self.t.cfg.checkpoint
        every = c.every_steps and t.step % c.every_steps == 0
        at_epoch = epoch_end and c.every_epochs and (epoch + 1) % c.every_epochs == 0
        return bool(every or at_epoch or t.step == self.end)

    def save_checkpoint(self) -> None:
        t = self.t
        t.corrupt = self.corrupt.sync()  # the saved total covers every record in corrupt.jsonl
        saving = time.monotonic()
        save(t, self.run_dir.checkpoints, self.spe)
        self.clock.pause(time.monotonic() - saving)

    def stop_code(self, time_up: bool) -> int | None:
        """The exit code when the run stops after this step (saved): a health stop, the time limit, a stop
        signal before the end; None to go on."""
        t = self.t
        if self.health.stop:
            if t.rank == 0:
                print(f"mst-ds: error: stopped at step {t.step} on a health alert (run.on_alert=stop; "
                      f"{self.run_dir.alerts}); checkpoint {ckpt.tag_for(t.step)} saved", file=sys.stderr)
            return 1
        if time_up:
            return 0
        if self.stop.agreed and t.step < self.end:
            if t.rank == 0:
                print(f"mst-ds: stopped by {self.stop.requested or 'a stop signal on another rank'} after step "
                      f"{t.step}; checkpoint {ckpt.tag_for(t.step)} saved, relaunch to resume "
                      f"(exit {job.EXIT_STOPPED})", file=sys.stderr, flush=True)
            return job.EXIT_STOPPED
        return None


def default_accelerator(env: MutableMapping[str, str], *, gpu_visible: bool) -> None:
    """DeepSpeed's accelerator where the user named none: its CPU one when no GPU is visible (else it
    probes and warns on every rank); with a GPU, DeepSpeed detects CUDA / ROCm itself."""
    if not gpu_visible:
        env.setdefault("DS_ACCELERATOR", "cpu")


def run(args) -> int:
    """``mst-ds train --preset NAME [--set k=v ...] [--run-dir DIR]``."""
    default_accelerator(os.environ, gpu_visible=eng.gpu_visible())
    cfg = load_config(args.preset, args.sets).config
    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.run.output_dir) / cfg.run.name
    launched = "LOCAL_RANK" in os.environ or os.environ.get("SLURM_PROCID", "0") != "0"
    # Before DeepSpeed loads its comm op: every rank loads from where the pre-flight built (one note, not N).
    job.use_extensions_dir(announce=getattr(args, "check", False) or not launched,
                           required=os.environ.get("DS_ACCELERATOR") == "cpu")
    if getattr(args, "check", False):
        check(cfg, run_dir, probe_lock=os.environ.get("MST_DS_NODE_RANK", "0") == "0")
        return 0
    manifest = check_training_data(cfg)  # the one read of the training manifest in this process
    stop = job.StopSignals().install()  # SIGTERM/SIGUSR1: finish the step, save it, exit EXIT_STOPPED
    try:
        if "LOCAL_RANK" in os.environ:  # started by a launcher: die with it, never train on as an orphan
            job.die_with_launcher(stop)
        return train(cfg, run_dir, stop=stop, manifest=manifest)
    finally:
        # Called in-process (tests, notebooks), the caller gets its handlers back: a record-only SIGTERM
        # handler left behind is inherited by every process the caller forks later, which then outlive
        # a terminate() (seen: the shard writer's pool hung a test session).
        stop.uninstall()
