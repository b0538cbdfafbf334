"""Issue 33, fourth reliability pass: writers replace only their own files (defects 6, 7), malformed shard
manifests and report inputs are one line (8, 9), ``--layout ilsvrc --classes`` (11), and the smaller
ones: lock files, ``train --check``'s pre-flight, ``--which`` of an export, the recorded preset, a timm
folder's config.json, ``--classes`` names. Each test failed on the code before the fix."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pytest

from data_tools.cli import main as shards_main
from data_tools.sample_data import generated_image, jpeg_bytes
from data_tools.subsets import read_class_list
from data_tools.writer import WriteError, write_shards
from mst_ds import job
from mst_ds.cli import main
from mst_ds.eval.features import OUT_LOCK
from tests.conftest import digits_folders


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real digits: train 10 / class, val 4 / class; val also as shards."""
    root = digits_folders(tmp_path_factory, "rel4", 10, 4)
    write_shards(root / "val", root / "val_shards", split="val", max_count=16, progress=False)
    return root


def _knn(digits, out, *extra, val=None):
    return main(["knn", "--preset", "tiny", "--train", str(digits / "train"), "--val", str(val or digits / "val"),
                 "--out", str(out), "--num-workers", "0", "--batch-size", "64", "--k", "5", *extra])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mst-ds"), err
    return err[0]


# -- defect 7 (k-NN half): --out DIR/knn.json of a user -----------------------------------------------
def test_knn_does_not_overwrite_a_users_knn_json(digits, tmp_path, capsys, one_thread):
    out = tmp_path / "o"
    out.mkdir()
    (out / "knn.json").write_text('{"mine": "my own numbers"}\n')
    assert _knn(digits, out) == 2
    assert "was not written by mst-ds knn" in _one_line(capsys)
    assert json.loads((out / "knn.json").read_text()) == {"mine": "my own numbers"}  # before: overwritten
    assert _knn(digits, out, "--force") == 0
    assert json.loads((out / "knn.json").read_text())["command"] == "knn"
    assert _knn(digits, out) == 0  # its own file is replaced without --force
    assert not (out / OUT_LOCK).exists()  # the eval lock is removed when done


# -- defect 6: report's outputs --------------------------------------------------------------------
def _fake_result(root, name, weights):
    run = root / name
    run.mkdir()
    (run / "knn.json").write_text(json.dumps({
        "command": "knn", "model": {"weights": weights, "which": "teacher", "step": 4},
        "data": {"train": {"digest": "t"}, "val": {"digest": "v"}}, "metrics": {"knn_k20_top1": 40.0}}))
    return run


