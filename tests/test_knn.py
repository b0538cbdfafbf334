"""Weighted k-NN against an independent numpy brute force (full similarity matrix, same weighting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mst_ds.config import UsageError
from mst_ds.eval.knn import nearest_neighbours, topk_ordered, weighted_knn


def reference_knn(train, train_labels, val, val_labels, k, T, num_classes):
    """DINO's knn_classifier written with numpy on the full (Nv, Nt) similarity matrix.

    Tie rules (stated by mst_ds.eval.knn): neighbours by (similarity desc, train index asc); classes by
    (weight desc, class index asc); each class's weights summed in neighbour order in float64.
    Returns (top1 %, top5 %, ranked classes (Nv, min(5, C))).
    """
    train = np.asarray(train, dtype=np.float64)
    val = np.asarray(val, dtype=np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    val = val / np.linalg.norm(val, axis=1, keepdims=True)
    sim = val @ train.T
    n_val = len(val)
    order = np.stack([np.lexsort((np.arange(sim.shape[1]), -row))[:k] for row in sim])
    weights = np.exp(np.take_along_axis(sim, order, 1) / T)
    labels = np.asarray(train_labels)[order]
    probs = np.zeros((n_val, num_classes))
    for r in range(k):  # neighbour order
        probs[np.arange(n_val), labels[:, r]] += weights[:, r]
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, : min(5, num_classes)]
    correct = ranked == np.asarray(val_labels)[:, None]
    return 100 * correct[:, 0].mean(), 100 * correct[:, : min(5, k)].any(1).mean(), ranked


def grid_features(n, dim=64, nonzero=16, levels_seed=0):
    """±1 on exactly `nonzero` (a perfect square) coordinates: L2 norm sqrt(nonzero) exactly, so the
    normalised features and every dot product are exact binary fractions in float32 whatever the
    summation order. Cosine similarities take only 2·nonzero+1 values: ties everywhere."""
    rng = np.random.default_rng(levels_seed)
    x = np.zeros((n, dim), np.float32)
    for row in x:
        cols = rng.choice(dim, nonzero, replace=False)
        row[cols] = rng.choice([-1.0, 1.0], nonzero)
    return torch.from_numpy(x)


def clustered(n, dim, num_classes, gen, spread=1.5, dtype=torch.float64):
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    centers = torch.randn(num_classes, dim, generator=gen, dtype=dtype)
    return centers[labels] + spread * torch.randn(n, dim, generator=gen, dtype=dtype), labels


KS = [1, 3, 10, 20, 50]


def test_matches_bruteforce_on_random_features():
    gen = torch.Generator().manual_seed(0)
    xt, yt = clustered(400, 24, 8, gen)
    xv, yv = clustered(150, 24, 8, gen)
    # float64 features: the reference's float64 rounding cannot move a neighbour boundary.
    res = weighted_knn(xt, yt, xv, yv, KS, 0.07, 8)
    for k in KS:
        top1, top5, ranked = reference_knn(xt.numpy(), yt.numpy(), xv.numpy(), yv.numpy(), k, 0.07, 8)
        assert res.top1[k] == pytest.approx(top1, abs=1e-9)
        assert res.top5[k] == pytest.approx(top5, abs=1e-9)
        np.testing.assert_array_equal(res.predictions[k].numpy(), ranked)
    assert 20 < res.top1[20] < 100  # neither chance (12.5) nor trivial: the vote matters


# (similarity budget, val rows per block) → blocks of 5 rows × 1 column (a merge per train sample),
# 8 rows × 13 columns, 37 rows × all columns, everything at once.
BLOCKS = ((5, 5), (8 * 13, 8), (37 * 300, 1), (10**9, 1024))


def test_ties_and_k_larger_than_a_class():
    gen = torch.Generator().manual_seed(1)
    xt, xv = grid_features(300, levels_seed=2), grid_features(60, levels_seed=3)
    # Class 4 has 3 train samples: k = 10 … 50 must reach into other classes.
    yt = torch.randint(0, 4, (300,), generator=gen)
    yt[:3] = 4
    yv = torch.randint(0, 5, (60,), generator=gen)
    yv[:10] = 4
    sims = torch.nn.functional.normalize(xv) @ torch.nn.functional.normalize(xt).T
    kth = sims.sort(1, descending=True).values[:, 19:21]
    assert (kth[:, 0] == kth[:, 1]).float().mean() > 0.5  # the boundary at k=20 is tied in most rows
    refs = {k: reference_knn(xt.numpy(), yt.numpy(), xv.numpy(), yv.numpy(), k, 0.07, 5) for k in KS}
    for budget, rows in BLOCKS:
        res = weighted_knn(xt, yt, xv, yv, KS, 0.07, 5, max_chunk_elements=budget, query_rows=rows)
        for k, (top1, top5, ranked) in refs.items():
            np.testing.assert_array_equal(res.predictions[k].numpy(), ranked, err_msg=f"k={k} block={budget, rows}")
            assert res.top1[k] == pytest.approx(top1, abs=1e-9)
            assert res.top5[k] == pytest.approx(top5, abs=1e-9)


def test_chunked_equals_unchunked_exactly():
    # Exact arithmetic: neighbours, similarity values and votes are bit-identical for every block shape.
    xt = torch.nn.functional.normalize(grid_features(257, dim=256, nonzero=64, levels_seed=4))
    xv = torch.nn.functional.normalize(grid_features(40, dim=256, nonzero=64, levels_seed=5))
    ref_v, ref_i = nearest_neighbours(xt, xv, 40, max_chunk_elements=10**9)
    for budget, rows in BLOCKS:
        v, i = nearest_neighbours(xt, xv, 40, max_chunk_elements=budget, query_rows=rows)
        assert torch.equal(v, ref_v) and torch.equal(i, ref_i), (budget, rows)
    # Random float32 features: the same neighbours and votes. (BLAS may round a similarity's last bit
    # differently for different block shapes; that moves nothing here.)
    gen = torch.Generator().manual_seed(2)
    xt, yt = clustered(500, 64, 10, gen, dtype=torch.float32)
    xv, yv = clustered(90, 64, 10, gen, dtype=torch.float32)
    full = weighted_knn(xt, yt, xv, yv, [10, 20, 100], max_chunk_elements=10**9)
    for budget, rows in BLOCKS[1:]:
        part = weighted_knn(xt, yt, xv, yv, [10, 20, 100], max_chunk_elements=budget, query_rows=rows)
        assert part.top1 == full.top1 and part.top5 == full.top5
        for k in full.predictions:
            assert torch.equal(part.predictions[k], full.predictions[k])


def test_topk_ordered_breaks_ties_by_lowest_index():
    sim = torch.tensor([[0.5, 0.75, 0.5, 0.5, 0.25, 0.75],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    v, i = topk_ordered(sim, 3)
    assert i.tolist() == [[1, 5, 0], [0, 1, 2]]
    assert v.tolist() == [[0.75, 0.75, 0.5], [0.0, 0.0, 0.0]]


def test_bad_inputs_are_one_line_errors():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(UsageError, match="exceeds the 10 training samples"):
        weighted_knn(x, y, x, y, [20])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        weighted_knn(bad, y, x, y, [5])


def _gather_worker(rank: int, init: str, counts: list[int], out: str) -> None:
    import torch.distributed as dist

    from mst_ds.eval import features as fx

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(counts))
    fx.GATHER_ROWS = 3  # several rounds, the last one short
    mine = torch.arange(counts[rank] * 2, dtype=torch.float32).view(-1, 2) + 100 * rank
    parts = fx._all_gather_rows(mine, counts, torch.device("cpu"))
    torch.save(parts, f"{out}.{rank}")
    dist.destroy_process_group()


def test_rows_of_unequal_parts_are_gathered_in_short_rounds(tmp_path):
    """Each rank's rows come back whole and in order, in rounds no longer than the longest part needs."""
    import torch.multiprocessing as mp

    counts = [5, 2]
    mp.spawn(_gather_worker, args=(f"file://{tmp_path / 'store'}", counts, str(tmp_path / "parts")), nprocs=2)
    expected = [torch.arange(n * 2, dtype=torch.float32).view(-1, 2) + 100 * r for r, n in enumerate(counts)]
    for rank in range(2):
        parts = torch.load(tmp_path / f"parts.{rank}")
        assert [p.shape[0] for p in parts] == counts
        assert all(torch.equal(p, e) for p, e in zip(parts, expected))
