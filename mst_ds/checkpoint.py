"""Checkpoints of a run directory, auto-resume, the universal path, and ``mst-ds export``.

Layout::

    RUN/config.yaml                     resolved config (written at start)
    RUN/checkpoints/step00000120/       DeepSpeed files (engine.save_checkpoint, client_state on rank 0)
                    rng_rank00000.pt    this rank's torch / python / numpy RNG + loader position
                    complete.json       written by rank 0 after every rank finished (step, world, hash)
    RUN/checkpoints/latest              tag of the newest complete checkpoint (atomic rename)

A checkpoint is complete before ``latest`` points to it: DeepSpeed's own ``latest`` is disabled
(``save_latest=False``, it is written in place, not atomically) and ``complete.json`` + ``latest`` are
written by rank 0 after a barrier. A kill at any moment leaves ``latest`` on a complete checkpoint.
``client_state`` is written by rank 0 only (SPEC §7), so it holds only rank-invariant state; DeepSpeed
saves no RNG state, hence the per-rank RNG files.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mst_ds import atomic
from mst_ds.config import UsageError

CKPT_SUBDIR = "checkpoints"
COMPLETE = "complete.json"
LATEST = "latest"
UNIVERSAL_SUFFIX = "_universal"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


_atomic_write = atomic.write_text


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------
def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def read_meta(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / COMPLETE).read_text())


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first (by step)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir()
            if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX) and is_complete(p)]
    return sorted(tags, key=lambda t: read_meta(ckpt_dir / t)["step"])


def newest_complete(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is complete, else the newest complete one."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and is_complete(ckpt_dir / tag):
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def resolve(path: str | Path) -> tuple[Path, str]:
    """A run directory, its checkpoints/ directory or a tag directory → (checkpoints dir, tag)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such checkpoint or run directory")
    if is_complete(p):
        return p.parent, p.name
    ckpt_dir = p / CKPT_SUBDIR if (p / CKPT_SUBDIR).is_dir() else p
    tag = newest_complete(ckpt_dir)
    if tag is None:
        raise UsageError(f"{p}: no complete checkpoint (a tag directory holds {COMPLETE})")
    return ckpt_dir, tag


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------
def save(engine, ckpt_dir: Path, *, step: int, client_state: dict[str, Any], meta: dict[str, Any],
         loader_position: dict[str, int], keep_last: int, rank: int) -> str:
    """Save a complete checkpoint of every rank, then point ``latest`` to it; prune to keep_last.

    All ranks call this. ``client_state`` must be rank-invariant (only rank 0's copy is kept).
    """
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if is_complete(tag_dir):
        return tag  # never rewrite (and so never endanger) a complete checkpoint
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover of a save that was killed half-way
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save({"rng": rng_state(), "loader": loader_position, "step": step},
               tag_dir / f"rng_rank{rank:05d}.pt")
    _barrier()  # every rank's files are on disk
    if rank == 0:
        _atomic_write(tag_dir / COMPLETE, json.dumps({**meta, "step": step, "tag": tag, "time": time.time()}, indent=1))
        _atomic_write(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep_last)
    _barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete leftovers."""
    keep = set(complete_tags(ckpt_dir)[-keep_last:])
    for p in ckpt_dir.iterdir():
        base = p.name.removesuffix(UNIVERSAL_SUFFIX)
        if p.is_dir() and base not in keep:
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
    """``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`` on rank 0 → new tag."""
    out_tag = tag + UNIVERSAL_SUFFIX
    out = ckpt_dir / out_tag
    if rank == 0 and not is_complete(out):
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
               "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
            raise RuntimeError(f"ds_to_universal failed on {ckpt_dir / tag}: {tail[0]}")
        shutil.copy2(ckpt_dir / tag / COMPLETE, out / COMPLETE)
    _barrier()
    return out_tag


def load(engine, ckpt_dir: Path, tag: str, *, rank: int, same_world: bool) -> dict[str, Any]:
    """Load engine state and this rank's RNG → client_state (+ "loader" position)."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise UsageError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    if same_world and rng_file.exists():
        saved = torch.load(rng_file, weights_only=False)
        set_rng_state(saved["rng"])
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
    """
    ckpt_dir, tag = resolve(path)
    states = torch.load(_model_states_file(ckpt_dir / tag), map_location="cpu", weights_only=False)
    teacher = states["teacher"]
    if read_meta(ckpt_dir / tag).get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        student = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        student = states["module"]
    student = {k: v.float() if v.is_floating_point() else v for k, v in student.items()}
    return teacher, student


# --------------------------------------------------------------------------------------------------
# mst-ds export
# --------------------------------------------------------------------------------------------------
def run_dir_of(path: str | Path) -> Path | None:
    """RUN for RUN, RUN/checkpoints or RUN/checkpoints/TAG (the directory holding config.yaml)."""
    p = Path(path)
    for cand in (p, p.parent, p.parent.parent):
        if cand.is_dir() and (cand / "config.yaml").is_file():
            return cand
    return None


def run_config(path: str | Path, sets: list[str] | tuple[str, ...] = ()):
    """The resolved config written next to the run ``path`` belongs to (``--set`` items still apply)."""
    from mst_ds.config import load_config

    run_dir = run_dir_of(path)
    if run_dir is None:
        raise UsageError(f"{path}: no config.yaml in its run directory (not a run of mst-ds train)")
    return load_config(str(run_dir / "config.yaml"), sets).config


def export_backbone(path: str | Path, out: str | Path, which: str = "teacher") -> dict[str, Any]:
    """Write the backbone as timm-keyed safetensors + ``OUT.json`` → the timm model config written.

    Load it with ``timm.create_model(cfg["architecture"], pretrained=True,
    pretrained_cfg_overlay=dict(file=OUT), **cfg["model_args"])``. The metadata also carries what
    evaluating it needs (``eval_settings``: network, normalisation, eval section), so ``mst-ds knn
    --ckpt OUT`` evaluates it as the run would.
    """
    from safetensors.torch import save_file

    from mst_ds.eval.features import export_settings
    from mst_ds.model.backbone import Backbone

    ckpt_dir, tag = resolve(path)
    cfg = run_config(ckpt_dir)
    teacher, student = load_teacher_student(ckpt_dir / tag)
    state = teacher if which == "teacher" else student
    backbone = Backbone.from_config(cfg.model, drop_path_rate=0.0)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    tensors = {k: v.contiguous() for k, v in backbone.timm_state_dict().items()}
    model_cfg = {
        "architecture": cfg.model.arch,
        "model_args": {**cfg.model.timm_kwargs, "num_classes": 0, "dynamic_img_size": True},
        "source": {"checkpoint": str(ckpt_dir / tag), "which": which, "step": read_meta(ckpt_dir / tag)["step"],
                   "config_hash": cfg.hash()},
        "patch_size": backbone.patch_size,
        "eval_settings": export_settings(cfg),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"mst_ds": json.dumps(model_cfg)})
    out.with_suffix(".json").write_text(json.dumps(model_cfg, indent=1) + "\n")
    return model_cfg


def run(args) -> int:
    """``mst-ds export CKPT --out FILE.safetensors [--which teacher|student]``."""
    if not str(args.out).endswith(".safetensors"):
        raise UsageError(f"--out {args.out}: expected a .safetensors file name")
    model_cfg = export_backbone(args.ckpt, args.out, args.which)
    args_txt = ", ".join(f"{k}={v!r}" for k, v in model_cfg["model_args"].items())
    print(f"wrote {args.out} ({args.which}, step {model_cfg['source']['step']}); load with\n"
          f"  timm.create_model({model_cfg['architecture']!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(args.out)!r}), {args_txt})")
    return 0
