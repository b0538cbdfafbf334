"""What a result was computed from — the reuse rule (ARCHITECTURE.md, "Reuse").

A cached or reused result (features, a probe state, a k-NN / linear result, a study's evaluation, a
model card's numbers) carries the identity of the network and of the data it was computed from, and is
reused only when both equal the identity of what would be used now; otherwise it is recomputed, or
refused in one line. A name (a path, a tag, a step, a folder's mtime) is never the identity:

* :func:`network_identity` — the weights: a ``.safetensors`` file by the sha256 of its bytes; a
  checkpoint tag by a digest of its files' listing (relative path, size, mtime_ns: a retrained or
  rolled-back tag of the same name is new files); random init by architecture and seed. Plus ``which``
  (teacher / student) and the ``model`` config section (the attention path changes the last bits).
* :func:`data_identity` — what the loader reads: an ImageFolder by a digest of the very file list
  torchvision's ``ImageFolder`` reads (nested sub-folders included: relative path, size, mtime_ns) and
  its class names; shards by their manifest's fingerprint (names, counts, sizes, checksums, classes)
  plus the listing of the local shard files (a shard rewritten in place is other data).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mst_ds.config import MSTConfig, UsageError
from mst_ds.data.manifest import Manifest, is_shard_dir

RANDOM = "random"


# --------------------------------------------------------------------------------------------------
# Digests
# --------------------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of the file's bytes (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def listing_digest(entries: Iterable[tuple[str, int, int]]) -> str:
    """A digest of (relative path, size, mtime_ns) rows, in the given order."""
    h = hashlib.sha256()
    for rel, size, mtime in entries:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def listing(root: Path, files: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(path relative to ``root``, size, mtime_ns) of each file, links followed (what a reader reads)."""
    rows = []
    for f in files:
        st = os.stat(f)
        rows.append((str(Path(f).relative_to(root)), st.st_size, st.st_mtime_ns))
    return rows


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------
def network_identity(ckpt: str | None, cfg: MSTConfig, which: str) -> dict[str, Any]:
    """The identity of the network ``ckpt`` (None / "random" = random init of ``cfg``) as ``which``.

    → {"weights": digest, "which", "step" (None when unknown), "model": cfg.model (without the head)}.
    Equal dicts = the same features; a path is not part of it (a moved checkpoint is the same network).
    """
    model = cfg.model.model_dump(mode="json")
    model.pop("head", None)
    if ckpt is None or str(ckpt) == RANDOM:
        return {"weights": f"random:seed{cfg.run.seed}", "which": RANDOM, "step": 0, "model": model}
    path = Path(ckpt)
    if path.is_file():
        return {"weights": file_digest(path), "which": which, "step": _export_step(path), "model": model}
    # torch comes with the checkpoint module: imported only for a checkpoint (plan --study is torch-free)
    from mst_ds import checkpoint as ckpt_mod

    ckpt_dir, tag = ckpt_mod.resolve(path)
    tag_dir = ckpt_dir / tag
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file())
    return {"weights": "files:" + listing_digest(listing(tag_dir, files)), "which": which,
            "step": ckpt_mod.read_meta(tag_dir)["step"], "model": model}


def _export_step(path: Path) -> int | None:
    """The step an export's metadata names (informative: the weights' digest is the identity)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mst_ds", "{}"))
        step = meta.get("source", {}).get("step") if isinstance(meta, dict) else None
        return step if isinstance(step, int) and not isinstance(step, bool) else None
    except Exception:  # not an export of mst-ds (foreign or older file): no step to tell
        return None


def same_network(recorded: Any, now: dict[str, Any]) -> bool:
    """Whether a result's recorded network identity is ``now``'s (a missing or older record is not)."""
    return isinstance(recorded, dict) and recorded == now


# --------------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------------
def imagefolder_files(root: Path) -> tuple[list[str], list[Path]]:
    """(class names, image files) exactly as ``torchvision.datasets.ImageFolder(root)`` reads them
    (its ``find_classes`` and ``make_dataset``: nested sub-folders, links followed, its extensions)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except (FileNotFoundError, OSError) as err:
        raise UsageError(f"{root}: cannot list the ImageFolder ({err})") from None
    return list(classes), [Path(p) for p, _ in samples]


def data_identity(source: str) -> dict[str, Any]:
    """The identity of a labelled data source (see the module docstring). An ImageFolder →
    {"folder", "classes", "files", "listing"}; shards → the manifest's fingerprint + "files" (a
    digest of the local shard files' listing, absent for remote shards)."""
    p = Path(source)
    if p.is_dir() and not is_shard_dir(p):
        root = p.resolve()
        classes, files = imagefolder_files(root)
        rows = listing(root, files)
        names = hashlib.sha256(json.dumps(classes).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return {"folder": str(root), "classes": len(classes), "class_names": names, "files": len(rows),
                "listing": listing_digest(rows)}
    manifest = Manifest.load(source)
    ident = manifest.fingerprint()
    urls = manifest.urls()
    if all(not u.startswith(("pipe:", "http://", "https://")) for u in urls):
        try:
            ident["files"] = listing_digest((Path(u).name, *_stat(u)) for u in urls)
        except OSError as err:
            raise UsageError(f"{source}: a shard cannot be read ({err.strerror}: {err.filename})") from None
    return ident


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def same_data(recorded: Any, now: dict[str, Any]) -> bool:
    """Whether a result's recorded data identity is ``now``'s (a missing or older record is not)."""
    return isinstance(recorded, dict) and recorded == now


# --------------------------------------------------------------------------------------------------
# Writing only what this code wrote
# --------------------------------------------------------------------------------------------------
def refuse_foreign(path: Path, ours: Callable[[Path], bool], writer: str, force: bool) -> None:
    """One line (UsageError) when ``path`` exists and ``ours(path)`` says this code did not write it,
    unless ``force`` (the mechanism of ``mst-ds export`` and ``mst-shards write``): a directory or a link
    at the name is never replaced."""
    if path.is_symlink() or path.is_dir():
        raise UsageError(f"{path}: is a {'link' if path.is_symlink() else 'directory'}; {writer} writes a file there")
    if path.exists() and not force and not ours(path):
        raise UsageError(f"{path} exists and was not written by {writer} (it would be overwritten); "
                         "use another --out, or --force to replace it")


def json_written_by(path: Path, key: str, value: str) -> bool:
    """Whether ``path`` is a JSON object whose ``key`` is ``value`` (how mst-ds marks its result files)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get(key) == value
