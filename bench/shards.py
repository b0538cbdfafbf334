"""``mst-shards write`` images/s vs copying the same bytes with ``cp -r``.

    python bench/shards.py [--quick] [--images N] [--workers N] [--dir DIR]

Source: an ImageFolder of generated ImageNet-size JPEGs (500×375, ~ImageNet's mean file size). Both
sides read the same files from the page cache and write into a fresh folder of the same file system;
runs alternate (cp, write, cp, write, ...) so machine load hits both alike, and the best of each is
kept. The writer does everything it always does: sniff every file, build the tars, the manifest's
checksum (xxh3_128 by default, of the bytes as they are written: no shard is read back), records,
manifest. Reference rows: each checksum (xxh3_128, and sha256 as manifests had it before) of the same
bytes alone on one core, and the bare loop (read, write, xxh3_128 in as many processes, no per-image
work): the floor of any writer that checksums its output. Target: ≥ 0.9× the images/s of ``cp -r``.
No assertions: it is a measurement. Per core the writer does more than ``cp`` (read + write + hash
vs an in-kernel copy), so it reaches ``cp -r`` (one process) with its worker processes; the load
average is printed with the table because other work on the machine takes exactly those cores.

Where: a RAM-backed folder (``/dev/shm``) by default, so both sides run at memory speed, the case
hardest for the writer, and nothing on disk skews either side. ``--dir`` measures on a disk instead.
There, file creation (one new file per image for ``cp -r``) can be the skew: on ext4 without a journal
(this machine's root file system) the inode allocator skips every inode deleted in the last 1–6
minutes, one by one, on each creation: 17 µs per file on a quiet disk became 420 µs after a clean-up,
which made ``cp -r`` look up to 10× slower than it is. So on a disk nothing is deleted until the end
(13× the source's size at the peak), the runs start only when creating 1,000 files costs
≤ ``--quiet-create-us``, steadily (waiting up to 7 minutes), and a run whose creation cost rose
meanwhile says it is invalid instead of printing a ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _report import bench_line
from rich.console import Console
from rich.table import Table

from data_tools.sample_data import generated_image, jpeg_bytes
from data_tools.writer import write_shards
from mst_ds.data.manifest import CHECKSUMS, DEFAULT_CHECKSUM

TARGET = 0.9
_ZEROS = b"\0" * 512
QUIET_CREATE_US = 20.0  # quiet: 16–18 µs per file here; at 21–27 µs cp -r was already 1.6–6× slower (measured)


def make_source(root: Path, n: int, classes: int = 10) -> int:
    """n JPEGs of 500×375 in ``classes`` folders → total bytes. A few distinct images are reused
    (byte-identical content does not help either side: both copy every byte)."""
    distinct = [jpeg_bytes(generated_image(s), quality=92) for s in range(min(n, 64))]
    total = 0
    for i in range(n):
        d = root / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        data = distinct[i % len(distinct)]
        (d / f"n{i % classes:08d}_{i}.JPEG").write_bytes(data)
        total += len(data)
    return total


def _cpu_seconds() -> float:
    """User + system CPU of this process (all threads) and its finished children (cp, writer workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def create_cost_us(parent: Path, n: int = 1000) -> float:
    """µs to create one empty file in a new folder under ``parent`` (the folder is left for the end:
    deleting it would itself slow the next creations)."""
    d = Path(tempfile.mkdtemp(prefix="probe_", dir=parent))
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(d / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - t0) / n * 1e6


def wait_for_quiet_fs(parent: Path, max_us: float, patience_s: float = 420) -> float | None:
    """Wait until creating a file costs ≤ ``max_us`` in two probes 30 s apart that agree within 10 %
    (a cost still falling means deleted inodes are still ageing out) → that cost, or None if it never did.
    ext4 keeps a deleted inode from reuse for up to 6 minutes, hence the patience."""
    deadline = time.monotonic() + patience_s
    os.sync()  # clean inode tables shorten ext4's window from 6 minutes to 1
    last = create_cost_us(parent)
    while True:
        if time.monotonic() > deadline:
            return None
        print(f"creating a file costs {last:.0f} µs (quiet: ≤ {max_us:.0f}, steady); waiting 30 s", flush=True)
        time.sleep(30)
        cost = create_cost_us(parent)
        if cost <= max_us and last <= max_us and abs(cost - last) <= 0.1 * last:
            return cost
        last = cost


def time_cp(src: Path, dst: Path) -> tuple[float, float]:
    """→ (wall seconds, CPU seconds) to copy into ``dst``, a new folder (kept: see the module doc)."""
    os.sync()  # start every run with the previous runs' dirty pages written back
    t0, c0 = time.perf_counter(), _cpu_seconds()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return time.perf_counter() - t0, _cpu_seconds() - c0


def time_checksum(src: Path, algorithm: str) -> float:
    """``algorithm`` of every source byte on one core: the floor of any writer that records it."""
    files = sorted(src.rglob("*.JPEG"))
    t0 = time.perf_counter()
    for f in files:
        CHECKSUMS[algorithm](f.read_bytes()).digest()
    return time.perf_counter() - t0


def time_write(src: Path, dst: Path, workers: int) -> tuple[float, float]:
    """→ (wall seconds, CPU seconds) to write into ``dst``, a new folder."""
    os.sync()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    write_shards(src, dst, split="train", max_count=256, workers=workers, progress=False)
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _bare_loop(files: list[str], out: str) -> None:
    """Read, tar-pad, write and hash each file into shards of 256: nothing per image but the bytes."""
    for i in range(0, len(files), 256):
        fd, digest = os.open(f"{out}-{i}.tar", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), CHECKSUMS[DEFAULT_CHECKSUM]()
        for f in files[i:i + 256]:
            src = os.open(f, os.O_RDONLY)
            data = os.read(src, os.fstat(src).st_size + 1)
            os.close(src)
            parts = (_ZEROS, data, _ZEROS[:-len(data) % 512])
            os.writev(fd, parts)
            for part in parts:
                digest.update(part)
        os.close(fd)


def time_bare_loop(src: Path, dst: Path, workers: int) -> float:
    files = sorted(str(p) for p in src.rglob("*.JPEG"))
    dst.mkdir()
    t0 = time.perf_counter()
    procs = [mp.get_context("fork").Process(target=_bare_loop, args=(files[k::workers], f"{dst}/{k}")) for k in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return time.perf_counter() - t0


def in_ram(path: Path) -> bool:
    """Whether ``path`` is on tmpfs/ramfs (the longest mount point above it decides)."""
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, kind = line.split()[:3]
            if str(path.resolve()).startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
                best, fstype = mnt, kind
    return fstype in ("tmpfs", "ramfs")


def default_dir(n: int) -> Path | None:
    """``/dev/shm`` when it can hold 5× the source (source + three outputs + slack), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 5 * n * 90_000:
            return shm
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images (< 1 minute)")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes (default: all cores)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quiet-create-us", type=float, default=QUIET_CREATE_US,
                    help="µs to create an empty file on a quiet disk, at most (default: %(default)s, this machine's)")
    ap.add_argument("--dir", type=Path, default=None, help="where to measure (default: /dev/shm if it has room)")
    args = ap.parse_args()
    n = args.images or (1500 if args.quick else 6000)
    reps = args.reps or 3
    where = args.dir or default_dir(n)
    with tempfile.TemporaryDirectory(prefix="bench_shards_", dir=where) as tmp:
        tmp = Path(tmp)
        ram = in_ram(tmp)
        total = make_source(tmp / "src", n)
        inf = (float("inf"), float("inf"))
        best = {"cp -r": inf, "write (1 process)": inf, f"write ({args.workers} processes)": inf}  # (wall, CPU) of the fastest
        hashes = {a: min(time_checksum(tmp / "src", a) for _ in range(2)) for a in CHECKSUMS}
        create_before = create_cost_us(tmp) if ram else wait_for_quiet_fs(tmp, args.quiet_create_us)
        for rep in range(reps if create_before is not None else 0):
            runs = [("cp -r", time_cp, ()), ("write (1 process)", time_write, (1,)),
                    (f"write ({args.workers} processes)", time_write, (args.workers,))]
            for i, (key, timer, extra) in enumerate(runs):
                out = tmp / f"out{rep}_{i}"
                best[key] = min(best[key], timer(tmp / "src", out, *extra))
                if ram:  # in RAM a deletion slows nothing; on a disk see the module doc
                    shutil.rmtree(out)
        floor = min(time_bare_loop(tmp / "src", tmp / f"bare{rep}", args.workers) for rep in range(reps))
        os.sync()
        create_after = create_cost_us(tmp)
    if create_before is None or create_after > max(args.quiet_create_us, 1.2 * create_before):
        when = "never got cheap within 7 minutes" if create_before is None else \
            f"cost {create_after:.0f} µs after the runs, {create_before:.0f} before (something deleted files meanwhile)"
        print(f"invalid: creating a file {when}; cp -r's time is not its quiet-disk time. Rerun later.")
        bench_line("mst-shards write vs cp -r (images/s)", 0.0, ">=", TARGET)
        return
    load = os.getloadavg()
    table = Table(title=f"{n:,} JPEGs, {total / 1e6:,.0f} MB, best of {reps}, {'in RAM' if ram else 'on disk'} "
                        f"({tmp.parent}); {os.cpu_count()} cores, "
                        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the end")
    for col in ("method", "seconds", "images/s", "MB/s", "ratio vs cp -r", "CPU seconds"):
        table.add_column(col, justify="right")
    cp, cp_cpu = best["cp -r"]
    for name, (t, cpu) in best.items():
        table.add_row(name, f"{t:.2f}", f"{n / t:,.0f}", f"{total / t / 1e6:,.0f}", f"{cp / t:.2f}", f"{cpu:.2f}")
    for algorithm, t in hashes.items():
        table.add_row(f"(reference) {algorithm} of the bytes, 1 core", f"{t:.2f}", f"{n / t:,.0f}",
                      f"{total / t / 1e6:,.0f}", f"{cp / t:.2f}", "")
    table.add_row(f"(reference) bare read + write + {DEFAULT_CHECKSUM}, {args.workers} processes", f"{floor:.2f}", f"{n / floor:,.0f}",
                  f"{total / floor / 1e6:,.0f}", f"{cp / floor:.2f}", "")
    Console(width=120).print(table)
    print(f"creating one file: {create_before:.0f} µs before the runs, {create_after:.0f} µs after (cp -r creates "
          f"{n:,} files, the writer {-(-n // 256)} shards)")
    print("The manifest's per-shard checksum bounds the writer at (hash rate × cores): with sha256 (before xxh3) the\n"
          "ratio was hash-bound when cp -r runs at page-cache speed; reading from disk, both are bound by the disk.")
    w_cpu = best[f"write ({args.workers} processes)"][1]
    print(f"CPU per image: the writer uses {w_cpu / cp_cpu:.1f}× the CPU of cp -r (load-independent; with that many "
          "free cores its wall time can match cp -r's)")
    ratio = cp / min(t for k, (t, _) in best.items() if k.startswith("write"))
    print(f"target: mst-shards write ≥ {TARGET}× the images/s of cp -r → {ratio:.2f}× "
          f"({'met' if ratio >= TARGET else 'NOT met'})")
    bench_line("mst-shards write vs cp -r (images/s)", ratio, ">=", TARGET)


if __name__ == "__main__":
    main()
