"""MST's two losses (SPEC §1.6): DINO self-distillation and L1 restoration of the global views.

Both are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over every
    (teacher global view i, student view v ≠ i) pair, averaged over pairs (DINO's ``DINOLoss``).

    ``center`` (1, K) is an EMA (``center_momentum``, 0.9) of the teacher's mean output; it is a
    buffer so it is checkpointed with the module and identical on every rank (all-reduced). It moves
    once per optimizer step (:meth:`accumulate_center` per micro-batch, :meth:`update_center` per step).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: tuple[Tensor, int] | None = None  # (sum (1, K) float32, count) of this step

    def teacher_probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """(M, K) raw teacher logits → centred, sharpened softmax (M, K) float32."""
        return F.softmax((teacher_logits.float() - self.center.float()) / teacher_temp, dim=-1)

    def forward(self, student_logits: list[Tensor], teacher_logits: list[Tensor], teacher_temp: float) -> Tensor:
        """student_logits: one (B, K) per view, the global views first, in the teacher's order;
        teacher_logits: one (B, K) per global view → scalar float32 loss (no center update)."""
        log_p = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits]
        q = [self.teacher_probs(t, teacher_temp).detach() for t in teacher_logits]
        total = torch.zeros((), dtype=torch.float32, device=log_p[0].device)
        n_terms = 0
        for i, qi in enumerate(q):
            for v, lp in enumerate(log_p):
                if v == i:
                    continue
                total = total + torch.sum(-qi * lp, dim=-1).mean()
                n_terms += 1
        return total / n_terms

    @torch.no_grad()
    def accumulate_center(self, teacher_logits: Tensor) -> None:
        """Add a micro-batch's teacher logits (M, K) to the pending batch center (no collective).

        The center moves once per *optimizer* step from the whole global batch (DINO, SPEC §9): with
        gradient accumulation every micro-batch of a step is centred with the same center, and
        :meth:`update_center` applies the EMA once after the step. Plain attributes, not buffers:
        the pending sum is empty whenever a checkpoint is written (after the step)."""
        total = teacher_logits.float().sum(dim=0, keepdim=True)
        if self._pending is None:
            self._pending = (total, teacher_logits.shape[0])
        else:
            self._pending = (self._pending[0] + total, self._pending[1] + teacher_logits.shape[0])

    def discard_pending_center(self) -> None:
        """Forget the pending sum (a skipped step must not move the center)."""
        self._pending = None

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor | None = None) -> None:
        """center ← m·center + (1−m)·mean of the teacher logits of the whole (all ranks') step.

        teacher_logits (M, K): added to the pending sum first (DINO's one-call form: one batch, one
        update). Every rank must call this once per optimizer step (one all-reduce)."""
        if teacher_logits is not None:
            self.accumulate_center(teacher_logits)
        if self._pending is None:
            raise RuntimeError("update_center: no teacher logits accumulated since the last update")
        total, n = self._pending
        self._pending = None
        packed = torch.cat([total.flatten(), total.new_tensor([float(n)])])  # one collective
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        batch_center = (packed[:-1] / packed[-1]).view_as(total)
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center.to(self.center.dtype), alpha=1 - m)


def _patch_pixels(patch_mask: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """(B, N) patch mask on an h×w grid → (B, 1, h·P, w·P) pixel mask."""
    B = patch_mask.shape[0]
    h, w = grid
    m = patch_mask.reshape(B, 1, h, w)
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def restoration_loss(pred: Tensor, target: Tensor, *, reduction: str = "mean", patch_mask: Tensor | None = None,
                     patch_size: int | None = None, num_prototypes: int | None = None) -> Tensor:
    """L1 between the restored image and the (unmasked, augmented, normalised) view; float32 scalar.

    pred, target: (B, 3, H, W). reduction ``mean``: mean absolute error over the pixels counted;
    ``sum_per_image``: sum over each image's counted pixels, averaged over images (Algorithm 1's
    ``abs(p-q).sum().mean()`` read literally); ``mean_ln_k``: ``mean`` × ln(num_prototypes), the DINO
    loss's scale at initialisation (derivation: ``LossConfig.restore_reduction``). patch_mask (B, N)
    with patch_size: count only masked patches (Table 4 "masked tokens" target); an image with nothing
    masked contributes zero.
    """
    if reduction == "mean_ln_k":
        if num_prototypes is None or num_prototypes < 2:
            raise ValueError("restoration_loss: mean_ln_k needs num_prototypes ≥ 2")
        mean = restoration_loss(pred, target, reduction="mean", patch_mask=patch_mask, patch_size=patch_size)
        return mean * math.log(num_prototypes)
    err = (pred.float() - target.float()).abs()
    if patch_mask is None:
        if reduction == "mean":
            return err.mean()
        return err.flatten(1).sum(dim=1).mean()
    if patch_size is None:
        raise ValueError("restoration_loss: patch_mask needs patch_size")
    H, W = target.shape[-2:]
    pix = _patch_pixels(patch_mask.to(err.device), patch_size, (H // patch_size, W // patch_size)).float()
    masked = err * pix
    if reduction == "mean":
        return masked.sum() / (pix.sum() * err.shape[1]).clamp_min(1.0)
    return masked.flatten(1).sum(dim=1).mean()
