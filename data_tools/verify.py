"""``mst-shards verify``: re-read every shard against its manifest (count, size, sha256, optionally decode).

A tar truncated at a member boundary reads back short with no error (SPEC §5); only this comparison
with the manifest notices it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mst_ds.data.augment import decode_rgb
from mst_ds.data.manifest import Manifest, file_sha256
from mst_ds.data.reader import IMAGE_EXTS, iter_tar_samples


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)  # "SHARD: what is wrong"

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shard(path: Path, expected_count: int, expected_bytes: int, expected_sha: str, *, decode: bool,
                 seen_keys: set[str]) -> tuple[int, list[str]]:
    """→ (samples read, problems) for one local shard."""
    problems: list[str] = []
    if not path.exists():
        return 0, [f"{path}: missing"]
    size = path.stat().st_size
    if size != expected_bytes:
        problems.append(f"{path}: {size} bytes, manifest says {expected_bytes}")
    elif file_sha256(path) != expected_sha:
        problems.append(f"{path}: sha256 differs from the manifest")
    count = 0
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
            if decode and img_ext:
                try:
                    decode_rgb(s[img_ext[0]])
                except Exception as err:
                    problems.append(f"{path}: sample {key} does not decode ({str(err).splitlines()[0][:80]})")
    except Exception as err:
        problems.append(f"{path}: unreadable tar after {count} samples ({type(err).__name__}: {err})")
    if count != expected_count:
        problems.append(f"{path}: {count} samples, manifest says {expected_count}")
    return count, problems


def verify_dir(directory: str | Path, *, decode: bool = False, on_shard=None) -> VerifyReport:
    """Verify every shard of the manifest in ``directory`` (or of an ``index.json`` path)."""
    manifest = Manifest.load(str(directory))
    report = VerifyReport()
    seen: set[str] = set()
    root = Path(manifest.root)
    for info in manifest.shards:
        count, problems = verify_shard(root / info.name, info.count, info.bytes, info.sha256, decode=decode, seen_keys=seen)
        report.shards += 1
        report.samples += count
        report.problems.extend(problems)
        if on_shard is not None:
            on_shard(info.name, count)
    if report.samples != manifest.total and not report.problems:
        report.problems.append(f"{root / 'index.json'}: total {manifest.total} but shards hold {report.samples}")
    return report
