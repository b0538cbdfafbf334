"""``mst-shards write``: an ImageFolder tree or the ILSVRC2012 archives → verified WebDataset shards.

Design (SPEC §5):
* the original bytes are stored (no re-encode); the format is sniffed from the bytes, so a PNG named
  ``.JPEG`` becomes ``KEY.png`` and a CMYK JPEG is recorded as such in ``KEY.json``;
* the sample list is sorted, then shuffled with the seed, then cut into shards of ``max_count``;
* every tar member has mtime 0, uid/gid 0 and no user names, so two runs give identical bytes;
* each shard is streamed to a temp name (a second thread writes and hashes while the first reads and
  sniffs the next inputs) and renamed; a small record (plan hash, count, size, checksum) is then written
  to ``.mst-shards/``, so a rerun after an interruption keeps every shard whose record and bytes still
  match and writes only the rest;
* ``workers`` processes write disjoint contiguous shard ranges;
* ``index.json`` is written last.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import random
import re
import signal
import stat
import tarfile
import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from data_tools import TOOL_VERSION
from data_tools.sniff import DEFAULT_MAX_PIXELS, ImageInfo, TooLarge, Unreadable, convert_to_png, sniff
from mst_ds import atomic
from mst_ds.config import RunFailure
from mst_ds.data.manifest import (
    CHECKSUMS,
    DEFAULT_CHECKSUM,
    INDEX_NAME,
    PROGRESS_DIR,
    Manifest,
    ShardInfo,
    file_checksum,
    manifests_in,
    split_index_name,
)
from mst_ds.faults import Faults
from mst_ds.job import FileLock

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# PROGRESS_DIR (.mst-shards): per-shard records of finished shards (resume after interruption)


class WriteError(ValueError):
    """Bad input for the writer (missing source, unreadable inputs under --strict, an --out folder that
    is not its own): one line, exit 2."""


class WriteFailure(RunFailure):
    """Writing failed (disk full, unwritable output): one line, exit 1; finished shards are kept."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
class Sample(NamedTuple):  # a tuple: ImageNet lists 1.28 M of them, 5× cheaper than a frozen dataclass
    key: str  # tar member stem (no dots)
    label: int
    wnid: str
    source: str  # source name shown to users (relative path or archive member)
    ref: tuple  # ("file", path) | ("tar", archive path, offset, size)
    size: int | None  # input bytes if the listing knows them (None: a plain file, sized when read)


@dataclass
class SourceListing:
    samples: list[Sample]
    classes: list[dict]  # [{"index", "wnid", "name"}]
    unreadable: list[str]  # "source: reason" for inputs rejected while listing


_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]")


def _key_of(stem: str) -> str:
    """WebDataset splits the member name at the first dot: keys keep letters, digits, '_' and '-'."""
    return _NOT_KEY.sub("_", stem)


def _unique_keys(raw: list[tuple[str, ...]]) -> list[str]:
    """Keys for (stem, ...) tuples in sorted order; collisions get a deterministic ``_dupN`` suffix."""
    seen: dict[str, int] = {}
    keys = []
    for item in raw:
        k = _key_of(item[0])
        n = seen.get(k, 0)
        seen[k] = n + 1
        keys.append(k if n == 0 else f"{k}_dup{n}")
    return keys


def _os_reason(err: OSError) -> str:
    return f"unreadable ({err.strerror or err})"


def _walk_files(root: str, rel_dir: str, unreadable: list[str]) -> Iterator[tuple[str, str, int | None]]:
    """(relative name, path, size) of the files under ``root/rel_dir``, depth-first in sorted order;
    hidden entries skipped, symlinked folders not followed (as ``os.walk``). Plain strings and
    ``os.scandir``: at ImageNet's 1.28 M files pathlib's overhead is most of the listing time.

    A plain file's size is None: its type comes with the folder entry, and its size is taken when a
    worker reads it. One ``stat`` per file here would be serial, before any writing, and on a parallel
    file system a metadata round trip each (minutes for ImageNet). Symlinks are followed here, so a
    loop, a dangling link or a link to a folder is known at once."""
    try:
        with os.scandir(os.path.join(root, rel_dir)) as it:
            found = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        unreadable.append(f"{rel_dir}: {_os_reason(err)}")
        return
    for e in found:
        rel = f"{rel_dir}/{e.name}"
        try:
            if e.is_dir(follow_symlinks=False):
                yield from _walk_files(root, rel, unreadable)
                continue
            if e.is_file(follow_symlinks=False):
                yield rel, e.path, None
                continue
            st = e.stat()  # a symlink (or an odd entry), followed: a loop or a dangling link raises here
        except OSError as err:
            unreadable.append(f"{rel}: {_os_reason(err)}")
            continue
        if stat.S_ISDIR(st.st_mode):
            continue  # a symlink to a folder
        if not stat.S_ISREG(st.st_mode):
            unreadable.append(f"{rel}: not a regular file")  # a FIFO would block the reader forever
            continue
        yield rel, e.path, st.st_size


