"""Worker for tests/test_ema_partitions.py (2 gloo ranks under torchrun): the tiny model at ZeRO-1 and
ZeRO-2 bf16, two steps, then the EMA's masters gathered from the local fp32 partitions (one all-gather
per group) against ``safe_get_full_fp32_param`` (one all-reduce per parameter), for every parameter,
and the collectives each path makes (counted by torch's profiler: the c10d ops, no wrapper).
Usage: python -m torch.distributed.run --nproc_per_node 2 ema_partition_worker.py OUT.json
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch.profiler import ProfilerActivity, profile

from mst_ds import engine as eng
from mst_ds.config import derive, load_config
from mst_ds.train import train_step
from mst_ds.trainer import build_training

GLOBAL_BATCH = 4


def collectives(fn) -> tuple[object, int]:
    """fn() → (its result, number of c10d collectives it ran on this rank)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.name.startswith("c10d::") and "barrier" not in e.name)


def check_stage(stage: int, rank: int, world: int) -> dict:
    cfg = load_config("tiny", [f"optim.batch_size={GLOBAL_BATCH}", f"engine.zero_stage={stage}",
                               "engine.precision=bf16", "run.schedule_steps=40", "data.num_workers=0"]).config
    t, _ = build_training(cfg, derive(cfg, world, 64))
    G, L, per = cfg.augment.global_crop_size, cfg.augment.local_crop_size, GLOBAL_BATCH // world
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        full = [torch.randint(0, 256, (GLOBAL_BATCH, 3, s, s), dtype=torch.uint8, generator=g)
                for s in [G, G] + [L] * cfg.augment.n_local_crops]
        mine = [v[rank * per:(rank + 1) * per] for v in full]
        train_step(t, [{"global": mine[:2], "local": mine[2:]}])
    ema, student = t.ema, t.engine.module
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert ema.partitions is not None, "ZeRO-1/2 bf16 must take the partition path"
    new, n_new = collectives(ema.partitions.gather)
    old, n_old = collectives(lambda: {n: safe_get_full_fp32_param(p) for n, p in trainable})
    equal = [n for n, p in trainable if new[id(p)].dtype == torch.float32 and torch.equal(new[id(p)], old[n])]
    # the whole update: the teacher moved by the partition path equals one moved by the per-parameter masters
    teacher_old = copy.deepcopy(t.teacher)
    masters = dict(student.named_parameters())
    with torch.no_grad():
        for n, p in teacher_old.named_parameters():
            s = masters[n]
            src = old[n] if s.requires_grad else s.detach().float()
            p.mul_(0.9).add_(src, alpha=1 - 0.9)
    _, n_update = collectives(lambda: ema.update(0.9))
    same_teacher = all(torch.equal(a, b) for a, b in zip(t.teacher.parameters(), teacher_old.parameters()))
    rounded = sum(not torch.equal(new[id(p)], p.detach().float()) for _, p in trainable)
    return {"params": len(trainable), "equal": len(equal), "groups": len(t.engine.optimizer.single_partition_of_fp32_groups),
            "collectives_new": n_new, "collectives_old": n_old, "collectives_update": n_update,
            "same_teacher": same_teacher, "rounded": rounded}


def main() -> None:
    rank, world = eng.init_distributed()
    out = {"world": world, **{f"zero{s}": check_stage(s, rank, world) for s in (1, 2)}}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
