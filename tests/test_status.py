"""Issue 31: `mst-ds status RUN` from the run directory alone — running, finished, preempted, failed and
stale runs, a study folder, --json, and a live job's output file showing lines before its end."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import train_in_process
from test_train_dist import _env, _sets

from mst_ds import job
from mst_ds.cli import main
from mst_ds.faults import Faults
from mst_ds.status import STALE_MIN_S, run_status


def _status_json(run_dir, capsys) -> dict:
    assert main(["status", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_finished_run(trained_run, capsys):
    s = _status_json(trained_run, capsys)
    assert s["state"] == "finished" and s["step"] == s["total"] == 4
    assert s["checkpoint"]["tag"] == "step00000004" and s["checkpoint"]["age_s"] >= 0
    assert s["exit"]["code"] == 0 and s["held_by"] is None and s["eta_s"] is None
    assert set(s["losses"]) == {"loss", "dino", "restore"} and s["health"] == "healthy"
    assert s["throughput"]["img_per_s"] > 0 and s["next"].startswith("mst-ds knn --ckpt")
    assert main(["status", str(trained_run)]) == 0
    text = capsys.readouterr().out
    assert "finished — step 4/4" in text and "checkpoint: step00000004" in text


def test_a_preempted_run_then_one_killed_without_a_word(digits_shards, tmp_path):
    """SIGTERM → exit 75 with a checkpoint: preempted, and the resume command. A job killed outright
    (SIGKILL) leaves no exit record (the loop removes the previous one when it starts): stale."""
    run_dir = tmp_path / "stopped"
    stop = job.StopSignals().install()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert train_in_process(run_dir, digits_shards, "run.max_steps=4", stop=stop) == job.EXIT_STOPPED
    finally:
        stop.uninstall()
    s = run_status(run_dir)
    assert s["state"] == "preempted" and s["exit"]["code"] == job.EXIT_STOPPED
    assert s["step"] == 1 and s["total"] == 4 and s["checkpoint"]["step"] == 1
    assert s["next"] == f"mst-ds train --preset {run_dir / 'config.yaml'} --run-dir {run_dir}"
    (run_dir / "exit.json").unlink()  # what a SIGKILL leaves: the loop removed the last job's record
    assert run_status(run_dir)["state"] == "stale"


def test_a_failed_run(digits_shards, tmp_path, capsys):
    run_dir = tmp_path / "nan"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=4", faults=Faults("nan@3")) == 1
    capsys.readouterr()
    s = _status_json(run_dir, capsys)
    assert s["state"] == "failed" and s["exit"]["code"] == 1 and s["step"] == 2
    assert s["checkpoint"]["tag"] == "step00000002" and "--run-dir" in s["next"]


def test_a_run_whose_lock_a_live_process_holds_is_running_until_it_goes_quiet(trained_run, tmp_path):
    run_dir = tmp_path / "held"
    shutil.copytree(trained_run, run_dir)
    # The session's trained run may be older than STALE_MIN_S by now: its last logged step is "now" here.
    (run_dir / "metrics.jsonl").touch()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mst_ds import job; "
                               f"job.RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        s = run_status(run_dir)
        assert s["state"] == "running" and f"pid {holder.pid}" in s["held_by"] and s["next"] is None
        assert s["exit"] is None  # a live job's state wins over the last job's record
        later = time.time() + STALE_MIN_S + 1  # no logged step for longer than K × the usual interval
        assert run_status(run_dir, now=later)["state"] == "stale"
    finally:
        holder.kill()
        holder.wait()
    assert run_status(run_dir)["state"] == "finished"
    assert (run_dir / ".lock").read_text().startswith("host ")  # the probe never wrote the lock file


def test_a_study_folder_gives_one_row_per_run(trained_run, tmp_path, capsys):
    for name in ("a", "b"):
        shutil.copytree(trained_run, tmp_path / "study" / "runs" / name)
    (tmp_path / "study" / "runs" / "b" / "exit.json").write_text('{"code": 1, "error": "boom"}')
    assert main(["status", str(tmp_path / "study")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:2] == ["run", "state"]
    assert rows[1].split()[:3] == ["a", "finished", "4/4"] and rows[2].split()[:2] == ["b", "failed"]


def test_a_malformed_run_file_is_one_line(trained_run, tmp_path, capsys):
    run_dir = tmp_path / "bad"
    shutil.copytree(trained_run, run_dir)
    (run_dir / "run_info.json").write_text("{not json")
    assert main(["status", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run_info.json" in err[0]
    assert main(["status", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_a_job_writing_to_a_file_shows_lines_before_its_end_and_status_follows_it(digits_shards, tmp_path):
    """`mst-ds train` with stdout and stderr to a file, as sbatch runs it: progress lines appear while it
    trains; status says running, then (SIGTERM) preempted."""
    run_dir, out = tmp_path / "job", tmp_path / "job.out"
    cmd = [sys.executable, "-m", "mst_ds.cli", "train", "--preset", "tiny", "--run-dir", str(run_dir),
           *_sets(digits_shards, "run.max_steps=40", "run.log_every_s=0", "checkpoint.every_steps=0")]
    with open(out, "w") as fh:
        p = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "train step 2/40" not in out.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.poll() is None, out.read_text()  # lines appeared while the job still ran
        assert run_status(run_dir)["state"] == "running"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=300) == job.EXIT_STOPPED
    finally:
        if p.poll() is None:
            p.kill()
    lines = [x for x in out.read_text().splitlines() if x.startswith("train step")]
    assert len(lines) >= 2 and all(len(x) > 80 and "img/s" in x for x in lines)
    assert run_status(run_dir)["state"] == "preempted"
