"""Frozen-backbone features for the evaluators (k-NN, linear probe) [S §4, §5].

* :func:`load_backbone`: the teacher (default) or student backbone of a run / checkpoint directory
  (through :mod:`mst_ds.checkpoint`), of a timm-keyed ``.safetensors`` export, or the preset's network
  at random init (seeded by ``run.seed``) when no checkpoint is given.
* :func:`extract_features`: CLS (``n_last_blocks=1``), DINO's concatenation of the last n blocks'
  final-norm CLS, optionally followed by the average-pooled patch tokens; batch by batch under
  ``no_grad`` with a rich progress bar. Under torch.distributed every rank reads a disjoint part of
  the data (``make_eval_loader``); the parts are all-gathered in fixed-size row chunks (bounded
  memory) and every rank ends with all rows **ordered by sample key**, so the features do not depend
  on the number of ranks or workers.
* :class:`EvalContext`: what ``mst-ds knn`` and ``mst-ds linear`` share — config resolution (a run's
  own ``config.yaml`` wins over ``--preset``; an export's stored settings must agree with a
  ``--preset`` given), distributed start, output directory, a disk cache of features keyed by
  (model, data, options), and the matching of val classes to the training data's classes by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError
from torch import Tensor

from mst_ds import atomic, job
from mst_ds import checkpoint as ckpt_mod
from mst_ds.config import (
    DEFAULT_PRESET,
    MSTConfig,
    RunFailure,
    UsageError,
    format_validation_error,
    load_config,
)
from mst_ds.data.manifest import is_shard_dir
from mst_ds.eval.identity import RANDOM, data_identity, json_written_by, network_identity, refuse_foreign
from mst_ds.model.backbone import Backbone, BackboneOutput
from mst_ds.run_dir import RunDir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
GATHER_ROWS = 65536  # rows per all_gather round: bounds the extra memory of the exchange
OUT_LOCK = ".mst-ds-eval.lock"  # in --out while an evaluation writes there


# --------------------------------------------------------------------------------------------------
# Which network: config and weights
# --------------------------------------------------------------------------------------------------
def is_random(ckpt: str | None) -> bool:
    return ckpt is None or str(ckpt) == RANDOM


class ExportSource(BaseModel):
    """Where an export came from (informative, except ``which``: the network it holds)."""

    checkpoint: str | None = None
    which: Literal["teacher", "student"] | None = None
    step: int | None = None
    config_hash: str | None = None


class ExportMeta(BaseModel):
    """The ``mst_ds`` metadata of an export: the timm model description, its source, and
    ``eval_settings`` (dotted config keys → values, checked again as config when used). Written by
    ``mst-ds export`` through this model and read back through it: a file a user is handed is one
    line if its metadata is anything else."""

    architecture: str | None = None
    model_args: dict[str, Any] = Field(default_factory=dict)
    source: ExportSource = Field(default_factory=ExportSource)
    patch_size: int | None = None
    eval_settings: dict[str, Any] = Field(default_factory=dict)


TIMM_WEIGHTS = "model.safetensors"  # timm's HF_SAFE_WEIGHTS_NAME: what local-dir: / hf-hub: load
TIMM_CONFIG = "config.json"


def is_timm_folder(path: str | Path) -> bool:
    """A timm / Hub model folder (``config.json`` + ``model.safetensors``; ``mst-ds export --format
    timm-folder`` writes one), not a run directory."""
    p = Path(path)
    return (p.is_dir() and (p / TIMM_CONFIG).is_file() and (p / TIMM_WEIGHTS).is_file()
            and not RunDir(p).config.exists())


def weights_file(ckpt: str | None) -> str | None:
    """``--ckpt`` with a timm folder replaced by its ``model.safetensors`` (its metadata carries the
    eval settings, checked against the folder's ``config.json``); anything else unchanged."""
    if ckpt is None or not is_timm_folder(ckpt):
        return ckpt
    check_timm_config(Path(ckpt))
    return str(Path(ckpt) / TIMM_WEIGHTS)


def check_timm_config(folder: Path) -> None:
    """timm reads ``config.json``, mst-ds the weights' metadata: they must say the same (architecture,
    input size, mean, std), else one line — an edited config.json would make the two
    evaluate different networks or inputs under one name."""
    path = folder / TIMM_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise UsageError(f"{path}: unreadable ({type(err).__name__}); timm reads it") from None
    meta = safetensors_model_meta(folder / TIMM_WEIGHTS)
    if meta is None:
        return  # a foreign timm folder: its weights carry no settings to check config.json against
    pcfg = config.get("pretrained_cfg") if isinstance(config, dict) else None
    if not isinstance(pcfg, dict):
        raise UsageError(f"{path}: not a timm config (no pretrained_cfg object)")
    settings = meta.get("eval_settings", {})
    size = settings.get("eval.image_size")
    # (model_args are not compared: timm rewrites some, e.g. img_size 32 → [32, 32]; a changed shape
    # fails the weights' load in timm and in mst-ds alike)
    pairs = [("architecture", config.get("architecture"), meta.get("architecture")),
             ("pretrained_cfg.mean", pcfg.get("mean"), settings.get("augment.mean")),
             ("pretrained_cfg.std", pcfg.get("std"), settings.get("augment.std")),
             ("pretrained_cfg.input_size", pcfg.get("input_size"), None if size is None else [3, size, size])]
    for key, in_config, in_weights in pairs:
        if in_weights is not None and in_config != in_weights:
            raise UsageError(f"{path}: {key} is {json.dumps(in_config)}, the weights' metadata says "
                             f"{json.dumps(in_weights)} (an edited config.json: timm and mst-ds would disagree)")


def safetensors_model_meta(path: Path) -> dict[str, Any] | None:
    """The timm model description ``mst-ds export`` stores in the file's metadata (validated by
    :class:`ExportMeta`), if any."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # not a safetensors file at all
        raise UsageError(f"{path}: not a readable .safetensors file ({type(err).__name__})") from None
    if "mst_ds" not in meta:
        return None
    try:
        return ExportMeta.model_validate_json(meta["mst_ds"]).model_dump(mode="json")
    except ValidationError as err:
        raise UsageError(f"{path}: mst_ds metadata not as mst-ds export writes it "
                         f"({format_validation_error(err)})") from None


def export_keys() -> list[str]:
    """The config fields an export carries: the network (timm architecture + kwargs, patch size
    included), the normalisation, and the eval section (image size, k list, probe settings)."""
    from mst_ds.config import EvalConfig

    # eval.monitor is the training run's online k-NN (its data paths), not how to evaluate the network.
    # model.fused_attn: the attention path changes the features' last bits, and with them k-NN ties.
    return ["model.arch", "model.timm_kwargs", "model.fused_attn", "augment.mean", "augment.std",
            *(f"eval.{name}" for name in EvalConfig.model_fields if name != "monitor")]


def export_settings(cfg: MSTConfig) -> dict[str, Any]:
    """What evaluating an export needs from the run's config (dotted keys → JSON values): ``mst-ds
    export`` stores it in the file's metadata, :func:`resolve_config` reads it back."""
    return {key: _get_dotted(cfg, key) for key in export_keys()}


def _get_dotted(cfg: MSTConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    value = getattr(getattr(cfg, section), name)
    return json.loads(json.dumps(value))  # tuples → lists: comparable with what the metadata holds


def _export_config(path: Path, preset: str | None, sets: list[str] | tuple[str, ...]) -> tuple[MSTConfig, dict]:
    """The config of a ``.safetensors`` export: its stored settings over the (default) preset, ``--set``
    last. A ``--preset`` given explicitly must agree with every stored setting; an export without
    settings (older or foreign file) needs ``--preset``."""
    from mst_ds.config import parse_set

    meta = safetensors_model_meta(path) or {}
    stored: dict[str, Any] = dict(meta.get("eval_settings", {}))
    if not stored and meta.get("architecture"):  # an export of an older version: the network only
        stored = {"model.arch": meta["architecture"],
                  "model.timm_kwargs": {k: v for k, v in meta.get("model_args", {}).items()
                                        if k not in ("num_classes", "dynamic_img_size")}}
    if "eval.image_size" not in stored and preset is None:
        raise UsageError(f"{path}: an export without mst-ds evaluation settings (older or foreign file); "
                         "give --preset to name its architecture and eval settings")
    unknown = sorted(set(stored) - set(export_keys()))
    if unknown:
        raise UsageError(f"{path}: export settings unknown to this version of mst-ds: {', '.join(unknown)}")
    if preset is not None:
        given = load_config(preset).config
        for key, value in stored.items():
            mine = _get_dotted(given, key)
            if mine != value:
                raise UsageError(f"{path}: --preset {preset} conflicts with the export: {key} is "
                                 f"{json.dumps(value)} in the export, {json.dumps(mine)} in --preset {preset} "
                                 "(omit --preset to use the export's settings)")
    overrides = {**stored, **dict(parse_set(item) for item in sets)}
    return load_config(preset or DEFAULT_PRESET, overrides=overrides).config, meta


def resolve_config(ckpt: str | None, preset: str | None, sets: list[str] | tuple[str, ...] = ()) -> MSTConfig:
    """The config that describes ``ckpt``'s network: its run's config.yaml when there is one (``--set``
    still applies), the settings stored in a safetensors export, else ``preset`` (None = the default
    preset; for an export, None means "not given": the export's settings are used unchallenged)."""
    if is_random(ckpt):
        return load_config(preset or DEFAULT_PRESET, sets).config
    path = Path(ckpt)
    if not path.exists():
        raise UsageError(f"{ckpt}: no such checkpoint, run directory or .safetensors file")
    if path.suffix == ".safetensors":
        return _export_config(path, preset, sets)[0]
    if ckpt_mod.run_dir_of(path) is not None:
        return ckpt_mod.run_config(path, sets)
    return load_config(preset or DEFAULT_PRESET, sets).config


def export_which(ckpt: str | None, which: str) -> str:
    """The network an export holds (its metadata says; asking for the other one is an error)."""
    if is_random(ckpt) or Path(ckpt).suffix != ".safetensors":
        return which
    stored = (safetensors_model_meta(Path(ckpt)) or {}).get("source", {}).get("which")
    if stored is None:
        return which
    if which == "student" and stored != "student":
        raise UsageError(f"{ckpt}: --which student, but the export holds the {stored}")
    if which != stored:  # --which teacher is the default: say which network is evaluated, and record it
        print(f"note: {ckpt} holds the {stored} (exported with --which {stored}): evaluating the {stored}",
              file=sys.stderr)
    return stored


def _load_strict(module: torch.nn.Module, state: dict[str, Tensor], source: str, arch: str) -> None:
    """load_state_dict, but any missing/unexpected key or shape difference is one UsageError line."""
    own = module.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise UsageError(f"{source}: a checkpoint of another architecture than {arch} "
                             f"({k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model)")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UsageError(f"{source}: a checkpoint of another architecture than {arch} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys; {what})")
    module.load_state_dict(state)


def load_backbone(ckpt: str | None, cfg: MSTConfig, which: str = "teacher") -> Backbone:
    """The frozen backbone (eval mode, no grad, CPU) of ``ckpt`` built from ``cfg.model``.

    ckpt None / 'random': random init of the preset, seeded by ``cfg.run.seed`` (without touching
    the global RNG). A run / checkpoints / tag directory: the teacher's (or student's) backbone via
    :func:`mst_ds.checkpoint.load_teacher_student`. A ``.safetensors`` file: timm key names.
    """
    if which not in ("teacher", "student"):
        raise UsageError(f"--which {which!r}: expected teacher or student")
    arch = f"{cfg.model.arch} {cfg.model.timm_kwargs}" if cfg.model.timm_kwargs else cfg.model.arch
    if is_random(ckpt):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            backbone = Backbone.from_config(cfg.model, drop_path_rate=0.0)
    else:
        path = Path(ckpt)
        if not path.exists():
            raise UsageError(f"{ckpt}: no such checkpoint, run directory or .safetensors file")
        backbone = Backbone.from_config(cfg.model, drop_path_rate=0.0)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            _load_strict(backbone.vit, load_file(str(path)), str(path), arch)
        else:
            from mst_ds.checkpoint import load_teacher_student

            teacher, student = load_teacher_student(path, cfg)
            state = teacher if which == "teacher" else student
            prefix = "backbone."
            sub = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                raise UsageError(f"{ckpt}: the {which} state has no backbone.* weights")
            _load_strict(backbone, sub, str(path), arch)
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone


# --------------------------------------------------------------------------------------------------
# Ranks and device
# --------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_dist(platform: Any = None) -> Dist:
    """Under a launcher (WORLD_SIZE > 1): torch.distributed through the engine's start (gloo on CPU,
    NCCL on GPUs) and this rank's device. Otherwise a single process, no process group, on the GPU
    ``LOCAL_RANK`` names if set (an ``srun`` task, a shell's choice), else the first visible one
    (``CUDA_VISIBLE_DEVICES`` chooses it). ``platform``: :class:`mst_ds.engine.Platform` (asked if None)."""
    import torch.distributed as dist

    # not at the top: asking the platform imports DeepSpeed, which picks its accelerator when imported
    from mst_ds import engine

    platform = platform or engine.Platform.current()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or dist.is_initialized():
        started = not dist.is_initialized()
        rank, world = engine.init_distributed(platform)
        return Dist(rank, world, engine.device(platform), started)
    return Dist(0, 1, engine.bind_device(platform, dict(os.environ)))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def check_labelled(source: str) -> None:
    """A folder of images without class sub-folders has no labels: one clear line."""
    p = Path(source)
    if not p.exists() and not any(c in source for c in "{}:"):
        raise UsageError(f"{source}: no such data (expected shards or an ImageFolder)")
    if p.is_dir() and not is_shard_dir(p) and not any(c.is_dir() for c in p.iterdir()):
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()):
            raise UsageError(f"{source}: images without labels (an ImageFolder needs one sub-folder per class)")


def open_eval_data(source: str, *, transform, batch_size: int, num_workers: int, rank: int = 0,
                   world_size: int = 1):
    """``make_eval_loader`` with the label check → (loader of (images, labels, keys), class names)."""
    from mst_ds.data.reader import class_names, make_eval_loader

    check_labelled(source)
    loader, num_classes = make_eval_loader(source, transform=transform, batch_size=batch_size,
                                           num_workers=num_workers, rank=rank, world_size=world_size)
    if num_classes < 1:
        raise UsageError(f"{source}: data without labels (no classes in the manifest)")
    classes = class_names(source)
    if len(set(classes)) != len(classes):
        raise UsageError(f"{source}: class names are not unique")
    return loader, classes


UNKNOWN_CLASS_POLICIES = ("error", "exclude")


@dataclass
class ClassMatch:
    """Val labels re-expressed in the training data's class indices (matched by class name)."""

    labels: Tensor  # (N_kept,) train class indices
    keep: Tensor  # (N,) bool: val rows whose class the training data has
    excluded: dict[str, int]  # val class name → rows left out (only with policy "exclude")

    def describe(self) -> dict[str, Any]:
        return {"excluded_classes": self.excluded, "n_excluded": sum(self.excluded.values())}


def match_classes(train_classes: list[str], val_classes: list[str], val_labels: Tensor, *, policy: str,
                  train_source: str, val_source: str) -> ClassMatch:
    """Map val labels to the training data's class indices *by name*: an ImageFolder's labels are the
    positions of its folders, so a val set with only some classes (or its own order) has other indices
    than train for the same class. A val class that training does not have is an error, or with
    ``policy="exclude"`` its rows are left out (and reported)."""
    if policy not in UNKNOWN_CLASS_POLICIES:
        raise UsageError(f"--unknown-classes {policy!r}: expected one of {', '.join(UNKNOWN_CLASS_POLICIES)}")
    index = {name: i for i, name in enumerate(train_classes)}
    to_train = torch.tensor([index.get(name, -1) for name in val_classes] or [-1], dtype=torch.long)
    if bool(((val_labels < 0) | (val_labels >= len(val_classes))).any()):
        raise UsageError(f"{val_source}: labels outside the {len(val_classes)} classes of its manifest")
    mapped = to_train[val_labels]
    keep = mapped >= 0
    present = sorted(set(val_labels[~keep].tolist()))
    excluded = {val_classes[c]: int((val_labels == c).sum()) for c in present}
    if excluded and policy == "error":
        names = list(excluded)
        shown = ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "")
        raise UsageError(f"{val_source}: val classes unknown to the training data {train_source}: {shown} "
                         "(classes are matched by name; --unknown-classes exclude leaves them out)")
    if not bool(keep.any()):
        raise UsageError(f"{val_source}: no val class is a class of the training data {train_source}")
    return ClassMatch(mapped[keep], keep, excluded)


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSpec:
    """Which features: the last ``n_last_blocks`` final-norm CLS tokens concatenated (1 = the CLS),
    then, with ``avgpool``, the mean of the final-norm patch tokens (DINO's linear-eval options)."""

    n_last_blocks: int = 1
    avgpool: bool = False

    def dim(self, embed_dim: int) -> int:
        return embed_dim * (self.n_last_blocks + int(self.avgpool))


