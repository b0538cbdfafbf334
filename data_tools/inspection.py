"""``mst-shards inspect``: class histogram, image size statistics and a contact sheet of a shard set."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mst_ds.data.decode import decode_rgb
from mst_ds.data.manifest import Manifest
from mst_ds.data.reader import IMAGE_EXTS, iter_tar_samples


@dataclass
class Inspection:
    manifest: Manifest
    class_counts: Counter = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    bytes_per_image: list[int] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)  # (format, mode) → count
    thumbs: list[Image.Image] = field(default_factory=list)
    samples: int = 0
    undecodable: int = 0


def inspect_dir(directory: str | Path, *, max_shards: int | None = None, sheet_images: int = 64,
                thumb: int = 96, split: str | None = None) -> Inspection:
    manifest = Manifest.load(str(directory), split=split)
    res = Inspection(manifest)
    for url in manifest.urls()[:max_shards]:
        for s in iter_tar_samples(url):
            res.samples += 1
            label = int(s["cls"]) if "cls" in s else -1
            res.class_counts[label] += 1
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            if ext is None:
                continue
            res.bytes_per_image.append(len(s[ext]))
            meta = json.loads(s["json"]) if "json" in s else {}
            if "width" in meta:
                res.widths.append(int(meta["width"]))
                res.heights.append(int(meta["height"]))
            res.formats[(meta.get("format", ext), meta.get("mode", "?"))] += 1
            if len(res.thumbs) < sheet_images:
                try:
                    img = decode_rgb(s[ext])
                except Exception:
                    res.undecodable += 1
                    continue
                if "width" not in meta:
                    res.widths.append(img.width)
                    res.heights.append(img.height)
                img.thumbnail((thumb, thumb))
                tile = Image.new("RGB", (thumb, thumb), (32, 32, 32))
                tile.paste(img, ((thumb - img.width) // 2, (thumb - img.height) // 2))
                res.thumbs.append(tile)
    return res


def contact_sheet(thumbs: list[Image.Image], path: Path, columns: int = 8) -> Path:
    """Grid of thumbnails → PNG at ``path``."""
    if not thumbs:
        raise ValueError("no decodable images for the contact sheet")
    t = thumbs[0].width
    rows = math.ceil(len(thumbs) / columns)
    sheet = Image.new("RGB", (columns * t, rows * t), (0, 0, 0))
    for i, im in enumerate(thumbs):
        sheet.paste(im, ((i % columns) * t, (i // columns) * t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def stats_row(values: list[int]) -> tuple[str, ...]:
    if not values:
        return ("-",) * 5
    a = np.asarray(values)
    return tuple(f"{v:,.0f}" for v in (a.min(), np.percentile(a, 5), np.median(a), np.percentile(a, 95), a.max()))
