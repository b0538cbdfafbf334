"""Checkpoints of a run directory, auto-resume, the universal path (``mst-ds export``: :mod:`mst_ds.export`).

Layout::

    RUN/config.yaml                     resolved config (written at start)
    RUN/checkpoints/step00000120/       DeepSpeed files (engine.save_checkpoint, client_state on rank 0)
                    rng_rank00000.pt    this rank's torch / python / numpy RNG + loader position
                    complete.json       written by rank 0 after every rank finished (step, world, hash,
                                        resolved config, training-data identity, every file's size)
    RUN/checkpoints/latest              tag of the newest complete checkpoint (atomic rename)

``latest`` names the newest step of the trajectory the run is on. Pointing it back at an older complete
tag is a rollback: the run resumes there and moves the newer tags aside as ``TAG.superseded`` (kept,
never deleted); a tag of the step being saved that still exists is moved aside the same way, so ``latest``
always advances with the run.

A checkpoint is complete before ``latest`` points to it: DeepSpeed's own ``latest`` is disabled
(``save_latest=False``, it is written in place, not atomically) and ``complete.json`` + ``latest`` are
written by rank 0 after a barrier. A kill at any moment leaves ``latest`` on a complete checkpoint.
``client_state`` is written by rank 0 only (SPEC §7), so it holds only rank-invariant state; DeepSpeed
saves no RNG state, hence the per-rank RNG files.

Trust: a checkpoint is used only after its files have the sizes ``complete.json`` recorded and every
``.pt`` file in it unpickles with ``torch.load(weights_only=True)`` (memory-mapped, so only the pickle
is read); DeepSpeed's own loaders (which unpickle everything, weights-only off) see only files that passed. Pruning deletes
only directories this module wrote (a ``stepNNNNNNNN`` tag with its marker, or an incomplete tag holding
only checkpoint files); anything else under ``checkpoints/`` is left alone. A save that fails on any
rank (a full disk) removes its half-written tag on every rank and stops the run with one line; the
previous checkpoint and ``latest`` are untouched. Fault injection for the tests: a
:class:`mst_ds.faults.Faults` passed to :func:`save` (``enospc_in_save@N``, ``enospc_in_ds_save@N``).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mst_ds import atomic
from mst_ds.config import RunFailure, UsageError
from mst_ds.faults import Faults
from mst_ds.run_dir import CHECKPOINTS, COMPLETE, CONFIG, LATEST, TAG_RE, UNIVERSAL_SUFFIX, RunDir, tag_for  # noqa: F401

CKPT_SUBDIR = CHECKPOINTS  # the names live in mst_ds.run_dir; these stay importable from here
# What DeepSpeed and this module put in a tag directory (an incomplete one is pruned only if it holds
# nothing else): model/optimizer states, RNG files, the marker, atomic-write temps, universal zero/.
_OWN_ENTRY_RE = re.compile(r".*\.pt|" + re.escape(COMPLETE) + r"|\..*\.tmp-\d+|zero")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


_atomic_write = atomic.write_text


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------
def rng_state(gpus: int) -> dict[str, Any]:
    """This process's torch / python / numpy RNG state, and that of each of the ``gpus`` GPUs it sees
    (``engine.Platform.device_count``, passed in: "cuda" is a list, absent on CPU)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if gpus:
        state["cuda"] = [torch.cuda.get_rng_state(index) for index in range(gpus)]
    return state


