"""Preemption (issue 20, defect 3): SIGTERM / SIGUSR1 finish the current step, save a complete checkpoint
of it on every rank, and exit with the code the SLURM templates requeue on; the relaunch ends
bit-identical to a run that never stopped. A second SIGTERM exits at once with `latest` intact.

The in-process test runs in the default set; the launched ones (1 bare process, 2 ranks through
launch.sh) are slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import train_in_process
from test_train_dist import STEPS, _env, _sets, assert_same_run, finish, launch, records

from mst_ds import checkpoint as ckpt
from mst_ds import job


def _same_weights(a, b) -> None:
    t_a, s_a = ckpt.load_teacher_student(a)
    t_b, s_b = ckpt.load_teacher_student(b)
    assert all(torch.equal(t_a[k], t_b[k]) for k in t_a) and all(torch.equal(s_a[k], s_b[k]) for k in s_a)


def test_sigterm_saves_the_current_step_and_the_resumed_run_is_bit_identical(trained_run, digits_shards, tmp_path):
    """A SIGTERM already pending when the loop starts: step 1 runs, is saved (not a scheduled
    checkpoint: those are every 2 steps), the run returns EXIT_STOPPED; relaunched to 4 steps it equals
    the uninterrupted 4-step run."""
    run_dir = tmp_path / "stopped"
    stop = job.StopSignals().install()
    try:
        signal.raise_signal(signal.SIGTERM)  # the handler only sets the flag: this process goes on
        assert stop.requested == "SIGTERM"
        assert train_in_process(run_dir, digits_shards, "run.max_steps=4", stop=stop) == job.EXIT_STOPPED
    finally:
        stop.uninstall()
    ckpt_dir = run_dir / "checkpoints"
    assert ckpt.newest_complete(ckpt_dir) == "step00000001" == (ckpt_dir / "latest").read_text()
    assert ckpt.damage(ckpt_dir / "step00000001") is None
    assert train_in_process(run_dir, digits_shards, "run.max_steps=4") == 0
    assert [r["loss"] for r in records(run_dir)] == [r["loss"] for r in records(trained_run)]
    _same_weights(trained_run, run_dir)


def test_the_train_command_in_process_gives_the_callers_handlers_back(digits_shards, tmp_path):
    """`mst-ds train` called in-process (tests, notebooks) installs its stop handlers for the run only: a
    record-only SIGTERM handler left behind is inherited by every process the caller forks later, which
    then outlive a terminate() (seen: the shard writer's pool hung a CI session at test_shards_trust)."""
    from conftest import TRAIN_SETS

    from mst_ds.cli import main

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    argv = ["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--set", f"data.train={digits_shards}",
            "--set", "run.max_steps=1"]
    for s in TRAIN_SETS:
        argv += ["--set", s]
    assert main(argv) == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()  # it trained: the handlers were installed
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_sigusr1_stops_like_sigterm(digits_shards, tmp_path):
    stop = job.StopSignals().install()
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert train_in_process(tmp_path / "usr1", digits_shards, "run.max_steps=4", stop=stop) == job.EXIT_STOPPED
    finally:
        stop.uninstall()
    assert ckpt.newest_complete(tmp_path / "usr1" / "checkpoints") == "step00000001"


def _wait_for_step(p: subprocess.Popen, run_dir, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"run ended (rc {p.poll()}) or timed out before step {step}")


def _bare(run_dir, shards, *sets: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mst_ds.cli", "train", "--preset", "tiny", "--run-dir", str(run_dir),
           *_sets(shards, *sets)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_sigterm_mid_run_on_one_process(trained_run, digits_shards, tmp_path):
    """A bare `mst-ds train` (one rank) SIGTERMed after step 1: it saves the step it is on and exits
    EXIT_STOPPED with one line; before the fix it died at once (143) keeping only the scheduled step."""
    run_dir = tmp_path / "bare"
    p = _bare(run_dir, digits_shards, "run.max_steps=4")
    _wait_for_step(p, run_dir, 1)
    os.kill(p.pid, signal.SIGTERM)
    rc, out = finish(p)
    assert rc == job.EXIT_STOPPED, out[-3000:]
    last = records(run_dir)[-1]["step"]
    assert ckpt.newest_complete(run_dir / "checkpoints") == ckpt.tag_for(last)
    assert f"stopped by SIGTERM after step {last}" in out
    if last < 4:
        rc, out = finish(_bare(run_dir, digits_shards, "run.max_steps=4"))
        assert rc == 0, out[-3000:]
    _same_weights(trained_run, run_dir)


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once_and_keeps_latest_complete(digits_shards, tmp_path):
    run_dir = tmp_path / "twice"
    p = _bare(run_dir, digits_shards, f"run.max_steps={STEPS}")
    _wait_for_step(p, run_dir, 2)
    os.kill(p.pid, signal.SIGTERM)
    time.sleep(job.DUPLICATE_S + 0.5)  # past the window in which a launcher's forwarded copy is ignored
    if p.poll() is None:
        os.kill(p.pid, signal.SIGTERM)
    rc, out = finish(p)
    assert rc in (-signal.SIGTERM, job.EXIT_STOPPED), out[-3000:]
    ckpt_dir = run_dir / "checkpoints"
    tag = (ckpt_dir / "latest").read_text()
    assert ckpt.is_complete(ckpt_dir / tag) and ckpt.damage(ckpt_dir / tag) is None


@pytest.mark.slow
def test_sigterm_on_two_ranks_saves_one_step_and_resumes_bit_identical(digits_shards, tmp_path):
    """killpg(SIGTERM) of launch.sh, the DeepSpeed launcher and both ranks (what SLURM does to a job
    step): both ranks stop after the same step with a complete checkpoint of it, launch.sh exits
    EXIT_STOPPED; the relaunch equals an uninterrupted run. Prints the time from SIGTERM to exit."""
    whole = tmp_path / "whole"
    rc, out = finish(launch(whole, digits_shards))
    assert rc == 0, out[-3000:]
    run_dir = tmp_path / "preempted"
    p = launch(run_dir, digits_shards)
    _wait_for_step(p, run_dir, 3)
    sent = time.monotonic()
    os.killpg(p.pid, signal.SIGTERM)
    rc, out = finish(p)
    took = time.monotonic() - sent
    assert rc == job.EXIT_STOPPED, out[-3000:]
    last = records(run_dir)[-1]["step"]
    ckpt_dir = run_dir / "checkpoints"
    tag = ckpt.newest_complete(ckpt_dir)
    assert tag == ckpt.tag_for(last) and ckpt.damage(ckpt_dir / tag) is None
    assert (ckpt_dir / tag / "rng_rank00001.pt").exists()
    print(f"SIGTERM after step {last - 1}..{last}: every process exited {took:.1f} s later")
    if last < STEPS:
        rc, out = finish(launch(run_dir, digits_shards))
        assert rc == 0, out[-3000:]
    assert_same_run(whole, run_dir)

