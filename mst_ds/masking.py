"""Which patches of the student's global views are masked (SPEC §1.3).

Attention-guided [P]: from the teacher's last-block CLS→patch attention of a view, the ``r·N``
lowest-attention patches are candidates (r = ``mask.ratio``, N patches); ``per_token`` masks each
candidate with probability p (``mask.prob``), ``per_image`` masks exactly ``round(r·p·N)`` candidates
chosen uniformly at random. ``random`` (Table 4 ablation) masks every patch with probability p.

``mask.policy`` chooses the candidates: ``low`` (MST, above), ``high`` (AttMask-High, Kakogeorgiou et al.
ECCV 2022: the ``r·N`` *highest*-attention patches, the same draws at the same rate), ``hint``
(AttMask-Hint: ``high``, then ``⌊HINT_TOP·r·N⌋`` patches drawn uniformly among the ``⌊HINT_TOP·N⌋`` most
attended are shown again — AttMask's ``show_max`` 0.1 and its revealed count ``show_max × pred_ratio × N``),
``random``.
Replacement: ``mask_token`` (ours) or ``bert`` — of the masked positions 80 % get the mask token, 10 % a
random other token of the batch, 10 % stay unchanged; all of them count as masked (restoration target).

Everything is drawn on the CPU from the caller's ``torch.Generator`` (deterministic given its seed)
and returned on the CPU; the caller moves the plan to the views' device. Local views are never
masked: the Masker is only ever given the global views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mst_ds.config import MaskConfig

BERT_TOKEN = 0.8  # BERT: share of masked positions that get the mask token
BERT_RANDOM = 0.1  # ... a random other token; the remaining 10 % stay unchanged
HINT_TOP = 0.1  # AttMask-Hint (show_max): hints are drawn among the 10 % most attended patches
POLICIES = ("low", "high", "hint", "random")


@dataclass
class MaskPlan:
    """Masks of a batch of B global views with N patches each (all (B, N) bool, CPU unless moved)."""

    mask: Tensor  # positions counted as masked (masked-patches restoration target, mask_ratio)
    token: Tensor  # positions whose embedding becomes the mask token (⊂ mask)
    random: Tensor  # positions that get a random other token of the batch (BERT 10 %, ⊂ mask)
    source: Tensor | None = None  # (B, N) long: flat index into the B·N patch embeddings, for ``random``

    def to(self, device: torch.device | str) -> MaskPlan:
        return MaskPlan(self.mask.to(device), self.token.to(device), self.random.to(device),
                        None if self.source is None else self.source.to(device))

    @classmethod
    def empty(cls, batch: int, n: int) -> MaskPlan:
        z = torch.zeros(batch, n, dtype=torch.bool)
        return cls(z, z.clone(), z.clone(), None)


def combine_heads(attn: Tensor, how: str = "mean") -> Tensor:
    """(B, heads, N) per-head CLS→patch attention → (B, N) one score per patch."""
    if how == "mean":
        return attn.mean(dim=1)
    if how == "max":
        return attn.amax(dim=1)
    raise ValueError(f"mask.heads: unknown head combination {how!r}")


def n_candidates(n: int, ratio: float) -> int:
    """Number of lowest-attention candidates: ⌊r·N⌋ (never more than the r·N the paper's text allows)."""
    return int(math.floor(ratio * n + 1e-9))


def attention_guided_mask(attn: Tensor, ratio: float, prob: float, mode: str = "per_token",
                          generator: torch.Generator | None = None, policy: str = "low") -> Tensor:
    """attn (B, N) per-patch attention → mask (B, N) bool, on the CPU.

    Candidates: the ⌊r·N⌋ patches with the lowest (``policy`` low) or highest (high, hint) attention,
    ties broken by index (stable sort). per_token: each candidate independently with probability
    ``prob``. per_image: exactly ``round(r·p·N)`` (capped at the number of candidates) of them,
    uniformly at random. hint then reveals :func:`hint_reveal`'s patches.
    """
    if policy not in ("low", "high", "hint"):
        raise ValueError(f"mask.policy: {policy!r} is not attention-guided")
    attn = attn.detach().float().cpu()
    B, N = attn.shape
    k = n_candidates(N, ratio)
    mask = torch.zeros(B, N, dtype=torch.bool)
    if k == 0:
        return mask
    # (B, k) candidates, the most extreme first; descending + stable keeps the lower index first on ties
    candidates = attn.argsort(dim=1, stable=True, descending=policy != "low")[:, :k]
    if mode == "per_token":
        chosen = torch.rand(B, k, generator=generator) < prob  # (B, k)
    elif mode == "per_image":
        n_mask = min(k, int(round(ratio * prob * N)))
        order = torch.rand(B, k, generator=generator).argsort(dim=1)  # a uniform permutation per row
        chosen = torch.zeros(B, k, dtype=torch.bool)
        chosen.scatter_(1, order[:, :n_mask], True)
    else:
        raise ValueError(f"mask.mode: unknown mode {mode!r}")
    mask.scatter_(1, candidates, chosen)
    if policy == "hint":
        mask &= ~hint_reveal(attn, ratio, generator)
    return mask


def hint_reveal(attn: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """AttMask-Hint's shown patches: attn (B, N) → (B, N) bool, ⌊HINT_TOP·r·N⌋ per row drawn
    uniformly without replacement among the ⌊HINT_TOP·N⌋ highest-attention patches (ties by index)."""
    B, N = attn.shape
    top = int(math.floor(HINT_TOP * N + 1e-9))
    n_show = min(top, int(math.floor(HINT_TOP * ratio * N + 1e-9)))
    shown = torch.zeros(B, N, dtype=torch.bool)
    if n_show == 0:
        return shown
    most = attn.argsort(dim=1, stable=True, descending=True)[:, :top]  # (B, top)
    pick = torch.rand(B, top, generator=generator).argsort(dim=1)[:, :n_show]  # uniform subset per row
    shown.scatter_(1, most.gather(1, pick), True)
    return shown


def random_mask(batch: int, n: int, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """Every patch independently with probability ``prob`` → (batch, n) bool, on the CPU."""
    return torch.rand(batch, n, generator=generator) < prob


def random_sources(batch: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """For each of the B·N positions, a flat index of a *different* position of the batch → (B, N) long."""
    total = batch * n
    own = torch.arange(total).reshape(batch, n)
    if total == 1:
        return own
    src = torch.randint(0, total - 1, (batch, n), generator=generator)
    return src + (src >= own).long()  # skip the position itself: uniform over the others


class Masker:
    """Turns the teacher's attention of the B global views into a :class:`MaskPlan`."""

    def __init__(self, cfg: MaskConfig) -> None:
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: MaskConfig) -> Masker:
        return cls(cfg)

    @property
    def needs_attention(self) -> bool:
        return self.cfg.enabled and self.cfg.attention_guided

    def __call__(self, attn: Tensor | None, batch: int, n: int,
                 generator: torch.Generator | None = None) -> MaskPlan:
        """attn (B, heads, N) teacher CLS→patch attention (None for policy 'random') → MaskPlan."""
        cfg = self.cfg
        if not cfg.enabled:
            return MaskPlan.empty(batch, n)
        if cfg.attention_guided:
            if attn is None:
                raise ValueError("attention-guided masking needs the teacher's attention")
            if tuple(attn.shape[::2]) != (batch, n):
                raise ValueError(f"attention of shape {tuple(attn.shape)} does not match batch {batch} × {n} patches")
            mask = attention_guided_mask(combine_heads(attn, cfg.heads), cfg.ratio, cfg.prob, cfg.mode, generator,
                                         cfg.policy)
        else:
            mask = random_mask(batch, n, cfg.prob, generator)
        if cfg.replacement == "mask_token":
            return MaskPlan(mask, mask.clone(), torch.zeros_like(mask), None)
        u = torch.rand(batch, n, generator=generator)
        token = mask & (u < BERT_TOKEN)
        rand = mask & (u >= BERT_TOKEN) & (u < BERT_TOKEN + BERT_RANDOM)
        return MaskPlan(mask, token, rand, random_sources(batch, n, generator))
