"""Fault injection for the tests: one object, read from the environment once when a command starts.

``MST_DS_FAULT=KIND@N`` (one fault per process):

- ``nan@N``                rank 0's loss is NaN in training step N
- ``kill_in_save@N``       the process SIGKILLs itself half-way through saving the checkpoint of step N
- ``enospc_in_save@N``     the last rank's RNG-file write of step N fails with ENOSPC
- ``enospc_in_ds_save@N``  the last rank's writes inside DeepSpeed's ``save_checkpoint`` fail with ENOSPC
- ``disk_full@N``          ``mst-shards write``: shard number N fails with ENOSPC after its first block

The default object injects nothing; hot paths ask it, never the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "MST_DS_FAULT"


@dataclass(frozen=True)
class Faults:
    spec: str = ""  # "KIND@N", or "" for none

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Faults:
        return cls(env.get(ENV, ""))

    def at(self, kind: str, step: int) -> bool:
        """Whether fault ``kind`` is armed for step (or shard) ``step``."""
        return bool(self.spec) and self.spec == f"{kind}@{step}"