def list_imagefolder(src: Path) -> SourceListing:
    """``src/<class>/**/<file>``; classes = sorted folder names (torchvision's ImageFolder order).

    An entry that cannot be followed or listed (a symlink loop, no permission) is unreadable, like a bad
    image: listed, never an abort."""
    class_dirs, unreadable = [], []
    for d in sorted(src.iterdir()):
        if d.name.startswith("."):
            continue
        try:
            d.stat()  # follows symlinks: a loop or a dangling link raises here
        except OSError as err:
            unreadable.append(f"{d.name}: {_os_reason(err)}")
            continue
        if d.is_dir():
            class_dirs.append(d)
    if not class_dirs:
        raise WriteError(f"{src}: no class folders (expected SRC/<class>/<image files>)")
    classes, entries = [], []
    for idx, cdir in enumerate(class_dirs):
        classes.append({"index": idx, "wnid": cdir.name, "name": cdir.name})
        for rel, path, size in _walk_files(str(src), cdir.name, unreadable):
            if not rel.lower().endswith(IMG_EXTENSIONS):
                unreadable.append(f"{rel}: not an image file name")
                continue
            stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            entries.append((stem, idx, cdir.name, rel, path, size))
    entries.sort(key=lambda e: e[3])
    keys = _unique_keys(entries)
    samples = [Sample(k, idx, wnid, rel, ("file", path), size)
               for k, (_, idx, wnid, rel, path, size) in zip(keys, entries)]
    return SourceListing(samples, classes, unreadable)


def _tar_members(path: Path, offset: int = 0) -> Iterator[tarfile.TarInfo]:
    """Headers of a tar starting at ``offset`` of ``path``; member offsets are absolute in the file.

    A tar inside a tar is read in place (seek + headers only): nothing is extracted to disk.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                yield from tar
        except tarfile.TarError as err:
            raise WriteError(f"{path}: not a readable tar at offset {offset} ({err})") from None


def list_ilsvrc_train(src: Path) -> SourceListing:
    """ILSVRC2012_img_train.tar: a tar of ``<wnid>.tar`` class archives, each of ``<wnid>_N.JPEG``."""
    if src.is_dir():  # an already unpacked train folder is an ImageFolder
        return list_imagefolder(src)
    inner = [m for m in _tar_members(src) if m.isreg()]
    class_tars = sorted((m for m in inner if m.name.endswith(".tar")), key=lambda m: m.name)
    if not class_tars:
        raise WriteError(f"{src}: no per-class tars inside (expected the ILSVRC2012 train archive)")
    classes, entries, unreadable = [], [], []
    for idx, ct in enumerate(class_tars):
        wnid = Path(ct.name).stem
        classes.append({"index": idx, "wnid": wnid, "name": wnid})
        for m in _tar_members(src, ct.offset_data):
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if not base.lower().endswith(IMG_EXTENSIONS):
                unreadable.append(f"{ct.name}/{m.name}: not an image file name")
                continue
            entries.append((base.rsplit(".", 1)[0], idx, wnid, f"{ct.name}/{m.name}", m.offset_data, m.size))
    entries.sort(key=lambda e: e[3])
    keys = _unique_keys(entries)
    samples = [Sample(k, idx, wnid, name, ("tar", str(src), off, size), size)
               for k, (_, idx, wnid, name, off, size) in zip(keys, entries)]
    return SourceListing(samples, classes, unreadable)


# ---- validation labels -----------------------------------------------------------------------------
def _devkit_meta(meta_mat: bytes | Path) -> tuple[dict[int, str], dict[str, str]]:
    """devkit meta.mat → (ILSVRC2012_ID → wnid, wnid → words) over the leaf synsets (the 1000 classes)."""
    import scipy.io

    src = io.BytesIO(meta_mat) if isinstance(meta_mat, bytes) else str(meta_mat)
    synsets = scipy.io.loadmat(src, squeeze_me=True)["synsets"]
    id_to_wnid, words = {}, {}
    for row in synsets:
        ilsvrc_id, wnid, word, num_children = int(row[0]), str(row[1]), str(row[2]), int(row[4])
        if num_children == 0:
            id_to_wnid[ilsvrc_id] = wnid
            words[wnid] = word
    return id_to_wnid, words


def _read_devkit(path: Path) -> tuple[bytes | Path | None, str | None]:
    """(meta.mat, ground-truth text) from a devkit folder, its .tar.gz, or a ground-truth file."""
    gt_name, meta_name = "ILSVRC2012_validation_ground_truth.txt", "meta.mat"
    if path.is_dir():
        hits = {p.name: p for p in path.rglob("*") if p.name in (gt_name, meta_name)}
        meta = hits.get(meta_name)
        gt = hits[gt_name].read_text() if gt_name in hits else None
        return meta, gt
    if tarfile.is_tarfile(path):
        meta = gt = None
        with tarfile.open(path) as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if base == meta_name:
                    meta = tar.extractfile(m).read()
                elif base == gt_name:
                    gt = tar.extractfile(m).read().decode()
        return meta, gt
    sibling = path.parent / meta_name
    return (sibling if sibling.exists() else None), path.read_text()


def read_val_labels(path: Path, file_names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Val labels → ({val file name: wnid}, {wnid: words}).

    Accepted: the devkit (folder or ``.tar.gz``: ILSVRC ids mapped through ``meta.mat``), the devkit's
    ground-truth file (``meta.mat`` next to it), a text file with one wnid per line in sorted file-name
    order, or ``name wnid`` / ``name,wnid ...`` lines (e.g. LOC_val_solution.csv).
    """
    if not path.exists():
        raise WriteError(f"--val-labels {path}: no such file or folder")
    meta, text = _read_devkit(path)
    if text is None:
        raise WriteError(f"--val-labels {path}: no ILSVRC2012_validation_ground_truth.txt found")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].lower().startswith("imageid"):
        lines = lines[1:]  # CSV header
    words: dict[str, str] = {}
    names = sorted(file_names)
    if lines and all(ln.isdigit() for ln in lines):
        if meta is None:
            raise WriteError(f"--val-labels {path}: ILSVRC ids need the devkit's meta.mat (give the devkit folder)")
        id_to_wnid, words = _devkit_meta(meta)
        try:
            wnids = [id_to_wnid[int(ln)] for ln in lines]
        except KeyError as err:
            raise WriteError(f"--val-labels {path}: ILSVRC id {err} is not a leaf synset of meta.mat") from None
    elif lines and all(re.fullmatch(r"n\d{8}", ln) for ln in lines):
        wnids = lines
    else:
        mapping = {}
        for ln in lines:
            parts = re.split(r"[,\s]+", ln)
            if len(parts) < 2 or not re.fullmatch(r"n\d{8}", parts[1]):
                raise WriteError(f"--val-labels {path}: cannot parse line {ln[:60]!r}")
            mapping[Path(parts[0]).stem] = parts[1]
        missing = [n for n in names if Path(n).stem not in mapping]
        if missing:
            raise WriteError(f"--val-labels {path}: no label for {len(missing)} files (first: {missing[0]})")
        return {n: mapping[Path(n).stem] for n in names}, words
    if len(wnids) != len(names):
        raise WriteError(f"--val-labels {path}: {len(wnids)} labels for {len(names)} validation images")
    return dict(zip(names, wnids)), words


