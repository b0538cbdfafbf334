"""16-bit images decode scaled to 8 bits, not clipped (issue 20, defect 4): a 16-bit copy of an 8-bit
image (values × 257) decodes to exactly the 8-bit image on every decode path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_tools.sniff import Unreadable, convert_to_png, sniff
from mst_ds.data.augment import eval_transform
from mst_ds.data.decode import decode_rgb, to_rgb


@pytest.fixture(scope="module")
def grey8() -> np.ndarray:
    from sklearn.datasets import load_digits

    digit = load_digits().images[0] / 16.0  # a real image, 8x8, upscaled to 64x64 with full 0..255 range
    img = Image.fromarray((digit * 255).round().astype(np.uint8), mode="L").resize((64, 64), Image.BICUBIC)
    return np.asarray(img)


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png16(grey8: np.ndarray) -> bytes:
    return _bytes(Image.fromarray(grey8.astype(np.uint16) * 257), "PNG")


def test_16_bit_png_decodes_to_the_8_bit_image(grey8, tmp_path):
    data = _png16(grey8)
    want = np.asarray(Image.fromarray(grey8, mode="L").convert("RGB"))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    np.testing.assert_array_equal(np.asarray(decode_rgb(data)), want)  # shards, ImageFolders, verify, inspect
    (tmp_path / "a.png").write_bytes(data)
    t = eval_transform(32)
    assert t(Image.open(tmp_path / "a.png")).equal(t(Image.fromarray(grey8, mode="L")))  # eval transforms


def test_the_manifest_records_16_bit_grey(grey8):
    assert sniff(_png16(grey8)).mode == "I;16"
    assert sniff(_bytes(Image.fromarray(grey8, mode="L"), "PNG")).mode == "L"


def test_a_16_bit_tiff_is_stored_losslessly_and_decodes_scaled(grey8):
    tiff = _bytes(Image.fromarray(grey8.astype(np.uint16) * 257), "TIFF")
    png, info, fmt = convert_to_png(tiff)
    assert (fmt, info.mode) == ("tiff", "I;16")
    np.testing.assert_array_equal(np.asarray(decode_rgb(png))[..., 0], grey8)


def test_float_and_32_bit_pixels_of_unknown_range_are_unreadable(grey8):
    for arr in (grey8.astype(np.float32) / 255, grey8.astype(np.int32) * 1000):
        tiff = _bytes(Image.fromarray(arr), "TIFF")
        with pytest.raises(ValueError, match="unknown range"):
            decode_rgb(tiff)
        with pytest.raises(Unreadable, match="unknown range"):
            convert_to_png(tiff)
    assert to_rgb(Image.fromarray(grey8, mode="L")).mode == "RGB"
