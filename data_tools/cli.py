"""``mst-shards write|verify|inspect``.

Bad input (missing source, bad flag value, unreadable inputs under ``--strict``, an ``--out`` folder that
is not a shard folder) → one line on stderr, exit 2. A write that fails while running (disk full) → one
line, exit 1, finished shards kept, no temp file left. A verification failure → one line per problem, exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_tools import TOOL_VERSION
from data_tools.sniff import DEFAULT_MAX_PIXELS
from mst_ds.data.manifest import CHECKSUMS, DEFAULT_CHECKSUM

EXIT_FAILED, EXIT_USAGE = 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mst-shards", description="ImageNet / ImageFolder → verified WebDataset shards")
    parser.add_argument("--version", action="version", version=TOOL_VERSION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("write", help="write shards + their manifest (resumes an interrupted run)")
    w.add_argument("--src", required=True, help="ImageFolder tree, or ILSVRC2012 train tar / val folder or tar")
    w.add_argument("--out", required=True, help="output folder for the shards and their manifest (new, empty, or written by mst-shards)")
    w.add_argument("--split", required=True, choices=["train", "val"])
    w.add_argument("--layout", choices=["imagefolder", "ilsvrc"], default="imagefolder")
    w.add_argument("--val-labels", default=None, help="ILSVRC val: the devkit (folder/.tar.gz), its ground-truth file, or one wnid per line")
    w.add_argument("--max-count", type=int, default=256, help="images per shard")
    w.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="writer processes, each writing a disjoint range of shards (same bytes for any number; "
                        "default: the cores, at most 8)")
    w.add_argument("--seed", type=int, default=0, help="seed of the sample-list shuffle")
    w.add_argument("--strict", action="store_true", help="an unreadable input is an error (exit 2)")
    w.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images whose header claims more pixels are unreadable (decompression bombs)")
    w.add_argument("--classes", default=None, metavar="FILE|imagenet100",
                   help="write only these classes: a file of one wnid or folder name per line ('#' starts a comment; "
                        "a name with '#' or surrounding spaces as a JSON string), or imagenet100 "
                        "(CMC's ImageNet-100); kept classes are numbered 0..K-1 in source order (use the same list for train and val)")
    w.add_argument("--checksum", choices=list(CHECKSUMS), default=DEFAULT_CHECKSUM,
                   help="per-shard checksum in the manifest (xxh3_128: memory speed; sha256: as manifests before it)")
    w.add_argument("--quiet", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="check every shard against its manifest (exit 1 on any finding)")
    v.add_argument("dir", help="shard folder (or its manifest file)")
    v.add_argument("--split", default=None, help="which manifest of a folder holding several splits")
    v.add_argument("--decode", action="store_true", help="also decode every image")

    i = sub.add_parser("inspect", help="class histogram, size statistics, contact sheet")
    i.add_argument("dir", help="shard folder (or its manifest file)")
    i.add_argument("--split", default=None, help="which manifest of a folder holding several splits")
    i.add_argument("--out", default=None, help="contact-sheet PNG (default: DIR/contact_sheet.png)")
    i.add_argument("--max-shards", type=int, default=None, help="read only the first N shards")
    i.add_argument("--sheet-images", type=int, default=64)
    return parser


def _write(args) -> int:
    from rich.console import Console

    from data_tools.subsets import read_class_list
    from data_tools.writer import write_shards

    classes = read_class_list(args.classes) if args.classes is not None else None
    res = write_shards(args.src, args.out, split=args.split, layout=args.layout, val_labels=args.val_labels,
                       max_count=args.max_count, workers=args.workers, seed=args.seed, strict=args.strict,
                       progress=not args.quiet, max_pixels=args.max_pixels, classes=classes,
                       checksum=args.checksum)
    m = res.manifest
    mb = m.total_bytes / 1e6
    Console(stderr=True, soft_wrap=True).print(
        f"wrote {res.written} shard(s), kept {res.kept} from an earlier run: {m.total:,} images in {len(m.shards)} shard(s), "
        f"{len(m.classes)} classes, {mb:,.1f} MB, {m.total / max(res.seconds, 1e-9):,.0f} images/s, "
        f"{mb / max(res.seconds, 1e-9):,.1f} MB/s; {len(m.unreadable)} unreadable inputs → {res.path}"
        + (f" (class subset {m.extra['class_subset']['list']}: {m.extra['class_subset']['count']} of "
           f"{m.extra['class_subset']['of']} classes)" if "class_subset" in m.extra else ""), markup=False)
    for u in m.unreadable[:20]:
        print(f"  unreadable: {u}", file=sys.stderr)
    if len(m.unreadable) > 20:
        print(f"  ... and {len(m.unreadable) - 20} more ({res.path.name} lists all)", file=sys.stderr)
    for wnid in res.empty_classes:
        index = next(c["index"] for c in m.classes if c["wnid"] == wnid)
        print(f"mst-shards: warning: class {wnid} (label {index}) has no image; kept as a class so the labels "
              f"after it keep their index (recorded as empty_classes in {res.path.name})", file=sys.stderr)
    return 0


def _verify(args) -> int:
    from data_tools.verify import verify_dir

    report = verify_dir(args.dir, decode=args.decode, split=args.split)
    for p in report.problems:
        print(f"mst-shards: verify: {p}", file=sys.stderr)
    if not report.ok:
        print(f"mst-shards: verify FAILED: {len(report.problems)} finding(s) over {report.shards} shards", file=sys.stderr)
        return EXIT_FAILED
    print(f"verify OK: {report.shards} shards, {report.samples:,} samples{' (all decoded)' if args.decode else ''}")
    return 0


def _inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from data_tools.inspection import contact_sheet, inspect_dir, stats_row

    res = inspect_dir(args.dir, max_shards=args.max_shards, sheet_images=args.sheet_images, split=args.split)
    m = res.manifest
    con = Console()
    con.print(f"[bold]{m.split}[/bold]: {m.total:,} images in {len(m.shards)} shards, {len(m.classes)} classes, "
              f"{m.total_bytes / 1e6:,.1f} MB, {len(m.unreadable)} unreadable inputs, written by {m.tool_version}")
    hist = Table(title=f"class histogram ({res.samples:,} samples read)")
    for col in ("index", "wnid", "name", "count", ""):
        hist.add_column(col)
    top = max(res.class_counts.values(), default=1)
    for c in m.classes:
        n = res.class_counts.get(c["index"], 0)
        hist.add_row(str(c["index"]), c["wnid"], c["name"], f"{n:,}", "█" * max(0, round(30 * n / top)))
    if -1 in res.class_counts:
        hist.add_row("-", "-", "(no label)", f"{res.class_counts[-1]:,}", "")
    con.print(hist)
    sizes = Table(title="image statistics")
    for col in ("", "min", "p5", "median", "p95", "max"):
        sizes.add_column(col)
    sizes.add_row("width (px)", *stats_row(res.widths))
    sizes.add_row("height (px)", *stats_row(res.heights))
    sizes.add_row("bytes", *stats_row(res.bytes_per_image))
    con.print(sizes)
    con.print("formats: " + ", ".join(f"{f}/{mode}: {n:,}" for (f, mode), n in sorted(res.formats.items())))
    out = Path(args.out) if args.out else Path(m.root) / "contact_sheet.png"
    if res.thumbs:
        con.print(f"contact sheet of {len(res.thumbs)} images → {contact_sheet(res.thumbs, out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from data_tools.writer import WriteError
    from mst_ds.config import ConfigError, RunFailure
    from mst_ds.data.manifest import ManifestError

    args = build_parser().parse_args(argv)
    try:
        return {"write": _write, "verify": _verify, "inspect": _inspect}[args.command](args)
    except (WriteError, ManifestError, ConfigError) as err:
        print(f"mst-shards: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailure as err:  # disk full while writing: finished shards are kept, temp files removed
        print(f"mst-shards: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:  # unwritable output, disk full, ...: one line, finished shards are kept
        print(f"mst-shards: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mst-shards: error: interrupted (rerun to finish; finished shards are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
