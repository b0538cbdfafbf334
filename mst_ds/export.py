"""``mst-ds export``: a run's backbone for timm — one ``.safetensors`` file, or a timm / Hub model folder.

* ``--format safetensors`` (default): ``OUT.safetensors`` (timm key names; the metadata carries the
  network, normalisation and eval settings, so ``mst-ds knn --ckpt OUT`` evaluates it as the run would)
  + ``OUT.json``. Load with ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=OUT),
  **model_args)``.
* ``--format timm-folder``: ``DIR/config.json`` (written by timm's own ``save_config_for_hf``:
  ``architecture``, ``num_classes`` 0, ``model_args``, ``pretrained_cfg`` with mean / std / input size /
  crop of the run's evaluation) + ``DIR/model.safetensors`` (the same file as above) + ``DIR/README.md``
  (a short model card: preset, steps, k-NN / linear results of ``RUN/eval`` when present, config
  hash). ``timm.create_model("local-dir:DIR", pretrained=True)`` loads it — the layout of an ``hf-hub:``
  model, so the folder can be pushed as it is — and ``mst-ds knn|linear|attn --ckpt DIR`` evaluate it.

Never overwrites a file it did not write: an existing target must carry this module's mark (the
safetensors ``mst_ds`` metadata, the ``mst_ds`` key of ``config.json``, the model card's first line),
else the export stops with one line before writing anything. Other files in ``DIR`` are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mst_ds import atomic
from mst_ds import checkpoint as ckpt_mod
from mst_ds.config import MSTConfig, UsageError
from mst_ds.eval.features import TIMM_CONFIG as CONFIG
from mst_ds.eval.features import TIMM_WEIGHTS as WEIGHTS
from mst_ds.eval.features import ExportMeta, export_settings, run_preset
from mst_ds.eval.identity import network_identity, same_network
from mst_ds.model.backbone import Backbone
from mst_ds.run_dir import RunDir

CARD = "README.md"
CARD_MARK = "<!-- written by mst-ds export -->"


# --------------------------------------------------------------------------------------------------
# What is ours
# --------------------------------------------------------------------------------------------------
def _ours(path: Path) -> bool:
    """Whether an existing file at ``path`` was written by ``mst-ds export``."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return "mst_ds" in (f.metadata() or {})
        if path.name == CARD:
            with open(path, encoding="utf-8") as fh:
                return fh.readline().strip() == CARD_MARK
        data = json.loads(path.read_text())
        # (the OUT.json of earlier versions has no mst_ds key; its eval_settings are as much ours)
        return isinstance(data, dict) and ("mst_ds" in data or "eval_settings" in data)
    except Exception:  # unreadable, not JSON, not safetensors, not text: not ours either way
        return False


def refuse_foreign(paths: list[Path], force: bool = False) -> None:
    """One line, before anything is read or written, naming the first target that is a directory, lies in a
    place that cannot be written, or exists and was not written by this module (``force`` replaces it)."""
    for path in paths:
        if path.is_dir():
            raise UsageError(f"--out {path}: is a directory")
        place = next(p for p in path.absolute().parents if p.exists())  # the folder that holds or will hold it
        if not place.is_dir() or not os.access(place, os.W_OK | os.X_OK):
            why = "not a directory" if not place.is_dir() else "permission denied"
            raise UsageError(f"--out {path}: cannot write ({place}: {why})")
        if path.exists() and not force and not _ours(path):
            raise UsageError(f"--out {path} exists and was not written by mst-ds export (it would be overwritten); "
                             "choose another name, or --force to replace it")


