"""Diagnostics computed inside the forward (pure tensor functions, no RNG, no grad).

What they mean and which alerts read them: :mod:`mst_ds.health`. They live beside the model because the
forward computes them; the run-health layer above only reads the scalars.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


def attention_guidance(attn: Tensor | None, mask: Tensor) -> Tensor:
    """attn (B, heads, N) CLS→patch attention, mask (B, N) bool → scalar: mass on the masked patches ÷
    the expected mass of a random mask of the same size (NaN without attention or masked patches)."""
    if attn is None or not bool(mask.any()):
        return torch.tensor(float("nan"))
    a = attn.float().mean(dim=1)
    a = a / a.sum(dim=-1, keepdim=True)
    m = mask.to(a.device, torch.float32)
    expected = m.sum(dim=-1) / m.shape[-1]  # a random mask of |m| patches gets |m|/N of the mass
    return (a * m).sum() / expected.sum()


def forward_diagnostics(student_logits: list[Tensor], teacher_probs: Tensor, teacher_cls: Tensor,
                        attn: Tensor | None, mask: Tensor) -> dict[str, Tensor]:
    """The collapse / MST diagnostics of one forward (see the module doc), float32 scalars, no grad.

    student_logits: one (B, K) per view (global views first); teacher_probs: (2B, K) centred,
    sharpened teacher distribution of the two global views; teacher_cls: (2B, D); attn (2B, heads, N)
    or None; mask (2B, N) bool.
    """
    with torch.no_grad():
        q = teacher_probs.float()
        K = q.shape[-1]
        log_k = math.log(K) if K > 1 else 1.0
        B = student_logits[0].shape[0]
        t_arg = q.argmax(dim=-1).split(B)
        s_arg = [s.argmax(dim=-1) for s in student_logits]
        agree = [(t_arg[i] == s_arg[v]).float().mean() for i in range(len(t_arg)) for v in range(len(s_arg)) if v != i]
        dev = q.device
        return {
            "teacher_entropy_rel": _entropy(q).mean() / log_k,
            "teacher_usage_entropy_rel": _entropy(q.mean(dim=0)) / log_k,
            "agreement": torch.stack(agree).mean() if agree else torch.tensor(float("nan"), device=dev),
            "teacher_cls_std": F.normalize(teacher_cls.float(), dim=-1).std(dim=0).mean(),
            "attn_guidance": attention_guidance(attn, mask).float().to(dev),
        }
