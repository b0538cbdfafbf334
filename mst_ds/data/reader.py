"""Streaming multi-crop loader over verified shards: equal batches per rank, exact mid-epoch resume.

Stock WebDataset gives neither equal batches per rank, reproducible shuffles nor mid-epoch resume
(SPEC §5). Here everything that decides *which samples form which batch* is computed from the manifest
alone, identically on every rank, before a byte is read:

1. **Per-epoch permutation, then split.** The shards are permuted with (seed, epoch); the permuted
   sample sequence (counts from the manifest) is cut into one equal contiguous slice per rank and,
   within a rank, one equal sub-slice per *stream* (one stream per loader worker). A slice is a list of
   units = (shard, first sample, end); it cuts at most one shard at each end. A rank reads different
   shards every epoch, and a tiny data set with fewer shards than streams still feeds every stream.
2. **Equal batch count.** Every stream holds the same number of samples, so every rank yields exactly
   ``n = W · (slice // B)`` batches (< W·B samples per rank dropped): DDP never hangs at epoch end.
3. **Streams.** A stream reads its units in order (tar reading only), passes the raw samples through a
   shuffle buffer seeded from (seed, epoch, rank, stream), and cuts the result into batches of B *raw*
   samples. Batch ``j`` of the rank is batch ``j // W`` of stream ``j % W``; loader workers are rotated
   so the DataLoader's round-robin delivers exactly this order (a small reorder buffer guards it).
4. **Randomness per sample.** The crops of a sample come from ``crc32(seed, epoch, key)``, never from
   worker state, so they do not depend on which worker or when.
5. **Resume** from (epoch, skip_batches): each stream drops the raw samples of its consumed batches
   straight off the shuffle buffer, before any decode.
6. **Damage.** A shard the manifest lists must be there, whole: a missing shard or one whose size
   differs from the manifest is an error before anything starts (:func:`open_manifest`, a cheap stat),
   and a shard that reads back short of its manifest count (a tar truncated at a member boundary reads
   back short with no error) or breaks mid-way is an error while reading — losing whole shards is never
   a policy. A *sample* that fails to decode is, under ``data.corrupt_policy = count``, recorded (key,
   shard) and its slot refilled with another good sample of the same batch (new crops). Batch
   boundaries stay fixed, so resume stays exact. Nothing sleeps.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mst_ds.config import ConfigError, Derived, MSTConfig, RunFailure, derive
from mst_ds.data.augment import MultiCropCPU
from mst_ds.data.decode import DECODE_ERRORS, decode_rgb
from mst_ds.data.manifest import Manifest, is_shard_dir

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
ERROR_KEY = "_error"  # a loader worker's one-line failure, raised again in the main process


class CorruptDataError(RunFailure):
    """A shard that breaks or reads back short, a corrupt sample with ``data.corrupt_policy = error``,
    or a stream with no readable sample (found while running: exit 1)."""


class MissingShardError(ConfigError):
    """A shard the manifest lists is missing or has another size (found before starting: exit 2)."""


def _is_local(url: str) -> bool:
    return not url.startswith(("http://", "https://", "pipe:"))


def open_manifest(source: str, manifest: Manifest | None = None) -> Manifest:
    """The manifest of ``source``, with every local shard it lists present at its recorded size.

    One stat per shard (no hashing): a missing, truncated or replaced shard is a one-line error naming
    it, before any rank pays for a start. Remote shards (http, pipe:) are checked while reading.
    ``manifest``: the one this process already read from ``source`` (its shards are checked again, its
    file is not read again).
    """
    manifest = Manifest.load(source) if manifest is None else manifest
    for url, info in zip(manifest.urls(), manifest.shards):
        if not _is_local(url):
            continue
        try:
            size = Path(url).stat().st_size
        except OSError:
            raise MissingShardError(f"{url}: shard listed in the manifest of {source} is missing") from None
        if size != info.bytes:
            raise MissingShardError(f"{url}: {size} bytes, the manifest of {source} says {info.bytes} "
                                    "(truncated or replaced; check with `mst-shards verify`)")
    return manifest


# --------------------------------------------------------------------------------------------------
# Reading tars (local paths, pipe: commands, http URLs)
# --------------------------------------------------------------------------------------------------
def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard as dicts {"__key__", ext: bytes, ...}; tar errors propagate."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = wds.gopen(url)
    try:
        def members():
            for f in tar_file_iterator(stream):
                f["__url__"] = url
                yield f

        yield from group_by_keys(members())
    finally:
        stream.close()


def image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')} has no image member")


def sample_seed(seed: int, epoch: int, key: str, extra: str = "") -> int:
    """Stable per-sample seed: crc32 of (seed, epoch, key) — never Python's salted ``hash()``."""
    return zlib.crc32(f"{seed}:{epoch}:{key}{extra}".encode())