def set_rng_state(state: dict[str, Any], gpus: int) -> None:
    """Restore :func:`rng_state`'s ``state``. GPU states are restored for the ``gpus`` devices this process
    has (``engine.Platform.device_count``): a task that sees fewer GPUs than the saver (one GPU per task,
    a smaller node) restores the ones it has; more GPUs than saved keep their seeded state."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for index, cuda_state in enumerate(state.get("cuda", [])[:gpus]):
        torch.cuda.set_rng_state(cuda_state, index)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_for(*parts: int) -> int:
    """A stable 63-bit seed from integers (crc32 chain; never Python's hash())."""
    h = 0
    for p in parts:
        h = zlib.crc32(int(p).to_bytes(8, "little", signed=False), h)
    return (h << 31) ^ zlib.crc32(repr(parts).encode())


# --------------------------------------------------------------------------------------------------
# Loading without executing: every .pt file goes through torch's weights-only unpickler
# --------------------------------------------------------------------------------------------------
class UnsafeCheckpoint(UsageError):
    """A checkpoint file that would need arbitrary code to unpickle (never loaded)."""


def _safe_globals() -> list:
    """The few non-tensor classes a genuine DeepSpeed checkpoint or RNG file pickles (data, no code)."""
    import numpy.core.multiarray as np_multiarray

    allowed: list = [np_multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass
    return allowed


def safe_load(path: Path, *, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with the allow-list; a file needing more → UnsafeCheckpoint."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed|\.?\n|\.?$)", str(err))
        what = (f"global {found.group(1)}" if found else detail.group(1).strip() if detail and detail.group(1).strip()
                else "more than tensors and plain data")
        raise UnsafeCheckpoint(f"{path}: refusing to unpickle it (it needs {what}; nothing in it was run)") from None


def _pt_files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*.pt") if p.is_file())


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in tag_dir.rglob("*")
            if p.is_file() and p.name != COMPLETE and not p.name.startswith(".")}


def damage(tag_dir: Path) -> str | None:
    """Why a complete checkpoint cannot be trusted (missing / resized / unreadable file), else None.

    Raises UnsafeCheckpoint for a file that unpickles only with code execution (an error, not damage:
    it is never loaded, and never silently skipped either)."""
    why = marker_problem(tag_dir)
    if why is not None:
        return why
    for rel, size in read_meta(tag_dir)["files"].items():
        f = tag_dir / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    for f in _pt_files(tag_dir):
        try:
            safe_load(f, mmap=True)
        except UnsafeCheckpoint:
            raise
        except Exception as err:  # torch reports a torn zip as RuntimeError, a torn pickle as EOFError, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            return f"{f.relative_to(tag_dir)} cannot be read ({first})"
    return None


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------
def is_complete(tag_dir: Path) -> bool:
    """The tag carries a marker (which may still be malformed: see :func:`marker_problem`)."""
    return (tag_dir / COMPLETE).is_file()


def step_of(tag: str) -> int:
    """The step a tag name says (``step00000120`` → 120): the order of tags, whatever a marker claims."""
    return int(tag[4:12])


# What every reader of a marker relies on, and its type (bool is not an int here).
_META_TYPES: dict[str, type | tuple[type, ...]] = {"step": int, "samples": int, "world_size": int,
                                                   "zero_stage": int, "config_hash": str, "files": dict}


def marker_problem(tag_dir: Path) -> str | None:
    """Why ``complete.json`` of a tag cannot be trusted (not JSON, not an object, a key missing or of
    the wrong type, a step other than the tag's), else None. Such a tag is damaged, like a torn file."""
    try:
        meta = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{COMPLETE} cannot be read ({type(err).__name__})"
    if not isinstance(meta, dict):
        return f"{COMPLETE} is not a JSON object"
    for key, kind in _META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"{COMPLETE} has no valid {key!r}"
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in meta["files"].items()):
        return f"{COMPLETE} has no valid 'files'"
    if TAG_RE.fullmatch(tag_dir.name) and meta["step"] != step_of(tag_dir.name):
        return f"{COMPLETE} says step {meta['step']}, the tag is step {step_of(tag_dir.name)}"
    return None


def read_meta(tag_dir: Path) -> dict[str, Any]:
    """The marker of a tag that passed :func:`marker_problem` (a malformed one: UsageError, one line)."""
    why = marker_problem(tag_dir)
    if why is not None:
        raise UsageError(f"{tag_dir}: damaged checkpoint ({why})")
    return json.loads((tag_dir / COMPLETE).read_text())


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags this module wrote that carry a marker, oldest first (by the step in the name)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir()
            if p.is_dir() and TAG_RE.fullmatch(p.name) and not p.name.endswith(UNIVERSAL_SUFFIX) and is_complete(p)]
    return sorted(tags, key=step_of)


