"""Where DeepSpeed's CPU comm op is built (issue 20, defect 13 part; SPEC §11): one folder per Python
environment, a per-user fallback when HOME's cache is not writable, a user's TORCH_EXTENSIONS_DIR always
respected, and one line (never a traceback) when nothing is writable.

The shared .venv of the development machine sets TORCH_EXTENSIONS_DIR from a .pth file; every test here
sets or pops it explicitly, so CI (no such file) behaves the same. This machine runs the tests as root,
for whom a mode-0555 folder is writable: an unwritable HOME is a HOME that is a file (mkdir below it fails
for every user)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mst_ds.config import RunFailure
from mst_ds.job import EXTENSIONS_ENV, use_extensions_dir

ROOT = Path(__file__).resolve().parent.parent
ENV_HASH = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(EXTENSIONS_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return monkeypatch


def _unwritable_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.write_text("a file: nothing can be created below it\n")
    return home


def test_one_folder_per_python_environment(clean_env, tmp_path, capsys):
    clean_env.setenv("HOME", str(tmp_path / "h"))
    path = use_extensions_dir()
    assert path == tmp_path / "h" / ".cache" / "torch_extensions" / ENV_HASH and path.is_dir()
    assert os.environ[EXTENSIONS_ENV] == str(path) and capsys.readouterr().err == ""


def test_a_user_set_dir_is_respected(clean_env, tmp_path):
    clean_env.setenv(EXTENSIONS_ENV, str(tmp_path / "mine"))
    clean_env.setenv("HOME", str(_unwritable_home(tmp_path)))
    assert use_extensions_dir() == tmp_path / "mine"


def test_unwritable_home_falls_back_to_a_private_tmp_dir(clean_env, tmp_path, capsys):
    clean_env.setenv("HOME", str(_unwritable_home(tmp_path)))
    path = use_extensions_dir()
    assert path == tmp_path / "tmp" / f"torch_extensions-{os.getuid()}" / ENV_HASH and path.is_dir()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not writable" in err and str(path) in err
    clean_env.delenv(EXTENSIONS_ENV)
    assert use_extensions_dir(announce=False) == path and capsys.readouterr().err == ""  # what a rank does


def test_a_fallback_others_can_write_is_refused(clean_env, tmp_path):
    clean_env.setenv("HOME", str(_unwritable_home(tmp_path)))
    shared = tmp_path / "tmp" / f"torch_extensions-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # a module planted here would be loaded: never build or load from it
    with pytest.raises(RunFailure, match=EXTENSIONS_ENV):
        use_extensions_dir()


def test_preflight_with_nothing_writable_is_one_line(tmp_path, digits_shards):
    """Before: a NotADirectoryError (PermissionError for a read-only HOME) traceback from build_comm_op."""
    env = {k: v for k, v in os.environ.items() if k not in (EXTENSIONS_ENV, "XDG_CACHE_HOME")}
    home = _unwritable_home(tmp_path)
    env.update(HOME=str(home), TMPDIR=str(home), DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "mst_ds.cli", "train", "--check", "--preset", "tiny",
                        "--run-dir", str(tmp_path / "run"), "--set", f"data.train={digits_shards}"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and EXTENSIONS_ENV in r.stderr, r.stderr


@pytest.mark.slow
def test_launch_with_unwritable_home_builds_and_trains_from_the_fallback(tmp_path, digits_shards):
    """launch.sh with HOME unwritable and no TORCH_EXTENSIONS_DIR: the pre-flight builds the op into the
    per-user fallback (one note) and the ranks load it from there (they could not build anywhere else)."""
    from test_train_dist import _sets

    env = {k: v for k, v in os.environ.items() if k not in (EXTENSIONS_ENV, "XDG_CACHE_HOME", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK", "MASTER_PORT")}
    (tmp_path / "tmp").mkdir()
    env.update(HOME=str(_unwritable_home(tmp_path)), TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=str(ROOT))
    r = subprocess.run([str(ROOT / "launch.sh"), "--cpu", "2", "--preset", "tiny", "--run-dir", str(tmp_path / "run"),
                        *_sets(digits_shards, "run.max_steps=2")], env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out[-3000:]
    fallback = tmp_path / "tmp" / f"torch_extensions-{os.getuid()}" / ENV_HASH
    assert list(fallback.rglob("deepspeed_shm_comm*.so")), out[-3000:]
    assert out.count("not writable; building torch extensions in") == 1
