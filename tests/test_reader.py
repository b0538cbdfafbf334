"""The streaming loader: equal batches per rank, per-epoch permutation, exact resume, damage counting."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_tools import sample_data
from data_tools.writer import write_shards
from mst_ds.config import ConfigError, load_config
from mst_ds.data.augment import eval_transform
from mst_ds.data.manifest import Manifest
from mst_ds.data.reader import CorruptDataError, make_eval_loader, make_train_loader, plan_epoch, sample_seed


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """Real scikit-learn digits → train shards (1,438 images, 6 shards of ≤ 240) and the val folder."""
    root = tmp_path_factory.mktemp("digits")
    folders = sample_data.write_digits_imagefolder(root / "folder")
    write_shards(folders.train, root / "shards", split="train", max_count=240, progress=False)
    return root / "shards", folders.val


@pytest.fixture(scope="module")
def small(digits, tmp_path_factory) -> Path:
    """The 359 held-out digits as 8 shards of ≤ 48 (for tests that only need a few batches)."""
    out = tmp_path_factory.mktemp("small") / "shards"
    write_shards(digits[1], out, split="train", max_count=48, progress=False)
    return out


def _cfg(workers: int = 2, **sets):
    cfg = load_config("tiny").config
    cfg.data.num_workers = workers
    cfg.data.shuffle_buffer = 64
    for k, v in sets.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg


def _run(source, cfg, **kw) -> list[dict]:
    return list(make_train_loader(str(source), cfg, **kw))


# --------------------------------------------------------------------------------------------------
# The plan (pure, from manifest counts)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counts,world,streams,batch", [
    ([240] * 5 + [238], 2, 2, 32), ([7, 3, 11], 4, 3, 2), ([256] * 13 + [17], 3, 4, 16), ([50], 2, 2, 8),
])
def test_plan_covers_each_sample_at_most_once_with_equal_batches(counts, world, streams, batch):
    plans = [plan_epoch(counts, seed=0, epoch=e, world_size=world, streams=streams, batch_size=batch) for e in (0, 1)]
    for plan in plans:
        seen = Counter()
        for rank in plan.units:
            for units in rank:
                assert sum(u.count for u in units) >= plan.stream_batches(0) * batch
                for u in units:
                    seen.update((u.shard, i) for i in range(u.start, u.stop))
        assert max(seen.values()) == 1 and all(0 <= i < counts[s] for s, i in seen)
        assert plan.n_batches * batch * world > sum(counts) - world * streams * batch - world  # little dropped
    assert plans[0].units != plans[1].units  # a new permutation every epoch


# --------------------------------------------------------------------------------------------------
# The real loader
# --------------------------------------------------------------------------------------------------
def test_two_ranks_two_workers(digits):
    shards, _ = digits
    assert len(Manifest.load(shards).shards) % 4 != 0  # shards not divisible by ranks × workers
    cfg = _cfg(workers=2)
    epochs = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            loader = make_train_loader(str(shards), cfg, rank=rank, world_size=2, micro_batch=32, epoch=epoch)
            batches = list(loader)
            assert len(batches) == len(loader) and all(len(b["key"]) == 32 for b in batches)
            per_rank.append(batches)
        assert len(per_rank[0]) == len(per_rank[1]) == 22  # (1438 // 2 // 2 // 32) × 2 streams
        keys = [k for batches in per_rank for b in batches for k in b["key"]]
        assert len(keys) == len(set(keys))  # every sample at most once per epoch, over both ranks
        epochs[epoch] = keys
        b = per_rank[0][0]
        assert [v.shape for v in b["global"]] == [torch.Size([32, 3, 32, 32])] * 2
        assert [v.shape for v in b["local"]] == [torch.Size([32, 3, 16, 16])] * 2
        assert b["global"][0].dtype == torch.uint8 and b["params"].shape == (32, 4, 5)
        assert b["label"].dtype == torch.long and set(b["label"].tolist()) <= set(range(10))
    assert epochs[0] != epochs[1]  # a different order next epoch
    assert set(epochs[0][:200]) != set(epochs[1][:200])


def test_labels_match_folders(digits):
    shards, _ = digits
    batch = next(iter(make_train_loader(str(shards), _cfg(0), rank=0, world_size=1, micro_batch=16, epoch=0)))
    m = Manifest.load(shards)
    by_key = {}
    for url in m.urls():
        import json

        from mst_ds.data.reader import iter_tar_samples

        for s in iter_tar_samples(url):
            by_key[s["__key__"]] = json.loads(s["json"])["wnid"]
    assert [int(by_key[k]) for k in batch["key"]] == batch["label"].tolist()  # folder "3" → label 3


@pytest.mark.parametrize("k", [3, 4])
def test_resume_yields_exactly_the_remaining_batches(digits, k):
    shards, _ = digits
    cfg = _cfg(workers=2)
    full = _run(shards, cfg, rank=1, world_size=2, micro_batch=32, epoch=2)
    resumed_loader = make_train_loader(str(shards), cfg, rank=1, world_size=2, micro_batch=32, epoch=2, skip_batches=k)
    assert len(resumed_loader) == len(full) - k
    resumed = list(resumed_loader)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[k:]]
    for a, b in zip(resumed, full[k:]):
        assert torch.equal(a["params"], b["params"])
        assert all(torch.equal(x, y) for x, y in zip(a["global"] + a["local"], b["global"] + b["local"]))


def test_in_process_loading_gives_the_same_batches(small):
    cfg = _cfg(workers=2)
    a = _run(small, cfg, rank=0, world_size=1, micro_batch=16, epoch=0)
    b = _run(small, cfg, rank=0, world_size=1, micro_batch=16, epoch=0, num_workers=0)
    assert len(a) == 22
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["params"], y["params"]) for x, y in zip(a, b))


def test_crops_depend_on_seed_epoch_key_only():
    # crc32 of "seed:epoch:key": the same on every process and Python run (never the salted hash()).
    assert sample_seed(0, 3, "n01440764_10026") == 448508194
    assert sample_seed(0, 4, "n01440764_10026") != sample_seed(0, 3, "n01440764_10026")


def test_pipe_and_brace_sources(small):
    shards = small
    cfg = _cfg(workers=0)
    m = Manifest.load(shards)
    last = len(m.shards) - 1
    brace = f"{shards}/train-{{000000..{last:06d}}}.tar"
    pipe = f"pipe:cat {shards}/train-{{000000..{last:06d}}}.tar"
    ref = [b["key"] for b in _run(shards, cfg, rank=0, world_size=1, micro_batch=50, epoch=0)]
    for source in (brace, pipe, str(shards / "index.json")):
        assert [b["key"] for b in _run(source, cfg, rank=0, world_size=1, micro_batch=50, epoch=0)] == ref
    sub = _run(f"{shards}/train-{{000000..000001}}.tar", cfg, rank=0, world_size=1, micro_batch=10, epoch=0)
    assert len(sub) == 96 // 10


def test_http_source(small):
    """Shards served over http: the manifest is fetched next to them, the tars are streamed."""
    import functools
    import http.server
    import threading

    shards = small
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = _cfg(workers=0)
        ref = [b["key"] for b in _run(shards, cfg, rank=1, world_size=2, micro_batch=20, epoch=1)]
        m = Manifest.load(f"{base}/index.json")
        assert m.urls()[0] == f"{base}/train-000000.tar"
        last = len(m.shards) - 1
        for source in (f"{base}/index.json", f"{base}/train-{{000000..{last:06d}}}.tar"):
            assert [b["key"] for b in _run(source, cfg, rank=1, world_size=2, micro_batch=20, epoch=1)] == ref
    finally:
        server.shutdown()
        server.server_close()


def _truncate_at_member(path: Path, sample_index: int) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[3 * sample_index].offset
    with open(path, "r+b") as f:
        f.truncate(offset)


@pytest.fixture()
def damaged(tmp_path) -> Path:
    """Shards (48 good images, ≤ 10 per shard) with one JPEG that passes the header check but fails to decode."""
    src = tmp_path / "src"
    sample_data.write_generated_imagefolder(src, classes=2, per_class=24, width=64, height=48)
    (src / "c01" / "zz_undecodable.JPEG").write_bytes(sample_data.undecodable_jpeg_bytes(sample_data.generated_image(9, 64, 48)))
    out = tmp_path / "shards"
    write_shards(src, out, split="train", max_count=10, progress=False)
    return out


def _shard_of(shards: Path, key: str) -> str:
    from mst_ds.data.reader import iter_tar_samples

    m = Manifest.load(shards)
    return next(s.name for s in m.shards if any(x["__key__"] == key for x in iter_tar_samples(str(shards / s.name))))


def test_corrupt_samples_are_counted_and_skipped(damaged):
    cfg = _cfg(workers=2)
    loader = make_train_loader(str(damaged), cfg, rank=0, world_size=1, micro_batch=8, epoch=0)
    batches = list(loader)  # no exception, no hang
    assert len(batches) == len(loader) == 6 and all(len(b["key"]) == 8 for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert "zz_undecodable" not in keys
    total = sum(make_train_loader(str(damaged), cfg, rank=r, world_size=2, micro_batch=4, epoch=0).__len__() for r in (0, 1))
    assert total > 0
    records = []
    for epoch in range(4):  # over a few epochs the undecodable one is met and recorded (key and shard)
        ld = make_train_loader(str(damaged), _cfg(workers=0), rank=0, world_size=1, micro_batch=8, epoch=epoch)
        list(ld)
        got = ld.take_corrupt()
        assert ld.take_corrupt() == [] and len(got) == ld.corrupt_count  # handed over once
        records += got
    assert records and set(map(str, records)) == {str({"key": "zz_undecodable", "shard": _shard_of(damaged, "zz_undecodable")})}


def test_resume_is_exact_on_damaged_shards(damaged):
    """Corrupt slots are refilled inside their batch: batch boundaries stay fixed."""
    cfg = _cfg(workers=0)
    for epoch in range(3):
        full = _run(damaged, cfg, rank=0, world_size=1, micro_batch=4, epoch=epoch)
        resumed = _run(damaged, cfg, rank=0, world_size=1, micro_batch=4, epoch=epoch, skip_batches=5)
        assert [b["key"] for b in resumed] == [b["key"] for b in full[5:]]
        assert all(torch.equal(a["params"], b["params"]) for a, b in zip(resumed, full[5:]))


def test_resume_is_exact_after_a_batch_with_no_decodable_sample(tmp_path):
    """A batch whose samples all fail to decode borrows a good one without reading on in the stream, so a
    resume after it (skipping B samples per batch) sees the batches of the run that never stopped."""
    src = tmp_path / "src"
    sample_data.write_generated_imagefolder(src, classes=2, per_class=8, width=64, height=48)
    bad = sample_data.undecodable_jpeg_bytes(sample_data.generated_image(9, 64, 48))
    for i in range(16):
        (src / "c01" / f"zz_bad{i:02d}.JPEG").write_bytes(bad)
    write_shards(src, tmp_path / "shards", split="train", max_count=8, progress=False)
    cfg = _cfg(workers=0)
    whole_batches_bad = 0
    for epoch in range(3):
        loader = make_train_loader(str(tmp_path / "shards"), cfg, rank=0, world_size=1, micro_batch=2, epoch=epoch)
        full = []
        for b in loader:
            full.append(b)
            whole_batches_bad += len(loader.take_corrupt()) == 2
        assert all("zz_bad" not in k for b in full for k in b["key"])
        for k in (1, len(full) // 2, len(full) - 1):
            resumed = _run(tmp_path / "shards", cfg, rank=0, world_size=1, micro_batch=2, epoch=epoch, skip_batches=k)
            assert [b["key"] for b in resumed] == [b["key"] for b in full[k:]], (epoch, k)
            assert all(torch.equal(a["params"], b["params"]) for a, b in zip(resumed, full[k:]))
    assert whole_batches_bad >= 2  # the case under test happened


def test_corrupt_policy_error_raises(damaged):
    cfg = _cfg(workers=0, data__corrupt_policy="error")
    with pytest.raises(CorruptDataError, match="zz_undecodable"):
        for epoch in range(4):
            list(make_train_loader(str(damaged), cfg, rank=0, world_size=1, micro_batch=8, epoch=epoch))


@pytest.fixture()
def copied(small, tmp_path) -> Path:
    """A private copy of the small shard set (tests below damage it)."""
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(small, out)
    return out


def test_missing_or_truncated_shard_is_an_error_before_reading(copied):
    """Issue 9 case 3: a listed shard that is gone (or has another size) is one line naming it, for the
    training and the evaluation loader alike — never a run on what is left."""
    from mst_ds.data.reader import MissingShardError

    m = Manifest.load(copied)
    gone, cut = m.shards[2].name, m.shards[5].name
    (copied / gone).unlink()
    for make in (lambda: make_train_loader(str(copied), _cfg(), rank=0, world_size=1, micro_batch=8, epoch=0),
                 lambda: make_eval_loader(str(copied), transform=eval_transform(32), batch_size=8, num_workers=0)):
        with pytest.raises(MissingShardError, match=f"{gone}: shard listed in the manifest") as err:
            make()
        assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
    _truncate_at_member(copied / cut, 3)
    (copied / gone).write_bytes(b"")  # present but empty: size differs
    with pytest.raises(MissingShardError, match=f"{gone}: 0 bytes, the manifest .* says"):
        make_train_loader(str(copied), _cfg(), rank=0, world_size=1, micro_batch=8, epoch=0)


def test_short_shard_is_an_error_while_reading(copied):
    """A shard that reads back short of its manifest count (size check passed, e.g. a manifest whose size
    was recorded for the cut file, or an http/pipe: source) stops the loaders with one line naming it."""
    import json

    index = json.loads((copied / "index.json").read_text())
    cut = index["shards"][1]
    _truncate_at_member(copied / cut["name"], 20)
    cut["bytes"] = (copied / cut["name"]).stat().st_size  # only the count still tells
    (copied / "index.json").write_text(json.dumps(index))
    for workers in (0, 2):
        cfg = _cfg(workers=workers)
        with pytest.raises(CorruptDataError, match=f"{cut['name']}: 20 samples, the manifest says") as err:
            for epoch in range(3):
                list(make_train_loader(str(copied), cfg, rank=0, world_size=1, micro_batch=8, epoch=epoch))
        assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
        loader, _ = make_eval_loader(str(copied), transform=eval_transform(32), batch_size=8, num_workers=workers)
        with pytest.raises(CorruptDataError, match=f"{cut['name']}: 20 samples, the manifest says {cut['count']}"):
            list(loader)


def test_bad_sources_are_one_line_config_errors(tmp_path, digits):
    shards, _ = digits
    with pytest.raises(ConfigError, match="no such manifest"):
        make_train_loader(str(tmp_path), _cfg(), rank=0, world_size=1, micro_batch=8, epoch=0)
    with pytest.raises(ConfigError, match="cannot fill one batch"):
        make_train_loader(str(shards), _cfg(), rank=0, world_size=2, micro_batch=4096, epoch=0)


def test_eval_loader_shards_and_imagefolder(digits, tmp_path):
    shards, val_folder = digits
    tf = eval_transform(32)
    seen = []
    for rank in (0, 1):
        loader, n_classes = make_eval_loader(str(shards), transform=tf, batch_size=100, num_workers=2, rank=rank, world_size=2)
        assert n_classes == 10
        batches = list(loader)
        assert len(batches) == len(loader)
        for imgs, labels, keys in batches:
            assert imgs.shape[1:] == (3, 32, 32) and imgs.dtype == torch.float32 and len(labels) == len(keys)
            seen.extend(keys)
    assert len(seen) == len(set(seen)) == 1438
    keys_f, labels_f = [], []
    for rank in (0, 1):
        loader, n_classes = make_eval_loader(str(val_folder), transform=tf, batch_size=64, num_workers=0, rank=rank, world_size=2)
        for _imgs, labels, keys in loader:
            keys_f.extend(keys)
            labels_f.extend(labels.tolist())
    assert n_classes == 10 and len(keys_f) == len(set(keys_f)) == 359
    assert all(int(k.split("/")[0]) == y for k, y in zip(keys_f, labels_f))
