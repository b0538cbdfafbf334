"""Masking statistics (SPEC §1.3): attention-guided, random, BERT 80/10/10; determinism; locals never masked."""

from __future__ import annotations

import math

import pytest
import torch

from mst_ds.config import MaskConfig, load_config
from mst_ds.masking import (
    Masker,
    MaskPlan,
    attention_guided_mask,
    n_candidates,
    random_mask,
    random_sources,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _attn(batch: int, heads: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, heads, n, generator=_gen(seed)).softmax(dim=-1)


def test_attention_mask_only_among_lowest_rN_patches():
    B, H, N, r = 64, 6, 196, 0.3
    attn = _attn(B, H, N)
    plan = Masker(MaskConfig(ratio=r, prob=0.9))(attn, B, N, _gen())
    k = n_candidates(N, r)
    assert k == math.floor(r * N)
    lowest = attn.mean(dim=1).argsort(dim=1)[:, :k]
    allowed = torch.zeros(B, N, dtype=torch.bool).scatter_(1, lowest, True)
    assert plan.mask.any()
    assert not (plan.mask & ~allowed).any(), "a patch outside the r·N lowest-attention ones was masked"
    # with p = 1 every candidate is masked: exactly the lowest r·N
    full = attention_guided_mask(attn.mean(dim=1), r, 1.0, "per_token", _gen())
    assert torch.equal(full, allowed)


def test_attention_mask_rate_is_r_times_p_on_average():
    """Fixed-seed statistical test: per-image masked count ~ Binomial(r·N, p), mean r·p·N."""
    B, N, r, p = 2000, 200, 0.3, 0.5  # r·N = 60 exactly
    attn = torch.rand(B, N, generator=_gen(3))
    mask = attention_guided_mask(attn, r, p, "per_token", _gen(4))
    counts = mask.sum(dim=1).float()
    expected = r * p * N
    std_err = math.sqrt(r * N * p * (1 - p) / B)
    assert abs(counts.mean().item() - expected) < 4 * std_err
    assert abs(counts.var().item() - r * N * p * (1 - p)) < 0.15 * r * N * p * (1 - p)


def test_attention_mask_per_image_exact_count_uniform_over_candidates():
    B, N, r, p = 3000, 100, 0.3, 0.5
    attn = torch.arange(N, dtype=torch.float32).repeat(B, 1)  # candidates are patches 0..29
    mask = attention_guided_mask(attn, r, p, "per_image", _gen(5))
    assert (mask.sum(dim=1) == round(r * p * N)).all()
    assert not mask[:, 30:].any()
    freq = mask[:, :30].float().mean(dim=0)  # each candidate with probability 15/30
    assert (freq - 0.5).abs().max() < 4 * math.sqrt(0.25 / B)


def test_heads_max_combination_differs_from_mean():
    B, H, N = 8, 4, 50
    attn = _attn(B, H, N, seed=7)
    m_mean = Masker(MaskConfig(prob=1.0, heads="mean"))(attn, B, N, _gen())
    m_max = Masker(MaskConfig(prob=1.0, heads="max"))(attn, B, N, _gen())
    lowest_max = attn.amax(dim=1).argsort(dim=1)[:, : n_candidates(N, 0.3)]
    assert torch.equal(m_max.mask, torch.zeros(B, N, dtype=torch.bool).scatter_(1, lowest_max, True))
    assert not torch.equal(m_mean.mask, m_max.mask)


def test_random_mask_statistics():
    B, N, p = 500, 196, 0.15
    mask = random_mask(B, N, p, _gen(8))
    rate = mask.float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / (B * N))
    # independent of position: every column near p
    assert (mask.float().mean(dim=0) - p).abs().max() < 5 * math.sqrt(p * (1 - p) / B)
    plan = Masker(MaskConfig(strategy="random", prob=p))(None, B, N, _gen(8))
    assert torch.equal(plan.mask, mask) and torch.equal(plan.token, mask) and not plan.random.any()


def test_bert_replacement_80_10_10():
    B, N = 400, 196
    plan = Masker(MaskConfig(strategy="random", prob=0.5, replacement="bert"))(None, B, N, _gen(9))
    m = plan.mask.sum().item()
    assert not (plan.token & ~plan.mask).any() and not (plan.random & ~plan.mask).any()
    assert not (plan.token & plan.random).any()
    unchanged = plan.mask & ~plan.token & ~plan.random
    for part, share in ((plan.token, 0.8), (plan.random, 0.1), (unchanged, 0.1)):
        frac = part.sum().item() / m
        assert abs(frac - share) < 4 * math.sqrt(share * (1 - share) / m)
    src = plan.source
    own = torch.arange(B * N).reshape(B, N)
    assert src is not None and src.dtype == torch.long
    assert (src != own).all() and src.min() >= 0 and src.max() < B * N


def test_random_sources_uniform_over_other_positions():
    src = random_sources(2, 3, _gen(10))
    assert (src != torch.arange(6).reshape(2, 3)).all()
    many = torch.stack([random_sources(1, 4, _gen(s))[0, 0] for s in range(400)])
    counts = torch.bincount(many, minlength=4)
    assert counts[0] == 0 and (counts[1:] > 90).all()


def test_masks_are_deterministic_given_the_generator():
    attn = _attn(4, 3, 49)
    masker = Masker(MaskConfig(replacement="bert", prob=0.9))
    a, b = masker(attn, 4, 49, _gen(11)), masker(attn, 4, 49, _gen(11))
    c = masker(attn, 4, 49, _gen(12))
    assert all(torch.equal(x, y) for x, y in zip((a.mask, a.token, a.random, a.source), (b.mask, b.token, b.random, b.source)))
    assert not torch.equal(a.mask, c.mask)


def test_disabled_masker_and_shape_checks():
    plan = Masker(MaskConfig(enabled=False))(None, 3, 16, _gen())
    assert isinstance(plan, MaskPlan) and not plan.mask.any() and plan.mask.shape == (3, 16)
    with pytest.raises(ValueError):
        Masker(MaskConfig())(None, 3, 16, _gen())
    with pytest.raises(ValueError):
        Masker(MaskConfig())(_attn(3, 2, 15), 3, 16, _gen())


def test_local_views_are_never_masked():
    """Through MSTModel: the backbone calls on local views carry no mask; the global call does."""
    from mst_ds.model import MSTModel

    cfg = load_config("tiny", ["mask.prob=1.0", "mask.replacement=bert"]).config
    model = MSTModel.from_config(cfg)
    teacher = model.make_teacher()
    calls: list[tuple[int, bool, bool]] = []
    original = model.backbone.forward

    def recording(x, mask=None, random_replace=None, **kw):
        calls.append((x.shape[-1], mask is not None and bool(mask.any()),
                      random_replace is not None and bool(random_replace.any())))
        return original(x, mask, random_replace, **kw)

    model.backbone.forward = recording
    B = 8
    views = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(2)]
    out = model(views, teacher, 0.04, _gen())
    assert [c[0] for c in calls] == [32, 16]  # globals batched, locals batched
    assert calls[0][1] and calls[0][2]
    assert calls[1][1:] == (False, False)
    n = (32 // 8) ** 2
    assert out["mask_ratio"].item() == pytest.approx(n_candidates(n, 0.3) / n)
