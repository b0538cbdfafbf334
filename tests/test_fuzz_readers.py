"""Issue 33: every reader of a file a user may hand mst-ds — a shard manifest, a k-NN / linear result, a
metrics or alerts log, a class list, trackers.json, a timm folder's config.json — gives one line (its
own error type, exit 2 at the command line) for any wrongly shaped JSON or bytes; never a traceback,
never a silently accepted wrong value. Seeded mutations of valid files: every node of the document in
turn replaced by values of every wrong shape, plus cut, non-UTF-8 and random bytes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from data_tools.subsets import read_class_list
from data_tools.writer import WriteError
from mst_ds.config import UsageError, load_config
from mst_ds.data.manifest import Manifest, ManifestError
from mst_ds.eval import report
from mst_ds.trackers import check as check_trackers

WRONG = [None, True, False, -5, 0, 80.5, 10**30, -(10**30), "", "x", "10", [], [1], {}, {"a": 1}, float("inf")]


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every node's path in a JSON document (the root included)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):  # the first few elements stand for the rest
            out += _paths(v, (*prefix, i))
    return out


def _replace(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def _byte_variants(text: bytes, rng: random.Random) -> list[bytes]:
    cut = [text[: rng.randrange(1, len(text))] for _ in range(5)]
    flipped = []
    for _ in range(5):
        b = bytearray(text)
        b[rng.randrange(len(b))] = rng.choice([0xFF, 0xC3, 0x00, 0x80])
        flipped.append(bytes(b))
    noise = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(5)]
    return [b"", b"\xef\xbb\xbf" + text, b"[" * 50000, *cut, *flipped, *noise]


def _mutations(doc: Any, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for path in _paths(doc):
        for value in WRONG:
            out.append(json.dumps(_replace(doc, path, value)).encode())
        if path and isinstance(path[-1], str):  # the key missing
            parent = json.loads(json.dumps(doc))
            target = parent
            for key in path[:-1]:
                target = target[key]
            target.pop(path[-1])
            out.append(json.dumps(parent).encode())
    return out + _byte_variants(json.dumps(doc).encode(), rng)


# -- shard manifests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest_doc(digits_shards) -> dict:
    return json.loads((Path(digits_shards) / "index.json").read_text())


def test_fuzz_manifest_reader(manifest_doc, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    accepted = 0
    cases = _mutations(manifest_doc, seed=1)
    assert len(cases) > 500
    for data in cases:
        (folder / "index.json").write_bytes(data)
        try:
            m = Manifest.load(folder)
        except ManifestError as err:
            assert "\n" not in str(err)
            continue
        accepted += 1
        # What was accepted is well shaped: every field the loader and the evaluators use.
        assert isinstance(m.split, str) and isinstance(m.total, int) and not isinstance(m.total, bool)
        assert all(isinstance(s.count, int) and not isinstance(s.count, bool) and 1 <= s.count <= 2**40
                   for s in m.shards)
        assert all(isinstance(c, dict) and isinstance(c["index"], int) for c in m.classes)
        m.fingerprint()
    assert accepted  # extra keys and such are fine: the reader is not refusing everything


# -- report's inputs ---------------------------------------------------------------------------------
RESULT = {"command": "knn", "model": {"weights": "files:a", "which": "teacher", "step": 4},
          "data": {"train": {"digest": "t"}, "val": {"digest": "v"}}, "metrics": {"knn_k20_top1": 40.0}}
ALERT = {"step": 20, "rule": "uniform_collapse", "metric": "teacher_entropy_rel", "value": 0.95, "threshold": 0.9}


def test_fuzz_report_result_reader(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for data in _mutations(RESULT, seed=2):
        (run / "knn.json").write_bytes(data)
        try:
            results = report.run_results(run)
        except UsageError as err:
            assert "\n" not in str(err)
            continue
        assert all(isinstance(r.value, float) for r in results.values())
        report.check_comparable({str(run): results})


@pytest.mark.parametrize("log", ["metrics", "alerts"])
def test_fuzz_report_log_readers(tmp_path, log):
    path = tmp_path / f"{log}.jsonl"
    doc = ALERT if log == "alerts" else {"step": 3, "loss": 2.5, "lr": 1e-4}
    for data in _mutations(doc, seed=3):
        path.write_bytes(json.dumps(doc).encode() + b"\n" + data + b"\n")
        try:
            recs = report.read_alerts(path) if log == "alerts" else report.read_jsonl(path)
        except UsageError as err:
            assert "\n" not in str(err)
            continue
        assert all(isinstance(r, dict) for r in recs)
        if log == "alerts":
            report.markdown({}, ["r"], [], {"r": recs})


# -- class lists, trackers.json ------------------------------------------------------------------------
def test_fuzz_class_list_reader(tmp_path):
    path = tmp_path / "classes.txt"
    rng = random.Random(4)
    for data in _byte_variants(b"n01440764\n\"a # b\"\n# comment\n", rng) + [b'"unterminated\n', b"[1]\n", b'""\n']:
        path.write_bytes(data)
        try:
            _, names = read_class_list(str(path))
        except WriteError as err:
            assert "\n" not in str(err)
            continue
        assert names and all(isinstance(n, str) and n for n in names)


def test_fuzz_trackers_json_reader(tmp_path):
    cfg = load_config("tiny").config
    for data in _mutations({"wandb": "abc123", "mlflow": "f00"}, seed=5):
        (tmp_path / "trackers.json").write_bytes(data)
        try:
            check_trackers(tmp_path, cfg)
        except UsageError as err:
            assert "\n" not in str(err)
