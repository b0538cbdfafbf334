"""DINO loss against a plain re-implementation of DINO's formula; center EMA; L1 restoration variants."""

from __future__ import annotations

import math

import pytest
import torch

from mst_ds.config import load_config
from mst_ds.losses import DINOLoss, restoration_loss


def plain_dino_loss(student, teacher, center, student_temp, teacher_temp):
    """DINO's loss written out element by element in float64: for every teacher global view i and
    student view v ≠ i, the batch mean of −Σ_k q_ik log p_vk; averaged over the pairs."""
    def softmax(row):
        m = max(row)
        e = [math.exp(x - m) for x in row]
        s = sum(e)
        return [x / s for x in e]

    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            batch = 0.0
            for b in range(t.shape[0]):
                q = softmax([(t[b, k].item() - center[0, k].item()) / teacher_temp for k in range(t.shape[1])])
                p = softmax([s[b, k].item() / student_temp for k in range(s.shape[1])])
                batch += -sum(qk * math.log(pk) for qk, pk in zip(q, p))
            total += batch / t.shape[0]
            pairs += 1
    return total / pairs


def test_dino_loss_equals_plain_formula():
    g = torch.Generator().manual_seed(0)
    K, B = 17, 3
    loss = DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(torch.randn(1, K, generator=g))
    student = [torch.randn(B, K, generator=g) * 3 for _ in range(5)]  # 2 global + 3 local
    teacher = [torch.randn(B, K, generator=g) * 3 for _ in range(2)]
    ours = loss(student, teacher, teacher_temp=0.05).item()
    ref = plain_dino_loss(student, teacher, loss.center, 0.1, 0.05)
    assert abs(ours - ref) <= 1e-6 * max(1.0, abs(ref))


def test_dino_loss_gradient_reaches_student_only():
    loss = DINOLoss(8)
    s = [torch.randn(2, 8, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 8, requires_grad=True) for _ in range(2)]
    loss(s, t, 0.04).backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)


def test_center_moves_by_the_ema_rule():
    g = torch.Generator().manual_seed(1)
    loss = DINOLoss(6, center_momentum=0.9)
    c0 = torch.randn(1, 6, generator=g)
    loss.center.copy_(c0)
    teacher = torch.randn(10, 6, generator=g)
    loss.update_center(teacher)
    torch.testing.assert_close(loss.center, 0.9 * c0 + 0.1 * teacher.mean(dim=0, keepdim=True), rtol=0, atol=1e-7)
    loss(list(torch.randn(3, 2, 6)), list(torch.randn(2, 2, 6)), 0.04)  # the loss alone does not move it
    torch.testing.assert_close(loss.center, 0.9 * c0 + 0.1 * teacher.mean(dim=0, keepdim=True), rtol=0, atol=1e-7)


def test_model_accumulates_center_in_training_only_and_moves_it_once_per_update():
    from mst_ds.model import MSTModel

    model = MSTModel.from_config(load_config("tiny").config)
    teacher = model.make_teacher()
    vs = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16)]
    vs2 = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16)]
    model.eval()
    model(vs, teacher, 0.04)
    with pytest.raises(RuntimeError, match="no teacher logits"):
        model.dino_loss.update_center()  # eval forwards accumulate nothing
    model.train()
    model(vs, teacher, 0.04)
    model(vs2, teacher, 0.04)  # two micro-batches of one optimizer step
    assert model.dino_loss.center.abs().sum() == 0  # forwards alone do not move the center
    model.dino_loss.update_center()
    both = torch.cat(teacher(vs[:2]).logits + teacher(vs2[:2]).logits).float()
    torch.testing.assert_close(model.dino_loss.center, 0.1 * both.mean(dim=0, keepdim=True), rtol=1e-5, atol=1e-6)


def test_center_of_micro_batches_equals_center_of_the_whole_batch():
    """k micro-batches accumulated then one update = DINO's one update from the whole batch."""
    g = torch.Generator().manual_seed(3)
    whole, parts = DINOLoss(5), DINOLoss(5)
    for _ in range(3):
        teacher = torch.randn(16, 5, generator=g)
        whole.update_center(teacher)
        for chunk in teacher.split(4):
            parts.accumulate_center(chunk)
        parts.update_center()
        torch.testing.assert_close(parts.center, whole.center, rtol=0, atol=1e-7)
    parts.accumulate_center(torch.randn(4, 5, generator=g))
    parts.discard_pending_center()  # a skipped step leaves the center as it was
    with pytest.raises(RuntimeError):
        parts.update_center()


def test_restoration_whole_image_reductions():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    err = (pred - target).abs()
    torch.testing.assert_close(restoration_loss(pred, target), err.mean())
    torch.testing.assert_close(restoration_loss(pred, target, reduction="sum_per_image"), err.sum() / 2)


def test_restoration_masked_patches_only():
    target = torch.zeros(2, 3, 8, 8)
    pred = torch.zeros(2, 3, 8, 8)
    mask = torch.zeros(2, 4, dtype=torch.bool)  # 2×2 grid of 4-pixel patches
    mask[0, 3] = True  # image 0, bottom-right patch
    pred[0, :, 4:, 4:] = 2.0  # error inside the masked patch
    pred[1] = 5.0  # error in an image with nothing masked: ignored
    pred[0, :, :4, :4] = 7.0  # error in an unmasked patch: ignored
    loss = restoration_loss(pred, target, patch_mask=mask, patch_size=4)
    assert loss.item() == pytest.approx(2.0)
    loss = restoration_loss(pred, target, reduction="sum_per_image", patch_mask=mask, patch_size=4)
    assert loss.item() == pytest.approx(2.0 * 3 * 16 / 2)
    with pytest.raises(ValueError):
        restoration_loss(pred, target, patch_mask=mask)