@pytest.mark.parametrize("victim", ["report.md", "report.json", "loss.png"])
def test_report_does_not_overwrite_a_users_files(tmp_path, capsys, victim):
    a, b = _fake_result(tmp_path, "a", "files:a"), _fake_result(tmp_path, "b", "files:b")
    with open(a / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    out = tmp_path / "report"  # the default --out: <parent>/report
    out.mkdir()
    (out / victim).write_bytes(b"my own file\n")
    assert main(["report", str(a), str(b)]) == 2
    assert "was not written by mst-ds report" in _one_line(capsys)
    assert (out / victim).read_bytes() == b"my own file\n"  # before: replaced, exit 0
    assert sorted(p.name for p in out.iterdir()) == [victim]  # nothing else written either
    assert main(["report", str(a), str(b), "--force"]) == 0
    assert main(["report", str(a), str(b)]) == 0  # its own files: replaced without --force
    assert json.loads((out / "report.json").read_text())["metrics"]["knn_k20_top1"]["n"] == 2


# -- defect 9: report's inputs ---------------------------------------------------------------------
REPORT_INPUTS = {
    "metrics line not an object": ("metrics.jsonl", b'{"step": 1, "loss": 2}\n[1, 2]\n'),
    "metrics not UTF-8": ("metrics.jsonl", b'{"step": 1, "loss": 2}\n{"note": "\xe9"}\n'),
    "knn.json a list": ("knn.json", b"[1, 2, 3]"),
    "knn metrics a list": ("knn.json", b'{"command": "knn", "metrics": [40.0]}'),
    "knn.json not UTF-8": ("knn.json", b'{"command": "knn", "metrics": {"x": 1}, "n": "\xff"}'),
    "knn.json not JSON": ("knn.json", b'{"command": '),
    "alert without rule": ("alerts.jsonl", b'{"step": 3, "metric": "m", "value": 1, "threshold": 2}\n'),
    "alert a number": ("alerts.jsonl", b"7\n"),
    "linear deeply nested": ("linear_cls.json", b"[" * 100000 + b"]" * 100000),
}


@pytest.mark.parametrize("case", sorted(REPORT_INPUTS))
def test_report_on_malformed_inputs_is_one_line(tmp_path, capsys, case):
    name, data = REPORT_INPUTS[case]
    run = _fake_result(tmp_path, "a", "files:a")
    if name == "knn.json":
        (run / name).unlink()
    (run / name).write_bytes(data)
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2  # before: a traceback
    assert str(run) in _one_line(capsys)


# -- defect 8: shard manifests that are JSON but not a manifest -------------------------------------
def _manifest(digits):
    return json.loads((digits / "val_shards" / "index.json").read_text())


def _with(m, path, value):
    m = json.loads(json.dumps(m))
    target = m
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return m


BAD_MANIFESTS = {
    "not a manifest": lambda m: {"hello": "world"},
    "classes a string": lambda m: _with(m, ["classes"], "n01440764"),
    "count 10**30": lambda m: _with(m, ["shards", 0, "count"], 10**30),
    "count -5": lambda m: _with(m, ["shards", 0, "count"], -5),
    "count 0": lambda m: _with(m, ["shards", 0, "count"], 0),
    "count 80.5": lambda m: _with(m, ["shards", 0, "count"], 80.5),
    "count true": lambda m: _with(m, ["shards", 0, "count"], True),
    "bytes a string": lambda m: _with(m, ["shards", 0, "bytes"], "big"),
    "class index -1": lambda m: _with(m, ["classes", 0, "index"], -1),
    "a list": lambda m: [m],
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
@pytest.mark.parametrize("command", ["knn", "verify", "inspect"])
def test_malformed_manifest_is_one_line(digits, tmp_path, capsys, case, command):
    shards = tmp_path / "shards"
    shutil.copytree(digits / "val_shards", shards)
    (shards / "index.json").write_text(json.dumps(BAD_MANIFESTS[case](_manifest(digits))))
    if command == "knn":
        code = _knn(digits, tmp_path / "o", val=shards)
        err = capsys.readouterr().err.strip().splitlines()
    else:
        code = shards_main([command, str(shards)])
        err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err  # before: tracebacks, or a silent "ImageFolder" / wrong count
    assert "index.json" in err[0] or "manifest" in err[0]


# -- defect 11: --layout ilsvrc --classes -----------------------------------------------------------
def _ilsvrc_train_tar(path, wnids):
    """An ILSVRC train tar of class tars; the last class's tar also holds a file that is no image."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as outer:
        for c, wnid in enumerate(wnids):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                members = [(f"{wnid}_{k}.JPEG", jpeg_bytes(generated_image(c * 10 + k, 40, 30))) for k in range(3)]
                if c == len(wnids) - 1:
                    members.append(("readme.txt", b"not an image"))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    inner.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(buf.getvalue())
            outer.addfile(info, io.BytesIO(buf.getvalue()))


def test_ilsvrc_subset_leaves_out_the_unreadable_inputs_of_dropped_classes(tmp_path):
    wnids = ["n01440764", "n01443537"]
    _ilsvrc_train_tar(tmp_path / "train.tar", wnids)
    res = write_shards(tmp_path / "train.tar", tmp_path / "sub", split="train", layout="ilsvrc", progress=False,
                       classes=("one", [wnids[0]]), strict=True)  # before: refused for n01443537.tar/readme.txt
    assert res.manifest.unreadable == [] and res.manifest.total == 3
    full = write_shards(tmp_path / "train.tar", tmp_path / "all", split="train", layout="ilsvrc", progress=False)
    assert full.manifest.unreadable == ["n01443537.tar/readme.txt: not an image file name"]
    with pytest.raises(WriteError, match="readme.txt"):
        write_shards(tmp_path / "train.tar", tmp_path / "sub2", split="train", layout="ilsvrc", progress=False,
                     classes=("two", [wnids[1]]), strict=True)


# -- --classes names ---------------------------------------------------------------------------------
def test_class_list_names_with_hash_spaces_bom_and_nfd(tmp_path, monkeypatch):
    listing = tmp_path / "list.txt"
    listing.write_bytes("\ufeffn01440764\n\"a # b \"\n  c  # comment\n".encode())
    assert read_class_list(str(listing))[1] == ["n01440764", "a # b ", "c"]  # before: "\ufeffn01440764", "\"a"
    src = tmp_path / "src"
    for name in ("caf\u0065\u0301", "other"):  # an NFD folder name ("café" as macOS writes it)
        (src / name).mkdir(parents=True)
        (src / name / "x.jpg").write_bytes(jpeg_bytes(generated_image(1, 40, 30)))
    nfc = tmp_path / "nfc.txt"
    nfc.write_text("caf\u00e9\n", encoding="utf-8")
    res = write_shards(src, tmp_path / "out", split="train", progress=False, classes=read_class_list(str(nfc)))
    assert res.manifest.total == 1  # before: "1 class(es) not in the source: café"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet100").write_text("n01440764\n")
    with pytest.raises(WriteError, match="both a built-in list and a file"):
        read_class_list("imagenet100")  # before: the built-in list, silently
    assert read_class_list("./imagenet100")[1] == ["n01440764"]


# -- lock files --------------------------------------------------------------------------------------
def test_a_link_planted_at_a_lock_name_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("a file of someone else's\n" * 100)
    before = victim.read_bytes()
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    os.symlink(victim, lock)
    with pytest.raises(job.RunDirLocked, match="symbolic link"):
        job.RunLock(lock.parent).acquire()
    assert victim.read_bytes() == before  # before: truncated to the holder line
    os.unlink(lock)
    os.link(victim, lock)  # a hard link: the same file under the lock's name
    with pytest.raises(job.RunDirLocked, match="hard link"):
        job.RunLock(lock.parent).acquire()
    assert victim.read_bytes() == before


def test_a_lock_is_never_truncated_and_the_eval_lock_is_removed(tmp_path):
    path = tmp_path / "x.lock"
    first = job.FileLock(path, "held by {holder}", RuntimeError, remove=True).acquire()
    size = path.stat().st_size
    with pytest.raises(RuntimeError, match="held by host"):
        job.FileLock(path, "held by {holder}", RuntimeError).acquire()
    first.release()
    assert not path.exists()
    path.write_text("somebody's notes\n")
    with pytest.raises(RuntimeError, match="did not write"):
        job.FileLock(path, "held by {holder}", RuntimeError).acquire()
    assert path.read_text() == "somebody's notes\n"
    path.unlink()
    kept = job.FileLock(path, "x", RuntimeError).acquire()
    kept.release()
    assert path.stat().st_size == size and path.exists()  # a run lock stays (padded holder line)


# -- train --check: loggers and trackers.json in the pre-flight --------------------------------------
def test_train_check_refuses_a_missing_logger_and_a_bad_trackers_json(digits_shards, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    # (both refusals come before the pre-flight builds DeepSpeed's comm op: no deepspeed_cpu fixture needed)
    base = ["train", "--preset", "tiny", "--set", f"data.train={digits_shards}", "--check"]
    assert main([*base, "--run-dir", str(tmp_path / "a"), "--set", "run.loggers=[tensorboard,mlflow]"]) == 2
    assert "mlflow, which is not installed" in _one_line(capsys)  # before: exit 0, failing later on rank 0
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "trackers.json").write_bytes(b"\xff not json")
    assert main([*base, "--run-dir", str(tmp_path / "b")]) == 2
    assert "trackers.json" in _one_line(capsys)


# -- exports: --which, the recorded preset, config.json ---------------------------------------------
@pytest.fixture(scope="module")
def student_export(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel4_export") / "student"
    assert main(["export", str(trained_run), "--out", str(out), "--format", "timm-folder", "--which", "student"]) == 0
    return out


def test_knn_of_a_student_export_says_it_evaluates_the_student(student_export, digits, tmp_path, capsys):
    capsys.readouterr()
    assert main(["knn", "--ckpt", str(student_export), "--train", str(digits / "train"), "--val",
                 str(digits / "val"), "--out", str(tmp_path / "o"), "--num-workers", "0", "--k", "5"]) == 0
    assert "holds the student" in capsys.readouterr().err  # before: nothing said
    rec = json.loads((tmp_path / "o" / "knn.json").read_text())
    assert rec["which"] == "student" and rec["preset"] is None  # before: the command's default preset


def test_knn_of_a_run_records_the_runs_preset(trained_run, digits, tmp_path, one_thread):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    info = json.loads((run / "run_info.json").read_text())
    info["argv"] = ["mst-ds", "train", "--preset", "tiny"]  # (the fixture trains in process: no argv of its own)
    (run / "run_info.json").write_text(json.dumps(info))
    assert main(["knn", "--ckpt", str(run), "--train", str(digits / "train"), "--val", str(digits / "val"),
                 "--out", str(tmp_path / "o"), "--num-workers", "0", "--k", "5"]) == 0
    assert json.loads((tmp_path / "o" / "knn.json").read_text())["preset"] == "tiny"  # before: mst_deit_s_100ep


@pytest.mark.parametrize("edit", ["architecture", "mean", "input_size", "not json"])
def test_an_edited_timm_config_json_is_refused(student_export, digits, tmp_path, capsys, edit):
    folder = tmp_path / "f"
    shutil.copytree(student_export, folder)
    config = json.loads((folder / "config.json").read_text())
    if edit == "architecture":
        config["architecture"] = "vit_small_patch16_224"
    elif edit == "mean":
        config["pretrained_cfg"]["mean"] = [0.5, 0.5, 0.5]
    elif edit == "input_size":
        config["pretrained_cfg"]["input_size"] = [3, 64, 64]
    (folder / "config.json").write_text("{" if edit == "not json" else json.dumps(config))
    capsys.readouterr()
    assert main(["knn", "--ckpt", str(folder), "--train", str(digits / "train"), "--val", str(digits / "val"),
                 "--out", str(tmp_path / "o"), "--num-workers", "0"]) == 2  # before: exit 0, config.json ignored
    assert "config.json" in _one_line(capsys)


def test_random_init_records_its_preset(digits, tmp_path, one_thread):
    assert _knn(digits, tmp_path / "o") == 0
    assert json.loads((tmp_path / "o" / "knn.json").read_text())["preset"] == "tiny"
