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


# Issue 20, defect 10: what the pre-flight can know is found there — one line, exit 2, before any rank
# starts (`plan`, `train --check` and a bare `train` all stop before DeepSpeed's start).
@pytest.mark.parametrize("bad, needle", [
    ("run.seed=100000000000000000000000", "run.seed"),  # torch.manual_seed / the step seeds overflowed
    ("schedule.warmup_epochs=.inf", "schedule.warmup_epochs"),  # OverflowError in derive()
    ("optim.base_lr=.inf", "optim.base_lr"),
    ("optim.min_lr=.inf", "optim.min_lr"),
    ("loss.teacher_temp=.inf", "loss.teacher_temp"),
    ("loss.warmup_teacher_temp=.inf", "loss.warmup_teacher_temp"),
    ("loss.student_temp=.inf", "loss.student_temp"),
    ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("optim.weight_decay_end=.inf", "optim.weight_decay_end"),
    ("augment.blur_sigma=[0.1, .inf]", "augment.blur_sigma"),
])
@pytest.mark.parametrize("command", ["plan", "check", "train"])
def test_unusable_numbers_are_refused_before_any_rank_starts(bad, needle, command, digits_shards, capsys, tmp_path):
    argv = {"plan": ["plan", "--no-model"], "check": ["train", "--check", "--run-dir", str(tmp_path / "run")],
            "train": ["train", "--run-dir", str(tmp_path / "run")]}[command]
    argv += ["--preset", "tiny", "--set", f"data.train={digits_shards}", "--set", bad]
    assert mst_ds_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field", ["bank", "query"])
@pytest.mark.parametrize("command", ["check", "train"])
def test_a_missing_monitor_bank_or_query_is_refused_before_any_rank_starts(field, command, digits_shards, capsys,
                                                                            tmp_path):
    argv = ["train", "--check"] if command == "check" else ["train"]
    sets = [f"data.train={digits_shards}", f"eval.monitor.{field}=/nonexistent/monitor"]
    if field == "query":
        sets.append(f"eval.monitor.bank={digits_shards.parent / 'folder' / 'val'}")
    for s in sets:
        argv += ["--set", s]
    assert mst_ds_main([*argv, "--preset", "tiny", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"eval.monitor.{field}" in err[0] and "/nonexistent/monitor" in err[0], err
    assert not (tmp_path / "run").exists()


def test_launch_sh_refuses_a_missing_tmpdir_before_the_pre_flight(tmp_path):
    """TMPDIR naming no directory: launch.sh failed only after the whole pre-flight (mktemp of the env
    file). Now it is the first thing said — here even before the missing data.train."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TMPDIR": str(tmp_path / "gone"), "PYTHONPATH": str(root)}
    r = subprocess.run([str(root / "launch.sh"), "--cpu", "1", "--preset", "tiny", "--run-dir", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "TMPDIR" in r.stderr, r.stderr
