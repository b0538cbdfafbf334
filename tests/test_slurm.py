"""SLURM logic without SLURM: node-list expansion, task variables → torch ranks, the allocation's hostfile,
the requeue check, and launch.sh building its launcher command from a faked allocation (fast, default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mst_ds import cluster
from mst_ds.config import UsageError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("nodelist, hosts", [
    ("node001", ["node001"]),
    ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
    ("a[1-2],b3,c[05]", ["a1", "a2", "b3", "c05"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("dcu-[3,1]-x", ["dcu-3-x", "dcu-1-x"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
])
def test_expand_nodelist_like_scontrol(nodelist, hosts):
    assert cluster.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "n[[1]]", "n[3-1]", "n[a-b]", "", "n[1-2]x[", ","])
def test_bad_nodelist_is_one_clear_error(bad):
    with pytest.raises(UsageError, match="node list"):
        cluster.expand_nodelist(bad)


def test_hostnames_falls_back_to_the_expander_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cluster.hostnames("n[1-3]") == ["n1", "n2", "n3"]


@pytest.mark.parametrize("env, gpus", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "v100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "2(x4)"}, 2),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "4"}, 8),
    ({}, None),
])
def test_gpus_per_node(env, gpus):
    assert cluster.gpus_per_node(env) == gpus


def test_hostfile_text_and_duplicates():
    assert cluster.hostfile_text(["a1", "a2"], 4) == "a1 slots=4\na2 slots=4\n"
    with pytest.raises(UsageError, match="more than once"):
        cluster.hostfile_text(["a1", "a1"], 4)
    with pytest.raises(UsageError):
        cluster.hostfile_text(["a1"], 0)


def _task(procid: int, localid: int, **extra: str) -> dict[str, str]:
    return {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NTASKS": "8",
            "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "987654", "SLURM_JOB_NODELIST": "dcu[07-08]",
            "SLURM_NTASKS_PER_NODE": "4", **extra}


def test_every_task_of_a_job_gets_its_rank_and_the_same_rendezvous():
    envs = [cluster.torch_env_from_slurm(_task(r, r % 4)) for r in range(8)]
    assert [e["RANK"] for e in envs] == [str(r) for r in range(8)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"] * 2
    assert {e["WORLD_SIZE"] for e in envs} == {"8"}
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"4"}
    assert {e["MASTER_ADDR"] for e in envs} == {"dcu07"}
    ports = {e["MASTER_PORT"] for e in envs}
    assert len(ports) == 1 and 1024 < int(ports.pop()) < 32768
    # A requeued job keeps its id (same port); another job gets another port.
    assert cluster.port_for_job("987654") == cluster.port_for_job(987654) != cluster.port_for_job("987655")


def test_user_master_and_step_nodelist_win():
    env = cluster.torch_env_from_slurm(_task(0, 0, MASTER_ADDR="10.0.0.1", MASTER_PORT="4000"))
    assert "MASTER_ADDR" not in env and "MASTER_PORT" not in env  # the user's values stay
    env = cluster.torch_env_from_slurm(_task(0, 0, SLURM_STEP_NODELIST="dcu08"))
    assert env["MASTER_ADDR"] == "dcu08"


def test_only_srun_tasks_without_a_launcher_rank_are_mapped():
    assert cluster.is_srun_task(_task(1, 1))
    assert not cluster.is_srun_task({**_task(1, 1), "RANK": "1", "WORLD_SIZE": "8"})  # deepspeed/torchrun set it
    batch_script = {k: v for k, v in _task(0, 0).items() if k != "SLURM_STEP_ID"}
    assert not cluster.is_srun_task(batch_script)
    assert not cluster.is_srun_task({})


@pytest.mark.parametrize("change, match", [
    ({"SLURM_PROCID": "8"}, "outside"),
    ({"SLURM_NTASKS": "x"}, "integers"),
    ({"SLURM_JOB_NODELIST": ""}, "NODELIST"),
])
def test_inconsistent_task_variables_fail_with_one_line(change, match):
    with pytest.raises(UsageError, match=match):
        cluster.torch_env_from_slurm({**_task(0, 0), **change})


# A well-formed complete.json of step 4 (a malformed marker is a damaged tag, issue 20).
MARKER = {"samples": 32, "step": 4, "world_size": 1, "zero_stage": 2, "config_hash": "0" * 16, "files": {}}


def test_run_finished(tmp_path):
    run = tmp_path / "run"
    assert not cluster.run_finished(run)
    (run / "checkpoints" / "step00000004").mkdir(parents=True)
    (run / "run_info.json").write_text(json.dumps({"derived": {"total_steps": 100, "global_batch": 8}}))
    (run / "config.yaml").write_text("run:\n  max_steps: 6\n")
    tag = run / "checkpoints" / "step00000004"
    (tag / "complete.json").write_text(json.dumps(MARKER))
    assert not cluster.run_finished(run)
    (run / "config.yaml").write_text("run:\n  max_steps: 4\n")
    assert cluster.run_finished(run)


def _fake_allocation(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment with a SLURM allocation and a `deepspeed` on PATH that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "deepspeed"
    fake.write_text('#!/usr/bin/env bash\nfor a in "$@"; do echo "ARG $a"; done\n'
                    'h=""; while [[ $# -gt 0 ]]; do [[ $1 == --hostfile ]] && h=$2; shift; done; cat "$h"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    venv = Path(sys.executable).parent  # launch.sh then skips activating .venv (whose deepspeed is real)
    env.update(PATH=f"{bin_dir}:{venv}:/usr/bin:/bin", VIRTUAL_ENV=str(venv.parent), DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="dcu[01-03]", **extra)
    return env


def _data(shards: Path, tmp_path: Path) -> list[str]:
    """What launch.sh's pre-launch check needs: real shards and a run directory of the test's own."""
    return ["--set", f"data.train={shards}", "--run-dir", str(tmp_path / "run")]


def test_launch_sh_builds_the_hostfile_from_the_allocation(tmp_path, digits_shards):
    res = subprocess.run([str(ROOT / "launch.sh"), "--preset", "tiny", *_data(digits_shards, tmp_path)],
                         env=_fake_allocation(tmp_path, SLURM_GPUS_ON_NODE="4"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    args = [line[4:] for line in res.stdout.splitlines() if line.startswith("ARG ")]
    assert "dcu01 slots=4\ndcu02 slots=4\ndcu03 slots=4\n" in res.stdout
    assert args[args.index("--master_addr") + 1] == "dcu01"
    assert int(args[args.index("--master_port") + 1]) > 0
    hostfile = args[args.index("--hostfile") + 1]
    assert not Path(hostfile).exists()  # the temporary hostfile is removed after the launcher ends


def test_launch_sh_no_ssh_per_node_agrees_on_port_and_takes_node_rank(tmp_path, digits_shards):
    outs = []
    for node in (0, 1):
        env = _fake_allocation(tmp_path, SLURM_NODEID=str(node))
        res = subprocess.run([str(ROOT / "launch.sh"), "--preset", "tiny", "--gpus-per-node", "2", "--no_ssh",
                              *_data(digits_shards, tmp_path)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        outs.append([line[4:] for line in res.stdout.splitlines() if line.startswith("ARG ")])
        assert "dcu03 slots=2\n" in res.stdout
    for node, args in enumerate(outs):
        assert args[args.index("--node_rank") + 1] == str(node)
        assert args[args.index("--master_port") + 1] == str(cluster.port_for_job(4242))


def test_launch_sh_without_gpu_count_fails_with_one_line(tmp_path):
    res = subprocess.run([str(ROOT / "launch.sh"), "--preset", "tiny"], env=_fake_allocation(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "GPUs per node unknown" in res.stderr and "ARG" not in res.stdout


def _run_dir(path: Path, *, done: bool) -> Path:
    (path / "checkpoints" / "step00000004").mkdir(parents=True)
    (path / "run_info.json").write_text(json.dumps({"derived": {"total_steps": 100, "global_batch": 8}}))
    (path / "config.yaml").write_text(f"run:\n  max_steps: {4 if done else 6}\n")
    (path / "checkpoints" / "step00000004" / "complete.json").write_text(json.dumps(MARKER))
    return path


@pytest.mark.parametrize("template, srun_rc, done, requeued", [
    ("dcu_32x4.sbatch", 0, False, True), ("dcu_32x4.sbatch", 0, True, False), ("dcu_32x4.sbatch", 1, False, False),
    ("v100_4x8.sbatch", 0, False, True)])
def test_sbatch_template_trains_then_requeues_until_the_run_is_done(tmp_path, template, srun_rc, done, requeued):
    """The template as sbatch runs it, with srun / scontrol replaced by recorders: one srun step of
    `mst-ds train` with the loader workers and time limit from the allocation; requeue only while the run
    directory is not finished and the step succeeded."""
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {tmp_path}/{tool}.log\n'
                                    + ("exit $FAKE_SRUN_RC\n" if tool == "srun" else ""))
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "VIRTUAL_ENV"}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="4",
               SLURM_NTASKS="32", SLURM_CPUS_PER_TASK="8", SLURM_JOB_END_TIME=str(int(time.time()) + 3600),
               RUN_DIR=str(_run_dir(tmp_path / "run", done=done)), FAKE_SRUN_RC=str(srun_rc))
    res = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / template)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == srun_rc, res.stdout + res.stderr
    srun = (tmp_path / "srun.log").read_text().split()
    assert "--kill-on-bad-exit=1" in srun and "train" in srun
    assert "data.num_workers=7" in srun
    limit = next(float(a.split("=")[1]) for a in srun if a.startswith("run.time_limit_min="))
    assert 40 <= limit <= 45  # 60 min left − the 15-min margin
    assert (tmp_path / "scontrol.log").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]


# Issue 20, defect 9 -----------------------------------------------------------------------------------
def _fake_sbatch(tmp_path: Path, template: str, srun_rc: int = 0, *, squeue: str | None = None, **env_extra: str):
    """The template run as sbatch runs it; srun / scontrol / squeue record their arguments, one a line."""
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {tmp_path}/{tool}.log\n'
                                    + ("exit $FAKE_SRUN_RC\n" if tool == "srun" else ""))
        (bin_dir / tool).chmod(0o755)
    if squeue is not None:
        (bin_dir / "squeue").write_text(f"#!/usr/bin/env bash\necho {squeue}\n")
        (bin_dir / "squeue").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "VIRTUAL_ENV"}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="4",
               SLURM_NTASKS="32", SLURM_CPUS_PER_TASK="8", RUN_DIR=str(_run_dir(tmp_path / "run", done=False)),
               FAKE_SRUN_RC=str(srun_rc), **env_extra)
    if squeue is None:
        env["SLURM_JOB_END_TIME"] = str(int(time.time()) + 3600)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / template)], env=env, capture_output=True, text=True,
                         timeout=120)
    srun = (tmp_path / "srun.log").read_text().splitlines() if (tmp_path / "srun.log").exists() else []
    return res, srun


@pytest.mark.parametrize("squeue, limit", [("UNLIMITED", None), ("1-02:03:04", 26 * 60 + 3 - 15), ("45:00", 30)])
def test_sbatch_template_reads_squeue_time_left_including_unlimited(tmp_path, squeue, limit):
    """Older Slurm (no SLURM_JOB_END_TIME): squeue %L. UNLIMITED used to stop the job at once (exit 2)."""
    res, srun = _fake_sbatch(tmp_path, "dcu_32x4.sbatch", squeue=squeue)
    assert res.returncode == 0, res.stdout + res.stderr
    limits = [a for a in srun if a.startswith("run.time_limit_min=")]
    assert limits == ([] if limit is None else [f"run.time_limit_min={limit}"])


@pytest.mark.parametrize("template", ["dcu_32x4.sbatch", "v100_4x8.sbatch"])
def test_sbatch_template_passes_shards_with_a_space_as_one_argument(tmp_path, template):
    res, srun = _fake_sbatch(tmp_path, template, SHARDS="/data/image net/train")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "data.train=/data/image net/train" in srun


@pytest.mark.parametrize("template", ["dcu_32x4.sbatch", "v100_4x8.sbatch"])
def test_sbatch_template_requeues_a_run_stopped_by_a_signal(tmp_path, template):
    """Ranks stopped by SIGTERM/SIGUSR1 save their step and exit 75: the job goes back in the queue;
    the templates ask SLURM for SIGUSR1 on every task shortly before the time limit."""
    from mst_ds.job import EXIT_STOPPED

    res, _ = _fake_sbatch(tmp_path, template, srun_rc=EXIT_STOPPED)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
    text = (ROOT / "scripts" / "slurm" / template).read_text()
    assert "#SBATCH --signal=USR1@" in text  # to the tasks (B: would signal only the batch shell)


def test_srun_task_without_ntasks_is_refused_not_a_world_of_one():
    env = {k: v for k, v in _task(3, 3).items() if k != "SLURM_NTASKS"}
    assert cluster.is_srun_task(env)
    with pytest.raises(UsageError, match="SLURM_NTASKS"):
        cluster.torch_env_from_slurm(env)


def test_a_reserved_step_port_wins_over_the_job_id():
    """srun --resv-ports: SLURM hands each step its own ports (no two steps on a node share them)."""
    env = cluster.torch_env_from_slurm(_task(0, 0, SLURM_STEP_RESV_PORTS="23001-23002"))
    assert env["MASTER_PORT"] == "23001"


def test_jobs_whose_ports_collide_are_told_in_one_line(tmp_path):
    """Jobs 1234 and 21234 derive the same port; the second job's rank 0 finds it taken and stops with
    one line naming the port, before any rendezvous (it used to be an EADDRINUSE traceback, or — for the
    other ranks — a rendezvous with the first job)."""
    import socket
    import sys

    assert cluster.port_for_job(1234) == cluster.port_for_job(21234)  # a pure function of the id must repeat
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(MASTER_PORT=str(port), PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
        res = subprocess.run([sys.executable, "-c", "import sys; from mst_ds import engine; "
                              "from mst_ds.cli import main, error_exit; from mst_ds.config import ConfigError\n"
                              "try:\n    engine.init_distributed()\n"
                              "except ConfigError as err:\n    sys.exit(error_exit(str(err)))"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("mst-ds")]
    assert len(lines) == 1 and f"MASTER_PORT {port}" in lines[0], res.stderr[-2000:]
