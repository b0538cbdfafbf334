"""``mst-ds study``: rows as recipe differences, the table's statistics, and a killed study that resumes
without retraining what finished (real launcher, real DeepSpeed engine on CPU, real digits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mst_ds import study as st
from mst_ds.config import UsageError

ROOT = Path(__file__).resolve().parent.parent


def test_named_row_sets_and_their_reference():
    rows, ref = st.parse_rows("table4")
    assert rows[-1] == "mst_deit_s_100ep" and ref == "mst_deit_s_100ep" and len(rows) == 4
    rows, ref = st.parse_rows("mst_vs_dino,ablation_lambda2_02,mst_deit_s_100ep")
    assert rows == ["dino_deit_s_100ep", "mst_deit_s_100ep", "ablation_lambda2_02"]  # duplicates dropped
    with pytest.raises(UsageError):
        st.parse_rows(" , ")


def test_a_row_is_its_recipe_below_the_paper_root():
    # Table 4 row 2 inherits row 1's recipe and changes the DINO weight back; run names never count.
    assert st.row_difference("ablation_t4_random_bert_masked_dino") == {
        "mask.strategy": "random", "mask.prob": 0.15, "mask.replacement": "bert",
        "loss.restore_target": "masked_patches", "loss.dino_weight": 1.0}
    assert st.row_difference("mst_deit_s_100ep") == {}


def _study(tmp_path, **kw):
    args = dict(rows="mst_vs_dino", seeds=2, base="tiny", steps=8, sets=[], ref=None, out=str(tmp_path / "s"),
                train="", val="", cpu=1, launcher=None, linear=False)
    args.update(kw)
    return st.study_from_args(type("Args", (), args)())


def test_rows_on_a_base_keep_the_base_and_change_only_the_recipe(tmp_path):
    study = _study(tmp_path)
    dino, mst = study.config("dino_deit_s_100ep", 1), study.config("mst_deit_s_100ep", 1)
    assert (dino.mask.enabled, dino.decoder.enabled, mst.mask.enabled) == (False, False, True)
    assert dino.augment.global_crop_size == mst.augment.global_crop_size == 32  # tiny's scale
    assert (dino.run.seed, dino.run.max_steps, dino.run.schedule_steps) == (1, 8, 8)


def test_a_global_set_that_overrides_what_a_row_compares_is_refused(tmp_path):
    with pytest.raises(UsageError, match="mask.enabled"):
        _study(tmp_path, sets=["mask.enabled=true"]).runs()


def test_differences_paired_by_seed_or_welch():
    from scipy import stats

    a, b = {0: 60.0, 1: 62.0, 2: 65.0}, {0: 58.0, 1: 61.0, 2: 61.5}
    paired = st.compare(a, b)
    assert paired["test"] == "paired t"
    assert paired["diff"] == pytest.approx(62.3333333 - 60.1666667)
    assert paired["p"] == pytest.approx(stats.ttest_rel([60, 62, 65], [58, 61, 61.5]).pvalue)
    welch = st.compare(a, {5: 58.0, 6: 61.0})
    assert welch["test"] == "Welch t"
    assert welch["p"] == pytest.approx(stats.ttest_ind([60, 62, 65], [58, 61], equal_var=False).pvalue)
    assert st.compare({0: 1.0}, {0: 2.0})["se"] is None


def test_a_folder_that_is_not_a_study_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(UsageError, match="not a study folder"):
        st._check_out_dir(tmp_path)


@pytest.fixture(scope="module")
def digits_splits(tmp_path_factory) -> tuple[Path, Path]:
    from data_tools import sample_data
    from data_tools.writer import write_shards

    root = tmp_path_factory.mktemp("study_digits")
    folders = sample_data.write_digits_imagefolder(root / "folder")
    for split in ("train", "val"):
        write_shards(getattr(folders, split), root / split, split=split, max_count=512, progress=False)
    return root / "train", root / "val"


def _run_study(out: Path, train: Path, val: Path, seeds: int, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mst_ds.cli", "study", "--rows", "mst_vs_dino", "--seeds", str(seeds), "--base", "tiny",
           "--steps", "8", "--cpu", "1", "--train", str(train), "--val", str(val), "--out", str(out),
           "--set", "optim.batch_size=16", "--set", "data.num_workers=0", "--set", "run.log_every=1"]
    # Not this process's rendezvous (an earlier test may have started torch.distributed here).
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**base, "DS_ACCELERATOR": "cpu", **env})


def test_study_killed_mid_run_resumes_and_its_table_is_the_runs_numbers(digits_splits, deepspeed_cpu, tmp_path):
    train, val = digits_splits
    out = tmp_path / "study"
    first = _run_study(out, train, val, seeds=1)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    kept = out / "runs" / "dino_deit_s_100ep_seed0"
    before = {f: (kept / f).read_bytes() for f in ("study_done.json", "metrics.jsonl", "eval/knn.json")}

    # The second seed's first run is killed (SIGKILL) while it writes its step-4 checkpoint.
    killed = _run_study(out, train, val, seeds=2, MST_DS_FAULT="kill_in_save@4")
    assert killed.returncode == 1
    victim = out / "runs" / "dino_deit_s_100ep_seed1"
    assert not (victim / st.DONE).exists()

    final = _run_study(out, train, val, seeds=2)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "dino_deit_s_100ep_seed0: trained (kept)" in final.stdout
    assert "dino_deit_s_100ep_seed1: training (resuming at step 2)" in final.stdout
    assert {f: (kept / f).read_bytes() for f in before} == before  # never retrained or re-evaluated
    steps = [r["step"] for r in map(json.loads, (victim / "metrics.jsonl").read_text().splitlines())]
    assert steps[-1] == 8 and sorted(set(steps)) == list(range(1, 9))

    table = json.loads((out / "table.json").read_text())
    metric = table["headline"]
    assert metric == "knn_k20_top1"
    for row in ("dino_deit_s_100ep", "mst_deit_s_100ep"):
        from_runs = {str(seed): json.loads((out / "runs" / f"{row}_seed{seed}" / "eval" / "knn.json").read_text())
                     ["metrics"][metric] for seed in (0, 1)}
        entry = table["rows"][row]["metrics"][metric]
        assert entry["values"] == from_runs
        assert entry["mean"] == pytest.approx(sum(from_runs.values()) / 2)
        assert table["rows"][row]["steps"] == 8
    mst, dino = (table["rows"][r]["metrics"][metric]["values"] for r in ("mst_deit_s_100ep", "dino_deit_s_100ep"))
    vs = table["rows"]["mst_deit_s_100ep"]["vs_reference"][metric]
    assert vs["test"] == "paired t"
    assert vs["diff"] == pytest.approx(sum(mst.values()) / 2 - sum(dino.values()) / 2)
    assert (out / "table.png").stat().st_size > 0 and "| `mst_deit_s_100ep` |" in (out / "table.md").read_text()


def _study_cmd(out: Path, train: Path, val: Path, rows: str = "dino_deit_s_100ep", steps: int = 4) -> list[str]:
    return [sys.executable, "-m", "mst_ds.cli", "study", "--rows", rows, "--seeds", "1", "--base", "tiny",
            "--steps", str(steps), "--cpu", "1", "--train", str(train), "--val", str(val), "--out", str(out),
            "--set", "optim.batch_size=16", "--set", "data.num_workers=0"]


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**base, "DS_ACCELERATOR": "cpu", **env})


@pytest.mark.slow
def test_a_rerun_on_other_data_redoes_evaluations_or_is_refused(digits_splits, deepspeed_cpu, tmp_path):
    """Issue 20 (1): another --val redoes the evaluation (its JSON records the identity of bank and
    query); another --train, or a refused rerun, changes nothing — study.json and recipes/ included."""
    train, val = digits_splits
    out = tmp_path / "study"
    first = _run(_study_cmd(out, train, val))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = out / "runs" / "dino_deit_s_100ep_seed0"
    knn = json.loads((run / "eval" / "knn.json").read_text())
    assert knn["data"]["val"]["samples"] == 359 and knn["data"]["train"]["samples"] == 1438

    # The same rerun keeps everything.
    again = _run(_study_cmd(out, train, val))
    assert again.returncode == 0 and "mst-ds knn" not in again.stdout, again.stdout
    assert json.loads((run / "eval" / "knn.json").read_text()) == knn

    # Another query set: the evaluation is redone, and the table is its number.
    other_val = train  # labelled, the same classes, other images
    rerun = _run(_study_cmd(out, train, other_val))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "trained (kept)" in rerun.stdout and "other data: redone" in rerun.stdout
    redone = json.loads((run / "eval" / "knn.json").read_text())
    assert redone["data"]["val"] == redone["data"]["train"] and redone["metrics"] != knn["metrics"]
    table = json.loads((out / "table.json").read_text())
    metric = table["headline"]
    assert table["rows"]["dino_deit_s_100ep"]["metrics"][metric]["values"] == {"0": redone["metrics"][metric]}

    # Other training data than the finished run's, or other --steps: one line, nothing rewritten.
    spec = (out / st.SPEC).read_bytes()
    recipe = (out / "recipes" / "dino_deit_s_100ep.yaml").read_bytes()
    for cmd, why in ((_study_cmd(out, val, val), "was trained on other data"),
                     (_study_cmd(out, train, val, steps=6), "finished with config"),
                     (_study_cmd(out, train, val, rows="dino_deit_s_100ep,ablation_typo"), "ablation_typo")):
        refused = _run(cmd)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and why in lines[0], refused.stderr
        assert (out / st.SPEC).read_bytes() == spec
        assert (out / "recipes" / "dino_deit_s_100ep.yaml").read_bytes() == recipe
        assert not (out / "recipes" / "ablation_typo.yaml").exists()


def _processes_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_kill_9_of_a_study_takes_its_training_down(digits_splits, deepspeed_cpu, tmp_path):
    """Issue 20 (11): the launches of a SIGKILLed study die with it (launch.sh, the DeepSpeed launcher,
    the ranks), as ranks die with launch.sh; nothing trains on unattended, holding the run's lock."""
    import signal
    import time

    from mst_ds import job

    train, val = digits_splits
    out = tmp_path / "study"
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    study = subprocess.Popen(_study_cmd(out, train, val, steps=400), cwd=ROOT, env={**base, "DS_ACCELERATOR": "cpu"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        lock = out / "runs" / "dino_deit_s_100ep_seed0" / job.LOCK_NAME
        deadline = time.monotonic() + 600
        while not (lock.is_file() and lock.read_text()):  # rank 0 is training (it took the run's lock)
            assert time.monotonic() < deadline and study.poll() is None, "no rank started"
            time.sleep(0.5)
        study.kill()
        study.wait()
        deadline = time.monotonic() + 90  # a loaded machine: the launcher chain is polled once a second
        while _processes_naming(str(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")[:120] for p in _processes_naming(str(out))}
        assert left == {}
    finally:
        for pid in _processes_naming(str(out)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_skipped_and_the_exit_code_says_so(digits_splits, deepspeed_cpu, tmp_path):
    """Issue 20 (12): one run that cannot train (its run directory held by another job) does not stop the
    others; the table has n per row and names the failed run; the exit code is 1."""
    from mst_ds import job

    train, val = digits_splits
    out = tmp_path / "study"
    holder = job.RunLock(out / "runs" / "dino_deit_s_100ep_seed0").acquire()
    (out / st.SPEC).write_text("{}")  # a study folder (the lock file alone would make it a foreign one)
    try:
        res = _run(_study_cmd(out, train, val, rows="mst_vs_dino"))
    finally:
        holder.release()
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("mst-ds: error: 1 of 2 runs failed (dino_deit_s_100ep_seed0)"), res.stderr
    assert "mst_deit_s_100ep_seed0: trained 4 steps" in res.stdout  # the next run went on
    table = json.loads((out / "table.json").read_text())
    dino, mst = table["rows"]["dino_deit_s_100ep"], table["rows"]["mst_deit_s_100ep"]
    assert (dino["n"], list(dino["failed"]), dino["metrics"]) == (0, ["0"], {})
    assert "in use by another job" in dino["failed"]["0"] or "training failed" in dino["failed"]["0"]
    assert mst["n"] == 1 and mst["failed"] == {} and table["headline"] in mst["metrics"]
    md = (out / "table.md").read_text()
    assert "| `dino_deit_s_100ep` | 0 of 1 (failed: seed 0) |" in md and "| `mst_deit_s_100ep` | 1 of 1 |" in md