def list_ilsvrc_val(src: Path, labels: Path | None) -> SourceListing:
    """Flat val images (a folder or ILSVRC2012_img_val.tar) + the devkit ground truth."""
    if labels is None:
        raise WriteError("--layout ilsvrc --split val needs --val-labels (the devkit or its ground-truth file)")
    refs: dict[str, tuple[tuple, int]] = {}
    unreadable: list[str] = []
    if src.is_dir():
        for p in sorted(src.iterdir()):
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except OSError as err:
                unreadable.append(f"{p.name}: {_os_reason(err)}")
                continue
            if not p.is_file():
                continue
            if p.name.lower().endswith(IMG_EXTENSIONS):
                refs[p.name] = (("file", str(p)), st.st_size)
            else:
                unreadable.append(f"{p.name}: not an image file name")
    else:
        for m in _tar_members(src):
            if m.isreg():
                base = m.name.rsplit("/", 1)[-1]
                refs[base] = (("tar", str(src), m.offset_data, m.size), m.size)
    if not refs:
        raise WriteError(f"{src}: no validation images")
    name_to_wnid, words = read_val_labels(labels, list(refs))
    wnids = sorted(set(words) or set(name_to_wnid.values()))
    index = {w: i for i, w in enumerate(wnids)}
    classes = [{"index": i, "wnid": w, "name": words.get(w, w)} for i, w in enumerate(wnids)]
    names = sorted(refs)
    keys = _unique_keys([(n.rsplit(".", 1)[0],) for n in names])
    samples = [Sample(k, index[name_to_wnid[n]], name_to_wnid[n], n, refs[n][0], refs[n][1]) for k, n in zip(keys, names)]
    return SourceListing(samples, classes, unreadable)


def list_source(src: Path, layout: str, split: str, val_labels: Path | None) -> SourceListing:
    if not src.exists():
        raise WriteError(f"--src {src}: no such file or folder")
    if layout == "imagefolder":
        if not src.is_dir():
            raise WriteError(f"--src {src}: an ImageFolder source must be a folder")
        return list_imagefolder(src)
    if split == "train":
        return list_ilsvrc_train(src)
    return list_ilsvrc_val(src, val_labels)


def select_classes(listing: SourceListing, names: list[str], label: str) -> tuple[SourceListing, dict]:
    """Keep the listed classes (matched by wnid or folder name), renumbered 0…K−1 in source order →
    (subset listing, manifest record). A name the source does not have is an error."""
    # Matched in Unicode NFC: a list typed on one system and folders made on another (macOS writes NFD)
    # spell "é" differently with the same look.
    known = {nfc(c["wnid"]): c for c in listing.classes} | {nfc(c["name"]): c for c in listing.classes}
    names = [nfc(n) for n in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f", … ({len(unknown)} in all)" if len(unknown) > 5 else "")
        raise WriteError(f"--classes {label}: {len(unknown)} class(es) not in the source: {shown}")
    wanted = {known[n]["index"] for n in names}
    kept = [c for c in listing.classes if c["index"] in wanted]
    new_index = {c["index"]: i for i, c in enumerate(kept)}
    classes = [{**c, "index": new_index[c["index"]]} for c in kept]
    samples = [s._replace(label=new_index[s.label]) for s in listing.samples if s.label in new_index]
    wnids = [c["wnid"] for c in classes]
    record = {"list": label, "count": len(classes), "of": len(listing.classes),
              "sha256": hashlib.sha256("\n".join(wnids).encode()).hexdigest()[:16]}
    # Unreadable inputs of the classes left out are no concern of this subset. A record names its input as
    # ``CLASS/...: why`` or ``CLASS: why`` (an ImageFolder) or ``WNID.tar/...: why`` (ILSVRC's class tars).
    dropped: set[str] = set()
    for c in listing.classes:
        if c["index"] not in wanted:
            dropped |= {c["name"], c["wnid"], f"{c['wnid']}.tar"}
    unreadable = [u for u in listing.unreadable if unreadable_head(u) not in dropped]
    return SourceListing(samples, classes, unreadable), record


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def unreadable_head(record: str) -> str:
    """The first path component of an unreadable-input record ``PATH: why`` (``./`` parts skipped)."""
    path = record.split(": ", 1)[0]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return parts[0] if parts else path


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardPlan:
    name: str
    samples: tuple[Sample, ...]
    max_pixels: int = DEFAULT_MAX_PIXELS

    def fingerprint(self, sizes: list[int | None]) -> str:
        """Hash of what goes into the shard, with each input's byte size (None: unreadable): a changed
        input or setting invalidates a finished shard."""
        items = [(s.key, s.label, s.wnid, s.source, n) for s, n in zip(self.samples, sizes, strict=True)]
        return hashlib.sha256(json.dumps([TOOL_VERSION, self.name, self.max_pixels, items]).encode()).hexdigest()

    def input_sizes(self) -> list[int | None]:
        """The inputs' sizes now (a ``stat`` for those the listing did not size; None if it fails)."""
        return [s.size if s.size is not None else _stat_size(s.ref[1]) for s in self.samples]


