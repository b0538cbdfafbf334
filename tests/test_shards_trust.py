"""``mst-shards`` off the happy path (issue 9): it touches only its own files, executes nothing from a
manifest, skips hostile inputs, fails one line on a full disk, and ``verify`` finds edited manifests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import xxhash

from data_tools import sample_data
from data_tools.cli import main as shards_main
from data_tools.writer import write_shards
from mst_ds.data.manifest import Manifest, ManifestError, is_shard_dir


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    """4 classes × 3 small JPEGs."""
    root = tmp_path_factory.mktemp("src")
    sample_data.write_generated_imagefolder(root, classes=4, per_class=3, width=64, height=48)
    return root


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mst-shards: error: "), err
    return err[0]


def _write(src: Path, out: Path, *extra: str) -> int:
    return shards_main(["write", "--src", str(src), "--out", str(out), "--quiet", *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the writer lock's (each writer writes its host, pid and time into it)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".lock"}


# ---- case 6: --out ---------------------------------------------------------------------------------
def test_refuses_a_folder_that_is_not_a_shard_folder(small_src, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.json").write_text('{"my": "own index"}')
    (out / "notes.txt").write_text("keep me")
    (out / "train-000000.tar").write_bytes(b"not yours")
    before = _snapshot(out)
    capsys.readouterr()
    assert _write(small_src, out, "--split", "train") == 2
    assert "not a shard folder" in _one_error_line(capsys)
    assert _snapshot(out) == before


def test_rerun_touches_only_its_own_files(small_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert _write(small_src, out, "--split", "train", "--max-count", "2") == 0
    assert len(list(out.glob("train-*.tar"))) == 6
    foreign = {"unrelated.tar": b"u", ".backup.tmp-123": b"t", "val-000000.tar.orig": b"v", "README": b"r",
               ".train-000000.tar.bak": b"b"}
    for name, data in foreign.items():
        (out / name).write_bytes(data)
    # A new plan (fewer, larger shards): this split's surplus shards go, nothing else does.
    assert _write(small_src, out, "--split", "train", "--max-count", "5") == 0
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-{i:06d}.tar" for i in range(3)]
    for name, data in foreign.items():
        assert (out / name).read_bytes() == data, name
    assert shards_main(["verify", str(out)]) == 0
    # A shard-named file that no manifest or record of this split claims: refused, not replaced.
    (out / "train-000007.tar").write_bytes(b"someone else's")
    capsys.readouterr()
    assert _write(small_src, out, "--split", "train", "--max-count", "5") == 2
    assert "train-000007.tar" in _one_error_line(capsys)
    assert (out / "train-000007.tar").read_bytes() == b"someone else's"


def test_train_and_val_share_a_folder_with_distinct_manifests(small_src, tmp_path, capsys):
    out = tmp_path / "both"
    assert _write(small_src, out, "--split", "train", "--max-count", "4") == 0
    train_files = {p.name: p.read_bytes() for p in out.glob("train-*.tar")}
    train_index = (out / "index.json").read_bytes()
    assert _write(small_src, out, "--split", "val", "--max-count", "5") == 0
    assert (out / "index.json").read_bytes() == train_index  # the train manifest is not replaced
    assert json.loads((out / "index-val.json").read_text())["split"] == "val"
    assert {p.name: p.read_bytes() for p in out.glob("train-*.tar")} == train_files
    # Only the folder: ambiguous, one line naming both manifests; with the split (or the file) it is clear.
    with pytest.raises(ManifestError, match=r"index\.json \(train\).*index-val\.json \(val\)"):
        Manifest.load(out)
    assert Manifest.load(out, split="val").split == "val"
    assert Manifest.load(out / "index-val.json").total == 12
    assert Manifest.load(str(out / "val-{000000..000002}.tar")).split == "val"
    assert Manifest.load(str(out / "train-{000000..000002}.tar")).split == "train"
    piped = Manifest.load(f"pipe:cat {out}/val-000001.tar")  # the manifest is read by the same command
    assert piped.split == "val" and [s.name for s in piped.shards] == ["val-000001.tar"]
    piped_all = Manifest.load(f"pipe:cat {out}/index-val.json")
    assert piped_all.urls()[0] == f"pipe:cat {out}/val-000000.tar"
    assert is_shard_dir(out)
    capsys.readouterr()
    assert shards_main(["verify", str(out)]) == 2
    assert "give the manifest file" in _one_error_line(capsys)
    assert shards_main(["verify", str(out), "--split", "val"]) == 0
    assert shards_main(["verify", str(out / "index.json")]) == 0  # val shards on disk are not train extras
    # Rewriting train (a new seed) leaves val's shards and manifest alone, and keeps index.json.
    val_before = {p.name: p.read_bytes() for p in out.glob("*val*")}
    assert _write(small_src, out, "--split", "train", "--max-count", "4", "--seed", "1") == 0
    assert {p.name: p.read_bytes() for p in out.glob("*val*")} == val_before
    assert json.loads((out / "index.json").read_text())["extra"]["seed"] == 1


def test_a_second_writer_of_the_same_split_is_refused_until_the_first_dies(small_src, tmp_path, capsys):
    """Two writers of one split would rename over each other's shards and records: the second is refused in
    one line naming the first (host, pid), touching nothing; another split may write alongside; a killed
    writer's lock goes with it."""
    import signal
    import sys

    out = tmp_path / "out"
    assert _write(small_src, out, "--split", "train", "--max-count", "4") == 0
    before = _snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from data_tools.writer import claim_out; "
                               f"claim_out(Path({str(out)!r}), 'train'); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert _write(small_src, out, "--split", "train", "--max-count", "4", "--seed", "1") == 2
        line = _one_error_line(capsys)
        assert "another mst-shards write of split 'train'" in line and f"pid {holder.pid}" in line, line
        assert _snapshot(out) == before
        assert _write(small_src, out, "--split", "val", "--max-count", "5") == 0  # another split: no wait
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _write(small_src, out, "--split", "train", "--max-count", "4", "--seed", "1") == 0
    assert shards_main(["verify", str(out), "--split", "train"]) == 0


