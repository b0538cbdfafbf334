"""Multi-crop CPU stage and batched photometric stage vs DINO's PIL pipeline, on real photos."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from data_tools.sample_data import skimage_photo
from mst_ds.config import AugmentConfig, load_config
from mst_ds.data.augment import (
    MultiCropCPU,
    Photometric,
    PILGaussianBlur,
    PILSolarize,
    eval_transform,
    gaussian_blur,
    linear_train_transform,
    pil_reference_multicrop,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo_crops() -> tuple[list[Image.Image], torch.Tensor]:
    """1,500 random 32×32 crops of four bundled scikit-image photos, as PIL and uint8 (N,3,32,32)."""
    rng = np.random.default_rng(0)
    photos = [skimage_photo(n) for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
    crops = []
    for i in range(1500):
        p = photos[i % 4]
        side = int(min(p.size) * rng.uniform(0.3, 0.8))
        x0, y0 = int(rng.integers(0, p.width - side)), int(rng.integers(0, p.height - side))
        crops.append(p.resize((32, 32), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side)))
    return crops, torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1) for c in crops])


def test_multicrop_shapes_and_determinism():
    cfg = AugmentConfig(global_crop_size=48, local_crop_size=24, n_local_crops=3)
    mc = MultiCropCPU.from_config(cfg)
    img = skimage_photo("chelsea.png")  # 451×300
    a, b, c = mc(img, 7), mc(img, 7), mc(img, 8)
    assert [v.shape for v in a["global"]] == [torch.Size([3, 48, 48])] * 2
    assert [v.shape for v in a["local"]] == [torch.Size([3, 24, 24])] * 3
    assert a["global"][0].dtype == torch.uint8 and a["params"].shape == (5, 5)
    assert torch.equal(a["params"], b["params"]) and all(torch.equal(x, y) for x, y in zip(a["global"], b["global"]))
    assert not torch.equal(a["params"], c["params"])
    # Crop areas fall in the configured scale ranges (the central fallback aside) and inside the image.
    for v, (top, left, h, w, flip) in enumerate(a["params"].tolist() + c["params"].tolist()):
        lo, hi = cfg.global_crop_scale if v % 5 < 2 else cfg.local_crop_scale
        assert lo * 0.9 <= h * w / (451 * 300) <= hi * 1.1
        assert 0 <= top <= 300 - h and 0 <= left <= 451 - w and flip in (0, 1)


def test_multicrop_matches_torchvision_crop_and_flip():
    """The recorded params reproduce the view with torchvision's own resized_crop + hflip."""
    import torchvision.transforms.functional as TF

    mc = MultiCropCPU(64, 32, (0.4, 1.0), (0.05, 0.4), 2)
    img = skimage_photo("coffee.png")
    out = mc(img, 123)
    views = out["global"] + out["local"]
    flips = 0
    for view, (top, left, h, w, flip) in zip(views, out["params"].tolist()):
        ref = TF.resized_crop(img, top, left, h, w, [view.shape[1]] * 2, interpolation=T.InterpolationMode.BICUBIC)
        if flip:
            ref = TF.hflip(ref)
            flips += 1
        ref_t = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
        assert (ref_t - view.float()).abs().mean() < 3.0  # same crop (box resampling differs at the edges)
    flip_rate = np.mean([mc(img, s)["params"][:, 4].float().mean().item() for s in range(200)])
    assert abs(flip_rate - 0.5) < 0.05


