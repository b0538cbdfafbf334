"""Warm start (``model.init_from``): a fresh run's initial weights from released or exported weights.

Sources, told apart by what they are:

* a timm model folder (``config.json`` + ``model.safetensors``; ``mst-ds export --format timm-folder``,
  a Hub download) — a backbone, timm key names;
* a ``.safetensors`` file (``mst-ds export``, timm's own) — a backbone, timm key names;
* anything else is read as a DINO-format checkpoint with ``torch.load(weights_only=True)`` (never
  unpickling code): a plain backbone state dict (DINO's released ``dino_deitsmall16_pretrain.pth``) or a
  training checkpoint holding ``teacher`` / ``student`` (``module.`` and ``backbone.`` / ``head.``
  prefixes), of which the teacher is read.

``model.init_from_parts``: ``backbone`` (the ViT's weights) or ``backbone+head`` (also the DINO projection
head: DINO's ``last_layer.weight_g/_v`` are the weight-norm parametrisation's ``original0/1``). Only the
weights: the optimizer, the schedules and the step start fresh, and the teacher is copied from the
student after loading, so both start equal. Keys that do not match (absent, or of another shape) are
said in one line; nothing matching at all is an error (one line).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mst_ds import checkpoint as ckpt
from mst_ds.config import ConfigError
from mst_ds.eval.features import TIMM_WEIGHTS

# DINO's weight-normalised last layer (torch.nn.utils.weight_norm) → torch's parametrizations.weight_norm.
_WEIGHT_NORM = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
                "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}


def weights_file(path: Path) -> Path:
    """The file holding the weights of ``path`` (a timm folder's ``model.safetensors``)."""
    return path / TIMM_WEIGHTS if path.is_dir() else path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_source(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """(backbone tensors with timm ViT key names, head tensors with this project's DINOHead names, kind)."""
    source = weights_file(path)
    if not source.is_file():
        raise ConfigError(f"model.init_from: {path}: no such file (or a folder without {TIMM_WEIGHTS})")
    if source.suffix == ".safetensors":
        try:
            return load_file(str(source)), {}, "timm folder" if path.is_dir() else "safetensors"
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise ConfigError(f"model.init_from: {source}: not a readable .safetensors file ({type(err).__name__})") from None
    try:
        state = ckpt.safe_load(source)
    except Exception as err:  # weights_only refuses pickled code; a damaged file fails in many ways
        raise ConfigError(f"model.init_from: {source}: not a weights-only torch checkpoint "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"model.init_from: {source}: expected a state dict, found {type(state).__name__}")
    for key in ("teacher", "student", "model", "state_dict"):  # a DINO training checkpoint: its teacher
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    has_prefix = any(k.startswith("backbone.") for k in state)
    backbone = _strip(state, "backbone.") if has_prefix else {k: v for k, v in state.items() if not k.startswith("head.")}
    head = {_WEIGHT_NORM.get(k, k): v for k, v in _strip(state, "head.").items()}
    return backbone, head, "DINO checkpoint"


def _load(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> tuple[int, list[str], list[str]]:
    """Copy the matching tensors into ``module`` → (loaded, source keys not used, module keys not set)."""
    own = module.state_dict()
    fit = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(fit, strict=False)
    unused = [f"{where}{k}" + (f" {tuple(v.shape)}≠{tuple(own[k].shape)}" if k in own else "")
              for k, v in tensors.items() if k not in fit]
    return len(fit), unused, [f"{where}{k}" for k in own if k not in fit]


def warm_start(model: torch.nn.Module, path: str | Path, parts: str, *, say: bool = True) -> dict[str, Any]:
    """Load ``path`` into ``model`` (an MSTModel, before its teacher is copied) → the source's identity
    and what was loaded, for run_info.json. Unmatched keys: one line on stdout (``say``: rank 0)."""
    path = Path(path)
    backbone, head, kind = read_source(path)
    n, unused, unset = _load(model.backbone.vit, backbone, "")
    if parts == "backbone+head":
        if not head:
            raise ConfigError(f"model.init_from_parts: backbone+head, but {path} ({kind}) holds no projection head")
        n_head, unused_head, unset_head = _load(model.head, head, "head.")
        n, unused, unset = n + n_head, unused + unused_head, unset + unset_head
    if n == 0:
        raise ConfigError(f"model.init_from: {path}: no tensor matches the model ({cfg_hint(backbone)})")
    if say and (unused or unset):
        print(f"warm start from {path}: {len(unused)} source key(s) not loaded: {', '.join(unused) or '-'}; "
              f"{len(unset)} model key(s) left at their initial values: {', '.join(unset) or '-'}", flush=True)
    return {"path": str(path.resolve()), "sha256": sha256(weights_file(path)), "kind": kind, "parts": parts,
            "tensors_loaded": n, "source_keys_not_loaded": unused, "model_keys_not_set": unset}


def cfg_hint(backbone: dict[str, torch.Tensor]) -> str:
    """A hint at what the source is, for the no-match error."""
    keys = sorted(backbone)[:3]
    return f"its keys start {', '.join(keys)}" if keys else "it holds no backbone tensor"