def _stat_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def plan_shards(samples: list[Sample], split: str, max_count: int, seed: int,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> list[ShardPlan]:
    """Seeded shuffle of the (sorted) sample list, cut into consecutive shards of ``max_count``."""
    order = list(samples)
    random.Random(seed).shuffle(order)
    return [ShardPlan(f"{split}-{i // max_count:06d}.tar", tuple(order[i:i + max_count]), max_pixels)
            for i in range(0, len(order), max_count)]


def read_input(ref: tuple, size: int | None = None) -> bytes:
    """The bytes of an input; ``size`` is what the listing saw (saves a stat; a changed file is read whole)."""
    if ref[0] == "file":
        # os.open/os.read: a third of the cost of open().read() per file, which shows at ImageNet's 1.28 M.
        # One read of the listed size + 1: os.read allocates what it is asked for, so a fixed large
        # request (16 MiB) costs more than the copy itself; a file that grew meanwhile is read on.
        fd = os.open(ref[1], os.O_RDONLY)
        try:
            if size is None:
                size = os.fstat(fd).st_size
            data = os.read(fd, size + 1)
            if len(data) <= size:
                return data
            parts = [data]
            while chunk := os.read(fd, 1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)
    _, path, offset, size = ref
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    # Constant metadata: without it every member gets a fresh mtime and the bytes change every run.
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


_BLOCK = tarfile.BLOCKSIZE
_ZEROS = b"\0" * _BLOCK
# Every header byte but the name (0:100), size (124:136) and checksum (148:156) is the same for all.
_TEMPLATE = _tarinfo("x", 0).tobuf(format=tarfile.GNU_FORMAT)
_HEAD, _TAIL, _REST = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]
_FIXED_SUM = sum(_HEAD) + sum(_TAIL) + sum(_REST) + 8 * ord(" ")  # the checksum field counts as spaces


def tar_header(name: str, size: int) -> bytes:
    """The GNU tar header ``tarfile`` would write for ``_tarinfo(name, size)``, ~40× faster.

    Only the name, size and checksum differ between members, so the checksum is the fixed bytes' sum
    plus theirs; long or non-ASCII names (and sizes past 8 GiB) fall back to ``tarfile`` itself.
    """
    raw = name.encode()
    if len(raw) >= 100 or not raw.isascii() or size >= 8**11:
        return _tarinfo(name, size).tobuf(format=tarfile.GNU_FORMAT)
    size_field = b"%011o\0" % size
    chksum = b"%06o\0 " % (_FIXED_SUM + sum(raw) + sum(size_field))
    return b"".join((raw.ljust(100, b"\0"), _HEAD, size_field, _TAIL, chksum, _REST))


def image_member(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, ImageInfo, str | None]:
    """Input bytes → (bytes to store, info, original format if converted). Raises Unreadable."""
    try:
        return data, sniff(data, max_pixels), None
    except TooLarge:
        raise
    except Unreadable as err:
        if data and not str(err).startswith("truncated"):
            return convert_to_png(data, max_pixels)  # BMP/GIF/WebP/TIFF: stored as lossless PNG
        raise


class TarStream:
    """Writes tar members with constant metadata to a file and hashes them as they are written.

    The checksum is of the bytes as they are written, so no shard is ever read back. The bytes equal
    ``tarfile``'s output. With ``background`` the writes and the hashing run in a second thread while
    the caller reads and sniffs the next inputs (file reads, ``writev`` and the hashes release the
    GIL): that pays when the process has a core to spare. When every core already runs a writer
    process the hand-over costs more CPU than it overlaps (6,000 images: 0.80 CPU-s with the thread,
    0.62 without, measured here), so then the caller writes and hashes itself.
    """

    def __init__(self, path: Path, fail_after: int | None = None, background: bool = True,
                 checksum: str = DEFAULT_CHECKSUM):
        self.path, self.size, self.written = path, 0, 0
        self.fail_after = fail_after  # test fault: the disk is full after this many bytes
        self.digest = CHECKSUMS[checksum]()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._error: BaseException | None = None
        self._q: queue.SimpleQueue | None = None
        if background:
            self._q = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._drain, daemon=True)
            self._thread.start()

    def _write(self, parts: list[bytes], nbytes: int) -> None:
        self.written += nbytes
        if self.fail_after is not None and self.written > self.fail_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        _writev_all(self._fd, parts, nbytes)
        for part in parts:
            self.digest.update(part)

    def _drain(self) -> None:
        try:
            while (item := self._q.get()) is not None:
                self._write(*item)
        except BaseException as err:  # reported by close()
            self._error = err
            while self._q.get() is not None:
                pass

    def _put(self, parts: list[bytes]) -> None:
        nbytes = sum(map(len, parts))
        self.size += nbytes
        if self._q is None:
            self._write(parts, nbytes)
        else:
            self._q.put((parts, nbytes))

    def add(self, *members: tuple[str, bytes]) -> None:
        """The members of one sample: one ``writev`` per sample. Image bytes are passed on as they are;
        headers, padding and small members are joined (fewer pieces to write and hash)."""
        parts, small = [], []
        for name, data in members:
            small.append(tar_header(name, len(data)))
            if len(data) > 4 * _BLOCK:
                parts += (b"".join(small), data)
                small = []
            else:
                small.append(data)
            small.append(_ZEROS[:-len(data) % _BLOCK])
        parts.append(b"".join(small))
        self._put(parts)

    def _finish(self) -> None:
        """Stop the writer thread (if any) and close the file."""
        if self._q is not None:
            self._q.put(None)
            self._thread.join()
        os.close(self._fd)

    def close(self) -> None:
        """Two zero blocks end the archive; ``tarfile`` pads it to a whole record of 20 blocks."""
        end = self.size + 2 * _BLOCK
        try:
            self._put([b"\0" * (2 * _BLOCK + (-end % tarfile.RECORDSIZE))])
        finally:
            self._finish()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._finish()
        self.path.unlink(missing_ok=True)