def _stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image statistics of float (N,3,S,S) in [0,1] that each photometric op moves."""
    chroma = x.amax(1) - x.amin(1)
    return {
        "mean brightness": x.mean((1, 2, 3)),
        "contrast (std)": x.std((1, 2, 3)),
        "grayscale": (chroma.flatten(1).amax(1) < 1.5 / 255).float(),
        "saturation": chroma.mean((1, 2)),
        "bright pixels (solarize)": (x >= 0.5).float().mean((1, 2, 3)),
        "sharpness (blur)": (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)),
    }


@pytest.mark.parametrize("view", [0, 1, 2])
def test_photometric_statistics_match_pil_pipeline(photo_crops, view):
    """Same inputs through the batched tensor stage and through DINO's PIL transforms: every statistic
    agrees within 4 standard errors (view 0: blur p 1; view 1: blur p 0.1 + solarize p 0.2; local: blur p 0.5)."""
    crops, u8 = photo_crops
    cfg = AugmentConfig()
    ph = Photometric.from_config(cfg)
    ours = ph.augment_view(u8, view, torch.Generator().manual_seed(view), normalize=False)
    blur_p, sol_p = ph.view_probs(view)
    ops = [T.RandomApply([T.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p), T.RandomGrayscale(cfg.grayscale_p),
           PILGaussianBlur(blur_p, cfg.blur_sigma)] + ([PILSolarize(sol_p)] if sol_p else []) + [T.ToTensor()]
    reference = T.Compose(ops)
    random.seed(view)
    torch.manual_seed(view)
    ref = torch.stack([reference(c) for c in crops])
    n = len(crops)
    for name, a in _stats(ours).items():
        b = _stats(ref)[name]
        se = (a.var() / n + b.var() / n).sqrt().item()
        z = (a.mean() - b.mean()).item() / se
        assert abs(z) < 4, f"view {view} {name}: ours {a.mean():.4f} vs PIL {b.mean():.4f} (z={z:+.1f})"


def test_probabilities_of_each_op(photo_crops):
    """Rates: grayscale 0.2, solarize 0.2 (global 2 only), blur per view, as configured."""
    _, u8 = photo_crops
    bright = torch.full((4000, 3, 8, 8), 200, dtype=torch.uint8)  # every pixel ≥ 128
    only_sol = Photometric(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), local_blur_p=0.0, solarize_p=(0.0, 0.2))
    g = torch.Generator().manual_seed(0)
    solarized = (only_sol.augment_view(bright, 1, g, normalize=False).mean((1, 2, 3)) < 0.5).float().mean().item()
    assert abs(solarized - 0.2) < 0.03
    assert (only_sol.augment_view(bright, 0, g, normalize=False) == 200 / 255).all()  # never on view 1
    colour = torch.stack([torch.full((8, 8), 200), torch.full((8, 8), 40), torch.full((8, 8), 90)]).to(torch.uint8)
    only_gray = Photometric(jitter_p=0.0, grayscale_p=0.2, blur_p=(0.0, 0.0), local_blur_p=0.0, solarize_p=(0.0, 0.0))
    out = only_gray.augment_view(colour.expand(4000, -1, -1, -1), 3, g, normalize=False)
    assert abs((out.std(1).amax((1, 2)) == 0).float().mean().item() - 0.2) < 0.03
    only_blur = Photometric(jitter_p=0.0, grayscale_p=0.0, solarize_p=(0.0, 0.0))
    for v, p in ((0, 1.0), (1, 0.1), (2, 0.5)):
        changed = (only_blur.augment_view(u8, v, g, normalize=False) != u8.float() / 255).flatten(1).any(1)
        assert abs(changed.float().mean().item() - p) < 0.05


# sha256 of the stage's output below as the code before the CPU speed-ups computed it (ce2e477: eager,
# NCHW blur, advanced indexing, one batch per view): they changed no bit.
PHOTOMETRIC_BEFORE_SPEEDUPS = "b7111cacefa54ccd8cc8a49147b14c44734debe2d3d6c8980759f3714f646a07"


def _digest(views: list[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(v.numpy().tobytes() for v in views)).hexdigest()


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler to fuse with")
def test_fused_cpu_stage_is_bit_identical_to_eager(photo_crops):
    """augment.fuse_cpu compiles the element-wise steps into fused C++ loops: every output bit equals
    eager's and the earlier code's, over all 24 orders of the jitter, grey pixels (zero chroma),
    grayscale, every blur radius, solarize, normalisation, and a batch of one. The switch does not
    change the run's identity."""
    _, u8 = photo_crops
    cfg = AugmentConfig()
    assert cfg.fuse_cpu
    eager = Photometric.from_config(cfg.model_copy(update={"fuse_cpu": False}))
    fused = Photometric.from_config(cfg)
    assert eager.fused is None and fused.fused is not None
    first = u8[:300].clone()
    first[:10] = 128  # grey: the hue rotation's c == 0 branch
    local = [u8[i:i + 300, :, :16, :16] for i in (600, 900, 1200)]
    for views in ([first, u8[300:600], *local], [v[:1] for v in (first, u8[300:600], *local)]):
        a = eager(views, torch.Generator().manual_seed(3))
        b = fused(views, torch.Generator().manual_seed(3))
        assert fused.fused.error is None, fused.fused.error
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        if len(views[0]) == 300:
            assert _digest(a) == PHOTOMETRIC_BEFORE_SPEEDUPS
    assert not all(torch.equal(x, y) for x, y in zip(a, fused(views, torch.Generator().manual_seed(4))))
    assert load_config("tiny").config.hash() == load_config("tiny", ["augment.fuse_cpu=true"]).config.hash()