def select_features(out: BackboneOutput, spec: FeatureSpec) -> Tensor:
    """BackboneOutput → (B, spec.dim(D))."""
    parts = list(out.last_cls) if spec.n_last_blocks > 1 else [out.cls]
    if spec.avgpool:
        # DINO interleaves the two with a reshape (and only for n=1); a linear layer does not care
        # about the order, so the pooled tokens are simply appended.
        parts.append(out.patch_tokens.mean(dim=1))
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def backbone_features(backbone: Backbone, images: Tensor, spec: FeatureSpec) -> Tensor:
    """images (B,3,S,S) on the backbone's device → features (B, F) float32."""
    n = spec.n_last_blocks if spec.n_last_blocks > 1 else 0
    if n > len(backbone.vit.blocks):
        raise UsageError(f"n_last_blocks={n} exceeds the backbone's {len(backbone.vit.blocks)} blocks")
    return select_features(backbone(images, n_last_blocks=n), spec).float()


def progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


def _local_features(backbone: Backbone, loader, spec: FeatureSpec, device: torch.device, *,
                    show_progress: bool, description: str) -> tuple[Tensor, Tensor, list[str]]:
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    keys: list[str] = []
    try:
        total = len(loader)
    except TypeError:
        total = None
    with progress_bar(show_progress) as bar:
        task = bar.add_task(description, total=total)
        for images, y, k in loader:
            feats.append(backbone_features(backbone, images.to(device, non_blocking=True), spec).cpu())
            labels.append(y.long().cpu())
            keys.extend(str(x) for x in k)
            bar.advance(task)
    dim = spec.dim(backbone.embed_dim)
    f = torch.cat(feats) if feats else torch.empty(0, dim)
    y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    return f, y, keys


