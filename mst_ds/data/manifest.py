"""The shard manifest ``index.json``: what ``mst-shards write`` produced, read by the loader and ``verify``.

A tar truncated exactly at a member boundary reads back short with no error (SPEC §5), so the per-shard
sample count, size and sha256 recorded here are the only way to notice a damaged shard; the loader also
equalises batches per rank from these counts without opening a single tar.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from mst_ds import atomic
from mst_ds.config import ConfigError

INDEX_NAME = "index.json"
FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    """The checksum the manifest records per shard (hex sha256 of the file's bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ManifestError(ConfigError):
    """A manifest or shard source that cannot be used; ``str(err)`` is one line."""


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's root, e.g. "train-000000.tar"
    count: int  # samples in the shard
    bytes: int  # file size
    sha256: str


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
            return [root.replace(INDEX_NAME, s.name) for s in self.shards]
        if _is_remote(root):
            return [root.rstrip("/") + "/" + s.name for s in self.shards]
        return [str(Path(root) / s.name) for s in self.shards]

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
            "shards": [asdict(s) for s in self.shards],
            "unreadable": self.unreadable,
            "num_unreadable": len(self.unreadable),
            "extra": self.extra,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``DIR/index.json`` atomically (temp name + rename)."""
        directory = Path(directory)
        path = directory / INDEX_NAME
        atomic.write_json(path, self.to_dict(), indent=1)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path | str) -> Manifest:
        try:
            shards = [ShardInfo(str(s["name"]), int(s["count"]), int(s["bytes"]), str(s["sha256"])) for s in d["shards"]]
            return cls(
                split=str(d["split"]),
                classes=list(d["classes"]),
                shards=shards,
                total=int(d["total"]),
                tool_version=str(d.get("tool_version", "?")),
                unreadable=list(d.get("unreadable", [])),
                root=root,
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{root}: not a shard manifest (missing or bad field {err})") from None

    @classmethod
    def load(cls, source: str | Path) -> Manifest:
        """A manifest from ``index.json``, its directory, an http(s) URL of it, or a shard source.

        Shard sources (a brace pattern such as ``dir/train-{000000..000009}.tar``, a ``pipe:`` command or
        http URLs, several separated by ``::``) select shards; their counts come from the ``index.json``
        next to the first shard, restricted to the selected names.
        """
        source = str(source)
        if source.endswith(".json") or (not _is_remote(source) and Path(source).is_dir()):
            return _load_index(source)
        urls = expand_urls(source)
        if not urls:
            raise ManifestError(f"{source}: no shards")
        sibling = _sibling_index(urls[0])
        try:
            full = _load_index(sibling)
        except ManifestError as err:
            raise ManifestError(f"{source}: the shards need their manifest ({err})") from None
        by_name = {s.name: s for s in full.shards}
        picked: list[ShardInfo] = []
        for url in urls:
            name = _shard_name(url)
            if name not in by_name:
                raise ManifestError(f"{url}: shard {name} is not in the manifest {sibling}")
            picked.append(by_name[name])
        full.shards = picked
        full.total = sum(s.count for s in picked)
        full.shard_urls = urls
        return full


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


def _sibling_index(url: str) -> str:
    """Where the manifest of a shard lives: ``index.json`` in the shard's directory (or URL prefix)."""
    if url.startswith("pipe:"):
        cmd = url[5:]
        target = _url_target(url)
        if "/" in target:
            return "pipe:" + cmd.replace(target, target.rsplit("/", 1)[0] + "/" + INDEX_NAME)
        return "pipe:" + cmd.replace(target, INDEX_NAME)
    if _is_remote(url):
        return url.split("?")[0].rsplit("/", 1)[0] + "/" + INDEX_NAME
    return str(Path(url).parent / INDEX_NAME)


def _load_index(source: str) -> Manifest:
    if source.startswith("pipe:"):
        proc = subprocess.run(source[5:], shell=True, capture_output=True)
        if proc.returncode != 0:
            raise ManifestError(f"{source}: command failed with exit code {proc.returncode}")
        text = proc.stdout.decode()
        root: Path | str = source  # urls(): the same command with the shard name in place of index.json
    elif source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as resp:
                text = resp.read().decode()
        except OSError as err:
            raise ManifestError(f"{source}: cannot fetch ({err})") from None
        root = source.rsplit("/", 1)[0]
    else:
        path = Path(source)
        if path.is_dir():
            path = path / INDEX_NAME
        if not path.exists():
            raise ManifestError(f"{path}: no such manifest (write shards with `mst-shards write` first)")
        text = path.read_text()
        root = path.parent
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{source}: manifest is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: not a shard manifest")
    return Manifest.from_dict(data, root)