def _writev_all(fd: int, parts: list[bytes], total: int) -> None:
    """``os.writev`` of ``total`` bytes until all are written (a short write is rare on a file, but allowed)."""
    n = os.writev(fd, parts)
    if n < total:
        rest = memoryview(b"".join(parts))[n:]
        while rest:
            rest = rest[os.write(fd, rest):]


def _disk_full_fault(name: str, faults: Faults) -> int | None:
    """``disk_full@N`` (:mod:`mst_ds.faults`): writing shard number N fails with ENOSPC after its first block."""
    match = re.fullmatch(r".+-(\d{6})\.tar", name)
    return _BLOCK if match and faults.at("disk_full", int(match.group(1))) else None


@dataclass
class ShardWritten:
    count: int  # samples stored
    nbytes: int
    checksum: str  # of the bytes as they were written (WriteOptions.checksum): the shard is never read back
    unreadable: list[str]  # "source: reason"
    class_counts: dict[int, int]  # label → samples stored
    input_sizes: list[int | None]  # per planned sample, as ShardPlan.input_sizes would say (None: unreadable)


_quote = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str


def sample_meta(s: Sample, info: ImageInfo, converted: str | None) -> bytes:
    """``KEY.json``: exactly ``json.dumps(meta, sort_keys=True)`` of the sample's metadata, written out
    directly (the encoder's generic path costs more than the rest of a sample's bookkeeping)."""
    if converted:
        meta = {"wnid": s.wnid, "source": s.source, "class": s.label, "format": info.format, "mode": info.mode,
                "width": info.width, "height": info.height, "converted_from": converted}
        return json.dumps(meta, sort_keys=True).encode()
    return (f'{{"class": {s.label:d}, "format": {_quote(info.format)}, "height": {info.height:d}, '
            f'"mode": {_quote(info.mode)}, "source": {_quote(s.source)}, "width": {info.width:d}, '
            f'"wnid": {_quote(s.wnid)}}}').encode()


@dataclass(frozen=True)
class WriteOptions:
    strict: bool = False  # an unreadable input stops the run
    background: bool = True  # write and hash in a second thread (TarStream)
    checksum: str = DEFAULT_CHECKSUM  # the manifest's per-shard checksum (a key of manifest.CHECKSUMS)
    faults: Faults = Faults()  # test-only fault injection, read once by write_shards


def write_shard_file(path: Path, plan: ShardPlan, progress=None, opts: WriteOptions = WriteOptions()) -> ShardWritten:
    """Read, sniff and write the samples of ``plan`` as a tar at ``path``."""
    tar = TarStream(path, _disk_full_fault(plan.name, opts.faults), opts.background, opts.checksum)
    unreadable: list[str] = []
    input_sizes: list[int | None] = []
    class_counts: dict[int, int] = {}
    count = pending_images = pending_bytes = 0
    last_tick = time.monotonic()
    try:
        for s in plan.samples:
            try:
                raw = read_input(s.ref, s.size)
            except OSError as err:
                unreadable.append(f"{s.source}: read error ({err.strerror or err})")
                input_sizes.append(s.size)
                continue
            input_sizes.append(len(raw) if s.size is None else s.size)
            pending_images += 1
            pending_bytes += len(raw)
            try:
                data, info, converted = image_member(raw, plan.max_pixels)
            except Unreadable as err:
                unreadable.append(f"{s.source}: {err}")
                if opts.strict:
                    raise WriteError(f"unreadable input (--strict): {unreadable[-1]}") from None
                continue
            tar.add((f"{s.key}.{info.ext}", data), (f"{s.key}.cls", str(s.label).encode()),
                    (f"{s.key}.json", sample_meta(s, info, converted)))
            count += 1
            class_counts[s.label] = class_counts.get(s.label, 0) + 1
            # A few ticks a second: each crosses a process boundary, which costs more than a sample.
            if progress is not None and count % 16 == 0 and time.monotonic() - last_tick > 0.2:
                progress.put(("tick", pending_images, pending_bytes))
                pending_images = pending_bytes = 0
                last_tick = time.monotonic()
    except BaseException:
        tar.abort()
        raise
    tar.close()
    if progress is not None and pending_images:
        progress.put(("tick", pending_images, pending_bytes))
    return ShardWritten(count, tar.size, tar.digest.hexdigest(), unreadable, class_counts, input_sizes)