def _all_gather_rows(x: Tensor, counts: list[int], device: torch.device) -> list[Tensor]:
    """Every rank's rows of ``x`` (counts[r] rows on rank r) → list per rank, exchanged in rounds of
    at most GATHER_ROWS rows so the extra memory stays bounded."""
    import torch.distributed as dist

    world = len(counts)
    out: list[list[Tensor]] = [[] for _ in range(world)]
    tail = tuple(x.shape[1:])
    longest = max(counts)
    for start in range(0, longest, GATHER_ROWS):
        # As many rows as the longest part still has: a monitor's 900 rows were padded to 65,536 (16 MiB
        # of 64-wide features sent per rank at every evaluation).
        rows = min(GATHER_ROWS, longest - start)
        piece = x.new_zeros((rows, *tail))
        mine = x[start:start + rows]
        piece[: len(mine)] = mine
        piece = piece.to(device)
        bufs = [torch.empty_like(piece) for _ in range(world)]
        dist.all_gather(bufs, piece)
        for r in range(world):
            valid = max(0, min(rows, counts[r] - start))
            if valid:
                out[r].append(bufs[r][:valid].cpu())
    return [torch.cat(parts) if parts else x.new_zeros((0, *tail)) for parts in out]


def _gather_all(feats: Tensor, labels: Tensor, keys: list[str], dist_info: Dist) -> tuple[Tensor, Tensor, list[str]]:
    import torch.distributed as dist

    counts_t = torch.tensor([len(keys)], device=dist_info.device)
    all_counts = [torch.zeros_like(counts_t) for _ in range(dist_info.world_size)]
    dist.all_gather(all_counts, counts_t)
    counts = [int(c) for c in all_counts]
    key_lists: list[list[str] | None] = [None] * dist_info.world_size
    dist.all_gather_object(key_lists, keys)
    f = torch.cat(_all_gather_rows(feats, counts, dist_info.device))
    y = torch.cat(_all_gather_rows(labels, counts, dist_info.device))
    return f, y, [k for part in key_lists for k in part]