def _latest_named(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names, if that tag carries a marker."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if TAG_RE.fullmatch(tag) and not tag.endswith(UNIVERSAL_SUFFIX) and is_complete(ckpt_dir / tag):
            return tag
    return None


def _trajectory(ckpt_dir: Path) -> list[str]:
    """Marked tags of the trajectory the run is on, newest first: from the one ``latest`` names down
    (a ``latest`` pointed back at an older tag is a rollback: the newer tags are not on it), or from
    the newest marked tag when ``latest`` names none."""
    tags = complete_tags(ckpt_dir)
    top = _latest_named(ckpt_dir)
    if top is not None:
        tags = [t for t in tags if step_of(t) <= step_of(top)]
    return tags[::-1]


def newest_complete(ckpt_dir: Path) -> str | None:
    """The newest tag of the run's trajectory (see :func:`_trajectory`) whose marker is sound."""
    return next((t for t in _trajectory(ckpt_dir) if marker_problem(ckpt_dir / t) is None), None)


def newest_intact(ckpt_dir: Path) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest tag of the trajectory whose marker and files check out, [(newer damaged tag, why)...]),
    newest first."""
    damaged: list[tuple[str, str]] = []
    for tag in _trajectory(ckpt_dir):
        why = damage(ckpt_dir / tag)
        if why is None:
            return tag, damaged
        damaged.append((tag, why))
    return None, damaged


def newer_than(ckpt_dir: Path, tag: str) -> list[str]:
    """Marked tags (universal twins included) of steps after ``tag``'s; a killed save's unmarked leftover
    is not one (the save of its step removes it)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir()
                  if p.is_dir() and TAG_RE.fullmatch(p.name) and step_of(p.name) > step_of(tag) and is_complete(p))


def set_aside(ckpt_dir: Path, tag: str, why: str = "damaged") -> str:
    """Rename a tag to ``TAG.WHY[-N]`` (kept for inspection, never deleted) → new name."""
    n, name = 0, f"{tag}.{why}"
    while (ckpt_dir / name).exists():
        n += 1
        name = f"{tag}.{why}-{n}"
    os.replace(ckpt_dir / tag, ckpt_dir / name)
    return name


