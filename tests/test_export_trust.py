"""Issue 20 (7, 8): export metadata a user can be handed is validated (one line, never a traceback), and
``mst-ds export`` never overwrites a file it did not write."""

from __future__ import annotations

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