def extract_features(backbone: Backbone, loader, *, n_last_blocks: int = 1, avgpool: bool = False,
                     device: torch.device | None = None, dist_info: Dist | None = None,
                     show_progress: bool = True, description: str = "features",
                     return_keys: bool = False):
    """Features of every sample of ``loader`` (each rank's part, gathered) ordered by sample key.

    loader yields (images (B,3,S,S), labels (B,), keys list[str]) → (feats (N, F) float32 CPU,
    labels (N,) long) [+ keys]. F = D × (n_last_blocks + avgpool).
    """
    spec = FeatureSpec(n_last_blocks, avgpool)
    dist_info = dist_info or Dist()
    device = device or next(backbone.parameters()).device
    f, y, keys = _local_features(backbone, loader, spec, device, show_progress=show_progress and dist_info.is_main,
                                 description=description)
    if dist_info.active:
        f, y, keys = _gather_all(f, y, keys, dist_info)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    idx = torch.tensor(order, dtype=torch.long)
    f, y = f[idx], y[idx]
    keys = [keys[i] for i in order]
    return (f, y, keys) if return_keys else (f, y)


# --------------------------------------------------------------------------------------------------
# The shared command context
# --------------------------------------------------------------------------------------------------
@dataclass
class LabelledFeatures:
    feats: Tensor  # (N, F) float32
    labels: Tensor  # (N,) long: indices into classes
    classes: list[str]  # class names in label order
    corrupt: int = 0  # samples that failed to decode (left out)
    keys: list[str] = field(default_factory=list)  # (N,) sample keys (the linear probe's held-out split)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, obj)


