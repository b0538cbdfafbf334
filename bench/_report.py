"""The one machine-readable line every benchmark prints per target, collected by ``bench/run_all``."""

from __future__ import annotations

import json
import operator

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, "==": operator.eq}


def bench_line(name: str, ratio: float, op: str, target: float) -> bool:
    """Print ``BENCH {...}`` for ``ratio op target`` (e.g. 1.07 <= 1.15) → whether it is met."""
    met = bool(_OPS[op](ratio, target))
    print("BENCH " + json.dumps({"name": name, "ratio": round(float(ratio), 3), "target": f"{op} {target}", "met": met}),
          flush=True)
    return met