def _record_path(out: Path, name: str) -> Path:
    return out / PROGRESS_DIR / f"{name}.json"


def write_one_shard(out: Path, plan: ShardPlan, progress, opts: WriteOptions) -> dict:
    """Write to a temp name, write the shard's record, then rename. → the record.

    The record comes first so that every file at a shard name was claimed by a record before it got
    there: a rerun may replace it, nothing else is ever replaced. No fsync: a shard damaged by a crash
    fails the checksum check of the next run and is rewritten."""
    shard = out / plan.name
    tmp = atomic.temp_path(shard)
    try:
        w = write_shard_file(tmp, plan, progress, opts)
        record = {"name": plan.name, "plan": plan.fingerprint(w.input_sizes), "count": w.count, "bytes": w.nbytes,
                  opts.checksum: w.checksum, "unreadable": w.unreadable,
                  "class_counts": {str(k): v for k, v in sorted(w.class_counts.items())}}
        atomic.write_json(_record_path(out, plan.name), record, indent=None)
        os.replace(tmp, shard)
    finally:
        tmp.unlink(missing_ok=True)
    return record


def finished_record(out: Path, plan: ShardPlan, checksum: str = DEFAULT_CHECKSUM) -> dict | None:
    """The record of a shard a previous run finished, if its plan, size and ``checksum`` still match (a
    shard a run with another ``--checksum`` wrote is written again: its record holds no such digest)."""
    rec_path, shard = _record_path(out, plan.name), out / plan.name
    if not (rec_path.exists() and shard.exists()):
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (not isinstance(rec, dict) or rec.get("plan") != plan.fingerprint(plan.input_sizes()) or "class_counts" not in rec
            or shard.stat().st_size != rec.get("bytes")):
        return None
    return rec if checksum in rec and file_checksum(shard, checksum) == rec[checksum] else None