def run_preset(run_dir: Path) -> str | None:
    """The ``--preset`` a run was started with (its run_info.json argv; ``mst-ds train``'s default when the
    argv has none), None when run_info.json does not say."""
    try:
        argv = json.loads(RunDir(run_dir).run_info.read_text(encoding="utf-8")).get("argv")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return None
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
    return DEFAULT_PRESET if "train" in argv else None


def recorded_preset(ckpt: str | None, given: str | None) -> str | None:
    """The preset a result records: ``--preset`` when given, else the run's own (a checkpoint of a run),
    None for an export (its stored settings describe it: ``ckpt``), the default for random init."""
    if given is not None:
        return given
    if is_random(ckpt):
        return DEFAULT_PRESET
    run_dir = ckpt_mod.run_dir_of(ckpt) if not Path(ckpt).is_file() else None
    return run_preset(run_dir) if run_dir is not None else None


def default_out_dir(ckpt: str | None, preset: str) -> Path:
    """RUN/eval for a checkpoint of a run; next to a .safetensors export; runs/eval/random_<preset>."""
    if is_random(ckpt):
        return Path("runs") / "eval" / f"random_{Path(preset).stem}"
    path = Path(ckpt)
    if is_timm_folder(path):  # beside the folder: the folder stays what is pushed / shared
        return path.parent / f"eval_{path.name}"
    run_dir = ckpt_mod.run_dir_of(path)
    if run_dir is not None:
        return RunDir(run_dir).eval_dir
    if path.is_file():
        return path.parent / f"eval_{path.stem}"
    return RunDir(path).eval_dir


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A feature-cache file, or None when it cannot be read as one (then it is recomputed and replaced)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torn, foreign or of another torch: recomputing is always right
        return None
    need = ("feats", "labels", "classes", "keys", "identity")
    return saved if isinstance(saved, dict) and all(k in saved for k in need) else None


