"""The ViT backbone shared by student and teacher: timm's VisionTransformer plus MST's mask token.

What this wrapper adds to timm (SPEC §1 steps 2–4):

* masked patch embeddings are replaced by a learnable mask token **after** the linear projection and
  **before** the position embedding [S §11], so a masked token keeps its position;
* BERT's random replacement (a masked position gets another token of the batch) for the Table 4 ablation;
* the last block's CLS→patch self-attention is returned from the *same* forward (the teacher runs once
  per step); only that block runs the explicit ``softmax(q·kᵀ/√d)`` path, the others keep timm's
  fused attention when ``ModelConfig.fused_attn``;
* the final-norm CLS of the last n blocks (DINO's ``get_intermediate_layers``) for the linear probe.

224- and 96-pixel views go through one model: ``dynamic_img_size=True`` makes timm interpolate the
position embeddings to the view's token grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from mst_ds.config import ConfigError, ModelConfig


@dataclass
class BackboneOutput:
    cls: Tensor  # (B, D) final-norm CLS
    patch_tokens: Tensor  # (B, N, D) final-norm patch tokens
    attn: Tensor | None  # (B, heads, N) last block's CLS→patch attention (rows softmaxed over all tokens)
    last_cls: list[Tensor] = field(default_factory=list)  # n_last_blocks × (B, D), oldest first


def _block_with_cls_attention(blk: Block, x: Tensor, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    """timm ``Block.forward`` with the attention computed explicitly so its probabilities can be read.

    x: (B, T, D) with T = prefix + N tokens → (x_out (B, T, D), cls_attn (B, heads, N)).
    Mirrors ``timm.layers.Attention.forward`` (non-fused branch) and ``Block.forward`` line by line.
    """
    attn_mod: Attention = blk.attn
    h = blk.norm1(x)
    B, T, _ = h.shape
    gate = attn_mod.gate(h).sigmoid() if getattr(attn_mod, "gate", None) is not None else None
    qkv = attn_mod.qkv(h).reshape(B, T, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    probs = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, T, T)
    cls_attn = probs[:, :, 0, num_prefix_tokens:]
    out = attn_mod.attn_drop(probs) @ v
    out = out.transpose(1, 2).reshape(B, T, attn_mod.attn_dim)
    out = attn_mod.norm(out)
    if gate is not None:
        out = out * gate
    out = attn_mod.proj_drop(attn_mod.proj(out))
    x = x + blk.drop_path1(blk.ls1(out))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, cls_attn


class Backbone(nn.Module):
    """timm ViT + mask token. ``vit`` keeps timm's parameter names (``timm_state_dict`` exports them)."""

    def __init__(self, vit: VisionTransformer, *, fused_attn: bool = True) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer) or not vit.has_class_token:
            raise ConfigError("model.arch: MST needs a timm VisionTransformer with a class token")
        last = vit.blocks[-1]
        if type(last) is not Block or not isinstance(last.attn, Attention):
            raise ConfigError(
                f"model.arch: the last block is {type(last).__name__}; MST reads attention from a standard timm Block"
            )
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.num_heads: int = last.attn.num_heads
        self.patch_size: int = int(vit.patch_embed.patch_size[0])
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        # BEiT/SimMIM initialise the mask token like the other embeddings.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for blk in vit.blocks:
            if hasattr(blk, "attn") and hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = fused_attn

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, drop_path_rate: float | None = None) -> Backbone:
        rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        kwargs = dict(cfg.timm_kwargs)
        try:
            vit = timm.create_model(
                cfg.arch, pretrained=False, num_classes=0, dynamic_img_size=True, drop_path_rate=rate, **kwargs
            )
        except (RuntimeError, TypeError, AssertionError) as err:
            raise ConfigError(f"model.arch: timm cannot build {cfg.arch!r} with {kwargs} ({err})") from None
        return cls(vit, fused_attn=cfg.fused_attn)

    # ---------------------------------------------------------------------------------------------
    def num_patches(self, image_size: int) -> int:
        """Patch tokens N of a square view of ``image_size`` pixels."""
        return (image_size // self.patch_size) ** 2

    def embed(self, x: Tensor, mask: Tensor | None = None, random_replace: Tensor | None = None,
              random_source: Tensor | None = None) -> Tensor:
        """Tokens entering block 1: (B,3,H,W) → (B, prefix + N, D).

        mask (B, N) bool: positions whose patch embedding becomes the mask token.
        random_replace (B, N) bool: positions that get another patch embedding of the batch (BERT 10 %);
        random_source (B, N) long: flat index into the batch's B·N patch embeddings for those
        positions (drawn by the Masker so it is reproducible); None = drawn here from torch's RNG.
        """
        x = x.to(self.vit.patch_embed.proj.weight.dtype)
        x = self.vit.patch_embed(x)  # (B, h, w, D): dynamic_img_size makes timm emit NHWC
        grid = x.shape
        B, D = x.shape[0], x.shape[-1]
        tokens = x.reshape(B, -1, D)
        N = tokens.shape[1]
        if random_replace is not None and bool(random_replace.any()):
            if random_source is None:
                random_source = torch.randint(0, B * N, (B, N), device=tokens.device)
            others = tokens.reshape(B * N, D)[random_source.to(tokens.device).reshape(-1)].reshape(B, N, D)
            tokens = torch.where(random_replace.to(tokens.device)[..., None], others, tokens)
        if mask is not None:
            tokens = torch.where(mask.to(tokens.device)[..., None], self.mask_token.to(tokens.dtype), tokens)
        x = tokens.reshape(grid)
        x = self.vit._pos_embed(x)  # prefix tokens + (interpolated) position embedding
        x = self.vit.patch_drop(x)
        return self.vit.norm_pre(x)

    def forward(self, x: Tensor, mask: Tensor | None = None, random_replace: Tensor | None = None, *,
                random_source: Tensor | None = None, return_attn: bool = False,
                n_last_blocks: int = 0) -> BackboneOutput:
        """x (B,3,H,W) normalised → BackboneOutput (see the dataclass for shapes).

        mask / random_replace / random_source: see :meth:`embed`. return_attn: run the last block's
        explicit attention and return its CLS→patch probabilities (B, heads, N). n_last_blocks: also
        return the final-norm CLS of the last n blocks.
        """
        vit = self.vit
        x = self.embed(x, mask, random_replace, random_source)
        depth = len(vit.blocks)
        last_cls: list[Tensor] = []
        attn = None
        for i, blk in enumerate(vit.blocks):
            if return_attn and i == depth - 1:
                x, attn = _block_with_cls_attention(blk, x, self.num_prefix_tokens)
            else:
                x = blk(x)
            if i >= depth - n_last_blocks:
                # DINO's get_intermediate_layers: every returned layer goes through the final norm.
                last_cls.append(vit.norm(x[:, 0]))
        x = vit.norm(x)
        return BackboneOutput(cls=x[:, 0], patch_tokens=x[:, self.num_prefix_tokens:], attn=attn, last_cls=last_cls)

    def timm_state_dict(self) -> dict[str, Tensor]:
        """The ViT's state dict with timm's key names (loadable by ``timm.create_model(arch, ...)``)."""
        return {k: v.detach().clone() for k, v in self.vit.state_dict().items()}
