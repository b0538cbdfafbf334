"""The shard manifest ``index.json``: what ``mst-shards write`` produced, read by the loader and ``verify``.

One folder may hold the shards of several splits (``train-*.tar`` and ``val-*.tar``), each with its own
manifest: a split's manifest is ``index.json`` unless that name already holds another split's, then
``index-<split>.json``. Given only such a folder, :meth:`Manifest.load` refuses to guess (one line naming
both) unless ``split=`` says which.

Shard names come from a file a user may have been handed: they are checked at load (no path separators,
no ``..``, no shell metacharacters) and every name substituted into a ``pipe:`` command is quoted.

A tar truncated exactly at a member boundary reads back short with no error (SPEC §5), so the per-shard
sample count, size and checksum recorded here are the only way to notice a damaged shard; the loader also
equalises batches per rank from these counts without opening a single tar.

The checksum is named by its key in each shard's entry: ``xxh3_128`` (what ``mst-shards write`` records by
default: it runs at memory speed, where sha256 alone was slower than copying the files) or ``sha256``
(``--checksum sha256``, and every manifest written before xxh3). Both verify; a data identity
(:meth:`Manifest.fingerprint`) computed from a sha256 manifest is what it always was.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from braceexpand import braceexpand
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from mst_ds import atomic
from mst_ds.config import ConfigError, format_validation_error

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
# Letters, digits and ``_ . + -``, not starting with a dot or dash: no separators, no shell syntax.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_SPLIT_INDEX = re.compile(r"index-([A-Za-z0-9_][A-Za-z0-9_.+-]*)\.json")


def split_index_name(split: str) -> str:
    """The manifest name of ``split`` in a folder whose ``index.json`` belongs to another split."""
    return f"index-{split}.json"


def shard_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a shard name (None if it can): it must stay a plain file in the manifest's
    folder and be inert in a shell command."""
    if not _SAFE_NAME.fullmatch(name):
        return f"shard name {name!r} has a path separator or a character outside [A-Za-z0-9_.+-]"
    if ".." in name:
        return f"shard name {name!r} contains '..'"
    return None


# Shard checksums by the key a manifest stores them under: a new hash object of each.
CHECKSUMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
DEFAULT_CHECKSUM = "xxh3_128"


def file_checksum(path: Path, algorithm: str) -> str:
    """The hex checksum ``algorithm`` (a key of :data:`CHECKSUMS`) of the file's bytes."""
    h = CHECKSUMS[algorithm]()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ManifestError(ConfigError):
    """A manifest or shard source that cannot be used; ``str(err)`` is one line."""


# The shape of a manifest as ``mst-shards write`` writes it, checked before any field is used: strict
# types (``true`` is not a count, 80.5 is not a count, "10" is not a list), bounded integers (10**30 is
# not a size), at least one sample per shard. Keys this version does not read are allowed (a newer writer).
MAX_COUNT = 2**40  # samples in one shard / one manifest: far beyond any data set, far below int64
MAX_BYTES = 2**62


