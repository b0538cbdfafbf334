"""bench/gpu_check.py: the runner (each section a process group with its own timeout, rows appended as
they come, a budget that holds, the table rebuilt from the file), every section's CPU path end to end
(`--cpu --quick`, slow), and the offline install from bench/wheelhouse into a fresh venv (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _gpu_runner import SECTION_ROW, Section, append_row, failures, read_rows, run_all, table  # noqa: E402


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _row_code(check: str, status: str = "pass") -> str:
    """A section body that appends one row the way _gpu_sections.Ctx.row does."""
    return ("import json, os; open(os.environ['GPU_CHECK_OUT'], 'a').write(json.dumps({'run': os.environ['GPU_CHECK_RUN'], "
            f"'section': os.environ['GPU_CHECK_SECTION'], 'check': {check!r}, 'status': {status!r}, 'value': 1}}) + '\\n')")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie (killed, not yet reaped by init) counts as gone
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_a_timeout_kills_the_whole_process_group_and_the_next_sections_still_run(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    hang = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); {_row_code('before the hang')}; time.sleep(300)")
    sections = [Section("hang", _py(hang), timeout_s=3, min_s=0),
                Section("crash", _py(_row_code("half") + "; raise SystemExit(3)"), timeout_s=30, min_s=0),
                Section("ok", _py(_row_code("fine")), timeout_s=30, min_s=0),
                Section("after_crash", _py(_row_code("x")), timeout_s=30, needs=("crash",), min_s=0),
                Section("after_ok", _py(_row_code("y")), timeout_s=30, needs=("ok",), min_s=0)]
    out = tmp_path / "r.jsonl"
    run, rows = run_all(sections, out, budget_s=120, logs=tmp_path / "logs", echo=lambda *_: None)
    closing = {r["section"]: r for r in rows if r["check"] == SECTION_ROW}
    assert closing["hang"]["status"] == "timeout" and "process group" in closing["hang"]["note"]
    assert not _alive(int(pidfile.read_text())), "the hung section's child outlived its timeout"
    assert closing["crash"]["status"] == "fail" and "exit 3" in closing["crash"]["note"]
    assert closing["ok"]["status"] == "pass" and closing["after_ok"]["status"] == "pass"
    assert closing["after_crash"]["status"] == "skipped" and "crash (fail)" in closing["after_crash"]["note"]
    # The rows a section wrote before it hung or crashed are kept, in the order they came.
    checks = [(r["section"], r["check"]) for r in rows if r["check"] != SECTION_ROW]
    assert checks == [("hang", "before the hang"), ("crash", "half"), ("ok", "fine"), ("after_ok", "y")]
    assert failures(rows) == ["hang", "crash", "after_crash"]


def test_a_sigterm_to_the_runner_kills_the_running_section_group(tmp_path):
    """A caller's timeout (SIGTERM to the runner) must not leave the section (its own session) running."""
    pidfile = tmp_path / "child.pid"
    hang = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); from pathlib import Path; "
            f"from _gpu_runner import Section, run_all; "
            f"run_all([Section('hang', {_py(hang)!r}, timeout_s=300, min_s=0)], Path({str(tmp_path / 'r.jsonl')!r}), "
            f"300, Path({str(tmp_path / 'logs')!r}))")
    runner = subprocess.Popen(_py(code))
    deadline = time.monotonic() + 60
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)
    runner.terminate()
    assert runner.wait(timeout=30) == 128 + 15
    assert not _alive(int(pidfile.read_text())), "the section's child outlived its stopped runner"
    assert read_rows(tmp_path / "r.jsonl")[-1]["status"] == "killed"


def test_the_budget_holds_and_later_sections_are_skipped_with_the_reason(tmp_path):
    sleepy = [Section(f"s{i}", _py("import time; time.sleep(60)"), timeout_s=60, min_s=1) for i in range(4)]
    t0 = time.monotonic()
    _, rows = run_all(sleepy, tmp_path / "r.jsonl", budget_s=8, logs=tmp_path / "logs", echo=lambda *_: None)
    took = time.monotonic() - t0
    assert took < 8 + 2, f"the 8 s budget took {took:.1f} s"
    status = [r["status"] for r in rows if r["check"] == SECTION_ROW]
    assert status[0] == "timeout" and status[-1] == "skipped"
    assert "time budget" in [r for r in rows if r["status"] == "skipped"][0]["note"]


def test_the_table_is_rebuilt_from_the_file_of_this_run_only_and_a_torn_line_is_ignored(tmp_path):
    out = tmp_path / "r.jsonl"
    append_row(out, {"run": "old", "section": "a", "check": "c", "status": "pass", "value": 1})
    append_row(out, {"run": "new", "section": "a", "check": "speed", "status": "info", "value": 1.23456, "note": "x\ny"})
    with open(out, "a") as fh:
        fh.write('{"run": "new", "section": "a", "che')  # killed mid-write
    rows = read_rows(out, "new")
    assert len(rows) == 1
    text = table(rows)
    assert "speed" in text and "1.235" in text and "\n" + " " * 14 + "y" in text


