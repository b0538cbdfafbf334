"""SLURM both ways on CPU, from a faked allocation of 2 "nodes" (127.0.0.1 and 127.0.0.2, both this
machine) × 1 task: ``launch.sh`` inside the allocation (hostfile from SLURM_JOB_NODELIST, one launch per
node with --no_ssh, node rank from SLURM_NODEID, port from SLURM_JOB_ID), and ``srun``-style tasks that
read their rank from SLURM_PROCID / SLURM_NTASKS. Both are preempted (SIGTERM to every process, as
SLURM does) at a random step and requeued with the same command: each ends bit-identical to an
uninterrupted run, and the srun run is bit-identical to the launcher's (same ranks, same gloo
reductions). Slow: ``pytest -m slow``."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_dist import STEPS, _env, _sets, assert_same_run, finish, records

from mst_ds import checkpoint as ckpt
from mst_ds import cluster, job

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
NODES = "127.0.0.[1-2]"


def _job_id() -> str:
    """A realistic job id whose derived rendezvous port is free on this machine."""
    for _ in range(200):
        p = random.randrange(cluster.PORT_BASE, cluster.PORT_BASE + cluster.PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
        return str(p - cluster.PORT_BASE + 30 * cluster.PORT_SPAN)
    raise RuntimeError("no free port")


def _allocation(job_id: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "LOCAL_SIZE")}
    env.update(SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST=NODES, SLURM_JOB_NUM_NODES="2", OMP_NUM_THREADS="1", **extra)
    return env


def start_launch_sh(run_dir: Path, shards: Path, job_id: str) -> list[subprocess.Popen]:
    """`srun --ntasks-per-node=1 ./launch.sh --no_ssh ...` as SLURM would run it: one launch per node."""
    cmd = [str(ROOT / "launch.sh"), "--preset", "tiny", "--no_ssh", "--run-dir", str(run_dir), *_sets(shards)]
    return [subprocess.Popen(cmd, env=_allocation(job_id, SLURM_NODEID=str(node), SLURM_GPUS_ON_NODE="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for node in (0, 1)]


def start_srun(run_dir: Path, shards: Path, job_id: str) -> list[subprocess.Popen]:
    """`srun --nodes=2 --ntasks-per-node=1 mst-ds train ...`: one task per (here CPU) device, no launcher."""
    cmd = [sys.executable, "-m", "mst_ds.cli", "train", "--preset", "tiny", "--run-dir", str(run_dir), *_sets(shards)]
    procs = []
    for task in (0, 1):
        env = _allocation(job_id, SLURM_PROCID=str(task), SLURM_LOCALID="0", SLURM_NODEID=str(task),
                          SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_STEP_ID="0",
                          SLURM_STEP_NODELIST=NODES)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def finish_all(procs: list[subprocess.Popen]) -> None:
    results = [finish(p) for p in procs]
    assert all(rc == 0 for rc, _ in results), "\n".join(out[-2500:] for _, out in results)


def preempt_at_random_step(procs: list[subprocess.Popen], run_dir: Path) -> int:
    """SIGTERM to every process group once the run passed a random step after its first checkpoint;
    every process must then exit 75 (its step saved), as the sbatch templates requeue on.

    The groups are frozen (SIGSTOP) the moment the step is seen, so the step the SIGTERM lands in is known
    however loaded the machine is: before this, a test process descheduled for a second let an 8-step run
    reach its last step first, and the run legitimately finished instead of being preempted."""
    kill_at = random.Random().randint(3, STEPS // 2)  # at least STEPS/2 steps left to stop in
    deadline = time.monotonic() + 900  # a loaded machine may first JIT-build DeepSpeed's CPU comm op
    reached = False
    while not reached and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        reached = (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= kill_at
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), f"run ended before the preemption at step {kill_at}"
    assert reached, f"step {kill_at} not reached in 900 s"
    for p in procs:
        os.killpg(p.pid, signal.SIGSTOP)
    logged = records(run_dir)[-1]["step"]
    assert logged < STEPS - 1, f"step {logged} of {STEPS} logged before the run could be frozen"
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
        os.killpg(p.pid, signal.SIGCONT)
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=60)[0])
        except subprocess.TimeoutExpired:  # SLURM's KillWait is over: SIGKILL
            os.killpg(p.pid, signal.SIGKILL)
            outs.append(p.communicate()[0])
    assert all(p.returncode == job.EXIT_STOPPED for p in procs), "\n".join(o[-2500:] for o in outs)
    newest = ckpt.newest_complete(run_dir / ckpt.CKPT_SUBDIR)
    saved = ckpt.read_meta(run_dir / ckpt.CKPT_SUBDIR / newest)["step"] if newest else None
    # The vote rides in the next step's all-reduce: the step after the one logged, or the one after it if
    # the ranks were frozen past that all-reduce but before its record.
    assert saved in (logged + 1, logged + 2), (saved, logged)
    print(f"preempted at step {logged}")
    return logged


@pytest.fixture(scope="module")
def launcher_run(tmp_path_factory, digits_shards, deepspeed_cpu) -> Path:
    """launch.sh inside the faked allocation, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("slurm") / "launcher"
    finish_all(start_launch_sh(run_dir, digits_shards, _job_id()))
    return run_dir


def test_launch_sh_in_an_allocation_is_a_two_node_job(launcher_run):
    import json

    assert json.loads((launcher_run / "run_info.json").read_text())["derived"]["world_size"] == 2
    assert (launcher_run / "checkpoints" / ckpt.tag_for(STEPS) / "rng_rank00001.pt").exists()
    assert [r["step"] for r in records(launcher_run)] == list(range(1, STEPS + 1))
    assert cluster.run_finished(launcher_run)


def test_srun_tasks_preempted_and_requeued_end_like_the_launcher_run(launcher_run, digits_shards, tmp_path):
    run_dir, job = tmp_path / "srun", _job_id()
    preempt_at_random_step(start_srun(run_dir, digits_shards, job), run_dir)
    assert not cluster.run_finished(run_dir)  # the sbatch template requeues on this
    finish_all(start_srun(run_dir, digits_shards, job))  # the requeued job: same id, same command
    assert cluster.run_finished(run_dir)
    assert_same_run(launcher_run, run_dir)


def test_launch_sh_preempted_and_requeued_is_bit_identical(launcher_run, digits_shards, tmp_path):
    run_dir, job = tmp_path / "launcher_requeued", _job_id()
    preempt_at_random_step(start_launch_sh(run_dir, digits_shards, job), run_dir)
    finish_all(start_launch_sh(run_dir, digits_shards, job))
    assert_same_run(launcher_run, run_dir)
