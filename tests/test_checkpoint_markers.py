"""Issue 20 (6): a malformed ``complete.json`` — not JSON, not an object, keys missing or of the wrong
type — in the newest or an older tag is a damaged tag (the existing fallback), never a traceback, in
every command that reads markers; a forged ``step`` never makes an older tag the newest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TRAIN_SETS, train_in_process

from mst_ds import checkpoint as ckpt
from mst_ds import cluster
from mst_ds import study as st
from mst_ds.cli import main
from mst_ds.config import UsageError

MALFORMED = {
    "not_json": "{ this is not json",
    "a_list": "[1, 2, 3]",
    "a_string": '"step00000004"',
    "no_keys": "{}",
    "step_is_text": None,  # the genuine marker with "step": "four"
    "files_is_list": None,  # the genuine marker with "files": [...]
}


def _break(tag_dir: Path, how: str) -> None:
    marker = tag_dir / ckpt.COMPLETE
    meta = json.loads(marker.read_text())
    if how == "step_is_text":
        meta["step"] = "four"
    elif how == "files_is_list":
        meta["files"] = list(meta["files"])
    else:
        marker.write_text(MALFORMED[how])
        return
    marker.write_text(json.dumps(meta))


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mst-ds: error:"), err
    return err[0]


@pytest.mark.parametrize("how", list(MALFORMED))
def test_a_malformed_newest_marker_is_a_damaged_tag_everywhere(trained_run, digits_shards, tmp_path, capsys, how):
    run = _copy(trained_run, tmp_path)
    newest = run / "checkpoints" / "step00000004"
    _break(newest, how)
    assert ckpt.damage(newest) is not None and "complete.json" in ckpt.damage(newest)
    with pytest.raises(UsageError, match=r"step00000004: damaged checkpoint \(complete.json.*newest intact"):
        ckpt.resolve(run)
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "damaged checkpoint (complete.json" in _one_error_line(capsys)
    assert cluster.main(["finished", str(run)]) == 3  # step 4 must be redone: the run is not finished
    assert ckpt.newest_complete(run / "checkpoints") == "step00000002"
    done = st.Run("r", 0, "tiny", (), run, "h", 8)
    assert st._trained_steps(done) == 2
    check = ["train", "--check", "--preset", "tiny", "--run-dir", str(run)]
    for s in [*TRAIN_SETS, f"data.train={digits_shards}", "run.max_steps=4"]:
        check += ["--set", s]
    assert main(check) == 0, capsys.readouterr().err


@pytest.mark.parametrize("how", ["not_json", "a_list", "no_keys"])
def test_a_malformed_older_marker_leaves_the_newest_in_use(trained_run, tmp_path, capsys, how):
    run = _copy(trained_run, tmp_path)
    _break(run / "checkpoints" / "step00000002", how)
    assert ckpt.resolve(run) == (run / "checkpoints", "step00000004")
    assert ckpt.newest_intact(run / "checkpoints") == ("step00000004", [])
    assert cluster.main(["finished", str(run)]) == 0
    (run / "checkpoints" / "latest").unlink()  # no latest: the newest by step, still not a traceback
    assert ckpt.newest_complete(run / "checkpoints") == "step00000004"
    assert main(["export", str(run), "--out", str(tmp_path / "x.safetensors")]) == 0
    ckpt.prune(run / "checkpoints", keep_last=1)  # pruning reads markers too


def test_resume_sets_a_malformed_newest_marker_aside_and_retrains(trained_run, digits_shards, tmp_path, capfd):
    run = _copy(trained_run, tmp_path)
    _break(run / "checkpoints" / "step00000004", "a_list")
    capfd.readouterr()
    assert train_in_process(run, digits_shards, "run.max_steps=4") == 0
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("mst-ds:")]
    assert len(err) == 1 and "step00000004 is damaged (complete.json" in err[0], err
    assert (run / "checkpoints" / "step00000004.damaged").is_dir()
    assert ckpt.damage(run / "checkpoints" / "step00000004") is None


def test_a_forged_future_step_in_an_older_tag_does_not_make_it_the_newest(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    d = run / "checkpoints"
    older = d / "step00000002" / ckpt.COMPLETE
    older.write_text(json.dumps({**json.loads(older.read_text()), "step": 99, "samples": 99 * 8}))
    (d / "latest").unlink()
    assert ckpt.complete_tags(d)[-1] == "step00000004"
    assert ckpt.newest_complete(d) == "step00000004"
    assert ckpt.resolve(run) == (d, "step00000004")
    assert "step" in ckpt.damage(d / "step00000002")


def test_a_foreign_folder_at_the_universal_tag_is_refused_not_deleted(tmp_path):
    """The universal conversion replaces only what it wrote: a folder at its tag name holding a user's file
    is one line and stays as it was."""
    from mst_ds.config import RunFailure

    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step00000004").mkdir(parents=True)
    foreign = ckpt_dir / ("step00000004" + ckpt.UNIVERSAL_SUFFIX)
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunFailure, match="did not write"):
        ckpt.convert_to_universal(ckpt_dir, "step00000004", rank=0)
    assert (foreign / "notes.txt").read_text() == "mine"
