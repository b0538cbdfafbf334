"""``mst-shards verify``: re-read every shard against its manifest (count, size, checksum, labels, optionally
decode), and the manifest against itself and the folder.

A tar truncated at a member boundary reads back short with no error (SPEC §5); only this comparison
with the manifest notices it. A manifest edited by hand (a shard entry dropped with the total adjusted,
the class list cut, a name reaching outside the folder) is a finding too: each problem is one line and
any finding exits 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.sniff import error_text
from data_tools.writer import PROGRESS_DIR
from mst_ds.data.decode import decode_rgb
from mst_ds.data.manifest import Manifest, file_checksum, shard_name_problem
from mst_ds.data.reader import IMAGE_EXTS, iter_tar_samples


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)  # "SHARD or MANIFEST: what is wrong"

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard(path: Path, expected_count: int, expected_bytes: int, expected_checksum: str, *, decode: bool,
                 seen_keys: set[str], classes: list[dict] | None = None,
                 algorithm: str = "sha256") -> tuple[int, list[str]]:
    """→ (samples read, problems) for one local shard. With ``classes``, every label must index it and
    name the same wnid as the sample's own ``.json``."""
    problems: list[str] = []
    if not path.exists():
        return 0, [f"{path}: missing"]
    size = path.stat().st_size
    if size != expected_bytes:
        problems.append(f"{path}: {size} bytes, manifest says {expected_bytes}")
    elif file_checksum(path, algorithm) != expected_checksum:
        problems.append(f"{path}: {algorithm} differs from the manifest")
    count = 0
    bad_labels: list[str] = []
    try:
        for s in iter_tar_samples(str(path)):
            count += 1
            key = s["__key__"]
            img_ext = [e for e in IMAGE_EXTS if e in s]
            if not img_ext or "cls" not in s:
                problems.append(f"{path}: sample {key} lacks an image or .cls member")
            if key in seen_keys:
                problems.append(f"{path}: duplicate key {key}")
            seen_keys.add(key)
            if classes is not None and "cls" in s and (why := _label_problem(s, classes)):
                bad_labels.append(f"sample {key} {why}")
            if decode and img_ext:
                try:
                    decode_rgb(s[img_ext[0]])
                except Exception as err:
                    problems.append(f"{path}: sample {key} ({img_ext[0]}) does not decode ({error_text(err)})")
    except Exception as err:
        problems.append(f"{path}: unreadable tar after {count} samples ({type(err).__name__}: {error_text(err)})")
    if bad_labels:
        more = f" (and {len(bad_labels) - 1} more)" if len(bad_labels) > 1 else ""
        problems.append(f"{path}: {bad_labels[0]}{more}")
    if count != expected_count:
        problems.append(f"{path}: {count} samples, manifest says {expected_count}")
    return count, problems


def _label_problem(sample: dict, classes: list[dict]) -> str | None:
    try:
        label = int(sample["cls"])
    except ValueError:
        return f"has a label that is not a number ({sample['cls'][:20]!r})"
    if not 0 <= label < len(classes):
        return f"has label {label}, outside the manifest's {len(classes)} classes"
    try:
        wnid = json.loads(sample["json"]).get("wnid") if "json" in sample else None
    except ValueError:
        wnid = None
    if wnid is not None and classes[label].get("wnid") != wnid:
        return f"is {wnid} but the manifest's class {label} is {classes[label].get('wnid')}"
    return None


def _manifest_problems(manifest: Manifest, raw: dict | None, index: Path) -> list[str]:
    """What the manifest says about itself that does not add up."""
    problems = []
    if raw is not None:
        for key, actual in (("num_shards", len(manifest.shards)), ("num_classes", manifest.num_classes),
                            ("total_bytes", manifest.total_bytes)):
            if key in raw and raw[key] != actual:
                problems.append(f"{index}: {key} is {raw[key]} but the manifest lists {actual}")
    held = sum(s.count for s in manifest.shards)
    if held != manifest.total:
        problems.append(f"{index}: total {manifest.total} but its shard entries add up to {held}")
    labels = [c.get("index") for c in manifest.classes]
    if labels != list(range(len(labels))):
        problems.append(f"{index}: class indices are not 0..{len(labels) - 1} in order")
    numbered = re.compile(rf"{re.escape(manifest.split)}-(\d{{6}})\.tar")
    numbers = [int(m.group(1)) for s in manifest.shards if (m := numbered.fullmatch(s.name))]
    if len(numbers) == len(manifest.shards) and numbers != list(range(len(numbers))):
        gaps = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
        what = f"{manifest.split}-{gaps[0]:06d}.tar is not listed" if gaps else "shard numbers are out of order"
        problems.append(f"{index}: {what} (shards are numbered from 0 without gaps)")
    return problems


def _extra_shards(manifest: Manifest, root: Path, index: Path) -> list[str]:
    """Shards of this split on disk (or claimed by a writer record) that the manifest does not list."""
    listed = {s.name for s in manifest.shards}
    pattern = re.compile(rf"{re.escape(manifest.split)}-\d{{6}}\.tar")
    on_disk = {p.name for p in root.iterdir() if pattern.fullmatch(p.name)}
    recorded = {p.name[:-5] for p in (root / PROGRESS_DIR).glob("*.json") if pattern.fullmatch(p.name[:-5])} \
        if (root / PROGRESS_DIR).is_dir() else set()
    return [f"{root / name}: a shard of split {manifest.split!r} on disk (or in the writer's records) that {index.name} "
            "does not list" for name in sorted((on_disk | recorded) - listed)]


def verify_dir(directory: str | Path, *, decode: bool = False, on_shard=None, split: str | None = None) -> VerifyReport:
    """Verify every shard of the manifest in ``directory`` (or of a manifest path), the manifest's own
    sums, and the folder for shards the manifest does not list."""
    manifest = Manifest.load(str(directory), split=split, check_names=False)
    report = VerifyReport()
    seen: set[str] = set()
    root = Path(manifest.root)
    local = root.is_dir()
    index = root / manifest.index_name
    raw = None
    if local:
        try:
            raw = json.loads(index.read_text())
        except (OSError, ValueError):
            raw = None
    report.problems.extend(_manifest_problems(manifest, raw, index))
    for info, url in zip(manifest.shards, manifest.urls()):
        report.shards += 1
        if (why := shard_name_problem(info.name)) is not None:
            report.problems.append(f"{index}: {why} (not opened)")
            continue
        if not local:
            report.problems.append(f"{url}: not a local shard (verify reads a local folder)")
            continue
        count, problems = verify_shard(root / info.name, info.count, info.bytes, info.checksum, decode=decode,
                                       seen_keys=seen, classes=manifest.classes, algorithm=info.algorithm)
        report.samples += count
        report.problems.extend(problems)
        if on_shard is not None:
            on_shard(info.name, count)
    if local:
        report.problems.extend(_extra_shards(manifest, root, index))
    if report.samples != manifest.total and not report.problems:
        report.problems.append(f"{index}: total {manifest.total} but shards hold {report.samples}")
    return report
