"""Image bytes → RGB PIL image: the one decode every reader uses (training, evaluation, verify, inspect,
attention maps). No torch here: ``mst-shards write`` imports it for its format conversion."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# What corrupt image bytes raise (PIL: OSError incl. UnidentifiedImageError, ValueError, SyntaxError for
# broken PNG chunks, DecompressionBombError), plus KeyError for a sample without an image member. Anything
# else is a bug and must not be counted as a corrupt sample.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, KeyError, Image.DecompressionBombError)


# 16-bit grey modes and their white level. PIL's convert("RGB") clips them to 255 instead of scaling.
# A PNG's 32-bit "I" can only hold 16-bit samples (the format's deepest), so it scales the same way; any
# other "I" or "F" (TIFF, ...) has no known white level and is refused rather than guessed from its range.
_WHITE_16 = 65535
MODES_16 = frozenset(("I;16", "I;16B", "I;16L", "I;16N"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image → RGB; 16-bit grey scaled to 8 bits (v·255/65535, rounded), so a 16-bit copy of an
    8-bit image (values × 257) decodes to exactly that image. Raises ValueError for 32-bit integer or
    float pixels of unknown range. EXIF orientation is not applied (as torchvision's ImageFolder, DINO)."""
    if img.mode == "RGB":
        return img
    if img.mode in MODES_16 or (img.mode == "I" and img.format == "PNG"):
        v = np.asarray(img).astype(np.int64).clip(0, _WHITE_16)
        return Image.fromarray(((v * 255 + _WHITE_16 // 2) // _WHITE_16).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("I", "F"):
        raise ValueError(f"{img.mode} pixels ({'32-bit integer' if img.mode == 'I' else 'float'}) "
                         "of unknown range, not scalable to 8 bits")
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Image bytes (JPEG incl. CMYK, PNG, ...) → fully decoded RGB PIL image (:func:`to_rgb`); raises on
    corrupt data."""
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now, so a corrupt file fails here and not later inside a transform
    return to_rgb(img)
