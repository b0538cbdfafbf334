"""mask.policy (issue 32): which patches low / high / hint / random mask for a known attention map;
low is today's masking bit for bit; the old key mask.strategy still reads; config hashes unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from mst_ds.config import ConfigError, MaskConfig, load_config
from mst_ds.masking import HINT_TOP, Masker, attention_guided_mask, hint_reveal, n_candidates
from mst_ds.study import ROW_SETS, parse_rows

B, N, R = 32, 64, 0.3  # `small`'s 8 × 8 patch grid
K = n_candidates(N, R)  # 19 candidates


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ranked(batch: int = B, n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) attention with a known order per row → (attention, rank): rank[b, i] = 0 for the lowest."""
    order = torch.stack([torch.randperm(n, generator=_gen(seed + b)) for b in range(batch)])  # (B, n)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).repeat(batch, 1))
    return (rank.float() + 1) / n, rank


def _heads(attn: torch.Tensor, heads: int = 4) -> torch.Tensor:
    return attn[:, None, :].repeat(1, heads, 1)  # (B, heads, N): every head the same map


def test_low_masks_the_lowest_high_the_highest_attention():
    attn, rank = _ranked()
    low = Masker(MaskConfig(policy="low", prob=1.0))(_heads(attn), B, N, _gen()).mask
    high = Masker(MaskConfig(policy="high", prob=1.0))(_heads(attn), B, N, _gen()).mask
    assert torch.equal(low, rank < K), "low: exactly the r·N lowest-attention patches at p = 1"
    assert torch.equal(high, rank >= N - K), "high: exactly the r·N highest-attention patches at p = 1"


def test_high_masks_at_the_same_rate_with_the_same_draws():
    """p = 0.5: high chooses among its candidates with the very draws low uses among its own."""
    attn, rank = _ranked(seed=11)
    low = attention_guided_mask(attn, R, 0.5, "per_token", _gen(3), "low")
    high = attention_guided_mask(attn, R, 0.5, "per_token", _gen(3), "high")
    assert not (high & (rank < N - K)).any()
    assert torch.equal(low.sum(dim=1), high.sum(dim=1)), "the same number masked per image"
    # the j-th lowest is masked by low exactly when the j-th highest is masked by high
    for b in range(B):
        by_rank_low = low[b][rank[b].argsort()][:K]
        by_rank_high = high[b][rank[b].argsort(descending=True)][:K]
        assert torch.equal(by_rank_low, by_rank_high)
    per_image = attention_guided_mask(attn, R, 0.5, "per_image", _gen(4), "high")
    assert (per_image.sum(dim=1) == round(R * 0.5 * N)).all() and not (per_image & (rank < N - K)).any()


def test_hint_reveals_a_share_of_the_most_attended():
    attn, rank = _ranked(seed=21)
    top = math.floor(HINT_TOP * N)  # 6 most attended
    n_show = math.floor(HINT_TOP * R * N)  # ⌊1.92⌋ = 1 shown per image (AttMask: show_max · pred_ratio · N)
    hint = Masker(MaskConfig(policy="hint", prob=1.0))(_heads(attn), B, N, _gen()).mask
    high = rank >= N - K
    assert not (hint & ~high).any(), "hint masks only high's candidates"
    shown = high & ~hint
    assert (shown.sum(dim=1) == n_show).all()
    assert not (shown & (rank < N - top)).any(), "the shown patches are among the 10 % most attended"
    # over many images every one of the top patches is shown about equally often
    attn_many, rank_many = _ranked(batch=3000, n=N, seed=5)
    shown_many = hint_reveal(attn_many, R, _gen(6))
    freq = torch.stack([shown_many[rank_many == N - 1 - j].float().mean() for j in range(top)])
    assert (freq - n_show / top).abs().max() < 4 * math.sqrt((1 / top) * (1 - 1 / top) / 3000)


def test_hint_at_paper_scale_shows_five_of_196():
    attn, _ = _ranked(batch=4, n=196, seed=2)
    assert (hint_reveal(attn, R, _gen()).sum(dim=1) == math.floor(0.1 * 0.3 * 196)).all()


def test_random_policy_ignores_attention():
    cfg = MaskConfig(policy="random", prob=0.15)
    masker = Masker(cfg)
    assert not masker.needs_attention
    a = masker(None, B, N, _gen(7)).mask
    assert torch.equal(a, torch.rand(B, N, generator=_gen(7)) < 0.15)


def test_low_is_todays_masking_bit_for_bit():
    """The pre-policy algorithm, written out: stable ascending sort, per-token draws, scatter."""
    attn = torch.rand(B, 6, N, generator=_gen(9)).softmax(dim=-1)
    got = Masker(MaskConfig())(attn, B, N, _gen(10)).mask
    g = _gen(10)
    cand = attn.mean(dim=1).argsort(dim=1, stable=True)[:, :K]
    want = torch.zeros(B, N, dtype=torch.bool).scatter_(1, cand, torch.rand(B, K, generator=g) < 0.5)
    assert torch.equal(got, want)


def test_old_key_strategy_still_reads_and_conflicts_are_refused():
    assert MaskConfig(strategy="random").policy == "random"
    assert MaskConfig(strategy="attention").policy == "low"
    assert load_config("tiny", ["mask.strategy=random"]).config.mask.policy == "random"
    assert load_config("ablation_random_masking").config.mask.strategy == "random"
    with pytest.raises(ConfigError, match="disagree"):
        load_config("ablation_random_masking", ["mask.policy=high"])
    with pytest.raises(ConfigError, match="mask.policy"):
        load_config("tiny", ["mask.strategy=highest"])


@pytest.mark.parametrize("preset,pinned", [
    ("mst_deit_s_100ep", "470b7cdde22bd1b8"), ("tiny", "66eb2d137e2779b2"), ("small", "cafa00272b63d2ad"),
    ("ablation_random_masking", "4d785ad1448cab99"), ("dino_deit_s_100ep", "d3a86611ced0ea88"),
])
def test_config_hashes_are_those_before_policy(preset, pinned):
    """Hashes measured on the commit before mask.policy: saved runs and study markers still match."""
    assert load_config(preset).config.hash() == pinned


def test_presets_and_row_set():
    assert load_config("ablation_mask_high").config.mask.policy == "high"
    assert load_config("ablation_mask_hint").config.mask.policy == "hint"
    for p in ("ablation_mask_high", "ablation_mask_hint"):  # only the policy differs from MST
        assert load_config(p).config.hash() != load_config("mst_deit_s_100ep").config.hash()
        assert load_config(p, ["mask.policy=low"]).config.hash() == load_config("mst_deit_s_100ep").config.hash()
    rows, ref = parse_rows("masking")
    assert ref == "mst_deit_s_100ep" and rows == ROW_SETS["masking"][0]
    assert {"ablation_mask_high", "ablation_random_masking"} <= set(rows)
