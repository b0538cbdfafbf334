"""Bad input to the training and data commands: one line on stderr, a non-zero exit, nothing written,
and no DeepSpeed start paid for a typo."""

from __future__ import annotations

import pytest

from mst_ds.cli import main as mst_ds_main


@pytest.mark.parametrize("sets, needle", [
    (["data.train=/nonexistent/shards"], "/nonexistent/shards"),
    ([], "data.train"),
    (["optim.batch_size=0"], "optim.batch_size"),
    (["engine.zero_stage=5"], "engine.zero_stage"),
])
def test_train_bad_input_is_one_line_exit_2(sets, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--preset", "tiny", "--set", f"run.output_dir={tmp_path / 'runs'}"]
    for s in sets:
        argv += ["--set", s]
    assert mst_ds_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "runs").exists()


def test_train_on_a_truncated_manifest_is_one_line(capsys, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text('{"split": "train", "shards": [')
    assert mst_ds_main(["train", "--preset", "tiny", "--set", f"data.train={shards}",
                        "--set", f"run.output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid JSON" in err[0], err


def test_shards_verify_missing_directory(capsys, tmp_path):
    from data_tools.cli import main as shards_main

    code = shards_main(["verify", str(tmp_path / "missing")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0], err