# Each section's CPU path in this process (the end-to-end run below is slow): what each must write.
SECTION_ROWS = {
    "env": {"device": "info", "GPUs visible": "pass"},
    "zero": {"ZeRO-2 bf16: per-param clip max ‖g‖/c": "pass", "ZeRO-2 bf16: EMA vs EMA of fp32 masters": "pass",
             "ZeRO-3 bf16: loss finite / loss scale": "pass", "ZeRO-2 fp16": "skipped",
             "precision auto: one step": "pass", "precision autocast_bf16: one step": "pass"},
    "kernels": {"SDPA backend (aten op that ran)": "pass", "SyncBN vs BN float32 max |Δ|": "skipped",
                "host syncs per training step": "skipped"},
    "throughput": {"MST img/s (engine, bf16)": "pass", "GFLOP per image (plan's count)": "info",
                   "DeepSpeed ÷ plain PyTorch (teacher bf16 both)": "info"},
    "loader": {"loader wait share (1 workers × 8)": "info"},
    "monitor": {"RNG states untouched by an evaluation": "pass", "next evaluation (decoded images kept) equal": "pass",
                "top-1 device vs CPU |Δ| (points)": "pass"},
}


@pytest.mark.parametrize("name", list(SECTION_ROWS))
def test_a_section_on_its_cpu_path_writes_its_rows_and_none_fails(name, deepspeed_cpu, tmp_path):
    from _gpu_sections import SECTIONS, Ctx

    out = tmp_path / "r.jsonl"
    SECTIONS[name](Ctx(cpu=True, quick=True, work=tmp_path, out=out, run="t", section=name))
    rows = {r["check"]: r for r in read_rows(out, "t")}
    assert {c: rows[c]["status"] for c in SECTION_ROWS[name] if c in rows} == SECTION_ROWS[name], rows
    assert not [c for c, r in rows.items() if r["status"] == "fail"], rows
    if name == "kernels":  # the aten op SDPA dispatched to on CPU
        assert "scaled_dot_product" in rows["SDPA backend (aten op that ran)"]["value"]


def test_the_resume_section_adds_a_run_deterministic_pass_on_a_gpu_with_valid_settings(tmp_path):
    """The kill/resume pass with run.deterministic=true: on a GPU always (its resumed steps must then be
    bit-identical), on CPU (bit-identical either way) only without --quick; its settings load as a config."""
    from _gpu_sections import Ctx, resume_passes, resume_sets

    from mst_ds.config import load_config

    def ctx(cpu: bool, quick: bool) -> Ctx:
        return Ctx(cpu=cpu, quick=quick, work=tmp_path, out=tmp_path / "r.jsonl", run="t", section="resume")

    assert resume_passes(ctx(False, True)) == resume_passes(ctx(False, False)) == [False, True]
    assert resume_passes(ctx(True, True)) == [False] and resume_passes(ctx(True, False)) == [False, True]
    on = load_config("tiny", resume_sets(6, tmp_path, True)).config
    off = load_config("tiny", resume_sets(6, tmp_path, False)).config
    assert on.run.deterministic and not off.run.deterministic
    assert on.model_dump(exclude={"run"}) == off.model_dump(exclude={"run"}) and on.run.max_steps == 6


def test_gpu_check_cpu_runs_the_parity_section_through_the_real_runner(deepspeed_cpu, tmp_path):
    """`bench/gpu_check.py --cpu --quick --only parity` in the default set: the section the in-process
    tests above cannot reach (it starts its own child) runs through the real runner (a subprocess per
    section, JSONL, table). resume (~9 min here) and knn (reads resume's run) stay in the slow end-to-end
    test below."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OUT"] = str(tmp_path)
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--quick", "--only", "parity",
                          "--budget-min", "15"], capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    closing = {r["section"]: r["status"] for r in rows if r["check"] == SECTION_ROW}
    assert res.returncode == 0 and closing == {"parity": "pass"}, (closing, res.stdout[-3000:], res.stderr[-2000:])
    checks = {(r["section"], r["check"]): r for r in rows}
    assert checks[("parity", "3 fp32 train_steps: losses max rel. Δ")]["value"] == 0


@pytest.mark.slow
def test_gpu_check_cpu_quick_runs_every_section_end_to_end(deepspeed_cpu, tmp_path):
    """`bench/gpu_check.py --cpu --quick`: every section passes on its CPU path; the JSONL holds each
    section's rows and closing row; the printed table is the file's."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OUT"] = str(tmp_path)
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--quick", "--budget-min", "40"],
                         capture_output=True, text=True, timeout=2700, cwd=ROOT, env=env)
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    closing = {r["section"]: r["status"] for r in rows if r["check"] == SECTION_ROW}
    print(res.stdout[-8000:])  # the table (pytest -s shows it)
    assert res.returncode == 0, json.dumps(closing) + res.stdout[-3000:] + res.stderr[-2000:]
    assert closing == dict.fromkeys(("env", "parity", "zero", "resume", "knn", "monitor", "kernels", "throughput", "loader"),
                                    "pass")
    checks = {(r["section"], r["check"]): r for r in rows}
    # CPU vs CPU: bit for bit; the kill/resume equals the uninterrupted run; GPU-only checks say why.
    assert checks[("parity", "3 fp32 train_steps: losses max rel. Δ")]["value"] == 0
    assert checks[("resume", "resumed steps 3-4 == uninterrupted (bits)")]["status"] == "pass"
    assert checks[("resume", "SIGKILL in the step-4 save after 4 steps: non-zero exit")]["status"] == "pass"
    assert checks[("zero", "ZeRO-0 fp16")]["status"] == "skipped"
    assert checks[("kernels", "host syncs per training step")]["status"] == "skipped"
    assert checks[("kernels", "SDPA backend (aten op that ran)")]["status"] == "pass"
    assert checks[("throughput", "MST img/s (engine, bf16)")]["value"] > 0
    assert "DeepSpeed ÷ plain PyTorch (teacher bf16 both)" in res.stdout


