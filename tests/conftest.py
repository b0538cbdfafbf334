"""Shared fixtures: real tiny shards built with data_tools, and DeepSpeed's CPU comm op built once.

The first DeepSpeed engine start on CPU JIT-compiles a small C++ comm op (~30–70 s, SPEC §7) into
this Python environment's extensions folder (:func:`mst_ds.job.use_extensions_dir`). ``deepspeed_cpu`` builds it once per test session (before any engine or
launcher starts), so every later engine — in this process or in launched subprocesses — loads it in
milliseconds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from data_tools.sample_data import write_digits_imagefolder
from mst_ds.scalars import MFU, THROUGHPUT

# Before anything imports DeepSpeed: this machine has no GPU, tests run the real engine on CPU (gloo).
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def deepspeed_cpu() -> None:
    """Build (or load from the cache) DeepSpeed's shared-memory comm op once for the session, in the
    folder `mst-ds train` uses (exported for this process and the launches it starts)."""
    from mst_ds.job import build_comm_op

    build_comm_op()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """Real scikit-learn digits (train split, 1,438 images) as verified WebDataset shards of ≤ 240."""
    from data_tools import sample_data
    from data_tools.writer import write_shards

    root = tmp_path_factory.mktemp("digits_shards")
    folders = sample_data.write_digits_imagefolder(root / "folder")
    write_shards(folders.train, root / "shards", split="train", max_count=240, progress=False)
    return root / "shards"


TRAIN_SETS = ["optim.batch_size=8", "data.num_workers=0", "run.log_every=1", "checkpoint.every_steps=2",
              "checkpoint.keep_last=2", "run.schedule_steps=40"]


def train_in_process(run_dir: Path, shards: Path, *sets: str, **kwargs) -> int:
    """`mst-ds train --preset tiny` in this process (world of one) on the digits shards (``kwargs`` go to
    :func:`mst_ds.train.train`)."""
    from mst_ds.config import load_config
    from mst_ds.train import train

    cfg = load_config("tiny", [*TRAIN_SETS, f"data.train={shards}", *sets]).config
    return train(cfg, run_dir, progress=False, **kwargs)


def digits_folders(tmp_path_factory, name: str, train_per_class: int, val_per_class: int) -> Path:
    """Real digits as small ImageFolders: ROOT/train and ROOT/val with the first N images of each class."""
    full = write_digits_imagefolder(tmp_path_factory.mktemp(f"{name}_full"), size=32)
    root = tmp_path_factory.mktemp(name)
    for split, src, per_class in (("train", full.train, train_per_class), ("val", full.val, val_per_class)):
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copy2(f, root / split / cls.name / f.name)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_shards, deepspeed_cpu) -> Path:
    """A 4-step tiny run (ZeRO-2 fp32, checkpoints at steps 2 and 4) in this process → run directory."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert train_in_process(run_dir, digits_shards, "run.max_steps=4") == 0
    return run_dir


@pytest.fixture
def one_thread():
    """Batched ops on tiny tensors run fastest single-threaded: thread hand-offs cost more than the
    work on a loaded 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Keys of metrics.jsonl that depend on the clock or the machine's load, not on the computation.
_TIMING_KEYS = {"time", "peak_mem_mb", "monitor_s", "monitor_time_share", *THROUGHPUT, MFU}


def _tensor_digest(h, obj) -> None:
    """Feed every tensor of a nested state (dicts in sorted key order) into the hash ``h``."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _tensor_digest(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensor_digest(h, v)


def pinning_platform() -> str:
    """Where pinned digests hold: CPU kernels (and so the last bits of a float sum) differ between torch
    versions and instruction sets."""
    import torch

    return f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()} cpus {os.cpu_count()}"


def run_digests(run_dir: Path, out: Path) -> dict[str, str]:
    """sha256 (16 hex) of a finished run's computation: metrics.jsonl values without timings, every tensor
    of the last checkpoint's files, teacher and student state dicts, and the exported teacher backbone."""
    import hashlib
    import json

    from safetensors.torch import load_file

    from mst_ds import checkpoint as ckpt
    from mst_ds.cli import main

    def digest(obj) -> str:
        h = hashlib.sha256()
        _tensor_digest(h, obj)
        return h.hexdigest()[:16]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [{k: v for k, v in r.items() if k not in _TIMING_KEYS} for r in records]
    tag_dir = run_dir / "checkpoints" / ckpt.newest_complete(run_dir / "checkpoints")
    files = {p.name: ckpt.safe_load(p) for p in sorted(tag_dir.rglob("*.pt"))}
    teacher, student = ckpt.load_teacher_student(run_dir)
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return {"metrics": hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16],
            "checkpoint_files": digest(files), "teacher": digest(teacher), "student": digest(student),
            "export": digest(load_file(str(out)))}


def assert_pinned(run_dir: Path, out: Path, platform: str, pinned: dict[str, str]) -> None:
    """The run's digests equal ``pinned`` (skipped, saying why, on another platform than the pinning one)."""
    got = run_digests(run_dir, out)
    print(pinning_platform(), got)
    if pinning_platform() != platform:
        pytest.skip(f"digests pinned on {platform}, this is {pinning_platform()}")
    assert got == pinned