class _ShardShape(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr
    count: StrictInt = Field(ge=1, le=MAX_COUNT)
    bytes: StrictInt = Field(ge=0, le=MAX_BYTES)

    @model_validator(mode="before")
    @classmethod
    def _checksum(cls, d: Any) -> Any:
        """The checksum this code reads first (a key of CHECKSUMS) is a string."""
        if isinstance(d, dict):
            algorithm = next((a for a in CHECKSUMS if a in d), None)
            if algorithm is not None and not isinstance(d[algorithm], str):
                raise ValueError(f"{algorithm} is not a string")
        return d


class _ClassShape(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: StrictInt = Field(ge=0, le=MAX_COUNT)
    wnid: StrictStr
    name: StrictStr


class _ManifestShape(BaseModel):
    model_config = ConfigDict(extra="allow")
    split: StrictStr
    classes: list[_ClassShape]
    shards: list[_ShardShape]
    total: StrictInt = Field(ge=0, le=MAX_COUNT)
    tool_version: StrictStr | None = None
    unreadable: list[StrictStr] = []
    empty_classes: list[StrictStr] = []
    extra: dict[str, Any] = {}


def shape_problem(d: Any) -> str | None:
    """Why ``d`` (parsed JSON) is not shaped like a manifest (the first problem, one line), else None."""
    if not isinstance(d, dict):
        return "not a JSON object"
    try:
        _ManifestShape.model_validate(d)
    except ValidationError as err:
        return format_validation_error(err)
    except RecursionError:
        return "nested deeper than this reader goes"
    return None


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's root, e.g. "train-000000.tar"
    count: int  # samples in the shard
    bytes: int  # file size
    checksum: str  # hex digest of the file's bytes
    algorithm: str = "sha256"  # a key of CHECKSUMS: the key the manifest stores the digest under

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "bytes": self.bytes, self.algorithm: self.checksum}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        """One shard entry; KeyError names the missing checksum when the entry has none this code knows."""
        algorithm = next((a for a in CHECKSUMS if a in d), None)
        if algorithm is None:
            raise KeyError(" or ".join(CHECKSUMS))
        return cls(str(d["name"]), int(d["count"]), int(d["bytes"]), str(d[algorithm]), algorithm)

    def identity(self) -> list[Any]:
        """The shard's part of the data identity; a sha256 shard's is what it was before other checksums."""
        digest = self.checksum if self.algorithm == "sha256" else f"{self.algorithm}:{self.checksum}"
        return [self.name, self.count, self.bytes, digest]


@dataclass
class Manifest:
    split: str
    classes: list[dict[str, Any]]  # [{"index": i, "wnid": ..., "name": ...}] in label order
    shards: list[ShardInfo]
    total: int  # samples over all shards
    tool_version: str
    unreadable: list[str] = field(default_factory=list)  # inputs that could not be stored
    root: Path | str = Path(".")  # directory (or URL prefix) the shard names are relative to
    extra: dict[str, Any] = field(default_factory=dict)  # writer settings (seed, max_count, layout, ...)
    # Explicit shard URLs (brace pattern / pipe: sources); None = root/name for every shard.
    shard_urls: list[str] | None = None
    # Class folders that held no image: still classes, so every later label keeps its index.
    empty_classes: list[str] = field(default_factory=list)
    index_name: str = INDEX_NAME  # the manifest's file name in root (a pipe: root names it in its command)

    # -- derived ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def urls(self) -> list[str]:
        """One openable URL per shard (a local path, ``pipe:...`` or ``http(s)://...``)."""
        if self.shard_urls is not None:
            return list(self.shard_urls)
        root = str(self.root)
        if root.startswith("pipe:"):  # a manifest read by a command: the same command reads each shard
            return [root.replace(self.index_name, shlex.quote(s.name)) for s in self.shards]
        if _is_remote(root):
            return [root.rstrip("/") + "/" + s.name for s in self.shards]
        return [str(Path(root) / s.name) for s in self.shards]

    def fingerprint(self) -> dict[str, Any]:
        """What the data is, independent of where it lies: the shards (name, count, size, checksum, in
        order — the order is part of a training trajectory) and the classes → digest + counts. Runs and
        evaluations record it; moved shards keep it, other shards or classes change it."""
        content = {"shards": [s.identity() for s in self.shards], "classes": self.classes}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
        return {"digest": digest, "samples": self.total, "shards": len(self.shards), "classes": self.num_classes}

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "split": self.split,
            "tool_version": self.tool_version,
            "total": self.total,
            "total_bytes": self.total_bytes,
            "num_shards": len(self.shards),
            "num_classes": self.num_classes,
            "classes": self.classes,
            "shards": [s.to_dict() for s in self.shards],
            "unreadable": self.unreadable,
            "num_unreadable": len(self.unreadable),
            "empty_classes": self.empty_classes,
            "extra": self.extra,
        }

    def save(self, directory: str | Path, name: str = INDEX_NAME) -> Path:
        """Write ``DIR/name`` atomically (temp name + rename)."""
        path = Path(directory) / name
        atomic.write_json(path, self.to_dict(), indent=1)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path | str, *, check_names: bool = True,
                  index_name: str = INDEX_NAME) -> Manifest:
        """``check_names=False`` is for ``verify``, which reports bad names as findings instead."""
        if (why := shape_problem(d)) is not None:
            where = str(root) if str(root).startswith("pipe:") else f"{root}/{index_name}"
            raise ManifestError(f"{where}: not a shard manifest as mst-shards writes it ({why})")
        try:
            shards = [ShardInfo.from_dict(s) for s in d["shards"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{root}: not a shard manifest (missing or bad field {err})") from None
        if check_names:
            where = str(root) if str(root).startswith("pipe:") else f"{root}/{index_name}"
            for s in shards:
                if (why := shard_name_problem(s.name)) is not None:
                    raise ManifestError(f"{where}: {why} (refused; `mst-shards verify` lists every problem)")
        try:
            return cls(
                split=str(d["split"]),
                classes=list(d["classes"]),
                shards=shards,
                total=int(d["total"]),
                tool_version=str(d.get("tool_version", "?")),
                unreadable=list(d.get("unreadable", [])),
                root=root,
                extra=dict(d.get("extra", {})),
                empty_classes=[str(c) for c in d.get("empty_classes", [])],
                index_name=index_name,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{root}: not a shard manifest (missing or bad field {err})") from None

    @classmethod
    def load(cls, source: str | Path, *, split: str | None = None, check_names: bool = True) -> Manifest:
        """A manifest from its file, its directory, an http(s) URL of it, or a shard source.

        Shard sources (a brace pattern such as ``dir/train-{000000..000009}.tar``, a ``pipe:`` command or
        http URLs, several separated by ``::``) select shards; their counts come from the manifest next
        to the first shard that lists it, restricted to the selected names. ``split`` picks the manifest
        of a folder that holds several splits (and must match the manifest's split when given).
        """
        source = str(source)
        local = not _is_remote(source)
        if local and not Path(source).exists() and not any(c in source for c in "{}") and "::" not in source:
            raise ManifestError(f"{source}: no such file or folder (expected shards written by `mst-shards write`)")
        if source.endswith(".json") or (local and Path(source).is_dir()):
            m = _load_index(source, split=split, check_names=check_names)
            if split is not None and m.split != split:
                raise ManifestError(f"{source}: a manifest of split {m.split!r}, not {split!r}")
            return m
        urls = expand_urls(source)
        if not urls:
            raise ManifestError(f"{source}: no shards")
        try:
            full = _sibling_manifest(urls[0], check_names=check_names)
        except ManifestError as err:
            raise ManifestError(f"{source}: the shards need their manifest ({err})") from None
        by_name = {s.name: s for s in full.shards}
        picked: list[ShardInfo] = []
        for url in urls:
            name = _shard_name(url)
            if name not in by_name:
                raise ManifestError(f"{url}: shard {name} is not in the manifest {full.root}/{full.index_name}")
            picked.append(by_name[name])
        full.shards = picked
        full.total = sum(s.count for s in picked)
        full.shard_urls = urls
        return full


def fingerprint_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """How two :meth:`Manifest.fingerprint` values differ, in words (for a one-line refusal)."""
    parts = [f"{old.get(k)} → {new.get(k)} {k}" for k in ("samples", "shards", "classes") if old.get(k) != new.get(k)]
    return ", ".join(parts) or "same counts, other shard contents or class names"


# ------------------------------------------------------------------------------------------------
# Manifests in a folder
# ------------------------------------------------------------------------------------------------
def manifests_in(directory: str | Path) -> dict[str, Path]:
    """{split: manifest path} of the shard manifests in ``directory`` (files that are not a manifest
    are left out)."""
    directory = Path(directory)
    found: dict[str, Path] = {}
    names = [INDEX_NAME] + sorted(p.name for p in directory.glob("index-*.json") if _SPLIT_INDEX.fullmatch(p.name))
    for name in names:
        path = directory / name
        try:
            data = json.loads(path.read_text())
            split = data["split"] if isinstance(data, dict) and isinstance(data.get("shards"), list) else None
        except (OSError, ValueError, KeyError, RecursionError):  # a deeply nested file: not a manifest
            continue
        if isinstance(split, str) and split not in found:
            found[split] = path
    return found


PROGRESS_DIR = ".mst-shards"  # the writer's records folder in a shard folder (data_tools.writer names it too)


def is_shard_dir(path: str | Path) -> bool:
    """True for a folder holding a shard manifest, or a file named like one, or the writer's records (the
    eval side's shards-or-ImageFolder test): such a folder is read as shards, and a malformed manifest is
    then one line saying why, never an ImageFolder whose classes are ``.mst-shards``."""
    p = Path(path)
    return p.is_dir() and (bool(manifests_in(p)) or (p / INDEX_NAME).is_file() or (p / PROGRESS_DIR).is_dir())


def manifest_path(directory: str | Path, split: str | None = None) -> Path:
    """The manifest file of ``directory`` (of ``split`` when given); one-line errors otherwise."""
    directory = Path(directory)
    found = manifests_in(directory)
    if split is not None:
        if split in found:
            return found[split]
        have = ", ".join(f"{p.name} ({s})" for s, p in found.items()) or "none"
        raise ManifestError(f"{directory}: no manifest of split {split!r} (manifests: {have})")
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        if (directory / INDEX_NAME).exists():
            return directory / INDEX_NAME  # not a manifest: _load_index says why
        raise ManifestError(f"{directory}: no such manifest (no {INDEX_NAME} in this folder; "
                            "write shards with `mst-shards write` first)")
    both = " and ".join(f"{p.name} ({s})" for s, p in found.items())
    raise ManifestError(f"{directory}: holds the manifests of several splits, {both}: give the manifest file")


# ------------------------------------------------------------------------------------------------
# Source strings
# ------------------------------------------------------------------------------------------------
def _is_remote(s: str) -> bool:
    return s.startswith(("http://", "https://", "pipe:"))


def expand_urls(source: str) -> list[str]:
    """``a-{000..003}.tar::b.tar`` → the list of URLs (brace patterns expanded, ``::`` separates)."""
    out: list[str] = []
    for part in source.split("::"):
        part = part.strip()
        if part:
            out.extend(braceexpand(part))
    return out


def _url_target(url: str) -> str:
    """The file path/URL a shard source reads: the last token of a ``pipe:`` command."""
    if url.startswith("pipe:"):
        tokens = shlex.split(url[5:])
        return tokens[-1] if tokens else url
    return url


def _shard_name(url: str) -> str:
    target = _url_target(url).split("?")[0]
    return target.rstrip("/").rsplit("/", 1)[-1]


def _sibling_manifest(url: str, *, check_names: bool) -> Manifest:
    """The manifest that lists the shard ``url``, from the shard's folder (or URL prefix): ``index.json``
    or the per-split ``index-<split>.json`` (split = the shard name's prefix, e.g. ``val-000003.tar``)."""
    name = _shard_name(url)
    if not _is_remote(url):
        folder = Path(url).parent
        found = manifests_in(folder) if folder.is_dir() else {}
        for path in found.values():
            m = _load_index(str(path), check_names=check_names)
            if any(s.name == name for s in m.shards):
                return m
        if found:
            raise ManifestError(f"no manifest in {folder} lists {name}")
        raise ManifestError(f"{folder / INDEX_NAME}: no such manifest")
    prefix = re.fullmatch(r"(.+)-\d+\.tar", name)
    candidates = ([split_index_name(prefix.group(1))] if prefix else []) + [INDEX_NAME]
    first_error: ManifestError | None = None
    for index_name in candidates:
        try:
            m = _load_index(_sibling_url(url, index_name), check_names=check_names)
        except ManifestError as err:
            first_error = first_error or err
            continue
        if any(s.name == name for s in m.shards):
            return m
    raise first_error or ManifestError(f"no manifest next to {url} lists {name}")


def _sibling_url(url: str, index_name: str) -> str:
    """Where a manifest named ``index_name`` next to the shard ``url`` is read from."""
    if url.startswith("pipe:"):
        cmd = url[5:]
        target = _url_target(url)
        if "/" in target:
            return "pipe:" + cmd.replace(target, target.rsplit("/", 1)[0] + "/" + index_name)
        return "pipe:" + cmd.replace(target, index_name)
    return url.split("?")[0].rsplit("/", 1)[0] + "/" + index_name


def _load_index(source: str, *, split: str | None = None, check_names: bool = True) -> Manifest:
    if source.startswith("pipe:"):
        # trusted: the user's own pipe: command (webdataset's URL form, from their command line or config);
        # shard names substituted into such commands are validated and shlex-quoted (urls()).
        proc = subprocess.run(source[5:], shell=True, capture_output=True)  # trusted: see above
        if proc.returncode != 0:
            raise ManifestError(f"{source}: command failed with exit code {proc.returncode}")
        text = proc.stdout.decode()
        root: Path | str = source  # urls(): the same command with the shard name in place of the manifest's
        index_name = _url_target(source).rsplit("/", 1)[-1]
    elif source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as resp:
                text = resp.read().decode()
        except OSError as err:
            raise ManifestError(f"{source}: cannot fetch ({err})") from None
        root, index_name = source.rsplit("/", 1)
    else:
        path = Path(source)
        if path.is_dir():
            path = manifest_path(path, split)
        if not path.exists():
            raise ManifestError(f"{path}: no such manifest (write shards with `mst-shards write` first)")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ManifestError(f"{path}: cannot read the manifest ({err})") from None
        root, index_name = path.parent, path.name
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{source}: manifest is not valid JSON ({err})") from None
    except RecursionError:
        raise ManifestError(f"{source}: not a shard manifest (nested deeper than Python's JSON reader goes)") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: not a shard manifest")
    return Manifest.from_dict(data, root, check_names=check_names, index_name=index_name)