_NO_COMPILER = """
import warnings, torch
from mst_ds.config import AugmentConfig, load_config
from mst_ds.data.augment import Photometric
u8 = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
ph = Photometric.from_config(AugmentConfig())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = ph([u8, u8], torch.Generator().manual_seed(0))
ref = Photometric.from_config(AugmentConfig(fuse_cpu=False))([u8, u8], torch.Generator().manual_seed(0))
assert all(torch.equal(x, y) for x, y in zip(out, ref))
assert ph.fused.error and "compiler" in ph.fused.error, ph.fused.error
assert sum(w.category is RuntimeWarning and "running eager" in str(w.message) for w in caught) == 1
print("eager fallback ok")
"""


def test_fused_cpu_stage_without_a_compiler_runs_eager_with_one_warning(tmp_path):
    """No working C++ compiler (a machine without g++): the stage warns once and gives eager's numbers."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", _NO_COMPILER], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "eager fallback ok" in r.stdout, r.stderr[-2000:]


def test_blur_and_solarize_match_pil_ops():
    img = skimage_photo("astronaut.png").resize((96, 96), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    for sigma in (0.3, 1.0, 2.0):
        ours = gaussian_blur(x, torch.tensor([sigma]))[0]
        pil = torch.from_numpy(np.array(img.filter(ImageFilter.GaussianBlur(radius=sigma)))).permute(2, 0, 1).float() / 255
        assert (ours - pil).abs().mean() < 2.5 / 255, sigma  # PIL approximates the Gaussian with box blurs
    ph = Photometric(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 1.0))
    u8 = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    ours = ph.augment_view(u8, 1, torch.Generator().manual_seed(0), normalize=False)[0]
    pil = torch.from_numpy(np.array(ImageOps.solarize(img))).permute(2, 0, 1).float() / 255
    assert torch.allclose(ours, pil, atol=1e-6)


def test_photometric_is_seeded_batched_and_normalised(photo_crops):
    _, u8 = photo_crops
    cfg = AugmentConfig()
    ph = Photometric.from_config(cfg)
    views = [u8[:64], u8[64:128], u8[128:192, :, :16, :16], u8[192:256, :, :16, :16]]
    a = ph(views, torch.Generator().manual_seed(5))
    b = ph(views, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [x.shape for x in a] == [v.shape for v in views] and a[0].dtype == torch.float32
    g = torch.Generator().manual_seed(5)  # the local views as one batch: the same as view after view
    assert all(torch.equal(x, ph.augment_view(v, i, g)) for i, (x, v) in enumerate(zip(a, views)))
    mixed = [*views, u8[256:264]]  # local views of two sizes: each its own batch
    assert [x.shape for x in ph(mixed, torch.Generator().manual_seed(5))] == [v.shape for v in mixed]
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert ((a[0] * std + mean) >= -1e-5).all() and ((a[0] * std + mean) <= 1 + 1e-5).all()


def test_pil_reference_multicrop_and_eval_transforms():
    cfg = AugmentConfig(global_crop_size=64, local_crop_size=32, n_local_crops=2)
    img = skimage_photo("rocket.jpg")
    views = [t(img) for t in pil_reference_multicrop(cfg)]
    assert [v.shape[-1] for v in views] == [64, 64, 32, 32]
    ev = eval_transform(224)(img)
    assert ev.shape == (3, 224, 224)
    assert torch.equal(ev, eval_transform(224)(img))  # deterministic
    grey = img.convert("L")
    assert eval_transform(32)(grey).shape == (3, 32, 32)
    assert linear_train_transform(48)(img).shape == (3, 48, 48)
