"""Issue 9, run side: the run directory is trusted only as far as it checks out. Other training data,
changed settings, a locked run directory, a damaged or crafted checkpoint, a full disk and folders that
are not checkpoints — each is one clear line (or a fallback that says so), never a silent change."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_SETS, train_in_process

from mst_ds import checkpoint as ckpt
from mst_ds import job
from mst_ds.checkpoint_manager import data_identity, find_resume
from mst_ds.cli import main
from mst_ds.config import ConfigError, RunFailure, load_config

ROOT = Path(__file__).resolve().parent.parent


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    shutil.copytree(run, out)
    return out


def _cfg(shards, *sets):
    return load_config("tiny", [*TRAIN_SETS, f"data.train={shards}", "run.max_steps=4", *sets]).config


def _weights_equal(a: Path, b: Path) -> bool:
    t_a, s_a = ckpt.load_teacher_student(a)
    t_b, s_b = ckpt.load_teacher_student(b)
    return all(torch.equal(t_a[k], t_b[k]) for k in t_a) and all(torch.equal(s_a[k], s_b[k]) for k in s_a)


# --------------------------------------------------------------------------------------------------
# Case 4: the training data's identity, not its path
# --------------------------------------------------------------------------------------------------
def test_resume_refuses_other_training_data_but_accepts_moved_shards(trained_run, digits_shards, tmp_path):
    run = _copy(trained_run, tmp_path)
    moved = tmp_path / "moved_shards"
    shutil.copytree(digits_shards, moved)
    cfg = _cfg(moved)
    assert find_resume(cfg, run / "checkpoints", data_identity(cfg))[0] == "step00000004"  # same bytes, new place

    subset = f"{digits_shards}/train-{{000000..000001}}.tar"  # two of the six shards: other data
    with pytest.raises(ConfigError, match=r"data.train: .* is not the data step00000004 was trained on "
                                          r"\(1438 → 480 samples, 6 → 2 shards\)"):
        train_in_process(run, digits_shards, "run.max_steps=4", f"data.train={subset}")
    assert ckpt.complete_tags(run / "checkpoints") == ["step00000002", "step00000004"]  # nothing touched


# --------------------------------------------------------------------------------------------------
# Case 17: a refused resume names the fields
# --------------------------------------------------------------------------------------------------
def test_refused_resume_names_the_fields_that_differ(trained_run, digits_shards, tmp_path):
    run = _copy(trained_run, tmp_path)
    with pytest.raises(ConfigError) as err:
        train_in_process(run, digits_shards, "run.max_steps=4", "loss.restore_weight=0.4", "optim.base_lr=0.001")
    msg = str(err.value)
    assert "loss.restore_weight" in msg and "→ 0.4" in msg and "optim.base_lr" in msg and "→ 0.001" in msg
    assert "allow_config_change" in msg and "\n" not in msg


def test_launch_sh_validates_once_before_the_ranks(tmp_path, digits_shards):
    """A bad setting through launch.sh: one line, exit 2, no launcher or rank started."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([str(ROOT / "launch.sh"), "--cpu", "2", "--preset", "tiny", "--run-dir", str(tmp_path / "r"),
                          "--set", f"data.train={digits_shards}", "--set", "optim.batch_size=-3"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mst-ds: error: optim.batch_size"), res.stderr
    assert "deepspeed" not in res.stdout + res.stderr


# --------------------------------------------------------------------------------------------------
# Case 7: pruning deletes only what this code wrote
# --------------------------------------------------------------------------------------------------
def _marker(step: int) -> dict:
    return {"step": step, "samples": step, "world_size": 1, "zero_stage": 0, "config_hash": "h", "files": {}}