# --------------------------------------------------------------------------------------------------
# The backbone of a checkpoint
# --------------------------------------------------------------------------------------------------
def backbone_tensors(path: str | Path, which: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], MSTConfig, Path]:
    """(timm-keyed tensors, model description, run config, run directory) of a checkpoint's backbone."""
    ckpt_dir, tag = ckpt_mod.resolve(path)
    cfg = ckpt_mod.run_config(ckpt_dir)
    teacher, student = ckpt_mod.load_teacher_student(ckpt_dir / tag)
    state = teacher if which == "teacher" else student
    backbone = Backbone.from_config(cfg.model, drop_path_rate=0.0)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    tensors = {k: v.contiguous() for k, v in backbone.timm_state_dict().items()}
    model_cfg = ExportMeta.model_validate({  # written through the model it is read back with
        "architecture": cfg.model.arch,
        "model_args": {**cfg.model.timm_kwargs, "num_classes": 0, "dynamic_img_size": True},
        "source": {"checkpoint": str(ckpt_dir / tag), "which": which, "step": ckpt_mod.read_meta(ckpt_dir / tag)["step"],
                   "config_hash": cfg.hash()},
        "patch_size": backbone.patch_size,
        "eval_settings": export_settings(cfg),
    }).model_dump(mode="json")
    return tensors, model_cfg, cfg, ckpt_mod.run_dir_of(ckpt_dir) or ckpt_dir.parent


def _write_weights(tensors: dict[str, torch.Tensor], model_cfg: dict[str, Any], out: Path) -> None:
    with atomic.atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"mst_ds": json.dumps(model_cfg)})


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """An OS error while writing ``out`` (disk full, permissions) is one line."""
    try:
        yield
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write ({err.strerror or err})") from None


def export_backbone(path: str | Path, out: str | Path, which: str = "teacher", *, force: bool = False) -> dict[str, Any]:
    """Write the backbone as timm-keyed ``OUT.safetensors`` + ``OUT.json`` → the model description."""
    out = Path(out)
    refuse_foreign([out, out.with_suffix(".json")], force)
    tensors, model_cfg, _, _ = backbone_tensors(path, which)
    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_weights(tensors, model_cfg, out)
        atomic.write_text(out.with_suffix(".json"), json.dumps({**model_cfg, "mst_ds": True}, indent=1) + "\n")
    return model_cfg


