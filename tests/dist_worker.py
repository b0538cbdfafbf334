"""Worker for test_train_dist: a few ZeRO-2 steps on a fixed global batch, split over the ranks.

Randomness that would legitimately differ between 1 and N ranks is switched off (photometric
probabilities 0, masks deterministic with p = 1, no BN, whose statistics are per rank on CPU), so the
per-step losses of any world size must agree. Usage: python dist_worker.py OUT.json [--local_rank N]
"""

from __future__ import annotations

import json
import sys

import torch

from mst_ds import engine as eng
from mst_ds.config import derive, load_config
from mst_ds.train import train_step
from mst_ds.trainer import build_training

GLOBAL_BATCH, STEPS = 8, 3
SETS = [f"optim.batch_size={GLOBAL_BATCH}", "engine.zero_stage=2", "engine.precision=fp32", "run.schedule_steps=40",
        "augment.color_jitter_p=0", "augment.grayscale_p=0", "augment.blur_p=[0,0]", "augment.local_blur_p=0",
        "augment.solarize_p=[0,0]", "mask.prob=1.0", "model.head.use_bn=false", "decoder.use_bn=false"]


def main() -> None:
    rank, world = eng.init_distributed()
    cfg = load_config("tiny", SETS).config
    t, _ = build_training(cfg, derive(cfg, world, 64))
    G, L, per = cfg.augment.global_crop_size, cfg.augment.local_crop_size, GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        full = [torch.randint(0, 256, (GLOBAL_BATCH, 3, s, s), dtype=torch.uint8, generator=g)
                for s in [G, G] + [L] * cfg.augment.n_local_crops]
        mine = [v[rank * per:(rank + 1) * per] for v in full]
        stats = train_step(t, [{"global": mine[:2], "local": mine[2:]}])
        losses.append([stats[k] for k in ("loss", "dino", "restore")])
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world": world, "losses": losses}, f)


if __name__ == "__main__":
    main()