def resolve(path: str | Path) -> tuple[Path, str]:
    """A run directory, its checkpoints/ directory or a tag directory → (checkpoints dir, tag), checked."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such checkpoint or run directory")
    if is_complete(p):
        why = damage(p)
        if why:
            raise UsageError(f"{p}: damaged checkpoint ({why})")
        return p.parent, p.name
    ckpt_dir = p / CKPT_SUBDIR if (p / CKPT_SUBDIR).is_dir() else p
    tag, damaged = newest_intact(ckpt_dir)
    if damaged:  # evaluating an older checkpoint than asked for would be a silently different number
        first, why = damaged[0]
        hint = f"; newest intact: {ckpt_dir / tag}" if tag else ""
        raise UsageError(f"{ckpt_dir / first}: damaged checkpoint ({why}){hint}")
    if tag is None:
        raise UsageError(f"{p}: no complete checkpoint (a tag directory holds {COMPLETE})")
    return ckpt_dir, tag


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------
def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _fail_everywhere(message: str, rank: int) -> None:
    """Every rank stops (exit 1); rank 0 says why in one line."""
    from mst_ds.job import stop_together

    stop_together(RunFailure(message), rank)


def _save_fault(faults: Faults, kind: str, step: int, rank: int) -> bool:
    import torch.distributed as dist

    last = dist.get_world_size() - 1 if dist.is_initialized() else 0
    return faults.at(kind, step) and rank == last


class _DiskFullWriter:
    """DeepSpeed's checkpoint engine with every ``save`` failing as on a full disk (everything else passes
    through). DeepSpeed has no hook to inject a write error, but its checkpoint engine is a pluggable
    component (``engine.checkpoint_engine``: torch, Nebula, decoupled), so a save swaps in this wrapper
    for its duration instead of patching a method of DeepSpeed's object."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def save(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def save(engine, ckpt_dir: Path, *, step: int, client_state: dict[str, Any], meta: dict[str, Any],
         loader_position: dict[str, int], keep_last: int, rank: int, gpus: int, faults: Faults = Faults()) -> str:
    """Save a complete checkpoint of every rank, then point ``latest`` to it; prune to keep_last.

    All ranks call this. ``client_state`` must be rank-invariant (only rank 0's copy is kept). A write
    error on any rank (ENOSPC, EIO, ...) removes this tag and stops every rank (RunFailure on rank 0).
    """
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and is_complete(tag_dir):
        # A tag of this step from another trajectory (a rollback's newer tags are moved aside when
        # the run resumes; this catches any other): kept aside, never rewritten, and `latest` names
        # the step this run is saving.
        set_aside(ckpt_dir, tag, "superseded")
    elif rank == 0 and tag_dir.exists():
        remove_leftover(tag_dir)  # a leftover of a save that was killed half-way
    _barrier()
    error = None
    writer = getattr(engine, "checkpoint_engine", None)
    if writer is not None and _save_fault(faults, "enospc_in_ds_save", step, rank):
        engine.checkpoint_engine = _DiskFullWriter(writer)  # this save only
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except OSError as err:
        error = f"rank {rank}: {err}"
        _barrier()  # the closing barrier of save_checkpoint, where the ranks that did not fail wait
    finally:
        if writer is not None:
            engine.checkpoint_engine = writer
    if error is None:
        try:
            with atomic.atomic_path(tag_dir / f"rng_rank{rank:05d}.pt") as tmp:
                if _save_fault(faults, "enospc_in_save", step, rank):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
                torch.save({"rng": rng_state(gpus), "loader": loader_position, "step": step}, tmp)
        except OSError as err:
            error = f"rank {rank}: {err}"
    # Every rank's files are on disk (or its error is known). Each rank lists the tag; the largest size
    # seen per file is its writer's view (a shared file system may show other nodes' files late).
    reports = _gather((error, _file_sizes(tag_dir) if error is None and tag_dir.is_dir() else {}))
    errors = [e for e, _ in reports if e]
    if rank == 0 and not errors:
        files: dict[str, int] = {}
        for _, sizes in reports:
            for name, size in sizes.items():
                files[name] = max(size, files.get(name, 0))
        try:
            _atomic_write(tag_dir / COMPLETE, json.dumps({**meta, "step": step, "tag": tag, "time": time.time(),
                                                          "files": files}, indent=1))
            _atomic_write(ckpt_dir / LATEST, tag)
        except OSError as err:
            (tag_dir / COMPLETE).unlink(missing_ok=True)
            errors.append(f"rank 0: {err}")
    errors = _gather(errors)[0]  # rank 0's verdict, for all
    if errors:
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)  # ours, incomplete: written by this save
        _barrier()
        previous = newest_complete(ckpt_dir)
        _fail_everywhere(f"checkpoint: saving step {step} failed ({errors[0]}); removed the partial {tag_dir.name}, "
                         f"the previous checkpoint ({previous or 'none'}) is intact", rank)
    if rank == 0:
        prune(ckpt_dir, keep_last)
    _barrier()
    return tag


def _looks_ours(tag_dir: Path) -> bool:
    return TAG_RE.fullmatch(tag_dir.name) is not None and all(_OWN_ENTRY_RE.fullmatch(p.name) for p in tag_dir.iterdir())


