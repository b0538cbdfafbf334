"""One rank of bench/rehearsal.py: `mst-ds train` (mst_ds.cli) as the DeepSpeed launcher starts it, which on
exit writes what the rank measured to $REHEARSAL_DIR/rank<R>.json: DeepSpeed's comms-logger records (op →
message bytes → count; the template enables the logger) and the process's peak resident memory."""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _dump() -> None:
    from deepspeed.comm.comm import comms_logger

    ops = {op: {str(size): rec[0] for size, rec in sizes.items()} for op, sizes in comms_logger.comms_dict.items()}
    rank = os.environ.get("RANK", "0")
    out = Path(os.environ["REHEARSAL_DIR"]) / f"rank{rank}_{os.getpid()}.json"
    out.write_text(json.dumps({"rank": int(rank), "world": int(os.environ.get("WORLD_SIZE", "1")), "ops": ops,
                               "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


if __name__ == "__main__":
    atexit.register(_dump)
    from mst_ds.cli import main

    sys.exit(main(sys.argv[1:]))
