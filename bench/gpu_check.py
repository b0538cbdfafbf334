"""One prepared check of the GPU path, for the few minutes a bare GPU machine is lent (one call).

    bench/gpu_check.sh                       # on the GPU machine: offline venv from bench/wheelhouse, then this
    python bench/gpu_check.py --cpu --quick  # every section's CPU path (CI)

Each section runs in its own process group with its own timeout (bench/_gpu_runner.py); every result is a
JSON line appended to --out as it is measured (default $OUT/gpu_check.jsonl when $OUT is set), and the
table at the end is rebuilt from that file, so a timeout, a host OOM or a CUDA abort loses nothing
already measured. The whole holds a hard wall-clock budget (--budget-min, default 8). Sections
(bench/_gpu_sections.py): env · parity (device vs CPU, fp32) · zero (ZeRO 0-3 × bf16/fp32, fp16) ·
resume (`mst-ds train` through the launcher, SIGKILL, resume) · knn (the checkpoint read on CPU) ·
monitor (the online k-NN monitor on a few hundred images, device vs CPU) ·
kernels (SyncBN world 1, SDPA backend, host syncs) · throughput (vs plain PyTorch, same teacher
precision) · loader. Exit 0 when every section passed; 1 otherwise; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _gpu_runner import Section, failures, read_rows, run_all, table  # noqa: E402

from mst_ds.job import use_extensions_dir  # noqa: E402  (torch-free)

ORDER = ("env", "parity", "zero", "resume", "knn", "monitor", "kernels", "throughput", "loader")
# What a section needs from another's result (skipped when that one did not pass); nothing else waits.
NEEDS = {"knn": ("resume",)}
TIMEOUT_S = {"env": 120, "parity": 240, "zero": 300, "resume": 360, "knn": 180, "monitor": 120, "kernels": 180,
             "throughput": 300,
             "loader": 240}
CPU_SLOWER = 3  # --cpu: the tiny preset, but a loaded CI machine and ~10 s of imports per process


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="every section's CPU path on the tiny preset (CI)")
    ap.add_argument("--quick", action="store_true", help="fewer combinations and steps")
    ap.add_argument("--out", default=None, help="results file, JSON lines, appended (default $OUT/gpu_check.jsonl, "
                                                "else runs/gpu_check.jsonl)")
    ap.add_argument("--budget-min", type=float, default=8.0, help="hard wall-clock budget for all sections")
    ap.add_argument("--only", nargs="*", default=None, choices=ORDER, help="run only these sections")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # run one section in this process
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cpu-steps", default=None, help=argparse.SUPPRESS)  # parity's CPU reference child
    ap.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.jsonl" if os.environ.get("OUT") else HERE.parent / "runs" / "gpu_check.jsonl"


def in_section(args: argparse.Namespace) -> int:
    """This process is one section (or parity's CPU child): torch is imported only here."""
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    from _gpu_sections import Ctx, _steps_record, run_section

    if args.cpu:
        torch.set_num_threads(1)
    ctx = Ctx(cpu=args.cpu, quick=args.quick, work=Path(args.work or tempfile.gettempdir()),
              out=Path(args.out or default_out()), run=os.environ.get("GPU_CHECK_RUN", "child"),
              section=args.section or "parity", peak_tflops=args.peak_tflops)
    if args.cpu_steps:
        Path(args.cpu_steps).write_text(json.dumps(_steps_record(ctx, args.steps)))
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: error: no GPU visible to torch (--cpu runs the CPU paths)", file=sys.stderr)
        return 2
    return run_section(args.section, ctx)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.section or args.cpu_steps:
        return in_section(args)
    out = Path(args.out) if args.out else default_out()
    # One folder for DeepSpeed's JIT-built CPU comm op, exported to every section and the launches they
    # start (`mst-ds train`'s own choice): with torch's default each process that imports DeepSpeed from
    # another path to the same environment rebuilds the op (a minute of compiling per section on CPU).
    use_extensions_dir(announce=False, required=False)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    base = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--work", str(work)]
    base += ["--cpu"] * args.cpu + ["--quick"] * args.quick
    base += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    names = [n for n in ORDER if args.only is None or n in args.only]
    scale = CPU_SLOWER if args.cpu else 1
    sections = [Section(n, [*base, "--section", n], TIMEOUT_S[n] * scale, needs=tuple(x for x in NEEDS.get(n, ()) if x in names))
                for n in names]
    try:
        run, rows = run_all(sections, out, args.budget_min * 60, out.parent / "gpu_check_logs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = read_rows(out, run)  # the table from the file, as a later reader would rebuild it
    print(f"\ngpu_check run {run} ({'CPU paths' if args.cpu else 'GPU'}), results in {out}")
    print(table(rows))
    bad = failures(rows)
    if bad:
        print(f"gpu_check: error: {len(bad)} section(s) did not pass: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
