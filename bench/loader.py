"""Images/s per CPU core: shards + this loader + batched photometric stage vs ImageFolder + DINO's PIL multi-crop.

    python bench/loader.py [--quick] [--images N] [--batch B]

Same images (crops of the photos bundled with scikit-image, saved as 500×375 JPEGs, ImageNet's typical
size) and the same crop settings (the paper's: 2 × 224 + 6 × 96, colour jitter, grayscale, blur,
solarize):

(a) ``mst-shards`` shards → ``make_train_loader`` (decode, RandomResizedCrop, flip → uint8) → the
    batched ``Photometric`` stage on CPU tensors (this machine has no accelerator);
(a′) the CPU-worker part of (a) alone: what each loader core must sustain when the photometric stage
    runs on the accelerator, as it does in training on GPUs;
(b) torchvision ``ImageFolder`` + DINO's PIL ``DataAugmentationDINO``-style transforms.

Everything runs in this process on one intra-op thread, timed in CPU seconds of the process (so the
load of the shared machine does not skew it), best of several alternating repetitions. The process keeps
its freed memory (``host_memory.keep_freed_memory``), as a CPU training process does, for both sides:
it took 1.1–1.3 ms per image off (a)'s photometric stage and nothing off (b) (10.0 ms either way). The
photometric stage runs as the preset configures it (``augment.fuse_cpu``: fused element-wise steps);
its one-off compile happens in a warm-up before the timing. Targets per core: (a) ≥ 1.5× (b),
(a′) ≥ 3× (b). No assertions: it is a measurement.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import bench_line
from PIL import Image
from rich.console import Console
from rich.table import Table
from torchvision.datasets import ImageFolder

from data_tools.sample_data import available_photos, skimage_photo
from data_tools.writer import write_shards
from mst_ds.config import load_config
from mst_ds.data.augment import Photometric, pil_reference_multicrop
from mst_ds.data.reader import make_train_loader
from mst_ds.host_memory import keep_freed_memory

# Per core: end to end on CPU (this machine, no accelerator) and the loader cores' part when the
# photometric stage runs on the accelerator, as in training on GPUs (issue 21's targets).
TARGETS = {"a": 1.5, "a_cpu": 3.0}


def make_folder(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    photos = [skimage_photo(p) for p in available_photos()]
    photos = [p for p in photos if min(p.size) >= 256]
    for i in range(n):
        p = photos[i % len(photos)]
        w = int(min(p.width, p.height * 4 / 3) * rng.uniform(0.6, 1.0))
        h = int(w * 3 / 4)
        x0, y0 = int(rng.integers(0, p.width - w + 1)), int(rng.integers(0, p.height - h + 1))
        img = p.resize((500, 375), Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"img_{i:05d}.JPEG", quality=90)


def run_ours(shards: Path, cfg, batch: int, photometric: bool, ph: Photometric) -> tuple[float, int]:
    """→ (CPU seconds, images) for one epoch of (a) or (a′)."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.process_time()
    n = 0
    loader = make_train_loader(str(shards), cfg, rank=0, world_size=1, micro_batch=batch, epoch=0, num_workers=0)
    for b in loader:
        if photometric:
            ph(b["global"] + b["local"], gen)
        n += len(b["key"])
    return time.process_time() - t0, n


def run_pil(folder: Path, cfg) -> tuple[float, int]:
    views = pil_reference_multicrop(cfg.augment)
    ds = ImageFolder(str(folder), transform=lambda img: [t(img) for t in views])
    t0 = time.process_time()
    for i in range(len(ds)):
        ds[i]
    return time.process_time() - t0, len(ds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repetitions (< 1 minute)")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    # quick was 64 images, best of 2: (a)/(b) moved 1.48–1.58 between runs on a quiet machine
    n = args.images or (128 if args.quick else 512)
    reps = args.reps or 3
    torch.set_num_threads(1)
    keep_freed_memory()
    cfg = load_config("mst_deit_s_100ep").config  # the paper's crops: 2 × 224 + 6 × 96
    cfg.data.num_workers = 0
    cfg.data.shuffle_buffer = 0
    best = {"a": float("inf"), "a_cpu": float("inf"), "b": float("inf")}
    counts = {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "folder", n)
        write_shards(tmp / "folder", tmp / "shards", split="train", max_count=256, progress=False)
        ph = Photometric.from_config(cfg.augment)
        t0 = time.perf_counter()
        a = cfg.augment
        ph([torch.zeros(2, 3, s, s, dtype=torch.uint8) for s in [a.global_crop_size] * 2 + [a.local_crop_size] * a.n_local_crops],
           torch.Generator().manual_seed(0))
        print(f"photometric warm-up (augment.fuse_cpu={a.fuse_cpu}: its compile): {time.perf_counter() - t0:.1f} s")
        for _ in range(reps):
            for key, fn in (("a", lambda: run_ours(tmp / "shards", cfg, args.batch, True, ph)),
                            ("a_cpu", lambda: run_ours(tmp / "shards", cfg, args.batch, False, ph)),
                            ("b", lambda: run_pil(tmp / "folder", cfg))):
                sec, k = fn()
                counts[key] = k
                best[key] = min(best[key], sec / k)
    rate = {k: 1.0 / v for k, v in best.items()}
    table = Table(title=f"{n} JPEGs 500×375, views 2×{cfg.augment.global_crop_size} + "
                        f"{cfg.augment.n_local_crops}×{cfg.augment.local_crop_size}, 1 thread, best of {reps}")
    for col in ("pipeline", "ms / image (CPU)", "images/s per core", "ratio vs (b)"):
        table.add_column(col, justify="right")
    names = {"a": "(a) shards + loader + photometric on CPU", "a_cpu": "(a′) shards + loader (workers' part)",
             "b": "(b) ImageFolder + DINO PIL multi-crop"}
    for k in ("a", "a_cpu", "b"):
        table.add_row(names[k], f"{best[k] * 1e3:.1f}", f"{rate[k]:.1f}", f"{rate[k] / rate['b']:.2f}")
    Console(width=130).print(table)
    for k, label in (("a", "end to end on CPU"), ("a_cpu", "loader cores, photometric on the accelerator")):
        ratio = rate[k] / rate["b"]
        print(f"target ≥ {TARGETS[k]}× per core, {label}: {ratio:.2f}× ({'met' if ratio >= TARGETS[k] else 'NOT met'})")
        bench_line(f"loader images/s per core vs PIL multi-crop ({label})", ratio, ">=", TARGETS[k])


if __name__ == "__main__":
    main()
