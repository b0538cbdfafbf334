"""Issue 9, run side, through the real launchers (slow): one job per run directory, ranks that die with
their launcher, a full disk on two ranks, and concurrent first builds of DeepSpeed's CPU comm op."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_dist import _env, _port, _sets, finish, launch, records

from mst_ds import checkpoint as ckpt

pytestmark = pytest.mark.slow
LONG = 40  # steps of the job that is locked and killed (its ranks are frozen while the second job knocks)
ROOT = Path(__file__).resolve().parent.parent


def _rank_pids(run_dir: Path) -> list[int]:
    """Training ranks of ``run_dir`` (the launcher appends --local_rank to their command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [c.decode(errors="replace") for c in cmd]
        if str(run_dir) in text and any(c.startswith("--local_rank") for c in text) and "--check" not in text:
            pids.append(int(proc.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_one_job_per_run_dir_and_ranks_die_with_their_launcher(digits_shards, tmp_path, deepspeed_cpu):
    run_dir, long = tmp_path / "locked", f"run.max_steps={LONG}"
    # Its output goes to a file: an undrained pipe would stall the job (and so the test) when it fills.
    cmd = [str(ROOT / "launch.sh"), "--cpu", "2", "--preset", "tiny", "--run-dir", str(run_dir), "--master_port",
           str(_port()), *_sets(digits_shards, long)]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and records(run_dir):
            break
        time.sleep(0.1)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    # Frozen, the first job holds its lock for as long as the second job's pre-flight takes (tens of
    # seconds under load: long enough, unfrozen, for it to finish its 40 steps and let the second one in).
    ranks = _rank_pids(run_dir)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)

    # A second job on the same run directory: refused before any rank starts, naming the holder.
    rc, out = finish(launch(run_dir, digits_shards, sets=(long,)), timeout=300)
    errors = [ln for ln in out.splitlines() if ln.startswith("mst-ds:")]
    assert rc == 2 and len(errors) == 1 and "in use by another job (host" in errors[0], out[-2000:]

    # SIGKILL of launch.sh alone (not its process group): the DeepSpeed runner and launch.py survive
    # it, the ranks (running again) must not.
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    for pid in ranks:
        os.kill(pid, signal.SIGCONT)
    assert records(run_dir)[-1]["step"] < LONG, "the first job finished: nothing left to orphan"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(p) for p in ranks):
        time.sleep(0.2)
    assert not any(_alive(p) for p in ranks), "orphaned ranks kept training"

    # The lock died with them: a relaunch finishes the run, each step logged once.
    rc, out = finish(launch(run_dir, digits_shards, sets=(long,)))
    assert rc == 0, out[-3000:]
    assert [r["step"] for r in records(run_dir)] == list(range(1, LONG + 1))


@pytest.mark.parametrize("fault", ["enospc_in_save", "enospc_in_ds_save"])
def test_a_full_disk_on_two_ranks_is_one_line_exit_1(digits_shards, tmp_path, deepspeed_cpu, fault):
    """Rank 1's disk is full in our RNG-file write, or inside DeepSpeed's own writes (rank 0 then
    waits in DeepSpeed's closing barrier): both ranks stop, one line, exit 1, nothing left behind."""
    run_dir = tmp_path / "enospc"
    rc, out = finish(launch(run_dir, digits_shards, env=_env(MST_DS_FAULT=f"{fault}@4")))
    errors = [ln for ln in out.splitlines() if "mst-ds: error:" in ln]
    assert rc == 1 and len(errors) == 1 and "No space left on device" in errors[0], out[-3000:]
    assert "Traceback" not in out
    ckpt_dir = run_dir / "checkpoints"
    assert ckpt.complete_tags(ckpt_dir) == ["step00000002"] and not (ckpt_dir / "step00000004").exists()
    assert not list(ckpt_dir.rglob(".*.tmp-*")) and ckpt.damage(ckpt_dir / "step00000002") is None


def test_concurrent_first_builds_of_the_comm_op_both_succeed(tmp_path):
    """Two processes build DeepSpeed's CPU comm op at once into an empty TORCH_EXTENSIONS_DIR (what two
    ranks of a first launch do): both finish, one compiles, the other loads the result."""
    env = _env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    code = "from mst_ds.job import build_comm_op; build_comm_op(); print('built')"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("built" in o for o in outs)
    assert list((tmp_path / "ext").rglob("deepspeed_shm_comm*.so"))