# --------------------------------------------------------------------------------------------------
# The timm / Hub folder
# --------------------------------------------------------------------------------------------------
def timm_config(cfg: MSTConfig, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` as timm writes it (``save_config_for_hf``), with this run's preprocessing:
    the eval transform resizes the short side to round(S·256/224) and center-crops S (bicubic)."""
    import tempfile

    import timm
    from timm.models._hub import save_config_for_hf

    size = cfg.eval.image_size
    model = timm.create_model(cfg.model.arch, pretrained=False, **model_cfg["model_args"])
    data_config = {"input_size": (3, size, size), "mean": tuple(cfg.augment.mean), "std": tuple(cfg.augment.std),
                   "crop_pct": size / round(size * 256 / 224), "crop_mode": "center", "interpolation": "bicubic"}
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, str(Path(tmp) / CONFIG), data_config=data_config)
        config = json.loads((Path(tmp) / CONFIG).read_text())
    # The defaults of the architecture's own pretrained weights describe someone else's weights.
    pcfg = config["pretrained_cfg"]
    for key in ("license", "hf_hub_id", "origin_url", "paper_ids", "notes"):
        pcfg.pop(key, None)
    pcfg["tag"] = "mst_ds"
    config["mst_ds"] = model_cfg["source"]
    return config


def _results(run_dir: Path, network: dict[str, Any]) -> list[tuple[str, float]]:
    """(metric, value) of the run's own evaluations (``RUN/eval/knn.json``, ``linear_*.json``) of this very
    network (the reuse rule: a result recording another checkpoint, ``--which`` or no identity is left out)."""
    found: list[tuple[str, float]] = []
    for path in [RunDir(run_dir).eval_dir / "knn.json", *sorted(RunDir(run_dir).eval_dir.glob("linear_*.json"))]:
        if not path.is_file() or path.name.endswith("_state.json"):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError, RecursionError):
            continue  # a result this card cannot read is left out, not guessed
        if not isinstance(record, dict) or not same_network(record.get("model"), network):
            continue
        metrics = record.get("metrics")
        if isinstance(metrics, dict):
            found += [(str(k), float(v)) for k, v in metrics.items()
                      if isinstance(v, int | float) and not isinstance(v, bool)]
    return found


def _init_from(run_dir: Path) -> dict[str, Any] | None:
    """The warm start's source the run recorded (run_info.json ``init_from``: path, sha256), else None."""
    try:
        source = json.loads(RunDir(run_dir).run_info.read_text()).get("init_from")
        return source if isinstance(source, dict) else None
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def model_card(run_dir: Path, model_cfg: dict[str, Any], config: dict[str, Any], out: Path,
               network: dict[str, Any]) -> str:
    src = model_cfg["source"]
    results = _results(run_dir, network)
    lines = [CARD_MARK, "---", "library_name: timm", "tags: [image-feature-extraction, self-supervised, mst]", "---",
             "", f"# MST backbone ({config['architecture']}, {src['which']})", "",
             "Masked Self-supervised Transformer (Li et al., NeurIPS 2021) pre-trained with mst_ds.", "",
             "```python", "import timm",
             f"model = timm.create_model({('local-dir:' + str(out))!r}, pretrained=True)  # (B, 3, H, W) → (B, "
             f"{config.get('num_features', '?')}) class-token features", "```", "",
             "| | |", "|---|---|",
             f"| preset | `{run_preset(run_dir) or 'unknown'}` |",
             f"| optimizer steps | {src['step']} |",
             f"| network | {src['which']} |",
             f"| config hash | `{src['config_hash']}` |",
             f"| input | {config['pretrained_cfg']['input_size'][1]} px, mean {config['pretrained_cfg']['mean']}, "
             f"std {config['pretrained_cfg']['std']} |"]
    init = _init_from(run_dir)
    lines.append(f"| initial weights | warm start from `{init.get('path')}` (sha256 `{init.get('sha256')}`, "
                 f"{init.get('parts')}) |" if init else "| initial weights | random (no warm start) |")
    if results:
        lines += ["", "Evaluations of this checkpoint's network (`RUN/eval`, top-1 %):", "", "| metric | value |",
                  "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in results]
    else:
        lines += ["", "No k-NN or linear result of this checkpoint's network was found in the run's `eval/` folder."]
    return "\n".join(lines) + "\n"


def export_folder(path: str | Path, out: str | Path, which: str = "teacher", *, force: bool = False) -> dict[str, Any]:
    """Write ``DIR/{config.json, model.safetensors, README.md}`` → the model description."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    targets = [out / CONFIG, out / WEIGHTS, out / CARD]
    refuse_foreign(targets, force)
    tensors, model_cfg, cfg, run_dir = backbone_tensors(path, which)
    config = timm_config(cfg, model_cfg)
    network = network_identity(model_cfg["source"]["checkpoint"], cfg, which)
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
        _write_weights(tensors, model_cfg, out / WEIGHTS)
        atomic.write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")
        atomic.write_text(out / CARD, model_card(run_dir, model_cfg, config, out, network))
    return model_cfg


def run(args) -> int:
    """``mst-ds export CKPT --out FILE.safetensors|DIR [--format safetensors|timm-folder] [--which ...]``."""
    if args.format == "timm-folder":
        model_cfg = export_folder(args.ckpt, args.out, args.which, force=args.force)
        print(f"wrote {args.out}/{{{CONFIG},{WEIGHTS},{CARD}}} ({args.which}, step {model_cfg['source']['step']}); "
              f"load with\n  timm.create_model({('local-dir:' + str(args.out))!r}, pretrained=True)")
        return 0
    if not str(args.out).endswith(".safetensors"):
        raise UsageError(f"--out {args.out}: expected a .safetensors file name (or --format timm-folder)")
    model_cfg = export_backbone(args.ckpt, args.out, args.which, force=args.force)
    args_txt = ", ".join(f"{k}={v!r}" for k, v in model_cfg["model_args"].items())
    print(f"wrote {args.out} ({args.which}, step {model_cfg['source']['step']}); load with\n"
          f"  timm.create_model({model_cfg['architecture']!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(args.out)!r}), {args_txt})")
    return 0
