"""`mst-shards write --classes`: class subsets (a file or CMC's ImageNet-100) recorded in the manifest,
train and val written with the same list evaluated with consistent labels."""

from __future__ import annotations

import json

import pytest

from data_tools import sample_data
from data_tools.cli import main as shards_main
from data_tools.subsets import IMAGENET100
from mst_ds.cli import main
from mst_ds.data.manifest import Manifest
from mst_ds.data.reader import class_names, iter_tar_samples


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_subset")
    return sample_data.write_digits_imagefolder(root / "images", size=32)


def test_imagenet100_is_cmcs_hundred_distinct_wnids():
    assert len(IMAGENET100) == len(set(IMAGENET100)) == 100
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in IMAGENET100)
    assert IMAGENET100[:2] == ["n02869837", "n01749939"] and IMAGENET100[-1] == "n02090622"


def test_subset_written_recorded_and_evaluated(digit_folders, tmp_path, capsys):
    listing = tmp_path / "classes.txt"
    listing.write_text("7\n# a comment\n3\n\n5\n")  # any order: labels follow the source's order
    out = {}
    for split, src in (("train", digit_folders.train), ("val", digit_folders.val)):
        out[split] = tmp_path / split
        assert shards_main(["write", "--src", str(src), "--out", str(out[split]), "--split", split, "--workers", "1",
                            "--quiet", "--classes", str(listing)]) == 0
        m = Manifest.load(out[split])
        assert [c["wnid"] for c in m.classes] == ["3", "5", "7"] and [c["index"] for c in m.classes] == [0, 1, 2]
        sub = m.extra["class_subset"]
        assert sub["list"] == str(listing) and sub["count"] == 3 and sub["of"] == 10 and len(sub["sha256"]) == 16
        samples = [s for url in m.urls() for s in iter_tar_samples(url)]
        assert {json.loads(s["json"])["wnid"] for s in samples} == {"3", "5", "7"}
        assert all(json.loads(s["json"])["class"] == ["3", "5", "7"].index(json.loads(s["json"])["wnid"])
                   for s in samples)
        assert m.total == sum(len(list((src / c).iterdir())) for c in ("3", "5", "7"))
    assert class_names(str(out["val"])) == ["3", "5", "7"]
    assert main(["knn", "--preset", "tiny", "--train", str(out["train"]), "--val", str(out["val"]),
                 "--num-workers", "0", "--out", str(tmp_path / "knn")]) == 0
    rec = json.loads((tmp_path / "knn" / "knn.json").read_text())
    # three well-separated digit classes at random init: far above a third when labels agree
    assert rec["metrics"]["knn_k20_top1"] > 60 and rec["n_excluded"] == 0


@pytest.mark.parametrize("case", ["unknown", "imagenet100_on_digits", "missing_file", "duplicate"])
def test_bad_class_lists_are_one_line_exit_2(digit_folders, tmp_path, capsys, case):
    listing = tmp_path / "classes.txt"
    spec = {"unknown": "3\nseventeen\n", "duplicate": "3\n3\n"}.get(case)
    if spec is not None:
        listing.write_text(spec)
    arg = {"imagenet100_on_digits": "imagenet100", "missing_file": str(tmp_path / "nope.txt")}.get(case, str(listing))
    capsys.readouterr()
    assert shards_main(["write", "--src", str(digit_folders.val), "--out", str(tmp_path / "o"), "--split", "val",
                        "--quiet", "--classes", arg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mst-shards: error: --classes")
    assert {"unknown": "seventeen", "imagenet100_on_digits": "n02869837", "duplicate": "twice"}.get(case, "neither") in err[0]
    assert not (tmp_path / "o").exists()
