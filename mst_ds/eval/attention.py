"""Last-layer CLS attention maps, the side-by-side figure of the paper's Fig. 1, and video [S §12, §13].

For every image and model: the last block's CLS→patch attention of each head, renormalised over the
patches (each head's map sums to 1; the softmax row also covers the CLS token itself), the mean over
heads, and DINO's thresholded version (``visualize_attention.py``): sort a head's map, keep the largest
patches until they hold ``keep`` (60 %) of the mass. Maps are upsampled nearest to the image.

Outputs (``--out``):

* ``compare.png`` / ``compare_thresholded.png``: one row per image, columns input | model A | model B …
  (head-averaged attention over the image; the thresholded mask) — the paper's Fig. 1;
* ``<model>/<image>_heads.png``: columns input | head 0 … | mean, each labelled with its peak share
  of the attention; top row the map over the input, bottom row the region holding ``keep`` of the
  mass (tinted and outlined; the rest dimmed); ``attention.json`` lists the panels;
* ``--video``: a video file (anything imageio can read here — GIF always, mp4 with imageio-ffmpeg/pyav)
  or a folder of frames → ``frames/frame_NNNNN.png`` (input | model A | …, one per frame), assembled
  into ``attention.mp4`` when an ffmpeg binary is available, else ``attention.gif``.

Figures are composed with PIL at exact pixel sizes: every tile is ``tile_size(image_size)`` pixels
(the image upscaled by an integer factor to ≥ 224 px, nearest: never blurred), plus a ``HEADER``-pixel
label strip on top. A token grid of at most 16 × 16 gets patch lines, so each token reads as a block.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from mst_ds.config import UsageError
from mst_ds.data.decode import to_rgb
from mst_ds.data.manifest import is_shard_dir
from mst_ds.eval.features import IMAGE_SUFFIXES, is_random, load_backbone, resolve_config, weights_file
from mst_ds.model.backbone import Backbone

HEADER = 20  # pixels of the label strip above each figure
HEAT_ALPHA = 0.6


# --------------------------------------------------------------------------------------------------
# Attention maps
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def cls_attention(backbone: Backbone, images: Tensor) -> Tensor:
    """images (B,3,H,W) normalised, H and W multiples of the patch → (B, heads, H/p, W/p), each head's
    map renormalised over the patches (sums to 1)."""
    out = backbone(images, return_attn=True)
    attn = out.attn.float()  # (B, heads, N): softmax row over CLS + patches, patch columns
    attn = attn / attn.sum(dim=-1, keepdim=True)
    p = backbone.patch_size
    return attn.reshape(attn.shape[0], attn.shape[1], images.shape[-2] // p, images.shape[-1] // p)


def threshold_mass(maps: Tensor, keep: float = 0.6) -> Tensor:
    """DINO's thresholding: per map, the largest entries holding ``keep`` of its mass.

    maps (..., h, w) non-negative → bool (..., h, w). Sort ascending, normalise, cumulative sum; an
    entry is kept when the mass at or below it exceeds 1 − keep.
    """
    flat = maps.flatten(-2)
    val, idx = flat.sort(dim=-1)
    val = val / val.sum(dim=-1, keepdim=True)
    kept_sorted = val.cumsum(dim=-1) > (1 - keep)
    kept = torch.zeros_like(kept_sorted).scatter_(-1, idx, kept_sorted)
    return kept.view(maps.shape)


def upsample(maps: Tensor, factor: int) -> Tensor:
    """(..., h, w) → (..., h·factor, w·factor), nearest (each patch becomes a block of pixels)."""
    shape = maps.shape
    up = F.interpolate(maps.reshape(-1, 1, *shape[-2:]).float(), scale_factor=factor, mode="nearest")
    return up.reshape(*shape[:-2], *up.shape[-2:])


@dataclass
class AttentionMaps:
    """Maps of one image under one model, at image resolution (H, W)."""

    heads: Tensor  # (heads, H, W) float, each head's patch map sums to 1 before upsampling
    mean: Tensor  # (H, W)
    heads_kept: Tensor  # (heads, H, W) bool
    mean_kept: Tensor  # (H, W) bool


def attention_maps(backbone: Backbone, images: Tensor, keep: float = 0.6) -> list[AttentionMaps]:
    """images (B,3,H,W) → one AttentionMaps per image."""
    grid = cls_attention(backbone, images)  # (B, heads, h, w)
    mean = grid.mean(dim=1)
    p = backbone.patch_size
    heads, mean_up = upsample(grid, p), upsample(mean, p)
    heads_kept, mean_kept = upsample(threshold_mass(grid, keep), p).bool(), upsample(threshold_mass(mean, keep), p).bool()
    return [AttentionMaps(heads[i].cpu(), mean_up[i].cpu(), heads_kept[i].cpu(), mean_kept[i].cpu())
            for i in range(images.shape[0])]


# --------------------------------------------------------------------------------------------------
# Drawing (exact pixel sizes)
# --------------------------------------------------------------------------------------------------
def tile_size(image_size: int) -> int:
    """Display size of one tile: the image upscaled by an integer factor to at least 224 px."""
    return image_size * max(1, math.ceil(224 / image_size))


def to_uint8(image: Tensor, mean, std) -> np.ndarray:
    """Normalised (3,H,W) → uint8 (H,W,3)."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (image.cpu() * s + m).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