def test_older_folder_without_records_is_still_ours(small_src, tmp_path):
    """A folder with only index.json and shards (no records): read as before, and a rerun may replace
    the shards its manifest lists."""
    out = tmp_path / "old"
    write_shards(small_src, out, split="train", max_count=4, progress=False)
    shutil.rmtree(out / ".mst-shards")
    assert Manifest.load(out).total == 12
    res = write_shards(small_src, out, split="train", max_count=3, progress=False)
    assert res.written == 4 and sorted(p.name for p in out.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(4)]


# ---- case 11: names from a manifest ------------------------------------------------------------------
def test_shard_names_are_never_run(small_src, tmp_path, capsys):
    out = tmp_path / "out"
    write_shards(small_src, out, split="train", max_count=12, progress=False)
    marker = tmp_path / f"PWNED-{uuid.uuid4().hex}"
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["name"] = f"x.tar; touch {marker}; true"
    (out / "index.json").write_text(json.dumps(index))
    for source in (out, out / "index.json", f"pipe:cat {out}/index.json"):
        with pytest.raises(ManifestError, match="shard name"):
            Manifest.load(source)
    # Even without the check, the name reaches a shell only quoted.
    m = Manifest.load(f"pipe:cat {out}/index.json", check_names=False)
    url = m.urls()[0]
    assert url.startswith("pipe:cat ") and "'" in url
    subprocess.run(url[5:], shell=True, capture_output=True)
    capsys.readouterr()
    assert shards_main(["verify", str(out)]) == 1
    assert "shard name" in capsys.readouterr().err
    assert not marker.exists()
    for bad in ("../train-000000.tar", "sub/train-000000.tar", "a`id`.tar", "$(id).tar", "-rf.tar", "x..tar"):
        index["shards"][0]["name"] = bad
        (out / "index.json").write_text(json.dumps(index))
        with pytest.raises(ManifestError, match="shard name"):
            Manifest.load(out)


# ---- cases 12, 13, 16, 17: inputs -----------------------------------------------------------------------
def _bomb_png(w: int, h: int) -> bytes:
    data = bytearray(sample_data.png_bytes(sample_data.generated_image(1, 16, 16)))
    data[16:24] = w.to_bytes(4, "big") + h.to_bytes(4, "big")  # IHDR claims w×h
    return bytes(data)


