"""Attention maps: normalisation, DINO's 60 % thresholding, figure sizes, video frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.sample_data import skimage_photo
from mst_ds.cli import main
from mst_ds.config import load_config
from mst_ds.eval.attention import HEADER, cls_attention, ffmpeg_binary, threshold_mass, tile_size, upsample
from mst_ds.eval.features import load_backbone


@pytest.fixture(scope="module")
def tiny_backbone():
    cfg = load_config("tiny").config
    return load_backbone(None, cfg), cfg


def test_each_head_sums_to_one(tiny_backbone):
    backbone, _ = tiny_backbone
    x = torch.randn(3, 3, 32, 48)  # non-square: a 4 × 6 patch grid
    maps = cls_attention(backbone, x)
    assert maps.shape == (3, backbone.num_heads, 4, 6)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(3, backbone.num_heads), atol=1e-5, rtol=0)
    # the raw softmax row also covers the CLS token, so before renormalising the patches hold < 1
    raw = backbone(x, return_attn=True).attn
    assert (raw.sum(-1) < 1 - 1e-4).all()


def dino_threshold(attn: torch.Tensor, threshold: float) -> torch.Tensor:
    """DINO visualize_attention.py, verbatim in spirit: attn (nh, N) → bool (nh, N)."""
    val, idx = torch.sort(attn)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    for head in range(attn.shape[0]):
        th_attn[head] = th_attn[head][idx2[head]]
    return th_attn


def test_threshold_keeps_sixty_percent_of_the_mass():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 7, 7, generator=gen) ** 4  # peaked maps
    maps = maps / maps.sum(dim=(-2, -1), keepdim=True)
    kept = threshold_mass(maps, 0.6)
    assert torch.equal(kept.flatten(1), dino_threshold(maps.flatten(1).clone(), 0.6))
    for m, k in zip(maps, kept):
        mass = float(m[k].sum())
        assert mass >= 0.6 - 1e-6
        assert mass - float(m[k].min()) < 0.6  # minimal: dropping the smallest kept patch falls short
        assert float(m[k].min()) >= float(m[~k].max())  # the kept patches are the largest ones


def test_upsample_is_nearest_blocks():
    grid = torch.arange(6.0).view(1, 2, 3)
    up = upsample(grid, 4)
    assert up.shape == (1, 8, 12)
    assert torch.equal(up[0, :4, :4], torch.zeros(4, 4)) and torch.equal(up[0, 4:, 8:], torch.full((4, 4), 5.0))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.png", "chelsea.png"):
        skimage_photo(name).resize((80, 60)).save(root / name)
    return root


def test_side_by_side_figure_sizes(photos, tmp_path, tiny_backbone):
    _, cfg = tiny_backbone
    out = tmp_path / "attn"
    rc = main(["attn", "--preset", "tiny", str(photos), "--ckpt", "random", "--ckpt", "random",
               "--set", "run.seed=1", "--out", str(out)])
    assert rc == 0
    tile = tile_size(cfg.eval.image_size)
    assert tile == 224  # 32-px images shown 7× larger
    for name in ("compare.png", "compare_thresholded.png"):
        with Image.open(out / name) as im:
            assert im.size == (3 * tile, HEADER + 2 * tile)  # input | model A | model B, one row per image
    index = json.loads((out / "attention.json").read_text())
    assert len(index["heads"]) == 4  # 2 images × 2 models
    heads = cfg.model.timm_kwargs["num_heads"]
    for path in index["heads"]:
        with Image.open(path) as im:
            assert im.size == ((heads + 2) * tile, HEADER + 2 * tile)  # input | head 0 … | mean
    with Image.open(out / "compare.png") as im:
        a = np.asarray(im)
    # the model columns differ from the input column (the overlay is drawn)
    assert np.abs(a[HEADER:, tile:2 * tile].astype(int) - a[HEADER:, :tile].astype(int)).mean() > 5


def _write_gif(path, n):
    img = np.asarray(skimage_photo("chelsea.png").resize((48, 40)))
    frames = np.stack([np.roll(img, 4 * i, axis=1) for i in range(n)])
    import imageio.v3 as iio

    iio.imwrite(path, frames, duration=100, loop=0)


def test_video_gives_one_overlay_per_frame(tmp_path):
    gif = tmp_path / "clip.gif"
    _write_gif(gif, 3)
    out = tmp_path / "vid"
    assert main(["attn", "--preset", "tiny", str(gif), "--video", "--out", str(out)]) == 0
    frames = sorted((out / "frames").glob("frame_*.png"))
    assert len(frames) == 3
    with Image.open(frames[0]) as im:
        # 40×48 → short side 32 → 32×38 → cut to the 8-px patch: 32×32; 2 tiles of 224, label strip
        assert im.size == (2 * 224, HEADER + 224)
    # A rerun replaces its own frames (2 now) but never a file it did not write.
    _write_gif(gif, 2)
    assert main(["attn", "--preset", "tiny", str(gif), "--video", "--out", str(out)]) == 0
    assert len(list((out / "frames").glob("frame_*.png"))) == 2
    (out / "frames" / "notes.txt").write_text("mine")
    assert main(["attn", "--preset", "tiny", str(gif), "--video", "--out", str(out)]) == 2
    assert (out / "frames" / "notes.txt").read_text() == "mine"
    _write_gif(gif, 3)
    (out / "frames" / "notes.txt").unlink()
    assert main(["attn", "--preset", "tiny", str(gif), "--video", "--out", str(out)]) == 0
    video = json.loads((out / "attention.json").read_text())["video"]
    if ffmpeg_binary():
        assert video.endswith(".mp4")
    else:
        with Image.open(video) as g:
            assert g.n_frames == 3


def test_frame_folder_input(tmp_path):
    folder = tmp_path / "frames_in"
    folder.mkdir()
    img = skimage_photo("coffee.png").resize((64, 48))
    for i in range(2):
        img.rotate(5 * i).save(folder / f"f{i:02d}.png")
    out = tmp_path / "vid2"
    assert main(["attn", "--preset", "tiny", str(folder), "--video", "--out", str(out), "--fps", "4"]) == 0
    assert len(list((out / "frames").glob("frame_*.png"))) == 2


def test_bad_video_input_is_one_line(tmp_path, capsys):
    bogus = tmp_path / "clip.mp4"
    bogus.write_bytes(b"not a video")
    assert main(["attn", "--preset", "tiny", str(bogus), "--video", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read this video" in err[0]


def test_heads_figure_panels_blocks_and_threshold(tiny_backbone, tmp_path):
    """A 4 × 4 token grid: columns input | each head | mean, rows attention | 60 % of the mass, each
    token drawn as a block of one colour (nearest, not blurred), the kept tokens tinted."""
    from mst_ds.eval.attention import KEPT_RGB, attention_maps, heads_figure

    backbone, cfg = tiny_backbone
    size = cfg.eval.image_size
    x = torch.zeros(1, 3, size, size)  # a uniform image: every colour on a map tile comes from the map
    maps = attention_maps(backbone, x, keep=0.6)[0]
    rgb = np.full((size, size, 3), 128, np.uint8)
    tile = tile_size(size)
    grid = (size // backbone.patch_size,) * 2
    assert grid == (4, 4)
    fig, panels = heads_figure(rgb, maps, tile, 0.6, grid)
    heads = backbone.num_heads
    assert panels["columns"] == ["input", *[f"head {h}" for h in range(heads)], "mean"]
    assert panels["rows"] == ["attention", "60% of mass"]
    assert fig.size == ((heads + 2) * tile, HEADER + 2 * tile)
    a = np.asarray(fig).astype(int)
    block = tile // 4
    for col in range(1, heads + 2):
        distinct = set()
        for i in range(4):
            for j in range(4):
                y0, x0 = HEADER + i * block + 3, col * tile + j * block + 3
                inner = a[y0:y0 + block - 6, x0:x0 + block - 6]
                if i == 0 and j == 0:
                    continue  # the row label sits in the first tile's corner
                assert (inner == inner[0, 0]).all()  # one colour per token: a block, not a blur
                distinct.add(tuple(inner[0, 0]))
        assert len(distinct) > 1  # the map is drawn (not one flat colour)
    # bottom row, mean column: the kept tokens (the smallest set with 60 % of the mass) are tinted cyan
    kept = threshold_mass(maps.mean[::backbone.patch_size, ::backbone.patch_size], 0.6)
    col = heads + 1
    for i in range(4):
        for j in range(4):
            y, x0 = HEADER + tile + i * block + block // 2, col * tile + j * block + block // 2
            tinted = a[y, x0, 1] > a[y, x0, 0] + 50  # cyan: green well above red
            assert tinted == bool(kept[i, j]), (i, j)
    assert KEPT_RGB.tolist() == [0, 255, 255]