def heat_overlay(rgb: np.ndarray, heat: Tensor, cmap: str = "inferno") -> np.ndarray:
    """uint8 (H,W,3) + map (H,W) → uint8 (H,W,3): the map, scaled min→max as DINO's ``plt.imsave`` of a
    head does, blended over the image."""
    import matplotlib

    h = heat.numpy().astype(np.float64)
    span = h.max() - h.min()
    h = (h - h.min()) / span if span > 0 else np.zeros_like(h)
    colour = matplotlib.colormaps[cmap](h)[..., :3] * 255
    return (HEAT_ALPHA * colour + (1 - HEAT_ALPHA) * rgb).round().astype(np.uint8)


KEPT_RGB = np.array([0, 255, 255])  # cyan: readable over dark and light images alike


def mask_overlay(rgb: np.ndarray, mask: Tensor) -> np.ndarray:
    """uint8 (H,W,3) + bool (H,W) → uint8 (H,W,3): the kept region tinted cyan with a cyan outline, the
    rest dimmed to 35 % (a dark image stays readable, unlike darkening alone)."""
    m = mask.numpy()
    out = np.where(m[..., None], 0.55 * rgb + 0.45 * KEPT_RGB, 0.35 * rgb)
    inner = m.copy()  # 4-neighbour erosion: the outline is the kept pixels with an outside neighbour
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    out[m & ~inner] = KEPT_RGB
    return out.round().astype(np.uint8)


def _tile(arr: np.ndarray, size: int | tuple[int, int]) -> Image.Image:
    wh = (size, size) if isinstance(size, int) else size
    return Image.fromarray(arr).resize(wh, Image.NEAREST)


GRID_MAX_TOKENS = 16  # token grids up to 16 × 16 get patch lines: each token reads as a block
GRID_RGB = (255, 255, 255)


def _draw_grid(draw: ImageDraw.ImageDraw, x0: int, y0: int, tw: int, th: int, grid: tuple[int, int]) -> None:
    gh, gw = grid
    for i in range(1, gw):
        x = x0 + round(i * tw / gw)
        draw.line([(x, y0), (x, y0 + th - 1)], fill=GRID_RGB, width=1)
    for j in range(1, gh):
        y = y0 + round(j * th / gh)
        draw.line([(x0, y), (x0 + tw - 1, y)], fill=GRID_RGB, width=1)


