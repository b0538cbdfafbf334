"""What an image file really is, from its bytes: format, colour mode, size, and whether it is complete.

ImageNet has a PNG named ``.JPEG`` and ~22 CMYK JPEGs (SPEC §5), so the file name cannot be trusted.
Parsing the headers ourselves costs microseconds per file, which keeps ``mst-shards write`` as fast as
copying the bytes; a full decode (``verify --decode``) is the exhaustive check.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from typing import NamedTuple

from mst_ds.data.decode import MODES_16, to_rgb

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG), CC (DAC) share the range but are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))  # markers without a length field
_U16, _U16X2 = struct.Struct(">H"), struct.Struct(">HH")


# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): it warns above it and refuses twice it.
DEFAULT_MAX_PIXELS = 89_478_485


class Unreadable(ValueError):
    """An input that cannot be stored as an image; ``str(err)`` says why in a few words."""


class TooLarge(Unreadable):
    """A header claiming more pixels than the limit: not worth a second opinion from PIL."""


class ImageInfo(NamedTuple):  # a tuple: built once per image, 5× cheaper than a frozen dataclass
    format: str  # "jpeg" | "png"
    ext: str  # member extension: "jpg" | "png"
    mode: str  # "RGB", "L", "CMYK", ...
    width: int
    height: int


def _jpeg_info(data: bytes) -> ImageInfo:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise Unreadable("corrupt JPEG header")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (seglen,) = _U16.unpack_from(data, i + 2)
        if marker in _SOF:
            if i + 10 > n:
                break
            h, w = _U16X2.unpack_from(data, i + 5)
            ncomp = data[i + 9]
            if w == 0 or h == 0 or ncomp not in _JPEG_MODES:
                raise Unreadable(f"bad JPEG frame header ({w}x{h}, {ncomp} components)")
            # Entropy-coded data cannot contain FF D9 (FF is always stuffed), so a file without the
            # end-of-image marker near its end was cut short.
            if data.rfind(b"\xff\xd9", max(i, n - 4096)) < 0:
                raise Unreadable("truncated JPEG (no end-of-image marker)")
            return ImageInfo("jpeg", "jpg", _JPEG_MODES[ncomp], w, h)
        if marker == 0xDA:
            break
        i += 2 + seglen
    raise Unreadable("truncated JPEG (no frame header)")


def _png_info(data: bytes) -> ImageInfo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise Unreadable("truncated PNG (no IHDR)")
    w = int.from_bytes(data[16:20], "big")
    h = int.from_bytes(data[20:24], "big")
    if data.rfind(b"IEND", max(0, len(data) - 4096)) < 0:
        raise Unreadable("truncated PNG (no IEND chunk)")
    mode = "I;16" if data[25] == 0 and data[24] == 16 else _PNG_MODES.get(data[25], "?")  # PIL's 16-bit grey
    return ImageInfo("png", "png", mode, w, h)


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """A header claiming more pixels than ``max_pixels`` is a decompression bomb (or useless): unreadable."""
    if width * height > max_pixels:
        raise TooLarge(f"{width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
                         "(decompression bomb? raise --max-pixels to keep it)")


def sniff(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format, mode and size from the bytes; raises :class:`Unreadable` for empty/unknown/cut files and
    for headers claiming more than ``max_pixels``."""
    if not data:
        raise Unreadable("empty file")
    if data.startswith(JPEG_MAGIC):
        info = _jpeg_info(data)
    elif data.startswith(PNG_MAGIC):
        info = _png_info(data)
    else:
        raise Unreadable(f"not a JPEG or PNG (starts with {data[:8].hex()})")
    check_pixels(info.width, info.height, max_pixels)
    return info


def error_text(err: BaseException) -> str:
    """First line of an error without the repr of an in-memory file (``<_io.BytesIO object at 0x…>``):
    the caller names the file."""
    text = re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(err).splitlines()[0] if str(err) else "")
    return text[:80] or type(err).__name__


def convert_to_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, ImageInfo, str]:
    """Another format PIL reads (BMP, GIF, WebP, TIFF, ...) → lossless PNG bytes, info, original format.

    PIL opens lazily: the size comes from the header and is checked before a single pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(io.BytesIO(data))
            check_pixels(img.width, img.height, max_pixels)
            fmt = (img.format or "?").lower()
            img.load()
    except Image.DecompressionBombError as err:  # PIL refuses at twice its own limit before we see the size
        raise Unreadable(f"decompression bomb ({error_text(err)})") from None
    except UnidentifiedImageError:
        raise Unreadable("not a readable image (unknown format)") from None
    except Unreadable:
        raise
    except Exception as err:  # PIL on a hostile file raises many kinds; one bad input never stops a write
        raise Unreadable(f"not a readable image ({error_text(err)})") from None
    if img.mode not in ("L", "RGB", "RGBA", "P", "LA", *MODES_16):  # 16-bit grey stays lossless
        try:
            img = to_rgb(img)
        except ValueError as err:
            raise Unreadable(f"not storable as an image ({err})") from None
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = buf.getvalue()
    return out, _png_info(out), fmt
