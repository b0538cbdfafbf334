"""`run.loggers`: W&B in offline mode (no network) next to TensorBoard, rank 0 only; the resolved config
and run identity go with the tracked run, and a resumed run continues the same one."""

from __future__ import annotations

import json
import re

import pytest

from mst_ds.config import ConfigError, load_config
from tests.conftest import train_in_process

wandb = pytest.importorskip("wandb")  # in the test extra (pip install '.[test]')


def _offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _is_segment_of(path, run_id: str) -> bool:
    """offline-run-DATE_TIME-ID, or -ID-1 when W&B found that name taken: a resume that starts within the
    same second as the first segment (seen in CI: both 2-step runs inside one second)."""
    return re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", path.name) is not None


def _settled_record(path, needles, wait_s: float = 60.0) -> bytes:
    """The offline record once it holds every needle, or as it is after ``wait_s``: W&B's service process
    writes it, and under a load average of ~20 it was seen holding only its header right after the run."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        record = path.read_bytes()
        if all(n in record for n in needles) or time.monotonic() > deadline:
            return record
        time.sleep(0.5)


def test_wandb_offline_run_carries_config_and_resume_continues_it(digits_shards, deepspeed_cpu, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B's own switch: nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "tracked"
    sets = ["run.loggers=[tensorboard, wandb]", "run.tracker_project=mst_ds_test", "checkpoint.every_steps=2"]
    assert train_in_process(run_dir, digits_shards, *sets, "run.max_steps=2") == 0
    ids = json.loads((run_dir / "trackers.json").read_text())
    first = _offline_runs(run_dir)
    assert len(first) == 1 and _is_segment_of(first[0], ids["wandb"])
    # The offline record file (protobuf) carries the resolved config, the run identity and the scalars.
    config_hash = json.loads((run_dir / "run_info.json").read_text())["config_hash"]
    needles = [n.encode() for n in (config_hash, str(run_dir.resolve()), "identity", "batch_size", "train/loss")]
    record = _settled_record(first[0] / f"run-{ids['wandb']}.wandb", needles)
    for needle in needles:
        assert needle in record, needle
    assert any((run_dir / "tb").iterdir())  # TensorBoard still written

    # resume (steps 3-4): the same W&B run id, a second offline segment of it
    assert train_in_process(run_dir, digits_shards, *sets, "run.max_steps=4") == 0
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    runs = _offline_runs(run_dir)
    assert len(runs) == 2 and all(_is_segment_of(r, ids["wandb"]) for r in runs)
    assert b"train/loss" in _settled_record(runs[-1] / f"run-{ids['wandb']}.wandb", [b"train/loss"])

def test_unknown_logger_is_a_config_error():
    with pytest.raises(ConfigError, match="loggers"):
        load_config("tiny", ["run.loggers=[tensorboard, neptune]"])
