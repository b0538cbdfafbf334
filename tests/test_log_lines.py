"""Issue 31: a run's progress in a job's output file (plain lines when stdout is not a terminal) and its
throughput, measured and logged (img/s in all and per device, data-wait share, peak memory, MFU)."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
from conftest import TRAIN_SETS

from mst_ds import job
from mst_ds.config import load_config
from mst_ds.eval import report
from mst_ds.metrics import Throughput, log_line
from mst_ds.scalars import MFU, THROUGHPUT
from mst_ds.train import flops_per_image, train


def test_a_log_line_is_one_full_line_with_every_field():
    stats = {"loss": 8.17571, "dino": 4.38243, "restore": 6.32211, "lr": 0.002, "img_per_s": 2048.5,
             "img_per_s_per_device": 256.06, "data_wait_share": 0.031, "peak_mem_gb": 31.25, "mfu": 0.412, "alerts": 2}
    line = log_line(1200, 125_000, 3, stats, eta_s=2 * 86400 + 3600 + 61, knn=61.25)
    assert "\n" not in line and len(line) > 80  # never cut to a terminal's width
    for part in ("train step 1200/125000 (1.0%)", "epoch 3", "eta 2d 1:01:01", "loss 8.1757", "dino 4.3824",
                 "restore 6.3221", "lr 0.002", "2048.5 img/s (256.1/device)", "data wait 3.1%",
                 "peak mem 31.25 GiB/device", "MFU 41.2%", "k-NN 61.2", "alerts 2"):
        assert part in line, (part, line)
    cpu = log_line(5, 10, 0, {k: v for k, v in stats.items() if k != "mfu"}, eta_s=None, knn=None)
    assert "MFU" not in cpu and "eta ?" in cpu and "k-NN -" in cpu  # no peak known: no MFU


def test_throughput_counts_the_loader_wait_and_the_mfu():
    clock = Throughput(10, world=4, flops_per_image=2e9, peak_tflops=100.0)
    time.sleep(0.05)
    clock.wait(0.02)
    clock.pause(0.01)
    r = clock.rates(12, 64)  # 2 steps of 64 images in ≈ 0.04 s of training
    assert r["img_per_s_per_device"] == pytest.approx(r["img_per_s"] / 4)
    assert 0.2 < r["data_wait_share"] <= 1.0  # 0.02 s of ≈ 0.04 s
    assert r[MFU] == pytest.approx(r["img_per_s_per_device"] * 2e9 / 100e12)
    assert MFU not in Throughput(0).rates(1, 8)  # no peak (CPU): no MFU


class _Watcher(job.StopSignals):
    """Never asks to stop; at each step's vote (inside the step) reads what the job's output file holds."""

    def __init__(self, out) -> None:
        super().__init__()
        self.out, self.seen = out, []

    def vote(self) -> float:
        self.seen.append(sum(x.startswith("train step") for x in self.out.read_text().splitlines()))
        return 0.0


def test_a_run_with_stdout_to_a_file_prints_full_lines_while_it_trains_and_logs_throughput(digits_shards, tmp_path):
    """In-process run with stdout redirected to a file (not a terminal), as sbatch runs a job: one line per
    logged step (run.log_every 2, run.log_every_s 0) is in the file while later steps still run, the
    last step's included; metrics.jsonl holds the throughput and, with run.peak_tflops given, the MFU
    from the model's FLOPs per image; `mst-ds report` aggregates them."""
    sets = [*TRAIN_SETS, f"data.train={digits_shards}", "run.max_steps=5", "run.log_every=2", "run.log_every_s=0",
            "run.peak_tflops=0.5"]
    cfg = load_config("tiny", sets).config
    out = tmp_path / "job.out"
    watcher = _Watcher(out)
    with open(out, "w") as fh, contextlib.redirect_stdout(fh):
        assert train(cfg, tmp_path / "run", progress=True, stop=watcher) == 0
    assert watcher.seen == [0, 0, 1, 1, 2]  # seen by steps 1-5: the lines of steps 2 and 4 before the end
    lines = [x for x in out.read_text().splitlines() if x.startswith("train step")]
    assert [x.split()[2] for x in lines] == ["2/5", "4/5", "5/5"], lines
    assert all("img/s" in x and "data wait" in x and "peak mem" in x and "MFU" in x for x in lines)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    assert set(THROUGHPUT) | {MFU} <= last.keys()
    assert last["img_per_s"] > 0 and 0 <= last["data_wait_share"] <= 1 and last["peak_mem_gb"] > 0.01
    flops = flops_per_image(cfg)
    assert flops > 1e6  # a real count of the tiny model's step
    assert last[MFU] == pytest.approx(last["img_per_s_per_device"] * flops / 0.5e12, rel=1e-9)
    summary = report.throughput_metrics(tmp_path / "run")  # what `mst-ds report` aggregates over seeds
    assert summary["img_per_s_median"] > 0 and summary["peak_mem_gb_max"] == max(r["peak_mem_gb"] for r in recs)
    assert {"img_per_s_per_device_median", "data_wait_share_median", "mfu_median"} <= summary.keys()
    assert "img_per_s_per_device" in report.CURVES["throughput"]
