"""Issue 20 (7, 8): export metadata a user can be handed is validated (one line, never a traceback), and
``mst-ds export`` never overwrites a file it did not write."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mst_ds.cli import main

CRAFTED = {
    "a_list": "[1, 2, 3]",
    "a_string": '"teacher"',
    "eval_settings_list": '{"architecture": "vit_tiny_patch16_224", "eval_settings": [1, 2]}',
    "source_string": '{"architecture": "vit_tiny_patch16_224", "source": "teacher"}',
    "model_args_number": '{"architecture": "vit_tiny_patch16_224", "model_args": 5}',
    "which_unknown": '{"architecture": "vit_tiny_patch16_224", "source": {"which": ["x"]}}',
}


@pytest.mark.parametrize("how", list(CRAFTED))
def test_crafted_export_metadata_is_one_line(digits_shards, tmp_path, capsys, how):
    f = tmp_path / "crafted.safetensors"
    save_file({"w": torch.zeros(1)}, str(f), metadata={"mst_ds": CRAFTED[how]})
    for cmd in (["knn"], ["linear", "--no-augment"]):
        assert main([*cmd, "--ckpt", str(f), "--train", str(digits_shards), "--val", str(digits_shards),
                     "--out", str(tmp_path / "eval")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mst-ds: error: {f}: mst_ds metadata"), err


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mst-ds: error:"), err
    return err[0]


def test_export_never_overwrites_a_file_it_did_not_write(trained_run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    mine = tmp_path / "model.json"
    mine.write_text("the user's own notes\n")
    assert main(["export", str(trained_run), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert "model.json" in line and "--force" in line
    assert mine.read_text() == "the user's own notes\n" and not out.exists()

    assert main(["export", str(trained_run), "--out", str(out), "--force"]) == 0
    assert json.loads(mine.read_text())["architecture"]
    capsys.readouterr()
    assert main(["export", str(trained_run), "--out", str(out)]) == 0  # its own earlier export: replaced

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other))  # someone else's weights
    before = other.read_bytes()
    capsys.readouterr()
    assert main(["export", str(trained_run), "--out", str(other)]) == 2
    assert "other.safetensors" in _one_line(capsys)
    assert other.read_bytes() == before


def test_export_to_a_directory_or_an_unwritable_place_is_one_line(trained_run, tmp_path, capsys):
    folder = tmp_path / "d.safetensors"
    folder.mkdir()
    assert main(["export", str(trained_run), "--out", str(folder)]) == 2
    assert "is a directory" in _one_line(capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["export", str(trained_run), "--out", str(blocker / "m.safetensors")]) == 2
    assert "cannot write" in _one_line(capsys)