def _die_with_parent() -> None:
    """A worker must not outlive a killed writer (it would keep writing into a rerun's folder)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _default_sigterm() -> None:
    """A forked worker starts with SIGTERM's default action, whatever handler its parent had installed
    (a caller's record-only handler would let the worker outlive ``Pool.terminate`` and hang the join)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _worker(out: Path, plans: list[ShardPlan], q: mp.Queue, opts: WriteOptions) -> None:
    _default_sigterm()
    _die_with_parent()
    parent = os.getppid()
    try:
        for plan in plans:
            if os.getppid() != parent:
                return
            q.put(("done", write_one_shard(out, plan, q, opts)))
    except WriteError as err:
        q.put(("error", str(err)))
    except OSError as err:  # disk full, unwritable: the same exit as with one process
        q.put(("failure", _os_failure(out, err)))
    except Exception as err:  # report, then let the main process stop the run
        q.put(("error", f"{type(err).__name__}: {err}"))


def _os_failure(out: Path, err: OSError) -> str:
    return f"{out}: cannot write ({err.strerror or err}); finished shards are kept, rerun to finish"


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
class _Progress:
    """rich progress bar with images/s and MB/s (quiet when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.images = self.nbytes = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("write", total=total, rate="")
            self.bar.start()

    def advance(self, images: int, nbytes: int) -> None:
        self.images += images
        self.nbytes += nbytes
        if self.bar is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            rate = f"{self.images / dt:,.0f} images/s  {self.nbytes / dt / 1e6:,.1f} MB/s"
            self.bar.update(self.task, completed=self.images, rate=rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _BarSink:
    """Progress messages of an in-process writer go straight to the bar."""

    def __init__(self, bar: _Progress):
        self.bar = bar

    def put(self, msg: tuple) -> None:
        self.bar.advance(msg[1], msg[2])


def _split_ranges(items: list, n: int) -> list[list]:
    """Contiguous, disjoint ranges of nearly equal length."""
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (i < r)
        if end > start:
            out.append(items[start:end])
        start = end
    return out


@dataclass
class WriteResult:
    manifest: Manifest
    written: int  # shards written by this run
    kept: int  # shards kept from an interrupted earlier run
    seconds: float
    path: Path  # the manifest file written
    empty_classes: list[str]  # class folders without a stored image (still classes: labels stay stable)


# --------------------------------------------------------------------------------------------------
# The output folder: what this tool may touch
# --------------------------------------------------------------------------------------------------
@dataclass
class OutFolder:
    """``--out`` as far as the writer of ``split`` may touch it.

    Owned = shard names of this split listed in its manifest or claimed by a record in ``.mst-shards/``
    (a record is written before its shard is renamed into place). Only owned shards, their records,
    this split's manifest and this split's own temp files are ever deleted or replaced.
    """

    path: Path
    split: str
    index_name: str  # this split's manifest file name
    owned: set[str]
    old_manifest: Path | None  # this split's manifest from an earlier run
    lock: FileLock | None = None  # this split's writer lock, held from claim_out to release

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @property
    def shard_re(self) -> re.Pattern:
        return re.compile(rf"{re.escape(self.split)}-\d{{6}}\.tar")

    def remove_temps(self) -> None:
        """Temp files of this split's shards, records and manifest (a killed run's leftovers)."""
        shard = rf"{re.escape(self.split)}-\d{{6}}\.tar"
        ours = re.compile(rf"\.(?:{shard}|{re.escape(self.index_name)})\.tmp-\d+")
        rec = re.compile(rf"\.(?:{shard}|{re.escape(self.split)})\.json\.tmp-\d+")
        for folder, pattern in ((self.path, ours), (self.path / PROGRESS_DIR, rec)):
            if folder.is_dir():
                for p in folder.iterdir():
                    if pattern.fullmatch(p.name):
                        p.unlink(missing_ok=True)

    def drop(self, name: str) -> None:
        """Delete an owned shard the new plan no longer has, then its record (the claim goes last)."""
        assert name in self.owned and self.shard_re.fullmatch(name)
        (self.path / name).unlink(missing_ok=True)
        _record_path(self.path, name).unlink(missing_ok=True)


def _shard_names(manifest_file: Path) -> list[str]:
    try:
        return [str(s["name"]) for s in json.loads(manifest_file.read_text())["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def claim_out(out: Path, split: str) -> OutFolder:
    """Check that ``out`` is new, empty or a shard folder written by this tool; lock this split; find what
    it owns.

    A folder holding other files and no manifest, a file at one of this split's shard names that no
    manifest or record of this split claims, or another live writer of this split is refused (one line,
    exit 2) before anything of the split is touched. The lock (``.mst-shards/<split>.lock``) is held until
    :meth:`OutFolder.release`; the kernel drops it if the writer dies."""
    if out.exists() and not out.is_dir():
        raise WriteError(f"--out {out}: not a folder")
    rec_dir = out / PROGRESS_DIR
    if out.is_dir() and any(True for _ in out.iterdir()) and not manifests_in(out) and not rec_dir.is_dir():
        raise WriteError(f"--out {out}: not empty and not a shard folder of mst-shards (no manifest); "
                         "give a new or empty folder")
    rec_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(rec_dir / f"{split}.lock", f"--out {out}: another mst-shards write of split {split!r} is "
                    "writing here ({holder}); wait for it to end or give another folder", WriteError).acquire()
    try:
        return _claim_locked(out, split, lock)
    except BaseException:
        lock.release()
        raise


def _claim_locked(out: Path, split: str, lock: FileLock) -> OutFolder:
    """What the split owns, read under its lock (an earlier writer may have just finished)."""
    rec_dir = out / PROGRESS_DIR
    found = manifests_in(out)
    shard_re = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    owned = {n for n in _shard_names(found[split]) if shard_re.fullmatch(n)} if split in found else set()
    owned |= {p.name[:-5] for p in rec_dir.iterdir() if p.name.endswith(".json") and shard_re.fullmatch(p.name[:-5])}
    foreign = sorted(p.name for p in out.iterdir() if shard_re.fullmatch(p.name) and p.name not in owned)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise WriteError(f"--out {out}: {foreign[0]}{more} was not written here by mst-shards for split {split!r} "
                         "(no manifest or record lists it); move it away or give another folder")
    index_name = _manifest_name(out, split, found)
    atomic.write_json(rec_dir / f"{split}.json", {"split": split, "manifest": index_name}, indent=None)
    for name in owned:  # claims that only the manifest held: they must outlive its deletion
        if not _record_path(out, name).exists():
            atomic.write_json(_record_path(out, name), {"name": name, "plan": None}, indent=None)
    return OutFolder(out, split, index_name, owned, found.get(split), lock)


def _manifest_name(out: Path, split: str, found: dict[str, Path]) -> str:
    """``index.json`` unless another split's manifest (or a file that is not ours) has that name; a
    rerun keeps the name its split had."""
    if split in found:
        return found[split].name
    marker = out / PROGRESS_DIR / f"{split}.json"
    names = [INDEX_NAME, split_index_name(split)]
    with contextlib.suppress(OSError, ValueError, AttributeError):
        names.insert(0, str(json.loads(marker.read_text()).get("manifest")))
    for name in names:
        if name in (INDEX_NAME, split_index_name(split)) and not (out / name).exists():
            return name
    raise WriteError(f"--out {out}: {INDEX_NAME} and {split_index_name(split)} both exist and neither is the "
                     f"manifest of split {split!r}; give another folder")


def _cleanup(folder: OutFolder, keep: set[str]) -> None:
    """Remove this split's temp files and the owned shards (and records) the plan no longer has."""
    folder.remove_temps()
    for name in sorted(folder.owned - keep):
        folder.drop(name)


