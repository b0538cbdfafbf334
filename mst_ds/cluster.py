"""SLURM allocations as the clusters run them: node lists, ranks from ``srun``, hostfiles, requeue checks.

Two ways to start a job on SLURM, both ending in the same ``mst-ds train``:

* ``launch.sh`` inside an allocation builds a DeepSpeed hostfile from ``SLURM_JOB_NODELIST``
  (:func:`hostfile_text`) and starts the DeepSpeed launcher as on any cluster;
* ``srun … mst-ds train …`` with one task per GPU: every task reads its rank from SLURM's variables
  (:func:`torch_env_from_slurm`), called by :func:`mst_ds.engine.init_distributed` when the usual
  ``RANK``/``WORLD_SIZE`` are absent. No launcher, no pdsh, no ssh.

Node lists use SLURM's hostlist syntax (``node[001-004,007],gpu-a[1-2]``). ``scontrol show hostnames``
is the authority when it is installed; :func:`expand_nodelist` is the fallback (and what the tests run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from mst_ds.config import UsageError
from mst_ds.run_dir import RunDir

# All tasks of a job must agree on the rendezvous port without talking to each other: it is a port SLURM
# reserved for the step (srun --resv-ports), else derived from the job id. Below the Linux ephemeral
# range (32768+), away from the well-known ports. Ids PORT_SPAN apart share a port: the job that comes
# second finds it taken on its first node and stops in one line (port_in_use), before any rendezvous.
PORT_BASE, PORT_SPAN = 12000, 20000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise UsageError(f"node list {text!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UsageError(f"node list {text!r}: unbalanced ']'")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise UsageError(f"node list {text!r}: unbalanced '['")
    parts.append(text[start:])
    return parts


def _expand_ranges(spec: str, whole: str) -> list[str]:
    """``001-003,007`` → ['001', '002', '003', '007'] (zero padding kept from the range's start)."""
    out = []
    for item in spec.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise UsageError(f"node list {whole!r}: bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise UsageError(f"node list {whole!r}: descending range {item!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM hostlist → host names in order, as ``scontrol show hostnames`` prints them.

    ``node[001-004,007]`` → node001 … node004, node007; several bracket groups multiply
    (``r[1-2]n[1-2]`` → r1n1 r1n2 r2n1 r2n2); a comma outside brackets separates host expressions.
    """
    hosts: list[str] = []
    for expr in _split_top(nodelist.strip()):
        expr = expr.strip()
        if not expr:
            continue
        names = [""]
        for piece in re.split(r"(\[[^\]]*\])", expr):
            if piece.startswith("["):
                names = [n + x for n in names for x in _expand_ranges(piece[1:-1], nodelist)]
            elif piece:
                names = [n + piece for n in names]
        hosts += names
    if not hosts:
        raise UsageError(f"node list {nodelist!r}: no hosts")
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames NODELIST`` when scontrol is installed, else :func:`expand_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        res = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        if res.returncode == 0 and res.stdout.split():
            return res.stdout.split()
    return expand_nodelist(nodelist)


def _leading_int(value: str) -> int | None:
    """``4``, ``4(x2)``, ``a100:4`` → 4 (SLURM's per-node counts come in these shapes)."""
    m = re.match(r"^(?:[^:,()]*:)?(\d+)", value.strip())
    return int(m.group(1)) if m else None


def gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs of this allocation per node: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, or None."""
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(var):
            n = _leading_int(env[var])
            if n:
                return n
    return None


def hostfile_text(hosts: list[str], slots: int) -> str:
    """DeepSpeed hostfile: one ``host slots=N`` line per host (duplicates refused: one line per node)."""
    if slots < 1:
        raise UsageError(f"slots per node must be ≥ 1 (got {slots})")
    dup = sorted({h for h in hosts if hosts.count(h) > 1})
    if dup:
        raise UsageError(f"node list names {', '.join(dup)} more than once")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def port_for_job(job_id: str | int) -> int:
    """The rendezvous port of a SLURM job: the same on every task and after a requeue."""
    try:
        jid = int(str(job_id).split("_")[0])  # array tasks: "1234_5" → 1234 (then SLURM_JOB_ID differs anyway)
    except ValueError:
        raise UsageError(f"SLURM_JOB_ID {job_id!r}: expected a number") from None
    return PORT_BASE + jid % PORT_SPAN


def is_srun_task(env: Mapping[str, str]) -> bool:
    """A task started by ``srun`` (a job step), not the batch script or an ``salloc`` shell, and not a
    process some launcher already gave a rank. Its other variables are checked by
    :func:`torch_env_from_slurm` (a task without SLURM_NTASKS is refused, never a world of one)."""
    return "RANK" not in env and "WORLD_SIZE" not in env and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


def port_in_use(port: int) -> bool:
    """Whether a listening socket holds ``port`` on this host (a TIME_WAIT leftover does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore binds
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def torch_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """SLURM task variables → torch.distributed's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

    Master = first host of the step's node list (where task 0 runs under SLURM's default block
    distribution); port from the job id unless MASTER_PORT / MASTER_ADDR are set by the user.
    """
    try:
        rank, world, local = (int(env[v]) for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    except KeyError as err:
        raise UsageError(f"srun task without {err.args[0]}: cannot place this process") from None
    except ValueError:
        raise UsageError("SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID: expected integers") from None
    if not 0 <= rank < world:
        raise UsageError(f"SLURM_PROCID={rank} outside SLURM_NTASKS={world}")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}
    if env.get("SLURM_NTASKS_PER_NODE"):
        out["LOCAL_WORLD_SIZE"] = str(_leading_int(env["SLURM_NTASKS_PER_NODE"]))
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise UsageError("srun task without SLURM_JOB_NODELIST: cannot find the master node")
        out["MASTER_ADDR"] = hostnames(nodelist)[0]
    if "MASTER_PORT" not in env:
        reserved = re.match(r"^(\d+)", env.get("SLURM_STEP_RESV_PORTS", ""))
        if reserved:
            out["MASTER_PORT"] = reserved.group(1)
        elif "SLURM_JOB_ID" not in env:
            raise UsageError("srun task without SLURM_JOB_ID: set MASTER_PORT")
        else:
            out["MASTER_PORT"] = str(port_for_job(env["SLURM_JOB_ID"]))
    return out


def run_finished(run_dir: str | Path) -> bool:
    """Whether a run directory's newest complete checkpoint is its last step (the sbatch templates
    requeue the job while it is not)."""
    import yaml

    from mst_ds import checkpoint as ckpt

    run = RunDir(run_dir)
    info, cfg_path = run.run_info, run.config
    if not info.exists() or not cfg_path.exists():
        return False
    derived = json.loads(info.read_text())["derived"]
    max_steps = (yaml.safe_load(cfg_path.read_text()).get("run") or {}).get("max_steps")
    end = min(derived["total_steps"], max_steps or derived["total_steps"])
    tag = ckpt.newest_complete(run.checkpoints)
    # The position is the samples seen (a resume may change the global batch; schedules follow samples).
    return tag is not None and ckpt.read_meta(run.tag(tag))["samples"] >= end * derived["global_batch"]


def main(argv: list[str] | None = None) -> int:
    """Helpers for launch.sh and the sbatch templates (not a user command; ``mst-ds`` declares those):

    ``python -m mst_ds.cluster hostfile OUT [SLOTS]``  the allocation's hostfile → prints the master host
    ``python -m mst_ds.cluster finished RUN_DIR``      exit 0 if the run is done, 3 if it should go on
    """
    import sys

    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) in (2, 3) and argv[0] == "hostfile":
            env = os.environ
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise UsageError("no SLURM_JOB_NODELIST: not inside a SLURM allocation (give --hostfile)")
            slots = int(argv[2]) if len(argv) == 3 else gpus_per_node(env)
            if not slots:
                raise UsageError("GPUs per node unknown: the allocation sets no SLURM_GPUS_ON_NODE (give --gpus-per-node)")
            hosts = hostnames(nodelist)
            Path(argv[1]).write_text(hostfile_text(hosts, slots))
            print(hosts[0])
            return 0
        if len(argv) == 2 and argv[0] == "finished":
            return 0 if run_finished(argv[1]) else 3
    except (UsageError, ValueError) as err:
        print(f"mst_ds.cluster: error: {err}", file=sys.stderr)
        return 2
    print("usage: python -m mst_ds.cluster hostfile OUT [SLOTS] | finished RUN_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
