"""Issue 20 (2): a rollback — ``latest`` pointed back at an older complete tag, as DeepSpeed users do —
resumes from that tag; the newer tags are moved aside as ``TAG.superseded`` (never deleted), and
``latest`` names the newest step of the trajectory the run is on, so evaluation, export and the SLURM
requeue check see the finished run."""

from __future__ import annotations

import shutil

import torch
from conftest import train_in_process

from mst_ds import checkpoint as ckpt
from mst_ds import cluster


def test_a_rolled_back_run_finishes_with_latest_on_its_newest_step(trained_run, digits_shards, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    d = run / "checkpoints"
    (d / "latest").write_text("step00000002")  # roll back
    assert ckpt.newest_complete(d) == "step00000002"
    assert cluster.main(["finished", str(run)]) == 3  # step 4 is to be (re)done
    capfd.readouterr()

    assert train_in_process(run, digits_shards, "run.max_steps=4") == 0
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("mst-ds:")]
    assert len(err) == 1 and "step00000004 is newer than step00000002" in err[0], err
    assert (d / "latest").read_text() == "step00000004"
    assert (d / "step00000004.superseded" / ckpt.COMPLETE).is_file()  # the old trajectory's tag, kept
    assert ckpt.complete_tags(d) == ["step00000002", "step00000004"]
    assert ckpt.resolve(run) == (d, "step00000004")
    assert cluster.main(["finished", str(run)]) == 0  # no endless requeue
    # The redone step 4 is the one the run first computed (resume is exact).
    t_a, _ = ckpt.load_teacher_student(trained_run)
    t_b, _ = ckpt.load_teacher_student(run)
    assert all(torch.equal(t_a[k], t_b[k]) for k in t_a)


def test_a_rollback_continued_further_supersedes_only_newer_tags(trained_run, digits_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    d = run / "checkpoints"
    (d / "latest").write_text("step00000002")
    assert train_in_process(run, digits_shards, "run.max_steps=6") == 0
    assert (d / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["step00000004", "step00000004.superseded",
                                                                 "step00000006"]
