"""Multi-crop augmentation of MST/DINO (SPEC §3), split into a CPU stage and a batched device stage.

DINO's PIL pipeline runs at ~20–30 images/s per CPU core because colour jitter (mostly hue) dominates
(SPEC §3). So the work is split, with the same distributions:

* :class:`MultiCropCPU` (loader workers): decode, RandomResizedCrop (bicubic), horizontal flip → uint8
  views; all randomness from one per-sample seed, so a resumed loader reproduces every crop exactly.
* :class:`Photometric` (training device, CPU tensors where there is none): colour jitter (BYOL: p 0.8,
  random order of the four adjustments), grayscale p 0.2, Gaussian blur (per view: global 1 p 1.0,
  global 2 p 0.1, locals p 0.5; sigma 0.1–2.0), solarize (global 2 p 0.2), normalise — per-sample
  parameters drawn from a ``torch.Generator``, applied to whole batches.

View order everywhere: global 1, global 2, then the local views.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from mst_ds.config import AugmentConfig
from mst_ds.data.cpu_fusion import FusedCPU
from mst_ds.data.decode import decode_rgb, to_rgb

_PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
_TV_INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Crop parameter columns of ``params``: top, left, height, width (original-image pixels), flipped.
PARAM_FIELDS = ("top", "left", "height", "width", "flip")


# --------------------------------------------------------------------------------------------------
# CPU stage
# --------------------------------------------------------------------------------------------------
def random_resized_crop_params(
    rng: random.Random, height: int, width: int, scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``rng`` → (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → uint8 (3, H, W) (a channels-last view: batching copies it once, contiguously)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class MultiCropCPU:
    """Decode + RandomResizedCrop + flip for 2 global and ``n_local`` local views → uint8 tensors."""

    def __init__(
        self,
        global_size: int,
        local_size: int,
        global_scale: Sequence[float],
        local_scale: Sequence[float],
        n_local: int,
        flip_p: float = 0.5,
        interpolation: str = "bicubic",
    ):
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.n_local, self.flip_p = n_local, flip_p
        self.resample = _PIL_RESAMPLE[interpolation]

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> MultiCropCPU:
        return cls(cfg.global_crop_size, cfg.local_crop_size, cfg.global_crop_scale, cfg.local_crop_scale,
                   cfg.n_local_crops, cfg.flip_p, cfg.interpolation)

    @property
    def n_views(self) -> int:
        return 2 + self.n_local

    def _view(self, img: Image.Image, rng: random.Random, size: int, scale) -> tuple[torch.Tensor, list[int]]:
        top, left, h, w = random_resized_crop_params(rng, img.height, img.width, scale)
        view = img.resize((size, size), self.resample, box=(left, top, left + w, top + h))
        flip = rng.random() < self.flip_p
        if flip:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_uint8_chw(view), [top, left, h, w, int(flip)]

    def __call__(self, img: Image.Image | bytes, seed: int) -> dict:
        """→ dict(global=[uint8 (3,G,G)]*2, local=[uint8 (3,L,L)]*n, params=int32 (2+n, 5))."""
        if isinstance(img, bytes | bytearray):
            img = decode_rgb(img)
        else:
            img = to_rgb(img)
        rng = random.Random(seed)
        views, params = [], []
        for v in range(self.n_views):
            size, scale = (self.global_size, self.global_scale) if v < 2 else (self.local_size, self.local_scale)
            view, p = self._view(img, rng, size, scale)
            views.append(view)
            params.append(p)
        return {"global": views[:2], "local": views[2:], "params": torch.tensor(params, dtype=torch.int32)}


# --------------------------------------------------------------------------------------------------
# Batched photometric stage
# --------------------------------------------------------------------------------------------------
def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) float → (B,1,H,W) luma with PIL's ITU-R 601-2 weights."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


# The element-wise steps below are written so that torch.compile can fuse each into one loop on CPU
# (``Photometric(fuse_cpu=True)``): no reductions, no writes into their inputs.
def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def blend(x: torch.Tensor, f: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """f·x + (1 − f)·other per sample, clamped to [0, 1] (PIL ImageEnhance's blend)."""
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def contrast_mean(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) → (B,1,1,1) mean luma. A reduction: never fused, so its summation order stays ATen's."""
    return _gray(x).mean(dim=(1, 2, 3), keepdim=True)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return blend(x, f, _gray(x))


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``f`` turns per sample: (B,3,H,W) in [0,1], f (B,).

    The same HSV round trip as torchvision/PIL, written without materialising S and the sextant
    table: with V = max, C = max − min and H in sextants, channel n = V − C·clamp(min(k, 4 − k), 0, 1),
    k = (H + n) mod 6 for n = 5, 3, 1 (R, G, B). ~4× faster than the table form on CPU.
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    c = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = c.reciprocal().masked_fill_(c == 0, 0.0)  # grey pixels: any hue, zero chroma
    is_r, is_g = maxc == r, maxc == g
    # Hue in sextants, shifted by 6 so every k below is positive (fmod is then the modulo).
    h = torch.where(is_r, (g - b).mul_(inv), torch.where(is_g, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0)))
    h.add_(6.0 * f.view(-1, 1, 1) + 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.fmod(h + n, 6.0)
        t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        channels.append(t.mul_(c).neg_().add_(maxc))  # V − t·C
    return torch.stack(channels, 1)


def to_unit(u8: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1]. Not fused: eager's conversion + in-place division measured faster
    than inductor's loop (0.63 vs 1.10 ms for 32 × 224²)."""
    return u8.float().div_(255.0)


def normalize(x: torch.Tensor, inv_std: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std as x·(1/std) + (−mean/std), per channel: (B,3,H,W), (1,3,1,1), (1,3,1,1)."""
    return x * inv_std + shift


# What ``Photometric(fuse_cpu=True)`` compiles on CPU (the jitter adjustments by name; contrast is a blend
# with :func:`contrast_mean`, which stays eager).
ELEMENTWISE = {"brightness": adjust_brightness, "blend": blend, "saturation": adjust_saturation,
               "hue": adjust_hue, "normalize": normalize}


def cpu_branches(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the branches tuned by measurement on CPU (channels-last blur, row copies, local
    views batched, the fused kernels); an accelerator's tensors take the plain ones. The one place the
    stage asks, so a test can force the accelerator branches on CPU tensors."""
    return x.device.type == "cpu"


def _blur_fixed_radius(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    b, c, h, w = x.shape
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kern = torch.exp(-0.5 * (k.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*3, K)
    y = x.reshape(1, b * c, h, w)
    pad_w, pad_h = min(radius, w - 1), min(radius, h - 1)
    # Replicate padding cannot exceed the image; fall back to zero padding of the remainder.
    y = F.pad(y, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    if radius > pad_w or radius > pad_h:
        y = F.pad(y, (radius - pad_w,) * 2 + (radius - pad_h,) * 2)
    if cpu_branches(y):
        # oneDNN's depthwise 1×K and K×1 kernels ran 1.5–4× faster on channels-last than on NCHW here,
        # conversions included, with the same results (tests compare); accelerators keep their layout.
        y = y.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(y, kern.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, kern.view(b * c, 1, -1, 1), groups=b * c)
    return y.contiguous().view(b, c, h, w)


def rows_of(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Batch indices (int64, on ``device``) of the True entries of a bool mask (B,)."""
    return torch.nonzero(mask).flatten().to(device)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] (index_select: ~8× faster on CPU than advanced indexing here)."""
    return x.index_select(0, rows)


def put_rows(x: torch.Tensor, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x[rows] = y in place, → x. On CPU as one copy per sample: ATen's index_put computes an offset per
    element and ran 2–3× slower than the row copies on 224-px views."""
    if cpu_branches(x):
        for j, i in enumerate(rows.tolist()):
            x[i].copy_(y[j])
    else:
        x.index_copy_(0, rows, y)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur, (B,3,H,W) with sigma (B,); separable, edge pixels extended like PIL.

    The kernel reaches 3σ; samples are grouped by that radius so a small σ pays for a small kernel."""
    radius = torch.ceil(3.0 * sigma).to(torch.int64).clamp_(min=1)
    if bool((radius == radius[0]).all()):
        return _blur_fixed_radius(x, sigma, int(radius[0]))
    out = torch.empty_like(x)
    for r in torch.unique(radius).tolist():
        rows = rows_of(radius == r, x.device)
        put_rows(out, rows, _blur_fixed_radius(take_rows(x, rows), take_rows(sigma, rows), int(r)))
    return out


class Photometric:
    """Batched BYOL photometric augmentation + normalisation of multi-crop views, on their device."""

    def __init__(
        self,
        jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: Sequence[float] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_p: Sequence[float] = (0.0, 0.2),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        fuse_cpu: bool = False,
    ):
        self.jitter, self.jitter_p, self.grayscale_p = tuple(jitter), jitter_p, grayscale_p
        self.blur_p, self.local_blur_p, self.blur_sigma = tuple(blur_p), local_blur_p, tuple(blur_sigma)
        self.solarize_p = tuple(solarize_p)
        self.mean, self.std = tuple(mean), tuple(std)
        self.fused = FusedCPU(ELEMENTWISE) if fuse_cpu else None  # bit-identical to eager (tests compare)

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> Photometric:
        return cls(cfg.color_jitter, cfg.color_jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.local_blur_p,
                   cfg.blur_sigma, cfg.solarize_p, cfg.mean, cfg.std, fuse_cpu=cfg.fuse_cpu)

    def _run(self, name: str, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        """``ELEMENTWISE[name](x, *args)``, fused when on CPU and ``fuse_cpu``."""
        if self.fused is not None and cpu_branches(x):
            return self.fused(name, x, *args)
        return ELEMENTWISE[name](x, *args)

    def _adjust(self, t: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Jitter adjustment ``t`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with factors f (B,)."""
        if t == 1:  # contrast: a blend with the mean luma
            return self._run("blend", x, f, contrast_mean(x))
        return self._run({0: "brightness", 2: "saturation", 3: "hue"}[t], x, f)

    def view_probs(self, v: int) -> tuple[float, float]:
        """(blur p, solarize p) of view ``v`` (0, 1 = globals)."""
        if v < 2:
            return self.blur_p[v], self.solarize_p[v]
        return self.local_blur_p, 0.0

    def _rand(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        dev = generator.device if generator is not None else "cpu"
        return torch.rand(n, generator=generator, device=dev).cpu()

    def draw(self, bsz: int, v: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample random parameters of view ``v`` for a batch of ``bsz`` (CPU tensors):
        jitter (B,) bool, factors (B,4) brightness/contrast/saturation/hue, order (B,4) a permutation
        of the four adjustments (torchvision draws one per call = per sample here), gray (B,) bool,
        blur (B,) bool, sigma (B,), solarize (B,) bool."""
        br, co, sa, hu = self.jitter
        lo_hi = [(max(0.0, 1 - br), 1 + br), (max(0.0, 1 - co), 1 + co), (max(0.0, 1 - sa), 1 + sa), (-hu, hu)]
        blur_p, sol_p = self.view_probs(v)
        lo, hi = self.blur_sigma
        return {
            "jitter": self._rand(bsz, generator) < self.jitter_p,
            "factors": torch.stack([a + (b - a) * self._rand(bsz, generator) for a, b in lo_hi], 1),
            "order": torch.argsort(self._rand(bsz * 4, generator).view(bsz, 4), dim=1),
            "gray": self._rand(bsz, generator) < self.grayscale_p,
            "blur": self._rand(bsz, generator) < blur_p,
            "sigma": lo + (hi - lo) * self._rand(bsz, generator),
            "solarize": self._rand(bsz, generator) < sol_p,
        }

    def color_jitter(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """ColorJitter(b, c, s, h) on the samples with ``p["jitter"]``, each with its factors and order.

        Samples sharing an order of the four adjustments are processed together (one gather, four
        ops, one scatter), which costs far less than masking every op."""
        br, co, sa, hu = self.jitter
        identity = (br == 0, co == 0, sa == 0, hu == 0)  # a zero-strength adjustment is the identity
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in torch.nonzero(p["jitter"]).flatten().tolist():
            groups.setdefault(tuple(p["order"][i].tolist()), []).append(i)
        factors = p["factors"].to(x.device)
        for perm, members in groups.items():
            rows = torch.tensor(members, dtype=torch.int64, device=x.device)
            y, f = take_rows(x, rows), take_rows(factors, rows)
            for t in perm:
                if not identity[t]:
                    y = self._adjust(t, y, f[:, t])
            put_rows(x, rows, y)
        return x

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """float (B,3,S,S) in [0,1] + parameters from :meth:`draw` → augmented (normalised) float.
        May modify ``x`` in place: use the result."""
        dev = x.device
        x = self.color_jitter(x, p)
        if p["gray"].any():
            rows = rows_of(p["gray"], dev)
            put_rows(x, rows, _gray(take_rows(x, rows)).expand(-1, 3, -1, -1))
        sigma = p["sigma"].to(dev)
        if len(x) and p["blur"].all():  # global view 1 (p 1.0): the whole batch, without a gather and a scatter copy
            x = gaussian_blur(x, sigma)
        elif p["blur"].any():
            rows = rows_of(p["blur"], dev)
            put_rows(x, rows, gaussian_blur(take_rows(x, rows), take_rows(sigma, rows)))
        if p["solarize"].any():
            rows = rows_of(p["solarize"], dev)
            xs = take_rows(x, rows)
            # PIL's solarize inverts pixels >= 128 (of 255).
            put_rows(x, rows, torch.where(xs >= 127.5 / 255.0, 1.0 - xs, xs))
        if not normalize:
            return x
        inv_std = 1.0 / torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        shift = -torch.tensor(self.mean, device=dev).view(1, 3, 1, 1) * inv_std
        return self._run("normalize", x, inv_std, shift)

    def __call__(self, views: list[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """views: [uint8 (B,3,S,S)] in view order → [float32 (B,3,S,S)] augmented and normalised.

        On CPU, local views of one size go through as one batch (their draws stay per view, in view
        order): fewer and larger groups per jitter order and blur radius, the same numbers."""
        local = views[2:]
        if not self._batch_locals(local):
            return [self.augment_view(u8, v, generator) for v, u8 in enumerate(views)]
        out = [self.augment_view(u8, v, generator) for v, u8 in enumerate(views[:2])]
        draws = [self.draw(u8.shape[0], v, generator) for v, u8 in enumerate(local, start=2)]
        x = self.apply(to_unit(torch.cat(local)), {k: torch.cat([d[k] for d in draws]) for k in draws[0]})
        return out + list(x.split([u8.shape[0] for u8 in local]))

    @staticmethod
    def _batch_locals(local: list[torch.Tensor]) -> bool:
        """Whether batching ``local`` cannot change a bit: a sample's contrast mean must be summed the
        same way whatever its group. ATen on CPU sums a sample below its grain (32,768 values) in one
        serial pass; above it, alone in its group, in two passes split over threads. CUDA sizes its
        reduction blocks by the group, so other devices keep one batch per view."""
        shapes = {tuple(u8.shape[1:]) for u8 in local}
        return (len(shapes) == 1 and cpu_branches(local[0])
                and local[0].shape[-2] * local[0].shape[-1] < 2**15)

    def augment_view(self, u8: torch.Tensor, v: int, generator: torch.Generator | None = None,
                     normalize: bool = True) -> torch.Tensor:
        """One view batch: uint8 (B,3,S,S) → float (B,3,S,S); ``v`` selects the blur/solarize p."""
        return self.apply(to_unit(u8), self.draw(u8.shape[0], v, generator), normalize)


# --------------------------------------------------------------------------------------------------
# Evaluation transforms (PIL → normalised float tensor)
# --------------------------------------------------------------------------------------------------
def eval_transform(image_size: int = 224, *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """Resize the short side to ``image_size``·256/224 (bicubic), center crop ``image_size`` [S §4]."""
    return T.Compose([
        T.Lambda(to_rgb),
        T.Resize(int(round(image_size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def linear_train_transform(image_size: int = 224, *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """RandomResizedCrop + horizontal flip only [S §5] (DINO's linear-probe training transform)."""
    return T.Compose([
        T.Lambda(to_rgb),
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def pil_reference_multicrop(cfg: AugmentConfig) -> list[T.Compose]:
    """DINO's PIL multi-crop pipeline (one Compose per view) — the reference for tests and benchmarks."""
    interp = _TV_INTERP[cfg.interpolation]
    norm = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])

    def jitter():
        return [
            T.RandomHorizontalFlip(p=cfg.flip_p),
            T.RandomApply([T.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
        ]

    def blur(p):
        return PILGaussianBlur(p, cfg.blur_sigma)

    views = []
    for v in range(2 + cfg.n_local_crops):
        g = v < 2
        size, scale = (cfg.global_crop_size, cfg.global_crop_scale) if g else (cfg.local_crop_size, cfg.local_crop_scale)
        ops = [T.Lambda(to_rgb), T.RandomResizedCrop(size, scale=scale, interpolation=interp), *jitter(),
               blur(cfg.blur_p[v] if g else cfg.local_blur_p)]
        if g and cfg.solarize_p[v] > 0:
            ops.append(PILSolarize(cfg.solarize_p[v]))
        ops.append(norm)
        views.append(T.Compose(ops))
    return views


class PILGaussianBlur:
    """DINO's GaussianBlur: PIL ImageFilter.GaussianBlur with radius ~ U(sigma) applied with prob p."""

    def __init__(self, p: float, sigma: Sequence[float]):
        self.p, self.sigma = p, tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        from PIL import ImageFilter

        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILSolarize:
    """DINO's Solarization: PIL ImageOps.solarize (threshold 128) with prob p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        from PIL import ImageOps

        return ImageOps.solarize(img) if random.random() < self.p else img