def seeded_shuffle(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: keep ``bufsize`` items, emit a random one as each new one arrives."""
    if bufsize <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        k = rng.randrange(bufsize)
        yield buf[k]
        buf[k] = x
    rng.shuffle(buf)
    yield from buf


# --------------------------------------------------------------------------------------------------
# The epoch plan: computed from the manifest alone, identical on every rank
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    shard: int  # index into manifest.shards
    start: int  # this unit holds samples [start, stop) of the shard (tar order)
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    batch_size: int
    streams: int  # W: loader workers per rank (1 when loading in the main process)
    n_batches: int  # per rank, equal on all ranks
    units: list[list[list[Unit]]]  # [rank][stream] → units in reading order

    def stream_batches(self, w: int) -> int:
        """Batches stream ``w`` contributes on every rank."""
        return self.n_batches // self.streams + (w < self.n_batches % self.streams)

    def consumed(self, w: int, skip_batches: int) -> int:
        """Batches of stream ``w`` among the first ``skip_batches`` of the rank."""
        return skip_batches // self.streams + (w < skip_batches % self.streams)


def _cut(order: list[int], counts: list[int], begin: int, length: int) -> list[Unit]:
    """Samples [begin, begin + length) of the circular concatenation of the shards in ``order``."""
    total = sum(counts)
    begin %= total
    if begin + length > total:  # wraps around the end of the sequence
        return _cut(order, counts, begin, total - begin) + _cut(order, counts, 0, begin + length - total)
    units, pos, end = [], 0, begin + length
    for s in order:
        lo, hi = max(begin, pos), min(end, pos + counts[s])
        if lo < hi:
            units.append(Unit(s, lo - pos, hi - pos))
        pos += counts[s]
        if pos >= end:
            break
    return units


def plan_epoch(counts: list[int], *, seed: int, epoch: int, world_size: int, streams: int, batch_size: int) -> EpochPlan:
    """Per-epoch shard permutation and start offset, then an exact split of the permuted (circular)
    sample sequence: rank ``r`` gets the ``r``-th contiguous slice, its stream ``w`` the ``w``-th
    sub-slice. A slice cuts at most one shard at each end (read up to the cut, never decoded), every
    stream holds the same number of samples, so < W·B samples per rank are dropped to equalise the
    batch count — and the random offset makes them (and the ranks' slices of a data set with fewer
    shards than ranks) different every epoch."""
    if batch_size < 1 or world_size < 1 or streams < 1:
        raise ValueError("batch_size, world_size and streams must be ≥ 1")
    rng = random.Random(f"mst-epoch:{seed}:{epoch}")
    order = list(range(len(counts)))
    rng.shuffle(order)
    total = sum(counts)
    offset = rng.randrange(total) if total else 0
    per_rank = total // world_size
    per_stream = per_rank // streams
    if per_stream == 0:
        return EpochPlan(epoch, batch_size, streams, 0, [[[] for _ in range(streams)] for _ in range(world_size)])
    units = [[_cut(order, counts, offset + r * per_rank + w * per_stream, per_stream) for w in range(streams)]
             for r in range(world_size)]
    return EpochPlan(epoch, batch_size, streams, streams * (per_stream // batch_size), units)


# --------------------------------------------------------------------------------------------------
# One stream: raw samples → batches
# --------------------------------------------------------------------------------------------------
@dataclass
class StreamSpec:
    urls: list[str]
    units: list[Unit]
    seed: int
    epoch: int
    rank: int
    stream: int
    batch_size: int
    n_batches: int  # this stream's batches in the epoch
    skip: int  # of them already consumed (resume)
    shuffle_buffer: int
    corrupt_policy: str
    streams: int  # W of the rank: global batch index = local index × W + stream


def shard_samples(url: str, *, start: int = 0, stop: int | None = None, expected: int | None = None) -> Iterator[dict]:
    """Raw samples [start, stop) of one shard (all when stop is None). A tar that breaks, or that ends
    before ``stop`` (or before ``expected`` samples when reading it all), is a :class:`CorruptDataError`
    naming the shard: a short read loses samples silently otherwise."""
    got = 0
    want = stop if stop is not None else expected
    try:
        for i, s in enumerate(iter_tar_samples(url)):
            if stop is not None and i >= stop:
                break
            got = i + 1
            if i >= start:
                yield s
    except Exception as err:
        raise CorruptDataError(f"{url}: shard unreadable after {got} samples ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if want is not None and got < want:
        raise CorruptDataError(f"{url}: {got} samples, the manifest says {expected if expected is not None else f'at least {want}'} "
                               "(shard shorter than its manifest)")


def _raw_stream(spec: StreamSpec) -> Iterator[dict]:
    """The stream's raw samples in their seeded shuffled order: one pass over its units, which holds
    exactly its batches' samples (a batch takes B of them, whatever fails to decode)."""
    rng = random.Random(f"mst-shuffle:{spec.seed}:{spec.epoch}:{spec.rank}:{spec.stream}:0")
    raw = (s for u in spec.units for s in shard_samples(spec.urls[u.shard], start=u.start, stop=u.stop))
    yield from seeded_shuffle(raw, spec.shuffle_buffer, rng)


class StreamBatches:
    """Batches of one stream; ``augment(img, seed)`` is the CPU multi-crop."""

    def __init__(self, spec: StreamSpec, augment: MultiCropCPU):
        self.spec, self.augment = spec, augment

    def _decode(self, sample: dict, seed: int) -> dict | None:
        try:
            img = decode_rgb(image_bytes(sample))
            label = int(sample["cls"]) if "cls" in sample else -1
        except DECODE_ERRORS as err:
            if self.spec.corrupt_policy == "error":
                raise CorruptDataError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {err}") from err
            return None
        out = self.augment(img, seed)
        out["label"] = label
        return out

    def _borrow(self, local: int) -> tuple[dict, dict, str]:
        """A good sample for batch ``local``, whose B samples all failed to decode: the first good one of
        this stream's epoch order, read afresh. → (raw sample, item, seed suffix).

        Reading on from the stream instead would shift every later batch by what it consumed, and a run
        resumed after this batch (which skips exactly B samples per batch) would then see other batches
        than the run that never stopped."""
        spec = self.spec
        extra = f":borrowed{local}"
        for s in _raw_stream(spec):
            item = self._decode(s, sample_seed(spec.seed, spec.epoch, s["__key__"], extra))
            if item is not None:
                return s, item, extra
        raise CorruptDataError(f"stream {spec.stream} of rank {spec.rank}: no sample of its shards decodes")

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        raw = _raw_stream(spec)
        B = spec.batch_size
        for _ in range(spec.skip * B):  # resume: drop consumed samples before any decode
            next(raw)
        for local in range(spec.skip, spec.n_batches):
            slots = [next(raw) for _ in range(B)]
            items, corrupt = [], []
            for s in slots:
                item = self._decode(s, sample_seed(spec.seed, spec.epoch, s["__key__"], ""))
                if item is None:
                    corrupt.append(_corrupt_record(s))
                items.append((s, item, ""))
            good = [i for i, (_, it, _) in enumerate(items) if it is not None]
            if not good:
                items.append(self._borrow(local))
                good = [len(items) - 1]
            batch = []
            k = 0
            for slot, (s, item, _extra) in enumerate(items[:B]):
                if item is None:
                    # Refill with another good sample of this batch, with crops of its own.
                    src_s, _, src_extra = items[good[k % len(good)]]
                    k += 1
                    seed = sample_seed(spec.seed, spec.epoch, src_s["__key__"], f"{src_extra}:refill{slot}")
                    item = self._decode(src_s, seed)
                    s = src_s
                batch.append((str(s["__key__"]), item))
            yield _collate(batch, index=local * spec.streams + spec.stream, corrupt=corrupt)


def _corrupt_record(sample: dict) -> dict[str, str]:
    """What ``RUN/corrupt.jsonl`` says of a sample that failed to decode: its key and shard."""
    return {"key": str(sample.get("__key__")), "shard": Path(_url_path(str(sample.get("__url__", "")))).name}


def _url_path(url: str) -> str:
    return url.rsplit(" ", 1)[-1] if url.startswith("pipe:") else url


def _collate(batch: list[tuple[str, dict]], *, index: int, corrupt: list[dict[str, str]]) -> dict:
    """[(key, multicrop dict)] → batch dict (global/local lists of uint8 (B,3,S,S), key, label, params)."""
    items = [it for _, it in batch]
    n_global, n_local = len(items[0]["global"]), len(items[0]["local"])
    return {
        "global": [torch.stack([it["global"][v] for it in items]) for v in range(n_global)],
        "local": [torch.stack([it["local"][v] for it in items]) for v in range(n_local)],
        "key": [k for k, _ in batch],
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "params": torch.stack([it["params"] for it in items]),  # (B, views, 5): top, left, h, w, flip
        "_index": index,
        "_corrupt": corrupt,
    }


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------
class _RankDataset(IterableDataset):
    """A rank's streams; DataLoader worker ``p`` serves stream ``(p + skip_batches) % W``."""

    def __init__(self, specs: list[StreamSpec], augment: MultiCropCPU, first_stream: int):
        self.specs, self.augment, self.first_stream = specs, augment, first_stream

    def __iter__(self):
        info = get_worker_info()
        if info is None:  # in the main process: interleave all streams round-robin ourselves
            iters = [iter(StreamBatches(self.specs[(self.first_stream + i) % len(self.specs)], self.augment))
                     for i in range(len(self.specs))]
            active = list(iters)
            while active:
                for it in list(active):
                    try:
                        yield next(it)
                    except StopIteration:
                        active.remove(it)
            return
        torch.set_num_threads(1)  # a worker is one core's worth of decode + crop
        w = (self.first_stream + info.id) % len(self.specs)
        try:
            yield from StreamBatches(self.specs[w], self.augment)
        except CorruptDataError as err:  # re-raised as one line in the main process, not a worker traceback
            yield {ERROR_KEY: str(err)}


class TrainLoader:
    """Iterable of training batches for one rank and one epoch (see the module doc).

    ``len(loader)`` = batches this iterator yields (the epoch's batches minus ``skip_batches``), equal on
    every rank; ``batches_per_epoch`` = the full count. ``corrupt_count`` = samples of the delivered
    batches that failed to decode; ``problems`` describes them; :meth:`take_corrupt` hands their
    records ({"key", "shard"}) over once each.
    """

    def __init__(self, manifest: Manifest, plan: EpochPlan, *, rank: int, seed: int, skip_batches: int,
                 augment: MultiCropCPU, num_workers: int, shuffle_buffer: int, corrupt_policy: str,
                 pin_memory: bool = False):
        self.manifest, self.plan, self.rank = manifest, plan, rank
        self.pin_memory = pin_memory
        self.skip_batches = min(skip_batches, plan.n_batches)
        self.num_workers = num_workers
        self.corrupt_count = 0
        self.problems: list[str] = []
        self._corrupt: list[dict[str, str]] = []
        urls = manifest.urls()
        self.specs = []
        for w in range(plan.streams):
            spec = StreamSpec(urls, plan.units[rank][w], seed, plan.epoch, rank, w, plan.batch_size,
                              plan.stream_batches(w), plan.consumed(w, self.skip_batches), shuffle_buffer, corrupt_policy,
                              plan.streams)
            self.specs.append(spec)
        self.dataset = _RankDataset(self.specs, augment, self.skip_batches % plan.streams)

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.n_batches

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    def __len__(self) -> int:
        return self.plan.n_batches - self.skip_batches

    def take_corrupt(self) -> list[dict[str, str]]:
        """Records of the corrupt samples delivered since the last call."""
        out, self._corrupt = self._corrupt, []
        return out

    def worker_loader(self) -> DataLoader:
        """The DataLoader over the worker streams (``num_workers`` > 0)."""
        return DataLoader(self.dataset, batch_size=None, num_workers=self.plan.streams, prefetch_factor=2,
                          persistent_workers=False, multiprocessing_context="fork", pin_memory=self.pin_memory)

    def _batches(self) -> Iterator[dict]:
        if self.num_workers == 0:
            yield from self.dataset
            return
        yield from self.worker_loader()

    def __iter__(self) -> Iterator[dict]:
        expected = self.skip_batches
        pending: dict[int, dict] = {}
        for batch in self._batches():
            if ERROR_KEY in batch:
                raise CorruptDataError(batch[ERROR_KEY])
            pending[batch.pop("_index")] = batch
            while expected in pending:
                out = pending.pop(expected)
                corrupt = out.pop("_corrupt")
                self.corrupt_count += len(corrupt)
                self.problems.extend(f"corrupt sample {c['key']} in {c['shard']}" for c in corrupt)
                self._corrupt.extend(corrupt)
                expected += 1
                yield out
        if pending or expected != self.plan.n_batches:
            raise RuntimeError(f"loader delivered batches out of plan (next {expected}, held {sorted(pending)})")


def _resolve_manifest(source: str, manifest: Manifest | None = None) -> Manifest:
    return open_manifest(source, manifest)  # ManifestError / MissingShardError are ConfigErrors: one line, exit 2


def make_train_loader(source: str, cfg: MSTConfig, *, rank: int, world_size: int, micro_batch: int, epoch: int,
                      skip_batches: int = 0, num_workers: int | None = None,
                      manifest: Manifest | None = None, pin_memory: bool = False) -> TrainLoader:
    """The training loader of ``rank`` for ``epoch`` (see the module doc). ``pin_memory``: the workers'
    batches land in page-locked memory (for a GPU rank: its host-to-device copies can overlap).

    The batch composition depends on (manifest, seed, epoch, world_size, micro_batch,
    ``cfg.data.num_workers``, ``cfg.data.shuffle_buffer``) only. ``num_workers=0`` loads in the calling
    process and yields exactly the same batches as the worker processes would. ``manifest``: the one
    already read from ``source`` (:func:`open_manifest`).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    manifest = _resolve_manifest(source, manifest)
    streams = max(1, cfg.data.num_workers)
    plan = plan_epoch([s.count for s in manifest.shards], seed=cfg.run.seed, epoch=epoch, world_size=world_size,
                      streams=streams, batch_size=micro_batch)
    if plan.n_batches == 0:
        from mst_ds.config import ConfigError

        raise ConfigError(f"{source}: {manifest.total} samples cannot fill one batch of {micro_batch} on each of "
                          f"{world_size} ranks × {streams} workers")
    workers = cfg.data.num_workers if num_workers is None else num_workers
    return TrainLoader(manifest, plan, rank=rank, seed=cfg.run.seed, skip_batches=skip_batches,
                       augment=MultiCropCPU.from_config(cfg.augment), num_workers=0 if workers == 0 else streams,
                       shuffle_buffer=cfg.data.shuffle_buffer, corrupt_policy=cfg.data.corrupt_policy,
                       pin_memory=pin_memory)


def derive_for_training(cfg: MSTConfig, world_size: int, manifest: Manifest | None = None) -> Derived:
    """``derive()`` for a run on ``cfg.data.train``: the manifest's size, and the steps per epoch the
    loader's equal-per-rank plan really yields, so schedules, epochs and checkpoints share one count.
    Without shards (``mst-ds plan`` before they exist): ``data.num_samples``. ``manifest``: the one
    already read from ``cfg.data.train``."""
    if not cfg.data.train:
        return derive(cfg, world_size)
    manifest = _resolve_manifest(cfg.data.train, manifest)
    micro = derive(cfg, world_size, manifest.total).micro_batch
    batches = batches_per_epoch(cfg.data.train, cfg, world_size=world_size, micro_batch=micro, manifest=manifest)
    return derive(cfg, world_size, manifest.total, steps_per_epoch=batches // cfg.engine.grad_accum_steps)


def batches_per_epoch(source: str, cfg: MSTConfig, *, world_size: int, micro_batch: int, epoch: int = 0,
                      manifest: Manifest | None = None) -> int:
    """``len()`` of a fresh training loader, without building one."""
    manifest = _resolve_manifest(source, manifest)
    return plan_epoch([s.count for s in manifest.shards], seed=cfg.run.seed, epoch=epoch, world_size=world_size,
                      streams=max(1, cfg.data.num_workers), batch_size=micro_batch).n_batches


# --------------------------------------------------------------------------------------------------
# Evaluation loader: every sample exactly once over all ranks, in a fixed order
# --------------------------------------------------------------------------------------------------
class _EvalShards(IterableDataset):
    def __init__(self, urls: list[str], counts: list[int], transform: Callable, batch_size: int):
        self.urls, self.counts, self.transform, self.batch_size = urls, counts, transform, batch_size

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)
        try:
            yield from self._batches(wid, nw)
        except CorruptDataError as err:  # a broken or short shard: one line in the main process
            yield {ERROR_KEY: str(err)}

    def _batches(self, wid: int, nw: int):
        imgs, labels, keys, corrupt = [], [], [], []
        for url, count in zip(self.urls[wid::nw], self.counts[wid::nw]):
            for s in shard_samples(url, expected=count):
                try:
                    img = decode_rgb(image_bytes(s))
                except DECODE_ERRORS:
                    corrupt.append(_corrupt_record(s))
                    continue
                imgs.append(self.transform(img))
                labels.append(int(s["cls"]) if "cls" in s else -1)
                keys.append(str(s["__key__"]))
                if len(imgs) == self.batch_size:
                    yield torch.stack(imgs), torch.tensor(labels), keys, corrupt
                    imgs, labels, keys, corrupt = [], [], [], []
        if imgs or corrupt:
            yield (torch.stack(imgs) if imgs else torch.empty(0)), torch.tensor(labels, dtype=torch.long), keys, corrupt


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, indices: list[int], transform: Callable):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(root))
        self.root, self.indices, self.transform = root, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        path, label = self.folder.samples[self.indices[i]]
        key = str(Path(path).relative_to(self.root))
        try:
            return self.transform(decode_rgb(Path(path).read_bytes())), label, key
        except DECODE_ERRORS:
            return None, label, key


def _collate_folder(items):
    good = [it for it in items if it[0] is not None]
    imgs = torch.stack([it[0] for it in good]) if good else torch.empty(0)
    corrupt = [{"key": it[2], "shard": ""} for it in items if it[0] is None]
    return imgs, torch.tensor([it[1] for it in good], dtype=torch.long), [it[2] for it in good], corrupt


class EvalLoader:
    """Iterable of (images float (B,3,S,S), labels (B,), keys); after iteration ``corrupt`` holds the
    records ({"key", "shard"}) of the samples that failed to decode (``corrupt_count`` of them). A
    broken or short shard raises :class:`CorruptDataError`."""

    def __init__(self, loader: DataLoader, num_samples: int, num_batches: int):
        self.loader, self.num_samples, self.num_batches = loader, num_samples, num_batches
        self.corrupt: list[dict[str, str]] = []

    @property
    def corrupt_count(self) -> int:
        return len(self.corrupt)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for item in self.loader:
            if isinstance(item, dict):
                raise CorruptDataError(item[ERROR_KEY])
            imgs, labels, keys, corrupt = item
            self.corrupt.extend(corrupt)
            if len(keys):
                yield imgs, labels, keys


def _is_imagefolder(source: str) -> bool:
    p = Path(source)
    return p.is_dir() and not is_shard_dir(p) and any(d.is_dir() for d in p.iterdir())


def make_eval_loader(source: str, *, transform: Callable, batch_size: int, num_workers: int, rank: int = 0,
                     world_size: int = 1) -> tuple[EvalLoader, int]:
    """(loader, num_classes) over shards or an ImageFolder; rank r reads a disjoint, fixed part."""
    if _is_imagefolder(source):
        from torchvision.datasets import ImageFolder

        root = Path(source)
        n = len(ImageFolder(str(root)).samples)
        ds = _FolderDataset(root, list(range(rank, n, world_size)), transform)
        dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_folder,
                        multiprocessing_context="fork" if num_workers else None)
        return EvalLoader(dl, len(ds), len(dl)), len(ds.folder.classes)
    manifest = _resolve_manifest(source)
    urls = manifest.urls()[rank::world_size]
    counts = [s.count for s in manifest.shards][rank::world_size]
    ds = _EvalShards(urls, counts, transform, batch_size)
    nw = min(num_workers, len(urls))
    dl = DataLoader(ds, batch_size=None, num_workers=nw, multiprocessing_context="fork" if nw else None)
    # Each worker batches its own shards: the last batch of every worker may be partial.
    n_batches = sum(-(-sum(counts[w::max(nw, 1)]) // batch_size) for w in range(max(nw, 1)))
    return EvalLoader(dl, sum(counts), n_batches), manifest.num_classes



def class_names(source: str) -> list[str]:
    """The class names of a labelled source in label order: an ImageFolder's sub-folder names (its
    labels are their sorted order), a manifest's class ids (``wnid``, the folder or synset name)."""
    if _is_imagefolder(source):
        from torchvision.datasets.folder import find_classes

        return list(find_classes(source)[0])
    classes = sorted(Manifest.load(source).classes, key=lambda c: int(c["index"]))
    if [int(c["index"]) for c in classes] != list(range(len(classes))):
        raise ConfigError(f"{source}: the manifest's class indices are not 0..{len(classes) - 1}")
    return [str(c.get("wnid") or c.get("name") or c["index"]) for c in classes]
