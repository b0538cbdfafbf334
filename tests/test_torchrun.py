"""Issue 31: torchrun as the third launcher (beside launch.sh / deepspeed and srun): 2 CPU processes train,
print their progress lines to the job's output, and a run SIGKILLed under torchrun resumes through
torchrun bit-identically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_train_dist import STEPS, _env, _port, _sets, assert_same_run, records

from mst_ds.status import run_status


def torchrun(run_dir, shards, *sets: str) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m mst_ds.cli train …` in its own process group, output to a pipe."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "mst_ds.cli", "train", "--preset", "tiny", "--run-dir", str(run_dir), *_sets(shards, *sets)]
    return subprocess.Popen(cmd, env=_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_two_processes_under_torchrun_train_and_print_their_progress(digits_shards, tmp_path, deepspeed_cpu):
    run_dir = tmp_path / "torchrun"
    p = torchrun(run_dir, digits_shards, "run.max_steps=3", "run.log_every_s=0")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    lines = [x for x in out.splitlines() if x.startswith("train step")]
    assert [x.split()[2] for x in lines] == ["1/3", "2/3", "3/3"], out[-3000:]  # rank 0 only: one line per step
    assert "/device)" in lines[-1] and "peak mem" in lines[-1] and "data wait" in lines[-1]
    s = run_status(run_dir)
    assert s["state"] == "finished" and s["world_size"] == 2 and s["step"] == 3
    assert s["commands"]["resume"].startswith("torchrun --nproc_per_node 2 -m mst_ds.cli train")


@pytest.mark.slow
def test_a_torchrun_job_killed_and_relaunched_is_bit_identical(digits_shards, tmp_path, deepspeed_cpu):
    ref = torchrun(tmp_path / "ref", digits_shards)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]
    run_dir = tmp_path / "killed"
    p = torchrun(run_dir, digits_shards)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= 3:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks at once, as a node failure would
    p.communicate(timeout=60)
    assert run_status(run_dir)["state"] == "stale"  # no job, no exit record
    again = torchrun(run_dir, digits_shards)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert len(records(run_dir)) == STEPS
    assert_same_run(tmp_path / "ref", run_dir)
