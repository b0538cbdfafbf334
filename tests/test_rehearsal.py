"""bench/rehearsal.py: 16 CPU ranks (gloo, tiny, ZeRO-2, 2 loader workers each, 32 shards) — equal batches
per rank and each sample once per epoch, a 16-rank save resumed at 4 ranks through the universal
checkpoint with the schedule continued, bytes per rank per step and peak memory measured (slow: minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_ring_bytes_per_rank_follow_the_collective(tmp_path):
    """The comms logger's message sizes → what one rank sends per step under a ring algorithm."""
    from rehearsal import comm_table, wire_bytes

    assert wire_bytes("reduce_scatter_tensor", 100, 16) == 1500  # 15 chunks of 100 bytes pass through
    assert wire_bytes("all_gather_into_tensor", 100, 16) == 1500
    assert wire_bytes("all_reduce", 160, 16) == 300
    assert wire_bytes("broadcast", 7, 16) == 7
    (tmp_path / "rank0_1.json").write_text(json.dumps(
        {"rank": 0, "world": 4, "max_rss_kib": 2048, "ops": {"all_gather_into_tensor": {"10": 4}, "broadcast": {"8": 1}}}))
    (tmp_path / "rank1_2.json").write_text(json.dumps({"rank": 1, "world": 4, "max_rss_kib": 4096, "ops": {}}))
    t = comm_table(tmp_path, steps=2)
    assert t["ops"]["all_gather_into_tensor"] == {"calls": 4, "message_bytes": 40, "ring_bytes_per_step": 60.0}
    assert t["max_rss_mib"] == [2.0, 4.0] and t["world"] == 4
    assert t["bytes_per_step_per_rank"] == [60.0, 0.0]  # rank 0: 4 all-gathers of 10 B × (W − 1) / 2 steps; no broadcast


@pytest.mark.slow
def test_sixteen_ranks_split_the_data_evenly_resume_at_four_and_measure_their_traffic(deepspeed_cpu):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "rehearsal.py")], capture_output=True, text=True,
                         timeout=3600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    print(res.stdout[-4000:])  # the table (pytest -s shows it)
    line = next(x for x in res.stdout.splitlines() if x.startswith("REHEARSAL "))
    r = json.loads(line[len("REHEARSAL "):])
    split = r["split"]
    assert split["batches_per_rank"] and len(split["batches_per_rank"]) == 1 and split["batch_sizes"] == [2]
    assert split["seen"] == split["distinct"] == split["samples"] == 128
    assert r["resumed"]
    assert r["comm"]["world"] == 16 and len(r["comm"]["max_rss_mib"]) == 16
    # What DeepSpeed's ZeRO-2 moved is what `mst-ds plan` estimates (gradients all-reduced, parameters
    # all-gathered), on every rank.
    assert abs(r["measured_over_plan"] - 1) <= 0.1
    assert len(r["comm"]["bytes_per_step_per_rank"]) == 16
    assert max(r["comm"]["bytes_per_step_per_rank"]) <= 1.1 * min(r["comm"]["bytes_per_step_per_rank"])