def remove_leftover(tag_dir: Path) -> None:
    """Remove an incomplete tag directory before saving into it, if it holds only checkpoint files."""
    if not _looks_ours(tag_dir):
        raise RunFailure(f"{tag_dir}: exists, is not a complete checkpoint and holds files this program did "
                         f"not write; move it away")
    shutil.rmtree(tag_dir)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and their universal twins), and
    leftovers of killed saves. Only directories this module wrote: a tag name with its marker, or a tag
    name holding nothing but checkpoint files (the run lock rules out a save in progress elsewhere)."""
    keep = set([t for t in complete_tags(ckpt_dir) if marker_problem(ckpt_dir / t) is None][-keep_last:])
    for p in ckpt_dir.iterdir():
        if not (p.is_dir() and TAG_RE.fullmatch(p.name)) or p.name.removesuffix(UNIVERSAL_SUFFIX) in keep:
            continue
        if (is_complete(p) and marker_problem(p) is None) or _looks_ours(p):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------
def needs_universal(meta: dict[str, Any], world_size: int, zero_stage: int) -> bool:
    """Different world size or ZeRO stage with partitioned optimizer files → universal checkpoint.

    A ZeRO-0 fp32/autocast checkpoint keeps the whole optimizer state in one file: it loads anywhere.
    """
    if meta["world_size"] == world_size and meta["zero_stage"] == zero_stage:
        return False
    return not (meta["zero_stage"] == 0 and meta.get("precision") not in ("bf16", "fp16"))


def convert_to_universal(ckpt_dir: Path, tag: str, rank: int) -> str:
    """``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`` on rank 0 → new tag.

    The input was checked by :func:`damage` (resume); the output is checked again before loading."""
    out_tag = tag + UNIVERSAL_SUFFIX
    out = ckpt_dir / out_tag
    error = None
    if rank == 0:
        try:
            if not is_complete(out) or damage(out):
                if out.exists() and not is_complete(out) and not _looks_ours(out):
                    raise RunFailure(f"{out}: exists, is not a universal checkpoint and holds files this "
                                     "program did not write; move it away")
                shutil.rmtree(out, ignore_errors=True)  # ours: our marker, or nothing but checkpoint files
                cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                       str(ckpt_dir / tag), "--output_folder", str(out), "--inject_missing_state",
                       "--num_extract_workers", "1", "--num_merge_workers", "1"]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
                    raise RunFailure(f"ds_to_universal failed on {ckpt_dir / tag}: {tail[0]}")
                meta = {**read_meta(ckpt_dir / tag), "files": _file_sizes(out)}
                _atomic_write(out / COMPLETE, json.dumps(meta, indent=1))
                why = damage(out)
                if why:
                    raise RunFailure(f"{out}: the universal checkpoint cannot be read ({why})")
        except (UsageError, RunFailure) as err:
            error = str(err)
    error = _gather(error)[0]
    if error:
        _fail_everywhere(error, rank)
    return out_tag


def load(engine, ckpt_dir: Path, tag: str, *, rank: int, same_world: bool, gpus: int) -> dict[str, Any]:
    """Load engine state and this rank's RNG (of the ``gpus`` it sees, :func:`set_rng_state`) →
    client_state (+ "loader" position).

    The tag must have passed :func:`damage` (DeepSpeed unpickles with weights-only off)."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise UsageError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    if same_world and rng_file.exists():
        saved = safe_load(rng_file)
        set_rng_state(saved["rng"], gpus)
    return client_state


# --------------------------------------------------------------------------------------------------
# Reading state dicts without an engine (eval, export)
# --------------------------------------------------------------------------------------------------
def _model_states_file(tag_dir: Path) -> Path:
    # ZeRO-3 names rank 0's module file zero_pp_rank_0_mp_rank_00_model_states.pt; client_state is in it.
    files = [f for f in (tag_dir / "mp_rank_00_model_states.pt", tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")
             if f.exists()]
    if not files:
        raise UsageError(f"{tag_dir}: no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint)")
    return files[0]


def load_teacher_student(path: str | Path, cfg=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(teacher state dict, student state dict), fp32, from a run / checkpoints / tag directory.

    The teacher is in client_state; the student's full fp32 weights are assembled from the ZeRO
    partitions (``zero_to_fp32``) when the run used ZeRO ≥ 1, else taken from the module state.
    ``cfg`` is accepted for interface symmetry with the evaluators (the checkpoint is self-describing).
    :func:`resolve` has checked every file of the tag (``zero_to_fp32`` unpickles unrestricted).
    """
    ckpt_dir, tag = resolve(path)
    states = safe_load(_model_states_file(ckpt_dir / tag))
    teacher = states["teacher"]
    if read_meta(ckpt_dir / tag).get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        student = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        student = states["module"]
    student = {k: v.float() if v.is_floating_point() else v for k, v in student.items()}
    return teacher, student


# --------------------------------------------------------------------------------------------------
# The run a checkpoint belongs to (eval, export)
# --------------------------------------------------------------------------------------------------
def run_dir_of(path: str | Path) -> Path | None:
    """RUN for RUN, RUN/checkpoints or RUN/checkpoints/TAG (the directory holding config.yaml)."""
    run = RunDir.of(path)
    return run.root if run is not None else None


def run_config(path: str | Path, sets: list[str] | tuple[str, ...] = ()):
    """The resolved config written next to the run ``path`` belongs to (``--set`` items still apply)."""
    from mst_ds.config import load_config

    run_dir = run_dir_of(path)
    if run_dir is None:
        raise UsageError(f"{path}: no {CONFIG} in its run directory (not a run of mst-ds train)")
    return load_config(str(RunDir(run_dir).config), sets).config