def test_prune_leaves_folders_it_did_not_write(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (d / ckpt.tag_for(step)).mkdir(parents=True)
        (d / ckpt.tag_for(step) / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (d / ckpt.tag_for(step) / ckpt.COMPLETE).write_text(json.dumps(_marker(step)))
    (d / "step00000002_universal").mkdir()  # the universal twin of a pruned tag: ours
    (d / "step00000002_universal" / ckpt.COMPLETE).write_text(json.dumps(_marker(2)))
    (d / "step00000005").mkdir()  # leftover of a killed save: only checkpoint files → ours
    (d / "step00000005" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    foreign = {"my_notes": "a.txt", "best": ckpt.COMPLETE, "step00000001": "notes.txt", "step2": "x.pt"}
    for folder, file in foreign.items():  # a name not ours, a marker without our name, our name with other files
        (d / folder).mkdir()
        (d / folder / file).write_text(json.dumps({"step": 1}))
    ckpt.prune(d, keep_last=1)
    left = sorted(p.name for p in d.iterdir())
    assert left == sorted([ckpt.tag_for(6), *foreign])
    assert all((d / folder / file).is_file() for folder, file in foreign.items())
    with pytest.raises(RunFailure, match="holds files this program did not write"):
        ckpt.remove_leftover(d / "step00000001")
    assert (d / "step00000001" / "notes.txt").is_file()


# --------------------------------------------------------------------------------------------------
# Case 8: one job per run directory
# --------------------------------------------------------------------------------------------------
def test_a_locked_run_directory_is_refused_naming_the_holder(trained_run, digits_shards, tmp_path, capsys):
    run = _copy(trained_run, tmp_path)
    holder = job.RunLock(run).acquire()
    try:
        with pytest.raises(ConfigError, match=rf"in use by another job \(host \S+ pid {os.getpid()} since"):
            train_in_process(run, digits_shards, "run.max_steps=4")
        args = ["train", "--check", "--preset", "tiny", "--run-dir", str(run)]
        for s in [*TRAIN_SETS, f"data.train={digits_shards}", "run.max_steps=4"]:
            args += ["--set", s]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another job" in err[0]
    finally:
        holder.release()
    assert main(args) == 0  # free again: the check passes (resume compatible, comm op built)


def test_a_killed_holder_never_keeps_the_lock(tmp_path):
    code = f"from mst_ds import job; job.RunLock({str(tmp_path)!r}).acquire(); import os; os.kill(os.getpid(), 9)"
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == -9 and "pid" in (tmp_path / job.LOCK_NAME).read_text()
    job.RunLock(tmp_path).acquire().release()


# --------------------------------------------------------------------------------------------------
# Case 9: a damaged newest checkpoint → the newest intact one, said in one line
# --------------------------------------------------------------------------------------------------
def test_a_truncated_newest_checkpoint_falls_back_to_the_intact_one(trained_run, digits_shards, tmp_path, capfd):
    run = _copy(trained_run, tmp_path)
    states = run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    with open(states, "r+b") as f:
        f.truncate(states.stat().st_size // 2)
    why = ckpt.damage(states.parent)
    assert why and "mp_rank_00_model_states.pt has" in why
    with pytest.raises(ConfigError, match=r"step00000004: damaged checkpoint .*newest intact: .*step00000002"):
        ckpt.resolve(run)  # evaluation never silently takes an older checkpoint
    capfd.readouterr()
    assert train_in_process(run, digits_shards, "run.max_steps=4") == 0
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("mst-ds:")]
    assert len(err) == 1 and "step00000004 is damaged" in err[0] and "resuming from step00000002" in err[0]
    assert (run / "checkpoints" / "step00000004.damaged" / states.name).is_file()  # kept, not deleted
    assert ckpt.damage(run / "checkpoints" / "step00000004") is None  # rewritten by the resumed run
    assert _weights_equal(run, trained_run)  # and the result is the uninterrupted run's, bit for bit


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(trained_run, digits_shards, tmp_path):
    run = _copy(trained_run, tmp_path)
    for tag in ("step00000002", "step00000004"):
        (run / "checkpoints" / tag / "rng_rank00000.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        train_in_process(run, digits_shards, "run.max_steps=4")
    assert ckpt.complete_tags(run / "checkpoints") == ["step00000002", "step00000004"]


# --------------------------------------------------------------------------------------------------
# Case 10: nothing in a checkpoint is executed
# --------------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (Path.touch, (self.mark,))


def _craft(run: Path, mark: Path, name: str = "mp_rank_00_model_states.pt") -> None:
    """Replace one file of the newest checkpoint by a pickle that creates ``mark`` when unpickled, with
    the recorded size updated so that only the unpickling check stands between it and DeepSpeed."""
    tag_dir = run / "checkpoints" / "step00000004"
    torch.save({"module": {}, "teacher": _Evil(mark)}, tag_dir / name, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    meta = ckpt.read_meta(tag_dir)
    meta["files"][name] = (tag_dir / name).stat().st_size
    (tag_dir / ckpt.COMPLETE).write_text(json.dumps(meta))


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "rng_rank00000.pt"])
def test_a_crafted_checkpoint_is_never_executed_on_resume(trained_run, digits_shards, tmp_path, name):
    run, mark = _copy(trained_run, tmp_path), tmp_path / "PWNED"
    _craft(run, mark, name)
    with pytest.raises(ConfigError, match=rf"{name}: refusing to unpickle it \(it needs .*; nothing in it was run\)"):
        train_in_process(run, digits_shards, "run.max_steps=4")
    assert not mark.exists()


def test_a_crafted_checkpoint_is_never_executed_by_export_or_knn(trained_run, digits_shards, tmp_path, capsys):
    run, mark = _copy(trained_run, tmp_path), tmp_path / "PWNED"
    _craft(run, mark)
    assert main(["export", str(run), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["knn", "--preset", "tiny", "--ckpt", str(run), "--train", str(digits_shards), "--val",
                 str(digits_shards), "--out", str(tmp_path / "knn"), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("refusing to unpickle" in line for line in err), err
    assert not mark.exists() and not (tmp_path / "x.safetensors").exists()


def test_rng_and_model_files_load_weights_only(trained_run):
    tag_dir = trained_run / "checkpoints" / "step00000004"
    for f in ("rng_rank00000.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        assert ckpt.safe_load(tag_dir / f) is not None
    with pytest.raises(pickle.UnpicklingError):  # and only the allow-list makes the DeepSpeed file load
        torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)


# --------------------------------------------------------------------------------------------------
# Case 14: a full disk during a save
# --------------------------------------------------------------------------------------------------
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
        trained_run, digits_shards, tmp_path, monkeypatch, capsys):
    run = _copy(trained_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step00000004")
    (run / "checkpoints" / "latest").write_text("step00000002")
    before = {p.name: p.stat().st_size for p in (run / "checkpoints" / "step00000002").iterdir()}
    monkeypatch.setenv("MST_DS_FAULT", "enospc_in_save@4")
    args = ["train", "--preset", "tiny", "--run-dir", str(run)]
    for s in [*TRAIN_SETS, f"data.train={digits_shards}", "run.max_steps=4"]:
        args += ["--set", s]
    capsys.readouterr()
    assert main(args) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert [ln for ln in err if ln.startswith("mst-ds:")] == err[-1:] and "Traceback" not in "\n".join(err)
    assert "saving step 4 failed" in err[-1] and "No space left on device" in err[-1] and "step00000002" in err[-1]
    ckpt_dir = run / "checkpoints"
    assert not (ckpt_dir / "step00000004").exists() and not list(ckpt_dir.rglob(".*.tmp-*"))
    assert (ckpt_dir / "latest").read_text() == "step00000002" and ckpt.damage(ckpt_dir / "step00000002") is None
    assert {p.name: p.stat().st_size for p in (ckpt_dir / "step00000002").iterdir()} == before
