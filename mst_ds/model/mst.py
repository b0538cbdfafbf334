"""MST's student/teacher pair and Algorithm 1's forward [S].

``MSTModel`` is the *student* side (backbone + mask token, DINO head, global image decoder, the DINO
loss with its ``center``): exactly the module ``deepspeed.initialize`` wraps. The teacher is a deep copy
of backbone + head (``make_teacher``), updated by EMA outside this module and run here under no_grad.
With ``mask.enabled`` and ``decoder.enabled`` off the same forward is the DINO baseline.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from mst_ds.config import MSTConfig
from mst_ds.losses import DINOLoss, restoration_loss
from mst_ds.masking import Masker, MaskPlan
from mst_ds.model.backbone import Backbone
from mst_ds.model.decoder import GlobalImageDecoder
from mst_ds.model.diagnostics import forward_diagnostics
from mst_ds.model.heads import DINOHead

N_GLOBAL = 2  # the teacher sees only the two global views [D]


@dataclass
class TeacherOutput:
    logits: list[Tensor]  # one (B, K) per global view
    attn: Tensor | None  # (2B, heads, N) last block's CLS→patch attention, global views batched
    cls: Tensor  # (2B, D) final-norm CLS


class Teacher(nn.Module):
    """f_t: backbone + head, no drop path, no gradients. Parameter names match the student's.

    ``compute_dtype``: the run's low-precision compute dtype (bf16 / fp16; None = fp32). The forward runs
    under ``torch.autocast`` of it, as DINO runs its teacher under the student's autocast: matmuls at the
    tensor-core rate, while the weights (and so the EMA) stay fp32. None runs plain fp32, as before."""

    def __init__(self, backbone: Backbone, head: DINOHead, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.compute_dtype = compute_dtype

    def _autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype)

    @torch.no_grad()
    def forward(self, global_views: list[Tensor], return_attn: bool = True) -> TeacherOutput:
        """global_views: 2 × (B, 3, G, G), run batched in one pass → TeacherOutput (logits, attention
        and CLS in ``compute_dtype`` when one is set, the losses read them as float32)."""
        B = global_views[0].shape[0]
        with self._autocast(global_views[0].device.type):
            out = self.backbone(torch.cat(global_views), return_attn=return_attn)
            logits = self.head(out.cls)
        return TeacherOutput(logits=list(logits.split(B)), attn=out.attn, cls=out.cls)


def attention_entropy(attn: Tensor) -> Tensor:
    """(B, heads, N) CLS→patch attention → mean normalised entropy in [0, 1] of the head-averaged map
    (1 = uniform over the patches, 0 = all mass on one patch)."""
    a = attn.float().mean(dim=1)
    a = a / a.sum(dim=-1, keepdim=True)
    ent = -(a * a.clamp_min(1e-12).log()).sum(dim=-1)
    return (ent / math.log(a.shape[-1])).mean() if a.shape[-1] > 1 else ent.mean() * 0


class MSTModel(nn.Module):
    """Student f_s + decoder g + DINO loss. ``forward`` = one step of Algorithm 1 (without the update)."""

    def __init__(self, cfg: MSTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone.from_config(cfg.model)
        self.head = DINOHead(self.backbone.embed_dim, cfg.model.head)
        self.decoder: GlobalImageDecoder | None = (
            GlobalImageDecoder(self.backbone.embed_dim, self.backbone.patch_size, cfg.decoder)
            if cfg.decoder.enabled else None
        )
        self.dino_loss = DINOLoss(cfg.model.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum)
        self.masker = Masker.from_config(cfg.mask)
        # Ask the teacher for its attention even when nothing is masked by it, for the attn_entropy
        # diagnostic (costs only the last block's unfused attention). bench/step_cost.py turns it off
        # for the pure DINO reference.
        self.attn_diagnostics = True

    @classmethod
    def from_config(cls, cfg: MSTConfig) -> MSTModel:
        return cls(cfg)

    def make_teacher(self, compute_dtype: torch.dtype | None = None) -> Teacher:
        """Deep copy of backbone + head with drop path off and requires_grad False; fp32 weights, its
        forward under autocast of ``compute_dtype`` when given (:class:`Teacher`)."""
        teacher = Teacher(copy.deepcopy(self.backbone), copy.deepcopy(self.head), compute_dtype)
        for m in teacher.modules():
            if isinstance(m, DropPath):
                m.drop_prob = 0.0
        teacher.requires_grad_(False)
        return teacher

    # ---------------------------------------------------------------------------------------------
    def _student_locals(self, local_views: list[Tensor]) -> list[Tensor]:
        """n × (B, 3, L, L) clean local views → n × (B, D) CLS, one backbone call per resolution."""
        cls: list[Tensor | None] = [None] * len(local_views)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(local_views):
            by_shape.setdefault(tuple(v.shape[1:]), []).append(i)
        for idx in by_shape.values():
            B = local_views[idx[0]].shape[0]
            out = self.backbone(torch.cat([local_views[i] for i in idx]))  # never masked
            for i, c in zip(idx, out.cls.split(B)):
                cls[i] = c
        return cls  # type: ignore[return-value]

    def _mask_plan(self, t: TeacherOutput, batch: int, n: int, device: torch.device,
                   generator: torch.Generator | None) -> MaskPlan:
        return self.masker(t.attn if self.masker.needs_attention else None, batch, n, generator).to(device)

    def forward(self, views: list[Tensor], teacher: Teacher, teacher_temp: float,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """views: 2 global (B,3,G,G) then n local (B,3,L,L), normalised float, augmented.

        Returns "loss" (with grad) and detached float32 scalars "dino", "restore", "dino_weighted",
        "restore_weighted", "mask_ratio", "attn_entropy", "center_norm", "teacher_entropy".
        ``generator``: CPU generator the masks are drawn from (None = torch's global RNG).
        In training mode the teacher logits are added to the pending center sum; the caller applies
        the center EMA once per optimizer step (``dino_loss.update_center()``, all-reduced).
        """
        cfg = self.cfg
        global_views, local_views = views[:N_GLOBAL], views[N_GLOBAL:]
        B = global_views[0].shape[0]
        x_g = torch.cat(global_views)  # (2B, 3, G, G): also the restoration target (before masking)
        grid = (x_g.shape[-2] // self.backbone.patch_size, x_g.shape[-1] // self.backbone.patch_size)
        n = grid[0] * grid[1]

        # 1. teacher once on the clean global views (logits + last-block attention from one forward)
        want_attn = self.masker.needs_attention or self.attn_diagnostics
        t = teacher(global_views, return_attn=want_attn)

        # 2. masks from the teacher's attention, global views only
        plan = self._mask_plan(t, N_GLOBAL * B, n, x_g.device, generator)
        masked = cfg.mask.enabled
        s_g = self.backbone(
            x_g,
            plan.token if masked else None,
            plan.random if masked and cfg.mask.replacement == "bert" else None,
            random_source=plan.source,
        )
        local_cls = self._student_locals(local_views)

        # 3. head: every crop's CLS in one call, as DINO — one BN batch over all views. Two calls (global,
        #    local) would normalise each group by its own statistics: measured on DeiT-S shapes, logits
        #    up to 92 % of their max apart from DINO's. BN running statistics are never read (training
        #    runs the head in train mode; evaluation uses the backbone), so which rows update them
        #    changes no number.
        student_logits = list(self.head(torch.cat([s_g.cls, *local_cls])).split(B))

        # 4. losses in float32
        dino = self.dino_loss(student_logits, t.logits, teacher_temp)
        if self.decoder is not None:
            pred = self.decoder(s_g.patch_tokens, grid)
            restore = restoration_loss(
                pred, x_g, reduction=cfg.loss.restore_reduction,
                patch_mask=plan.mask if cfg.loss.restore_target == "masked_patches" else None,
                patch_size=self.backbone.patch_size, num_prototypes=cfg.model.head.out_dim,
            )
        else:
            restore = torch.zeros((), dtype=torch.float32, device=dino.device)
        dino_w = cfg.loss.dino_weight * dino
        restore_w = cfg.loss.restore_weight * restore
        loss = dino_w + restore_w  # a zero weight keeps its branch in the graph: every parameter gets a grad

        with torch.no_grad():
            teacher_all = torch.cat(t.logits)
            q = self.dino_loss.teacher_probs(teacher_all, teacher_temp)
            teacher_entropy = -(q * q.clamp_min(1e-12).log()).sum(dim=-1).mean()
            if self.training:  # the center itself moves once per optimizer step (update_center)
                self.dino_loss.accumulate_center(teacher_all)
            attn_ent = attention_entropy(t.attn) if t.attn is not None else torch.tensor(float("nan"))
            dev = dino.device
            stats = {
                "dino": dino.detach(),
                "restore": restore.detach(),
                "dino_weighted": dino_w.detach(),
                "restore_weighted": restore_w.detach(),
                "mask_ratio": plan.mask.float().mean().to(dev),
                "attn_entropy": attn_ent.float().to(dev),
                "center_norm": self.dino_loss.center.float().norm().to(dev),
                "teacher_entropy": teacher_entropy.float(),
                **forward_diagnostics(student_logits, q, t.cls, t.attn, plan.mask),  # run health (issue 10)
            }
        return {"loss": loss, **stats}
