"""The run's record of corrupt samples: ``RUN/corrupt.jsonl`` and a total summed over ranks.

Each rank's loader hands over the samples that failed to decode (key, shard) as it delivers their
batches (``TrainLoader.take_corrupt``); they wait here until the next :meth:`CorruptLog.sync`, which
every rank calls at the same steps (log and checkpoint steps): the records are gathered, rank 0
appends them to the file, and every rank adds them to the run total. The total travels in the
checkpoint's client_state, and a sync precedes every save, so after a resume from step S the file is
cut back to the records of steps ≤ S (the later ones are met again, in the same batches) and agrees
with the total.
"""

from __future__ import annotations

import json
from pathlib import Path

from mst_ds.metrics import truncate_jsonl
from mst_ds.run_dir import RunDir


class CorruptLog:
    def __init__(self, run_dir: Path, *, rank: int, total: int = 0, start_step: int = 0) -> None:
        self.path = RunDir(run_dir).corrupt
        self.rank, self.total = rank, total
        self.pending: list[dict] = []
        if rank == 0:
            truncate_jsonl(self.path, start_step)  # records past the resume point are met again

    def collect(self, loader, step: int, epoch: int) -> None:
        """This rank's new corrupt samples (``step`` = the optimizer step whose batches held them)."""
        for record in loader.take_corrupt():
            self.pending.append({"step": step, "epoch": epoch, "rank": self.rank, **record})

    def sync(self) -> int:
        """Gather every rank's pending records (a collective: all ranks, same steps) → the run total."""
        import torch.distributed as dist

        records = self.pending
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[list[dict] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.pending)
            records = [r for part in parts for r in part or []]
        self.pending = []
        if records and self.rank == 0:
            records.sort(key=lambda r: (r["step"], r["rank"]))
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
                f.flush()
        self.total += len(records)
        return self.total
