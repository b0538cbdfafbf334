"""Online k-NN monitor (issue 10): ``mst-ds knn`` of the teacher, run inside training at a cadence.

The teacher's CLS features of a labelled held-out set (``eval.monitor``: a bank and a query split,
or one split cut deterministically by the crc32 of each sample key) are extracted with the evaluators'
own code (:func:`mst_ds.eval.features.extract_features`: each rank reads a disjoint part, the features
are all-gathered once and ordered by key) and scored on rank 0 by the same weighted k-NN
(:func:`mst_ds.eval.knn.weighted_knn`, temperature ``eval.knn_temperature``). With the same bank and
query as ``mst-ds knn --train BANK --val QUERY`` and the same weights it gives the same number.

It does not change training: the eval transform has no random op, the training loader is not touched,
and every RNG the data loader could draw from (torch CPU/CUDA, Python, NumPy) is restored afterwards,
so a run resumed after a kill stays bit-identical with the monitor on.

Each rank keeps its decoded, transformed monitor images in memory after the first evaluation when they
fit in ``KEEP_BYTES`` (the eval transform has no random op, so the kept tensors are exactly what a new
pass would decode): on the demo this took an evaluation from 1.45 to 1.1 s in one process.
"""

from __future__ import annotations

import random
import time
import zlib
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from mst_ds.config import MSTConfig, RunFailure
from mst_ds.data.augment import eval_transform
from mst_ds.eval import features as fx
from mst_ds.eval.knn import normalize_, weighted_knn

# Per rank and source: the digits' 1,797 images at 32 px take 22 MiB; an ImageNet-sized monitor at
# 224 px (600 KiB an image) does not fit and is decoded at every evaluation, as before.
KEEP_BYTES = 256 * 2**20


