"""Issue 9 case 5: corrupt samples are a run total over ranks and epochs that survives resume, and
``RUN/corrupt.jsonl`` names each one (key, shard) — real training on shards with undecodable JPEGs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TRAIN_SETS, train_in_process

from data_tools import sample_data
from data_tools.writer import write_shards
from mst_ds.config import load_config
from mst_ds.data.reader import iter_tar_samples, make_train_loader

N_BAD = 6


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory) -> Path:
    """50 real digits + 6 JPEGs that pass the header check but fail to decode, in shards of ≤ 16."""
    root = tmp_path_factory.mktemp("corrupt")
    full = sample_data.write_digits_imagefolder(root / "digits", size=32)
    src = root / "src"
    for cls in sorted(p for p in full.train.iterdir() if p.is_dir()):
        for f in sorted(cls.iterdir())[:5]:
            (src / cls.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, src / cls.name / f.name)
    for i in range(N_BAD):
        bad = sample_data.undecodable_jpeg_bytes(sample_data.generated_image(i, 32, 32))
        (src / str(i % 10) / f"zz_bad{i}.JPEG").write_bytes(bad)
    write_shards(src, root / "shards", split="train", max_count=16, progress=False)
    return root / "shards"


def expected_records(shards: Path, steps: int, *, world: int = 1) -> list[dict]:
    """What the loaders of every rank deliver as corrupt in the first ``steps`` steps (batch 8 over the ranks)."""
    cfg = load_config("tiny", [*TRAIN_SETS, f"data.train={shards}"]).config
    out = []
    for rank in range(world):
        step, epoch = 0, 0
        while step < steps:
            loader = make_train_loader(str(shards), cfg, rank=rank, world_size=world, micro_batch=8 // world, epoch=epoch)
            for _ in loader:
                step += 1
                out += [{"step": step, "epoch": epoch, "rank": rank, **r} for r in loader.take_corrupt()]
                if step == steps:
                    break
            epoch += 1
    return sorted(out, key=lambda r: (r["step"], r["rank"]))


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "corrupt.jsonl").read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_corrupt_samples_are_a_run_total_named_in_corrupt_jsonl(damaged_shards, tmp_path, deepspeed_cpu):
    """4 steps, a record a killed run wrote past its checkpoint, resume to 9 steps (across an epoch end:
    7 steps per epoch): corrupt.jsonl holds exactly the samples the loaders dropped in steps 1–9,
    each with its shard, and ``corrupt_samples`` counts them all (it reset every epoch before)."""
    expected = expected_records(damaged_shards, 9)
    assert {r["epoch"] for r in expected} == {0, 1} and len(expected) >= 3  # the test means something
    run = tmp_path / "run"
    assert train_in_process(run, damaged_shards, "run.max_steps=4") == 0
    assert lines(run) == [r for r in expected if r["step"] <= 4]
    with open(run / "corrupt.jsonl", "a") as f:  # as if a killed run had synced step 5 after the checkpoint
        f.write(json.dumps({"step": 5, "epoch": 0, "rank": 0, "key": "ghost", "shard": "x.tar"}) + "\n")
    assert train_in_process(run, damaged_shards, "run.max_steps=9") == 0
    got = lines(run)
    assert got == expected
    for r in got:  # each record names a real sample of the shard it gives
        assert r["key"].startswith("zz_bad")
        assert any(s["__key__"] == r["key"] for s in iter_tar_samples(str(damaged_shards / r["shard"])))
    recs = metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 10))
    for r in recs:
        assert r["corrupt_samples"] == sum(e["step"] <= r["step"] for e in expected)


@pytest.mark.slow
def test_two_ranks_sum_their_corrupt_samples(damaged_shards, tmp_path, deepspeed_cpu):
    """Both ranks' dropped samples reach corrupt.jsonl and the total (rank 0's alone did before)."""
    from test_train_dist import finish, launch

    expected = expected_records(damaged_shards, 8, world=2)
    assert {r["rank"] for r in expected} == {0, 1}
    run = tmp_path / "run2"
    code, out = finish(launch(run, damaged_shards, procs=2))
    assert code == 0, out[-2000:]
    assert lines(run) == expected
    assert metrics(run)[-1]["corrupt_samples"] == len(expected)
