"""Multi-process DeepSpeed on CPU through the real launchers: 2 ranks vs 1, two "nodes", SIGKILL at a
random step and during a checkpoint save, resume on another world size (universal checkpoint), and a
NaN that stops the run. Slow (each launch pays ~8 s of imports per process): ``pytest -m slow``."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_SETS

from mst_ds import checkpoint as ckpt

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STEPS = 8


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **extra})
    return env


def _sets(shards: Path, *more: str) -> list[str]:
    out = []
    for s in [*TRAIN_SETS, f"data.train={shards}", f"run.max_steps={STEPS}", *more]:
        out += ["--set", s]
    return out


def launch(run_dir: Path, shards: Path, *, procs: int = 2, extra: tuple[str, ...] = (), sets: tuple[str, ...] = (),
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """./launch.sh --cpu N (deepspeed launcher) in its own process group."""
    cmd = [str(ROOT / "launch.sh"), "--cpu", str(procs), "--preset", "tiny", "--run-dir", str(run_dir),
           "--master_port", str(_port()), *extra, *_sets(shards, *sets)]
    return subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def single(run_dir: Path, shards: Path, *sets: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m mst_ds.cli train` as one bare process."""
    cmd = [sys.executable, "-m", "mst_ds.cli", "train", "--preset", "tiny", "--run-dir", str(run_dir),
           *_sets(shards, *sets)]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=600)


def finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Loss history and final teacher / student bit-identical."""
    assert [r["loss"] for r in records(a)] == [r["loss"] for r in records(b)]
    t_a, s_a = ckpt.load_teacher_student(a)
    t_b, s_b = ckpt.load_teacher_student(b)
    assert all(torch.equal(t_a[k], t_b[k]) for k in t_a), "teachers differ"
    assert all(torch.equal(s_a[k], s_b[k]) for k in s_a), "students differ"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, digits_shards, deepspeed_cpu) -> Path:
    """An uninterrupted 2-process run of STEPS steps (checkpoints every 2)."""
    run_dir = tmp_path_factory.mktemp("dist") / "uninterrupted"
    rc, out = finish(launch(run_dir, digits_shards))
    assert rc == 0, out[-3000:]
    return run_dir


def test_two_processes_match_one_process(tmp_path, deepspeed_cpu):
    """ZeRO-2, same global batch of 8: 1 rank × 8 vs 2 ranks × 4 (torchrun); tolerance 1e-5 relative
    (fp32; reductions run in a different order)."""
    worker = str(ROOT / "tests" / "dist_worker.py")
    one = subprocess.run([sys.executable, worker, str(tmp_path / "w1.json")], env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_port()), worker, str(tmp_path / "w2.json")], env=_env(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("w1.json", "w2.json"))
    assert (a["world"], b["world"]) == (1, 2)
    for la, lb in zip(a["losses"], b["losses"]):
        assert lb == pytest.approx(la, rel=1e-5)


def test_two_nodes_with_no_ssh_train_like_two_local_ranks(two_rank_run, digits_shards, tmp_path):
    """Two launches with --no_ssh --node_rank 0|1 --master_addr 127.0.0.1 = one 2-rank job."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir, port = tmp_path / "two_nodes", str(_port())
    procs = []
    for node in (0, 1):
        cmd = [str(ROOT / "launch.sh"), "--preset", "tiny", "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
               str(node), "--master_addr", "127.0.0.1", "--master_port", port, "--run-dir", str(run_dir),
               *_sets(digits_shards)]
        procs.append(subprocess.Popen(cmd, env=_env(DS_ACCELERATOR="cpu"), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    results = [finish(p) for p in procs]
    assert all(rc == 0 for rc, _ in results), results[0][1][-2000:] + results[1][1][-2000:]
    assert json.loads((run_dir / "run_info.json").read_text())["derived"]["world_size"] == 2
    assert (run_dir / "checkpoints" / ckpt.tag_for(STEPS) / "rng_rank00001.pt").exists()
    # Same ranks, samples and seeds as one node with 2 processes; not bit-equal, because 2 local ranks
    # reduce through DeepSpeed's shared-memory op and 2 "nodes" through gloo (other summation order).
    a, b = records(two_rank_run), records(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)


def test_sigkill_at_a_random_step_then_relaunch_is_bit_identical(two_rank_run, digits_shards, tmp_path):
    kill_at = random.Random().randint(3, STEPS - 2)
    run_dir = tmp_path / "killed"
    p = launch(run_dir, digits_shards)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= kill_at:
            break
        time.sleep(0.05)
    assert p.poll() is None, f"run ended before the kill at step {kill_at}"
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step
    p.communicate()
    assert ckpt.newest_complete(run_dir / "checkpoints") is not None
    rc, out = finish(launch(run_dir, digits_shards))
    assert rc == 0, out[-3000:]
    print(f"killed at step {kill_at}")
    assert_same_run(two_rank_run, run_dir)


def test_kill_during_checkpoint_save_resumes_from_the_previous_one(trained_run, digits_shards, tmp_path):
    """SIGKILL inside the save of step 4: step 2 stays the resume point; the relaunch ends like the
    uninterrupted 4-step run of conftest."""
    run_dir = tmp_path / "killed_in_save"
    res = single(run_dir, digits_shards, "run.max_steps=4", env=_env(MST_DS_FAULT="kill_in_save@4"))
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step00000004").is_dir()
    assert not ckpt.is_complete(run_dir / "checkpoints" / "step00000004")
    assert ckpt.newest_complete(run_dir / "checkpoints") == "step00000002"
    res = single(run_dir, digits_shards, "run.max_steps=4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(trained_run, run_dir)


def test_two_rank_checkpoint_resumes_on_one_rank_through_universal(two_rank_run, digits_shards, tmp_path):
    from mst_ds.config import derive, load_config
    from mst_ds.data.manifest import Manifest
    from mst_ds.schedules import Schedules

    run_dir = tmp_path / "universal"
    shutil.copytree(two_rank_run, run_dir)
    res = single(run_dir, digits_shards, f"run.max_steps={STEPS + 2}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert ckpt.is_complete(run_dir / "checkpoints" / f"{ckpt.tag_for(STEPS)}{ckpt.UNIVERSAL_SUFFIX}")
    recs = records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 3))
    assert [r["loss"] for r in recs[:STEPS]] == [r["loss"] for r in records(two_rank_run)]
    cfg = load_config("tiny", [*TRAIN_SETS, f"data.train={digits_shards}"]).config
    sched = Schedules.from_config(cfg, derive(cfg, 1, Manifest.load(str(digits_shards)).total))
    for r in recs[STEPS:]:  # the schedules continue from the step count
        assert r["lr"] == pytest.approx(sched.at(r["step"] - 1).lr)
    # The student's buffers came along (the universal format holds parameters and optimizer state only):
    # the DINO center keeps growing from where it was instead of restarting from zero.
    assert recs[STEPS]["center_norm"] > recs[STEPS - 1]["center_norm"] > 2 * recs[0]["center_norm"]


def test_injected_nan_stops_cleanly_and_keeps_the_last_good_checkpoint(digits_shards, tmp_path):
    """Rank 0's loss is NaN at step 3: both ranks stop (exit 1) without saving; step 2 loads."""
    run_dir = tmp_path / "nan"
    rc, out = finish(launch(run_dir, digits_shards, env=_env(MST_DS_FAULT="nan@3")))
    assert rc != 0
    assert "non-finite loss at step 3" in out
    assert ckpt.complete_tags(run_dir / "checkpoints") == ["step00000002"]
    teacher, student = ckpt.load_teacher_student(run_dir)
    assert all(torch.isfinite(v).all() for v in teacher.values() if v.is_floating_point())
    assert [r["step"] for r in records(run_dir)] == [1, 2]


def test_sigkill_with_the_online_knn_monitor_on_is_bit_identical(two_rank_run, digits_shards, tmp_path):
    """Issue 10: the monitor (every 2 steps, 2 ranks each extracting their slice) and the health
    diagnostics change nothing: a run with them, SIGKILLed and relaunched, ends bit-identical to the
    uninterrupted run without them."""
    monitor = (f"eval.monitor.bank={digits_shards.parent / 'folder' / 'val'}", "eval.monitor.every_steps=2",
               "eval.monitor.num_workers=0", "eval.monitor.k=10")
    kill_at = random.Random().randint(3, STEPS - 2)
    run_dir = tmp_path / "killed_monitor"
    p = launch(run_dir, digits_shards, sets=monitor)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= kill_at + 1:  # + the step-0 record
            break
        time.sleep(0.05)
    assert p.poll() is None, f"run ended before the kill at step {kill_at}"
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    rc, out = finish(launch(run_dir, digits_shards, sets=monitor))
    assert rc == 0, out[-3000:]
    recs = records(run_dir)
    assert [r["step"] for r in recs if "monitor_knn_top1" in r] == [0, 2, 4, 6, 8]
    assert [r["loss"] for r in recs if "loss" in r] == [r["loss"] for r in records(two_rank_run)]
    t_a, s_a = ckpt.load_teacher_student(two_rank_run)
    t_b, s_b = ckpt.load_teacher_student(run_dir)
    assert all(torch.equal(t_a[k], t_b[k]) for k in t_a) and all(torch.equal(s_a[k], s_b[k]) for k in s_a)


# Issue 18 (a structure-only refactor): the uninterrupted 2-rank run, pinned bit for bit (digests generated
# from the unmodified code of main at d6b1422).
PINNED_PLATFORM = "torch 2.14.1+cu130 AVX512 cpus 2"
PINNED = {"metrics": "d876288447cb7022", "checkpoint_files": "795ec72ddb10a90a", "teacher": "787ba6a510eb1369",
          "student": "1e74ae2f8026fa56", "export": "9131037c71c8172a"}


def test_a_fixed_two_rank_run_is_bit_identical_to_the_pinned_one(two_rank_run, tmp_path):
    from conftest import assert_pinned

    assert_pinned(two_rank_run, tmp_path / "teacher.safetensors", PINNED_PLATFORM, PINNED)
