"""Issue 31: the demo states the steps that ran; a run its time limit cut says so in one line."""

from __future__ import annotations

from conftest import train_in_process

from mst_ds import demo


def test_a_run_cut_by_its_time_limit_is_reported_with_the_steps_it_trained(trained_run, digits_shards, tmp_path):
    run_dir = tmp_path / "cut"
    # A time limit of 6 ms: the first step already overruns it; the run saves and exits 0, as the demo's would.
    assert train_in_process(run_dir, digits_shards, "run.max_steps=40", "run.time_limit_min=0.0001") == 0
    steps, line = demo.trained_steps(run_dir, 40)
    assert 1 <= steps < 40
    assert line is not None and "\n" not in line and f"step {steps} of 40" in line and "time limit" in line
    assert demo.trained_steps(trained_run, 4) == (4, None)  # all planned steps: nothing to say