class EvalContext:
    """Config, ranks, output directory and feature cache of one ``mst-ds knn|linear`` invocation."""

    def __init__(self, cfg: MSTConfig, *, ckpt: str | None, which: str, out_dir: Path, dist_info: Dist,
                 batch_size: int, num_workers: int, cache: bool, preset: str,
                 unknown_classes: str = "error", sources: dict[str, str] | None = None,
                 lock: job.FileLock | None = None, given_preset: str | None = None) -> None:
        self.lock = lock
        self.cfg, self.ckpt, self.which = cfg, ckpt, which
        # The reuse rule (mst_ds.eval.identity): results and cached features carry the network's and the
        # data's identity, computed once here. {"train": bank / probe-training data, "val": query data}
        self.network = network_identity(ckpt, cfg, which)
        self.data = {name: data_identity(src) for name, src in (sources or {}).items()}
        self._data_of = {src: self.data[name] for name, src in (sources or {}).items()}
        self.out_dir, self.dist = out_dir, dist_info
        self.batch_size, self.num_workers, self.cache = batch_size, num_workers, cache
        self.preset = preset
        self.recorded_preset = recorded_preset(ckpt, given_preset)
        self.unknown_classes = unknown_classes

    @classmethod
    def from_args(cls, args, results: dict[str, str] | None = None) -> EvalContext:
        """``results``: {file name in --out: the ``command`` its JSON records}; each is refused (one line,
        every rank, before any work) when it exists and was not written by that command, unless --force."""
        from mst_ds.data.reader import _is_imagefolder, open_manifest

        given = None if is_random(args.ckpt) else args.ckpt
        ckpt = weights_file(given)
        cfg = resolve_config(ckpt, args.preset, args.sets)
        which = export_which(ckpt, args.which)
        preset = args.preset or DEFAULT_PRESET
        for name in ("train", "val"):
            source = getattr(args, name)
            check_labelled(source)
            if not _is_imagefolder(source):
                open_manifest(source)  # every listed shard present, before any rank starts
        out = Path(args.out) if args.out else default_out_dir(given, preset)
        for name, command in (results or {}).items():
            refuse_foreign(out / name, lambda p, c=command: json_written_by(p, "command", c), f"mst-ds {command}",
                           bool(getattr(args, "force", False)))
        dist_info = init_dist()
        lock = None
        if dist_info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            # Two evaluations into one folder would overwrite each other's result: the second is refused.
            lock = job.FileLock(out / OUT_LOCK, f"--out {out}: in use by another evaluation ({{holder}}); wait for "
                                "it to end or use another --out", UsageError, remove=True).acquire()
        return cls(cfg, ckpt=ckpt, which=which, out_dir=out, dist_info=dist_info,
                   batch_size=args.batch_size or 128,
                   num_workers=cfg.data.num_workers if args.num_workers is None else args.num_workers,
                   cache=not getattr(args, "no_cache", False), preset=preset,
                   unknown_classes=getattr(args, "unknown_classes", "error"),
                   sources={"train": args.train, "val": args.val}, lock=lock, given_preset=args.preset)

    def __enter__(self) -> EvalContext:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def model_label(self) -> str:
        return f"random init ({Path(self.preset).stem})" if self.ckpt is None else f"{self.ckpt} ({self.which})"

    def backbone(self) -> Backbone:
        return load_backbone(self.ckpt, self.cfg, self.which).to(self.dist.device)

    def describe(self) -> dict[str, Any]:
        """What a result file records of how it was computed; ``model`` and ``data`` are the identities
        (mst_ds.eval.identity) that decide whether it may be reused or aggregated with another."""
        return {"ckpt": self.ckpt or RANDOM, "which": self.which, "preset": self.recorded_preset,
                "model": self.network, "seed": self.cfg.run.seed,
                "image_size": self.cfg.eval.image_size, "world_size": self.dist.world_size, "data": self.data}

    def cache_key(self, source: str, spec: FeatureSpec, transform_name: str) -> dict[str, Any]:
        """Everything the features depend on: the network and data identities, the features and the transform."""
        data = self._data_of.get(source) or data_identity(source)
        return {"model": self.network, "data": data, "spec": [spec.n_last_blocks, spec.avgpool],
                "transform": transform_name, "image_size": self.cfg.eval.image_size, "mean": self.cfg.augment.mean,
                "std": self.cfg.augment.std}

    def cache_path(self, source: str, spec: FeatureSpec, transform_name: str) -> Path:
        key = self.cache_key(source, spec, transform_name)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.out_dir / "features" / f"{digest}.pt"

    def features(self, backbone: Backbone, source: str, spec: FeatureSpec, *, split: str) -> LabelledFeatures:
        """Eval-transform features of ``source`` on every rank, from the cache when it holds them for this
        very key (a file whose stored key differs, or of an older version without one, is recomputed)."""
        from mst_ds.data.augment import eval_transform

        path = self.cache_path(source, spec, "eval")
        key = json.loads(json.dumps(self.cache_key(source, spec, "eval")))  # as stored: tuples → lists
        if self.cache and path.exists():
            saved = _read_cache(path)
            if saved is not None and saved.get("identity") == key:
                return LabelledFeatures(saved["feats"], saved["labels"], list(saved["classes"]),
                                        int(saved.get("corrupt", 0)), list(saved["keys"]))
        transform = eval_transform(self.cfg.eval.image_size, mean=self.cfg.augment.mean, std=self.cfg.augment.std)
        loader, classes = open_eval_data(source, transform=transform, batch_size=self.batch_size,
                                         num_workers=self.num_workers, rank=self.dist.rank,
                                         world_size=self.dist.world_size)
        feats, labels, keys = extract_features(backbone, loader, n_last_blocks=spec.n_last_blocks,
                                               avgpool=spec.avgpool, device=self.dist.device, dist_info=self.dist,
                                               description=f"{split} features", return_keys=True)
        # Sorted by key: a repeated sample (a shard listed twice, a key written twice) would be
        # counted twice in the bank or the score; `mst-shards verify` reports it as damage.
        repeated = next((a for a, b in zip(keys, keys[1:]) if a == b), None)
        if repeated is not None:
            raise UsageError(f"{source}: sample key {repeated} occurs {keys.count(repeated)} times (a shard listed "
                             "twice or a duplicated sample; `mst-shards verify` lists them)")
        corrupt = self._corrupt_total(loader.corrupt, source)
        if labels.numel() == 0:
            raise UsageError(f"{source}: no readable images")
        if bool((labels < 0).any()):
            raise UsageError(f"{source}: data without labels ({int((labels < 0).sum())} samples have no class)")
        if self.cache and self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic.atomic_path(path) as tmp:
                torch.save({"feats": feats, "labels": labels, "classes": classes, "corrupt": corrupt,
                            "source": source, "keys": keys, "identity": key}, tmp)
        return LabelledFeatures(feats, labels, classes, corrupt, keys)

    def _corrupt_total(self, records: list[dict[str, str]], source: str) -> int:
        """Samples of ``source`` that failed to decode, over all ranks: an error under
        ``data.corrupt_policy = error``, else counted, reported and left out."""
        n = len(records)
        if self.dist.active:
            import torch.distributed as dist

            t = torch.tensor([n], device=self.dist.device)
            dist.all_reduce(t)
            n = int(t)
        if n and self.cfg.data.corrupt_policy == "error":
            first = records[0] if records else {"key": "?", "shard": ""}
            raise RunFailure(f"{source}: {n} images fail to decode (first: {first['key']} {first['shard']}); "
                             "data.corrupt_policy=count leaves them out")
        if n and self.is_main:
            print(f"warning: {source}: {n} images fail to decode and are left out "
                  f"(data.corrupt_policy=count)", file=sys.stderr)
        return n

    def match(self, train_classes: list[str], val: LabelledFeatures, *, train_source: str,
              val_source: str) -> tuple[LabelledFeatures, ClassMatch]:
        """``val`` with labels in the training data's class indices (see :func:`match_classes`)."""
        m = match_classes(train_classes, val.classes, val.labels, policy=self.unknown_classes,
                          train_source=train_source, val_source=val_source)
        if m.excluded and self.is_main:
            print(f"excluded {sum(m.excluded.values())} val images of classes the training data does not have: "
                  f"{', '.join(m.excluded)}")
        keys = [k for k, kept in zip(val.keys, m.keep.tolist()) if kept]
        return LabelledFeatures(val.feats[m.keep], m.labels, list(train_classes), val.corrupt, keys), m

    def barrier(self) -> None:
        if self.dist.active:
            import torch.distributed as dist

            dist.barrier()

    def finish(self) -> None:
        if self.dist.active:
            import torch.distributed as dist

            dist.barrier()
            if self.dist.started_here:
                dist.destroy_process_group()