@contextmanager
def rng_untouched(device: torch.device):
    """Every random state the block might advance is put back afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def is_query(key: str, fraction: float) -> bool:
    """Deterministic cut of one split: a stable hash of the sample key, not its position."""
    return zlib.crc32(key.encode()) % 10_000 < round(fraction * 10_000)


class OnlineKNN:
    """Weighted k-NN of the teacher backbone on the monitor data; all ranks call :meth:`evaluate`."""

    def __init__(self, cfg: MSTConfig, *, rank: int, world: int, device: torch.device,
                 keep_bytes: int = KEEP_BYTES) -> None:
        self.cfg, self.m = cfg, cfg.eval.monitor
        for source in (self.m.bank, self.m.query):
            if source is not None:
                fx.check_labelled(source)
        self.dist = fx.Dist(rank, world, device)
        self.seconds = 0.0  # wall time spent in evaluations by this process
        self.evaluations = 0
        self.keep_bytes = keep_bytes
        self.kept: dict[str, tuple[list, list[str]]] = {}  # source → (this rank's batches, class names)
        self.too_big: set[str] = set()

    def due(self, step: int, *, epoch_end: bool, epoch: int, last: bool) -> bool:
        """Step 0, the last step, every ``every_steps`` steps and the end of every ``every_epochs``-th epoch."""
        m = self.m
        return (step == 0 or last or (m.every_steps > 0 and step % m.every_steps == 0)
                or (epoch_end and m.every_epochs > 0 and (epoch + 1) % m.every_epochs == 0))

    def _batches(self, source: str):
        """→ (this rank's (images, labels, keys) batches of ``source``, class names); decoded once and
        kept while they fit in ``keep_bytes``, decoded again at every evaluation otherwise."""
        if source in self.kept:
            return iter(self.kept[source][0]), self.kept[source][1]
        cfg = self.cfg
        transform = eval_transform(cfg.eval.image_size, mean=cfg.augment.mean, std=cfg.augment.std)
        loader, classes = fx.open_eval_data(source, transform=transform, batch_size=self.m.batch_size,
                                            num_workers=self.m.num_workers, rank=self.dist.rank,
                                            world_size=self.dist.world_size)
        if source in self.too_big:
            return loader, classes

        def stream():
            kept, size = [], 0
            for batch in loader:
                if kept is not None:
                    size += batch[0].nbytes
                    if size > self.keep_bytes:
                        kept = None
                        self.too_big.add(source)
                    else:
                        kept.append(batch)
                yield batch
            if kept is not None:
                self.kept[source] = (kept, classes)

        return stream(), classes

    def _features(self, backbone, source: str) -> tuple[Tensor, Tensor, list[str], list[str]]:
        batches, classes = self._batches(source)
        feats, labels, keys = fx.extract_features(backbone, batches, device=self.dist.device, dist_info=self.dist,
                                                  show_progress=False, return_keys=True)
        return feats, labels, keys, classes

    @torch.no_grad()
    def evaluate(self, backbone: torch.nn.Module) -> dict[str, float] | None:
        """Top-1 / top-5 (percent) on rank 0, None elsewhere. ``backbone``: the teacher's."""
        started = time.monotonic()
        was_training = backbone.training
        with rng_untouched(self.dist.device):
            backbone.eval()
            try:
                bank, bank_y, keys, classes = self._features(backbone, self.m.bank)
                n_cls = len(classes)
                if self.m.query is not None:
                    query, query_y, _, query_classes = self._features(backbone, self.m.query)
                    # Classes are matched by name, as `mst-ds knn` does (a query class the bank lacks is an error).
                    match = fx.match_classes(classes, query_classes, query_y, policy="error",
                                             train_source=self.m.bank, val_source=self.m.query)
                    query_y = match.labels
                else:
                    q = torch.tensor([is_query(k, self.m.query_fraction) for k in keys], dtype=torch.bool)
                    bank, bank_y, query, query_y = bank[~q], bank_y[~q], bank[q], bank_y[q]
            finally:
                backbone.train(was_training)
        if len(query_y) == 0 or len(bank_y) < self.m.k:  # every rank holds the gathered features: all stop
            raise RunFailure(f"eval.monitor: {len(bank_y)} bank and {len(query_y)} query samples: too few for k={self.m.k}")
        result = None
        if self.dist.is_main:
            dev = self.dist.device
            res = weighted_knn(normalize_(bank.to(dev)), bank_y, normalize_(query.to(dev)), query_y, [self.m.k],
                               self.cfg.eval.knn_temperature, n_cls, normalized=True)
            result = {"monitor_knn_top1": res.top1[self.m.k], "monitor_knn_top5": res.top5[self.m.k]}
        self.seconds += time.monotonic() - started
        self.evaluations += 1
        return result


# --------------------------------------------------------------------------------------------------
# Cost estimate (mst-ds plan)
# --------------------------------------------------------------------------------------------------
def training_cost_per_image(cfg: MSTConfig, patch: int) -> float:
    """Training compute per image in units of one feature-extraction forward (an ESTIMATE).

    Tokens as the cost unit (the per-token MLP/projection work dominates a ViT at these lengths):
    teacher forward on the 2 global views, student forward + backward (≈ 3 forwards) on 2 global +
    n local views, against one forward of an eval image; the decoder (≈ 7 % of a DeiT-S step,
    bench/step_cost.py) is left out, so the estimate errs on the monitor's side."""
    def tokens(size: int) -> int:
        return (size // patch) ** 2 + 1

    g, loc, e = tokens(cfg.augment.global_crop_size), tokens(cfg.augment.local_crop_size), tokens(cfg.eval.image_size)
    return (2 * g + 3 * (2 * g + cfg.augment.n_local_crops * loc)) / e


def evaluations_per_epoch(cfg: MSTConfig, steps_per_epoch: int) -> float:
    m = cfg.eval.monitor
    return (steps_per_epoch / m.every_steps if m.every_steps else 0.0) + (1.0 / m.every_epochs if m.every_epochs else 0.0)


def cost_share(cfg: MSTConfig, *, dataset_size: int, steps_per_epoch: int, monitor_images: int, patch: int) -> float:
    """Estimated share of the run's compute spent by the monitor (feature extraction only)."""
    monitor = monitor_images * evaluations_per_epoch(cfg, steps_per_epoch)
    train = dataset_size * training_cost_per_image(cfg, patch)
    return monitor / (monitor + train)


def count_images(source: str) -> int:
    """Samples of a shard set (its manifest) or an ImageFolder."""
    from mst_ds.data.reader import _is_imagefolder

    if _is_imagefolder(source):
        from torchvision.datasets import ImageFolder

        return len(ImageFolder(source).samples)
    from mst_ds.data.manifest import Manifest

    return Manifest.load(source).total