def compose(rows: list[list[np.ndarray]], labels: list[str], tile: int | tuple[int, int], *,
            row_labels: list[str] | None = None, grid: tuple[int, int] | None = None) -> Image.Image:
    """Grid of uint8 (H,W,3) tiles → PIL image of (cols·tw) × (HEADER + rows·th) pixels with a label
    above each column, optionally a label in the corner of each row's first map tile (column 1), and
    ``grid`` = (h, w) tokens: patch lines over every map tile (column ≥ 1) of a small token grid."""
    tw, th = (tile, tile) if isinstance(tile, int) else tile
    cols = len(labels)
    canvas = Image.new("RGB", (cols * tw, HEADER + len(rows) * th), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(labels):
        draw.text((c * tw + 4, 4), text[: max(4, tw // 7)], fill="black")
    for r, row in enumerate(rows):
        for c, arr in enumerate(row):
            canvas.paste(_tile(arr, (tw, th)), (c * tw, HEADER + r * th))
            if c >= 1 and grid is not None and max(grid) <= GRID_MAX_TOKENS:
                _draw_grid(draw, c * tw, HEADER + r * th, tw, th, grid)
        if row_labels and len(row) > 1:
            x, y = tw + 3, HEADER + r * th + 3
            box = draw.textbbox((x, y), row_labels[r])
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill="white")
            draw.text((x, y), row_labels[r], fill="black")
    for c in range(1, cols):  # column separators: tiles of neighbouring maps never run together
        draw.line([(c * tw, HEADER), (c * tw, canvas.height)], fill="white", width=2)
    return canvas


def heads_figure(rgb: np.ndarray, maps: AttentionMaps, tile: int, keep: float = 0.6,
                 grid: tuple[int, int] | None = None) -> tuple[Image.Image, dict]:
    """(input, each head, mean) columns × 2 rows (attention over the input; the region holding ``keep``
    of the mass) → (figure, its panel layout)."""
    n = maps.heads.shape[0]
    raw = [rgb] + [heat_overlay(rgb, maps.heads[h]) for h in range(n)] + [heat_overlay(rgb, maps.mean)]
    kept = [rgb] + [mask_overlay(rgb, maps.heads_kept[h]) for h in range(n)] + [mask_overlay(rgb, maps.mean_kept)]
    # each head's peak share of the attention: a peaked head (high max) vs a flat one (≈ 1/tokens)
    peak = [float(maps.heads[h].max()) for h in range(n)] + [float(maps.mean.max())]
    columns = ["input"] + [f"head {h}" for h in range(n)] + ["mean"]
    labels = ["input"] + [f"{c} (max {p:.2f})" for c, p in zip(columns[1:], peak)]
    rows = ["attention", f"{keep:.0%} of mass"]
    return compose([raw, kept], labels, tile, row_labels=rows, grid=grid), {"columns": columns, "rows": rows}


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def image_files(inputs: list[str]) -> list[Path]:
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(p)
        elif p.is_dir() and not is_shard_dir(p):
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
    return out


def load_inputs(inputs: list[str], transform, max_images: int) -> list[tuple[str, Tensor]]:
    """Image files, folders (recursive) and shard sets → [(name, normalised (3,S,S))], at most max_images."""
    items: list[tuple[str, Tensor]] = []
    for item in inputs:
        p = Path(item)
        if not p.exists() and not any(c in item for c in "{}:"):
            raise UsageError(f"{item}: no such image, folder or shard set")
        files = image_files([item])
        if files:
            for f in files:
                try:
                    with Image.open(f) as img:
                        items.append((f.stem, transform(to_rgb(img))))
                except (OSError, ValueError) as err:
                    raise UsageError(f"{f}: cannot read image ({err})") from None
        elif p.is_file() and p.suffix.lower() not in (".json", ".tar"):
            raise UsageError(f"{item}: not an image (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
        else:  # shards
            from mst_ds.data.reader import make_eval_loader

            loader, _ = make_eval_loader(item, transform=transform, batch_size=max(1, max_images), num_workers=0)
            for images, _, keys in loader:
                items.extend((str(k), x) for k, x in zip(keys, images))
                if len(items) >= max_images:
                    break
        if len(items) >= max_images:
            break
    if not items:
        raise UsageError(f"no images found in {' '.join(inputs)}")
    return items[:max_images]


def square_transform(image_size: int, patch: int, mean, std):
    """The eval transform (resize 256/224·S, center crop S), S cut down to a multiple of the patch."""
    from mst_ds.data.augment import eval_transform

    return eval_transform(image_size - image_size % patch, mean=mean, std=std)


def frame_transform(image_size: int, patch: int, mean, std):
    """Video frames keep their aspect ratio: short side → S, both sides cut to multiples of the patch."""
    import torchvision.transforms as T

    def crop(img: Image.Image) -> Image.Image:
        w, h = img.size
        return img.crop((0, 0, w - w % patch, h - h % patch))

    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.Lambda(crop),
                      T.ToTensor(), T.Normalize(mean, std)])


def read_frames(source: str, max_frames: int = 0) -> tuple[list[Image.Image], float | None]:
    """A video file (via imageio) or a folder of frames → (RGB frames, fps if known)."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"{source}: no frames (image files) in this folder")
        files = files[:max_frames] if max_frames else files
        return [to_rgb(Image.open(f)) for f in files], None
    if not p.is_file():
        raise UsageError(f"{source}: no such video file or frame folder")
    try:
        import imageio.v3 as iio
    except ImportError:
        raise UsageError(f"{source}: reading a video file needs imageio (pip install imageio); "
                         "or pass a folder of frames") from None

    frames: list[Image.Image] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # imageio's plugin probing (legacy DICOM)
            for arr in iio.imiter(str(p)):
                frames.append(Image.fromarray(np.asarray(arr)).convert("RGB"))
                if max_frames and len(frames) >= max_frames:
                    break
            meta = iio.immeta(str(p))
    except Exception as err:  # imageio raises plugin-specific errors
        raise UsageError(f"{source}: imageio cannot read this video ({type(err).__name__}); install imageio-ffmpeg "
                         "or pass a folder of frames") from None
    if not frames:
        raise UsageError(f"{source}: no frames")
    fps = meta.get("fps")
    if fps is None and meta.get("duration"):
        fps = 1000.0 / float(meta["duration"])  # GIF: ms per frame
    return frames, fps


def ffmpeg_binary() -> str | None:
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed or no bundled binary
        return None


def assemble_video(frame_files: list[Path], out_dir: Path, fps: float) -> Path:
    """Frames → attention.mp4 with ffmpeg when available, else an animated attention.gif."""
    exe = ffmpeg_binary()
    if exe:
        out = out_dir / "attention.mp4"
        cmd = [exe, "-y", "-loglevel", "error", "-framerate", f"{fps:g}", "-i", str(frame_files[0].parent / "frame_%05d.png"),
               "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode == 0:
            return out
        print(f"ffmpeg failed ({(res.stderr or '').strip().splitlines()[-1:]}); writing a GIF instead")
    out = out_dir / "attention.gif"
    frames = [Image.open(f) for f in frame_files]
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=int(round(1000 / fps)), loop=0)
    return out


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------
@dataclass
class Model:
    label: str
    backbone: Backbone


def model_label(ckpt: str) -> str:
    if is_random(ckpt):
        return "random init"
    p = Path(ckpt)
    from mst_ds.checkpoint import run_dir_of

    run_dir = run_dir_of(p)
    return run_dir.name if run_dir is not None else p.stem


def load_models(ckpts: list[str], preset: str, sets: list[str], which: str):
    """--ckpt values ('random' or paths) → ([Model], config of the first)."""
    models, cfgs = [], []
    for ckpt in ckpts or ["random"]:
        weights = None if is_random(ckpt) else weights_file(ckpt)
        cfg = resolve_config(weights, preset, sets)
        models.append(Model(model_label(ckpt), load_backbone(weights, cfg, which)))
        cfgs.append(cfg)
    labels = [m.label for m in models]
    for i, m in enumerate(models):  # two checkpoints of the same run name: make the columns distinct
        if labels.count(m.label) > 1:
            m.label = f"{m.label} #{i + 1}"
    return models, cfgs[0]


def run_images(models: list[Model], items: list[tuple[str, Tensor]], cfg, out: Path, keep: float) -> dict:
    mean, std = cfg.augment.mean, cfg.augment.std
    size = items[0][1].shape[-1]
    tile = tile_size(size)
    batch = torch.stack([x for _, x in items])
    rgbs = [to_uint8(x, mean, std) for _, x in items]
    written: dict = {"compare": [], "heads": []}
    p = models[0].backbone.patch_size
    grid = (batch.shape[-2] // p, batch.shape[-1] // p)
    raw_rows = [[rgb] for rgb in rgbs]
    kept_rows = [[rgb] for rgb in rgbs]
    for m in models:
        maps = attention_maps(m.backbone, batch, keep)
        folder = out / _slug(m.label)
        folder.mkdir(parents=True, exist_ok=True)
        for (name, _), rgb, mp, rr, kr in zip(items, rgbs, maps, raw_rows, kept_rows):
            rr.append(heat_overlay(rgb, mp.mean))
            kr.append(mask_overlay(rgb, mp.mean_kept))
            path = folder / f"{_slug(name)}_heads.png"
            figure, panels = heads_figure(rgb, mp, tile, keep, grid)
            figure.save(path)
            written["heads"].append(str(path))
            written["heads_panels"] = panels
    labels = ["input"] + [m.label for m in models]
    for rows, name in ((raw_rows, "compare.png"), (kept_rows, "compare_thresholded.png")):
        path = out / name
        compose(rows, labels, tile, grid=grid).save(path)
        written["compare"].append(str(path))
    written["grid"] = list(grid)
    return written


FRAME_RE = re.compile(r"frame_\d{5,}\.png")


def run_video(models: list[Model], source: str, cfg, out: Path, keep: float, *, fps: float | None,
              max_frames: int) -> dict:
    frames, src_fps = read_frames(source, max_frames)
    patch = models[0].backbone.patch_size
    transform = frame_transform(cfg.eval.image_size, patch, cfg.augment.mean, cfg.augment.std)
    frame_dir = out / "frames"
    if frame_dir.exists():  # frames of an earlier run of this command are replaced; anything else is kept
        foreign = [p.name for p in frame_dir.iterdir() if not FRAME_RE.fullmatch(p.name)]
        if foreign:
            raise UsageError(f"{frame_dir}: holds files this command did not write ({', '.join(sorted(foreign)[:3])}); "
                             "choose another --out")
        for p in frame_dir.iterdir():
            p.unlink()
    frame_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, frame in enumerate(frames):
        x = transform(frame)[None]
        rgb = to_uint8(x[0], cfg.augment.mean, cfg.augment.std)
        row = [rgb] + [heat_overlay(rgb, attention_maps(m.backbone, x, keep)[0].mean) for m in models]
        h, w = rgb.shape[:2]
        factor = tile_size(min(h, w)) // min(h, w)
        path = frame_dir / f"frame_{i:05d}.png"
        compose([row], ["input"] + [m.label for m in models], (w * factor, h * factor)).save(path)
        files.append(path)
    video = assemble_video(files, out, fps or src_fps or 10.0)
    return {"frames": [str(f) for f in files], "video": str(video)}


def run(args) -> int:
    if not 0 < args.keep <= 1:
        raise UsageError(f"--keep {args.keep}: expected a fraction in (0, 1]")
    out = Path(args.out)
    if args.video and len(args.inputs) != 1:
        raise UsageError("--video takes exactly one input: a video file or a folder of frames")
    if args.video:
        read_frames(args.inputs[0], 1)  # fail on a bad input before loading any model
    models, cfg = load_models(args.ckpt, args.preset, args.sets, args.which)
    out.mkdir(parents=True, exist_ok=True)
    if args.video:
        written = run_video(models, args.inputs[0], cfg, out, args.keep, fps=args.fps, max_frames=args.max_frames)
        print(f"{len(written['frames'])} frames → {written['video']}")
    else:
        patch = models[0].backbone.patch_size
        transform = square_transform(cfg.eval.image_size, patch, cfg.augment.mean, cfg.augment.std)
        items = load_inputs(args.inputs, transform, args.max_images)
        written = run_images(models, items, cfg, out, args.keep)
        print(f"{len(items)} images × {len(models)} models → {', '.join(written['compare'])} "
              f"(+ {len(written['heads'])} per-head figures)")
    (out / "attention.json").write_text(json.dumps({"models": [m.label for m in models], "keep": args.keep,
                                                   **written}, indent=2) + "\n")
    return 0