def test_engine_compile_wraps_the_student_in_place(deepspeed_cpu):
    """engine.compile=true: DeepSpeed's engine.compile() on the student, the same parameter objects (so
    the EMA teacher and checkpoints see the trained weights); off by default. (Compiling runs at the first
    forward; its speed is measured by gpu_check on GPUs.)"""
    from mst_ds import engine as eng
    from mst_ds.config import derive, load_config
    from mst_ds.trainer import build_training

    eng.init_distributed()
    assert load_config("tiny").config.engine.compile is False
    cfg = load_config("tiny", ["engine.compile=true", "engine.precision=fp32", "optim.batch_size=8",
                               "run.schedule_steps=40"]).config
    t, _ = build_training(cfg, derive(cfg, 1, 64))
    assert t.engine.is_compiled
    student = {id(p) for p in t.engine.module.parameters()}
    assert all(id(s) in student for _, _, s in t.ema.pairs)


# --------------------------------------------------------------------------------------------------
# The wheelhouse: built here, installed offline into a fresh venv that has only what a GPU image has
# --------------------------------------------------------------------------------------------------
# What the simulated GPU image has: torch (and what torch itself needs), torchvision with Pillow, numpy.
IMAGE = ("torch", "torchgen", "functorch", "torchvision", "numpy", "PIL", "pillow", "filelock", "fsspec", "jinja2",
         "markupsafe", "networkx", "sympy", "mpmath", "triton", "nvidia", "cuda", "setuptools", "_distutils_hack")


def _image_site(tmp: Path) -> Path:
    """A folder of links to the image's packages (and their .libs / dist-info), nothing else."""
    import torch

    site = Path(torch.__file__).parent.parent
    image = tmp / "image_site"
    image.mkdir()
    for entry in site.iterdir():
        stem = entry.name.split("-")[0].split(".")[0].lower()
        if stem in {n.lower() for n in IMAGE} or any(entry.name.lower().startswith(n.lower() + "_") and
                                                    entry.name.endswith(".libs") for n in IMAGE):
            (image / entry.name).symlink_to(entry)
    return image


@pytest.mark.slow
def test_the_wheelhouse_installs_offline_into_a_bare_venv_and_the_check_imports(tmp_path):
    wheelhouse = ROOT / "bench" / "wheelhouse"
    if not any(wheelhouse.glob("deepspeed-*-py3-none-any.whl")):  # build it (needs PyPI) once; reused after
        subprocess.run([str(ROOT / "bench" / "gpu_wheelhouse.sh")], check=True, timeout=1200)
    size = sum(f.stat().st_size for f in wheelhouse.iterdir())
    assert size < 64 * 2**20, f"wheelhouse {size / 2**20:.1f} MiB"
    assert not [f for f in wheelhouse.glob("deepspeed-*") if "none-any" not in f.name]
    assert {f"cp3{v}" for v in (10, 11, 12, 13)} <= {f.name.split("-")[2] for f in wheelhouse.glob("pydantic_core-*")}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "gpu_image.pth").write_text(str(_image_site(tmp_path)) + "\n")
    # No network: an unreachable proxy, no index, no pip configuration (its find-links included).
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "GPU_CHECK_VENV": str(venv),
           "PIP_CONFIG_FILE": "/dev/null", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "DS_ACCELERATOR": "cpu"}
    dry = subprocess.run([str(py), "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "--find-links",
                          str(wheelhouse), "-r", str(ROOT / "bench" / "gpu_requirements.txt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    assert "deepspeed-0.19.8" in dry.stdout
    res = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--install-only"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    # Outside the worktree (no PYTHONPATH): the installed project, DeepSpeed and the check's imports.
    code = ("import deepspeed, mst_ds, mst_ds.cli, mst_ds.train, mst_ds.eval.knn, data_tools.writer, webdataset, timm, "
            "hjson, braceexpand, pydantic; print(deepspeed.__version__, mst_ds.__file__)")
    res = subprocess.run([str(py), "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert str(venv) in res.stdout and res.stdout.startswith("0.19.8")