def write_shards(src: str | Path, out: str | Path, *, split: str = "train", layout: str = "imagefolder",
                 val_labels: str | Path | None = None, max_count: int = 256, workers: int = 1, seed: int = 0,
                 strict: bool = False, progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                 classes: tuple[str, list[str]] | None = None, checksum: str = DEFAULT_CHECKSUM) -> WriteResult:
    """Write (or finish writing) the shards of ``src`` into ``out``; returns the manifest written last.
    ``classes``: (label, names) of a class subset (:mod:`data_tools.subsets`), else every class.
    ``checksum``: the per-shard checksum the manifest records (a key of ``manifest.CHECKSUMS``)."""
    if max_count < 1:
        raise WriteError(f"--max-count must be ≥ 1 (got {max_count})")
    if workers < 1:
        raise WriteError(f"--workers must be ≥ 1 (got {workers})")
    if max_pixels < 1:
        raise WriteError(f"--max-pixels must be ≥ 1 (got {max_pixels})")
    if checksum not in CHECKSUMS:
        raise WriteError(f"--checksum {checksum!r}: expected one of {', '.join(CHECKSUMS)}")
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    listing = list_source(src, layout, split, Path(val_labels) if val_labels else None)
    subset = None
    if classes is not None:
        listing, subset = select_classes(listing, classes[1], classes[0])
    if strict and listing.unreadable:
        raise WriteError(f"unreadable input (--strict): {listing.unreadable[0]}")
    if not listing.samples:
        raise WriteError(f"--src {src}: no images found")
    folder = claim_out(out, split)
    try:
        plans = plan_shards(listing.samples, split, max_count, seed, max_pixels)
        try:
            records, todo = _write_all(folder, plans, workers, WriteOptions(strict, checksum=checksum, faults=Faults.from_env()), progress)
        except OSError as err:
            raise WriteFailure(_os_failure(out, err)) from None
        finally:
            folder.remove_temps()
        shard_infos = [ShardInfo(p.name, records[p.name]["count"], records[p.name]["bytes"], records[p.name][checksum],
                                 checksum) for p in plans]
        unreadable = sorted(listing.unreadable + [u for p in plans for u in records[p.name]["unreadable"]])
        stored = {int(k) for p in plans for k, n in records[p.name]["class_counts"].items() if n}
        empty = [c["wnid"] for c in listing.classes if c["index"] not in stored]
        manifest = Manifest(
            split=split, classes=listing.classes, shards=shard_infos, total=sum(s.count for s in shard_infos),
            tool_version=TOOL_VERSION, unreadable=unreadable, root=out, empty_classes=empty,
            index_name=folder.index_name,
            extra={"layout": layout, "seed": seed, "max_count": max_count, "source": str(src)},
        )
        if max_pixels != DEFAULT_MAX_PIXELS:
            manifest.extra["max_pixels"] = max_pixels
        if subset is not None:
            manifest.extra["class_subset"] = subset
        # Chosen again now: a writer of another split into the same new folder may have taken index.json.
        manifest.index_name = folder.index_name = _manifest_name(out, split, manifests_in(out))
        try:
            path = manifest.save(out, folder.index_name)
        except OSError as err:
            raise WriteFailure(_os_failure(out, err)) from None
        finally:
            folder.remove_temps()
        return WriteResult(manifest, len(todo), len(plans) - len(todo), time.perf_counter() - t0, path, empty)
    finally:
        folder.release()  # the next writer of this split may start


def _write_all(folder: OutFolder, plans: list[ShardPlan], workers: int, opts: WriteOptions,
               progress: bool) -> tuple[dict[str, dict], list[ShardPlan]]:
    """Keep the finished shards that still match, write the rest. → ({name: record}, shards written)."""
    out = folder.path
    records: dict[str, dict] = {}
    todo: list[ShardPlan] = []
    # Checking a finished shard means hashing it: spread that over the workers too.
    candidates = [p for p in plans if p.name in folder.owned and (out / p.name).exists()]
    if workers > 1 and len(candidates) > 1:
        with mp.get_context("fork").Pool(min(workers, len(candidates)), initializer=_default_sigterm) as pool:
            found = dict(zip([p.name for p in candidates],
                             pool.starmap(finished_record, [(out, p, opts.checksum) for p in candidates])))
            # Workers leave on the pool's sentinels; terminate() (the with's exit) is left for errors.
            pool.close()
            pool.join()
    else:
        found = {p.name: finished_record(out, p, opts.checksum) for p in candidates}
    for p in plans:
        rec = found.get(p.name)
        if rec is None:
            todo.append(p)
        else:
            records[p.name] = rec
    stale = folder.owned - {p.name for p in plans}
    if (todo or stale) and folder.old_manifest is not None:
        folder.old_manifest.unlink(missing_ok=True)  # it is valid only while every shard it lists is
    _cleanup(folder, {p.name for p in plans})
    bar = _Progress(sum(len(p.samples) for p in plans), progress)
    bar.advance(sum(len(p.samples) for p in plans if p.name in records), 0)
    try:
        procs = 1 if workers == 1 or len(todo) <= 1 else min(workers, len(todo))
        opts = dataclasses.replace(opts, background=procs < _usable_cores())
        if procs == 1:
            sink = _BarSink(bar)
            for p in todo:
                records[p.name] = write_one_shard(out, p, sink, opts)
        else:
            _run_workers(out, todo, procs, opts, records, bar)
    finally:
        bar.close()
    return records, todo


def _usable_cores() -> int:
    """Cores this process may run on (a SLURM task or ``taskset`` may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run_workers(out: Path, todo: list[ShardPlan], n: int, opts: WriteOptions, records: dict, bar: _Progress) -> None:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(out, chunk, q, opts), daemon=True) for chunk in _split_ranges(todo, n)]
    for p in procs:
        p.start()
    remaining = len(todo)
    error: tuple[str, str] | None = None
    try:
        while remaining and error is None:
            try:
                msg = q.get(timeout=0.5)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and q.empty():
                    dead = [p.exitcode for p in procs if p.exitcode]
                    error = ("failure", f"a writer process died (exit codes {dead})" if dead else "writer processes stopped early")
                continue
            if msg[0] == "tick":
                bar.advance(msg[1], msg[2])
            elif msg[0] == "done":
                records[msg[1]["name"]] = msg[1]
                remaining -= 1
            else:
                error = (msg[0], msg[1])
    except BaseException:  # Ctrl-C: stop the workers now (finished shards are kept for the rerun)
        error = error or ("failure", "interrupted")
        raise
    finally:
        for p in procs:
            if error is not None and p.is_alive():
                p.kill()
            p.join()
    if error is not None:
        raise (WriteError if error[0] == "error" else WriteFailure)(error[1])
