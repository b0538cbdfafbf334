"""Issue 20 (13, the evaluation side): a deeply nested index.json, two evaluations into one --out, and a
val shard set holding a sample key twice — each one line (exit 2), never a traceback or a silently
lost or double-counted result (real digits, tiny preset)."""

from __future__ import annotations

import json
import shutil

import pytest

from data_tools.sample_data import write_digits_imagefolder
from data_tools.verify import verify_dir
from data_tools.writer import write_shards
from mst_ds import job
from mst_ds.cli import main
from mst_ds.eval.features import OUT_LOCK


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    folders = write_digits_imagefolder(root / "folder", size=32)
    write_shards(folders.val, root / "val", split="val", max_count=100, progress=False)
    return folders.train, root / "val"


def _knn(train, val, out):
    return main(["knn", "--preset", "tiny", "--train", str(train), "--val", str(val), "--out", str(out),
                 "--num-workers", "0", "--batch-size", "128", "--k", "10"])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mst-ds: error:"), err[-3:]
    return err[0]


def test_a_deeply_nested_manifest_is_one_line(data, tmp_path, capsys):
    train, val = data
    bomb = tmp_path / "nested"
    bomb.mkdir()
    (bomb / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    assert _knn(train, bomb, tmp_path / "o") == 2
    assert "not a shard manifest (nested deeper" in _one_line(capsys)
    assert main(["train", "--check", "--preset", "tiny", "--set", f"data.train={bomb}",
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "not a shard manifest (nested deeper" in _one_line(capsys)


def test_a_second_evaluation_into_the_same_out_is_refused(data, tmp_path, capsys):
    train, val = data
    out = tmp_path / "o"
    holder = job.FileLock(out / OUT_LOCK, "held", RuntimeError).acquire()  # an evaluation in progress
    try:
        assert _knn(train, val, out) == 2
        assert "in use by another evaluation" in _one_line(capsys)
        assert not (out / "knn.json").exists()
    finally:
        holder.release()
    assert _knn(train, val, out) == 0  # free again
    assert json.loads((out / "knn.json").read_text())["n_val"] == 359


def test_a_val_set_with_a_key_twice_is_refused_as_verify_flags_it(data, tmp_path, capsys):
    train, val = data
    twice = tmp_path / "twice"
    shutil.copytree(val, twice)
    index = json.loads((twice / "index.json").read_text())
    index["shards"].append(index["shards"][0])  # the first shard listed twice
    index["total"] += index["shards"][0]["count"]
    index["num_shards"] += 1
    (twice / "index.json").write_text(json.dumps(index))
    assert any("duplicate key" in p for p in verify_dir(twice).problems)
    assert _knn(train, twice, tmp_path / "o") == 2
    assert "occurs 2 times" in _one_line(capsys)