def _bomb_jpeg(w: int, h: int) -> bytes:
    data = bytearray(sample_data.jpeg_bytes(sample_data.generated_image(2, 16, 16)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


def _bomb_bmp(w: int, h: int) -> bytes:
    import io

    buf = io.BytesIO()
    sample_data.generated_image(3, 16, 16).save(buf, format="BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = w.to_bytes(4, "little") + h.to_bytes(4, "little")
    return bytes(data)


def test_bad_inputs_are_listed_never_stored_never_abort(tmp_path, capsys):
    src = tmp_path / "src"
    sample_data.write_generated_imagefolder(src, classes=3, per_class=2, width=64, height=48)
    c0 = src / "c00"
    bombs = {"bomb.bmp": _bomb_bmp(30000, 30000), "bomb.png": _bomb_png(30000, 30000),
             "bomb60k.png": _bomb_png(60000, 60000), "bomb.JPEG": _bomb_jpeg(30000, 30000),
             "bomb60k.JPEG": _bomb_jpeg(60000, 60000), "mid.bmp": _bomb_bmp(10000, 10000)}
    for name, data in bombs.items():
        (c0 / name).write_bytes(data)
    (c0 / "garbage.bmp").write_bytes(b"BM" + os.urandom(64))
    (c0 / "loop.JPEG").symlink_to(c0 / "loop.JPEG")  # a symlink loop: stat raises ELOOP
    (src / "c99").symlink_to(src / "c99")  # a class folder that loops
    (src / "c03").mkdir()  # an empty class folder
    out = tmp_path / "out"
    capsys.readouterr()
    assert _write(src, out, "--split", "train") == 0
    err = capsys.readouterr().err
    m = Manifest.load(out)
    assert m.total == 6
    bad = {u.split(":")[0]: u for u in m.unreadable}
    assert set(bad) == {f"c00/{n}" for n in bombs} | {"c00/garbage.bmp", "c00/loop.JPEG", "c99"}
    for name in bombs:
        assert "pixels" in bad[f"c00/{name}"] or "decompression bomb" in bad[f"c00/{name}"], bad[f"c00/{name}"]
    assert "symbolic links" in bad["c00/loop.JPEG"] and "symbolic links" in bad["c99"]
    assert "BytesIO" not in err and "BytesIO" not in json.dumps(m.unreadable)
    assert "c00/garbage.bmp: not a readable image" in err
    # The empty class stays a class (labels after it keep their index) and is warned about and recorded.
    assert [c["wnid"] for c in m.classes] == ["c00", "c01", "c02", "c03"]
    assert m.empty_classes == ["c03"] and "warning: class c03 (label 3) has no image" in err
    # The limit is a setting: with a low one even the ordinary 64×48 images are unreadable.
    low = write_shards(src, tmp_path / "low", split="train", max_pixels=64 * 48 - 1, progress=False).manifest
    assert low.total == 0
    assert sum("above the limit of 3,071" in u for u in low.unreadable) == 6 + 5  # + all bombs but BMP 30000²


def test_missing_paths_are_named_as_given(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "shards"
    with pytest.raises(ManifestError) as err:
        Manifest.load(missing)
    assert str(err.value).startswith(f"{missing}: no such file or folder")
    assert "/index.json" not in str(err.value)
    capsys.readouterr()
    assert shards_main(["verify", str(missing)]) == 2
    assert str(missing) in _one_error_line(capsys)


# ---- case 14: disk full -------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_is_one_line_exit_1_and_leaves_no_temp(small_src, tmp_path, capsys, monkeypatch, workers):
    out = tmp_path / "out"
    argv = ["--split", "train", "--max-count", "2", "--workers", str(workers)]
    monkeypatch.setenv("MST_DS_FAULT", "disk_full@3")
    capsys.readouterr()
    assert _write(small_src, out, *argv) == 1
    assert "No space left on device" in _one_error_line(capsys)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (out / "index.json").exists()
    monkeypatch.delenv("MST_DS_FAULT")
    assert _write(small_src, out, *argv) == 0
    assert shards_main(["verify", str(out)]) == 0
    # A finished folder and a rerun with nothing to write: the full disk is never noticed, state intact.
    before = _snapshot(out)
    monkeypatch.setenv("MST_DS_FAULT", "disk_full@3")
    assert _write(small_src, out, *argv) == 0
    assert {k: v for k, v in _snapshot(out).items() if k != "index.json"} == \
        {k: v for k, v in before.items() if k != "index.json"}


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_real_full_disk(tmp_path, capsys, workers):
    src = tmp_path / "src"
    sample_data.write_generated_imagefolder(src, classes=2, per_class=12, width=500, height=375)  # ~1.5 MB
    with _small_tmpfs(tmp_path / "small", "640k") as out:
        capsys.readouterr()
        assert _write(src, out / "shards", "--split", "train", "--max-count", "2", "--workers", str(workers)) == 1
        assert "No space left on device" in _one_error_line(capsys)
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ---- case 15: verify finds edited manifests ------------------------------------------------------------
@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("ten")
    sample_data.write_generated_imagefolder(src / "src", classes=10, per_class=2, width=48, height=32)
    write_shards(src / "src", src / "out", split="train", max_count=4, progress=False)
    return src / "out"


def _edited(ten_classes: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(ten_classes, out)
    index = json.loads((out / "index.json").read_text())
    edit(index, out)
    (out / "index.json").write_text(json.dumps(index))
    return out


def _drop_entry(index, out):
    gone = index["shards"].pop(2)
    index["total"] -= gone["count"]
    index["total_bytes"] -= gone["bytes"]
    index["num_shards"] -= 1


def _drop_entry_and_file(index, out):
    _drop_entry(index, out)
    (out / "train-000002.tar").unlink()
    (out / ".mst-shards" / "train-000002.tar.json").unlink()


def _cut_classes(index, out):
    index["classes"] = index["classes"][:5]
    index["num_classes"] = 5


def _escape_name(index, out):
    index["shards"][1]["name"] = "../copy/train-000001.tar"


def _extra_on_disk(index, out):
    shutil.copy(out / "train-000000.tar", out / "train-000005.tar")


@pytest.mark.parametrize("edit, expect", [
    (_drop_entry, "train-000002.tar"),
    (_drop_entry_and_file, "train-000002.tar is not listed"),
    (_cut_classes, "outside the manifest's 5 classes"),
    (_escape_name, "shard name '../copy/train-000001.tar'"),
    (_extra_on_disk, "train-000005.tar: a shard of split 'train' on disk"),
])
def test_verify_reports_edited_manifests(ten_classes, tmp_path, capsys, edit, expect):
    assert shards_main(["verify", str(ten_classes)]) == 0
    out = _edited(ten_classes, tmp_path, edit)
    capsys.readouterr()
    assert shards_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert expect in err and "verify FAILED" in err, err


def test_undecodable_message_names_the_sample_not_a_buffer(tmp_path, capsys):
    import hashlib
    import io
    import tarfile

    from mst_ds.data.manifest import ShardInfo

    out = tmp_path / "out"
    out.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("garbage.jpg", b"\xff\xd8\xff" + os.urandom(200)), ("garbage.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (out / "train-000000.tar").write_bytes(buf.getvalue())
    Manifest(split="train", classes=[{"index": 0, "wnid": "c0", "name": "c0"}],
             shards=[ShardInfo("train-000000.tar", 1, len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest())],
             total=1, tool_version="test").save(out)
    capsys.readouterr()
    assert shards_main(["verify", str(out), "--decode"]) == 1
    err = capsys.readouterr().err
    assert "sample garbage (jpg) does not decode" in err and "BytesIO" not in err and " at 0x" not in err, err


# ---- issue 13: hashed while written, bytes as tarfile writes them ------------------------------------
def test_shards_are_tarfile_bytes_and_hashed_as_written(small_src, tmp_path):
    import io
    import tarfile

    from data_tools.writer import _tarinfo

    m = write_shards(small_src, tmp_path / "out", split="train", max_count=5, workers=2, progress=False).manifest
    for s in m.shards:
        data = (tmp_path / "out" / s.name).read_bytes()
        assert s.algorithm == "xxh3_128" and xxhash.xxh3_128(data).hexdigest() == s.checksum and len(data) == s.bytes
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [(mem.name, tar.extractfile(mem).read()) for mem in tar]
        ref = io.BytesIO()
        with tarfile.open(fileobj=ref, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, body in members:
                tar.addfile(_tarinfo(name, len(body)), io.BytesIO(body))
        assert ref.getvalue() == data, s.name


@pytest.mark.parametrize("name,size", [("a.jpg", 0), ("n01440764_10026.JPEG", 123_456), ("k" * 99, 8**11 - 1),
                                       ("k.cls", 1), ("é.jpg", 5), ("y" * 100, 3), ("big.jpg", 8**11)])
def test_tar_header_is_tarfiles(name, size):
    import tarfile

    from data_tools.writer import _tarinfo, tar_header

    assert tar_header(name, size) == _tarinfo(name, size).tobuf(format=tarfile.GNU_FORMAT)


def test_sample_metadata_is_json_dumps_sorted():
    """KEY.json is written directly for speed; it must stay byte-identical to json.dumps(meta, sort_keys=True)
    (existing shards, checksums and resumes depend on it), whatever the names hold."""
    import random

    from data_tools.sniff import ImageInfo
    from data_tools.writer import Sample, sample_meta

    rng = random.Random(0)
    alphabet = 'abc/_-. "\\\t\n\x00\x1féü漢字😀'
    for _ in range(2000):
        source = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        wnid = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        s = Sample("k", rng.randint(0, 10**6), wnid, source, ("file", "x"), None)
        info = ImageInfo(rng.choice(["jpeg", "png"]), "jpg", rng.choice(["RGB", "L", "CMYK", "P"]),
                         rng.randint(1, 10**5), rng.randint(1, 10**5))
        converted = rng.choice([None, "bmp", "gif"])
        meta = {"wnid": wnid, "source": source, "class": s.label, "format": info.format, "mode": info.mode,
                "width": info.width, "height": info.height, **({"converted_from": converted} if converted else {})}
        assert sample_meta(s, info, converted) == json.dumps(meta, sort_keys=True).encode(), (source, wnid)


def test_background_and_inline_writing_give_the_same_shard(small_src, tmp_path, monkeypatch):
    """Whether a second thread writes and hashes (a core to spare) or the reader does (every core runs a
    writer) changes nothing in the bytes, the checksum, or a full disk's error and leftovers."""
    import errno

    from data_tools.writer import PROGRESS_DIR, WriteOptions, list_source, plan_shards, write_one_shard
    from mst_ds.faults import Faults

    plan = plan_shards(list_source(small_src, "imagefolder", "train", None).samples, "train", 6, 0)[0]
    written = {}
    for background in (True, False):
        out = tmp_path / str(background)
        (out / PROGRESS_DIR).mkdir(parents=True)
        rec = write_one_shard(out, plan, None, WriteOptions(background=background))
        data = (out / plan.name).read_bytes()
        assert xxhash.xxh3_128(data).hexdigest() == rec["xxh3_128"] and len(data) == rec["bytes"] and rec["count"] == 6
        written[background] = data
        full = Faults(f"disk_full@{int(plan.name[-10:-4])}")
        with pytest.raises(OSError) as err:
            write_one_shard(out, plan, None, WriteOptions(background=background, faults=full))
        assert err.value.errno == errno.ENOSPC
        assert sorted(p.name for p in out.iterdir()) == [PROGRESS_DIR, plan.name]  # no temp file left
    assert written[True] == written[False]


def test_a_callers_sigterm_handler_does_not_keep_the_workers_alive(small_src, tmp_path):
    """A process that calls the writer with a record-only SIGTERM handler installed (as `mst-ds train`
    used to leave behind in-process): the rerun's checking pool ends on its sentinels (close + join), and
    its workers start with SIGTERM's default action, so ``Pool.terminate`` would end them too. Before, a
    rerun could hang in the pool's join (a fresh-clone CI stopped at test_rerun_touches_only_its_own_files;
    a script hung at its 9th pair). A race, so this can miss it: 30 write + rerun pairs in a child
    process, which the timeout ends if they hang (it passed unfixed once in this test's first run)."""
    script = f"""
import signal
from pathlib import Path
from data_tools.cli import main
signal.signal(signal.SIGTERM, lambda s, f: None)
for i in range(30):
    out = Path({str(tmp_path)!r}) / f"out{{i}}"
    for count in ("2", "5"):  # the rerun checks the finished shards in a worker pool
        assert main(["write", "--src", {str(small_src)!r}, "--out", str(out), "--quiet", "--split", "train",
                     "--max-count", count, "--workers", "2"]) == 0
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
