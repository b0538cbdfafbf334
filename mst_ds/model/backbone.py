"""The ViT backbone shared by student and teacher: timm's VisionTransformer plus MST's mask token.

What this wrapper adds to timm (SPEC §1 steps 2–4):

* masked patch embeddings are replaced by a learnable mask token **after** the linear projection and
  **before** the position embedding [S §11], so a masked token keeps its position;
* BERT's random replacement (a masked position gets another token of the batch) for the Table 4 ablation;
* the last block's CLS→patch self-attention is returned from the *same* forward (the teacher runs once
  per step); only that block runs the explicit ``softmax(q·kᵀ/√d)`` path, the others keep timm's
  fused attention when ``ModelConfig.fused_attn``;
* the final-norm CLS of the last n blocks (DINO's ``get_intermediate_layers``) for the linear probe.

224- and 96-pixel views go through one model: ``dynamic_img_size=True`` lets the patch embedding take any
grid, and the position embedding is resampled to the view's grid either as DINO does (``dino``: plain
bicubic, scale factor (new + 0.1) / old, no antialias) or by timm (``timm``: antialiased), per
``ModelConfig.pos_embed_interp``. The cls token is initialised as DINO's (truncated normal, std 0.02;
timm: std 1e-6), per ``ModelConfig.cls_token_init``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
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


def dino_resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int]) -> Tensor:
    """DINO's ``interpolate_pos_encoding``: (1, 1 + h0·w0, D) → (1, 1 + h·w, D), the cls entry unchanged.

    Unchanged on the model's own grid; otherwise plain bicubic (no antialias) with scale_factor =
    (new + 0.1) / old — the offset makes the floor of the output size land on ``new``."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    (h, w), (h0, w0), dim = new_grid, old_grid, pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, h0, w0, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic")
    if patch.shape[-2:] != (h, w):
        raise ValueError(f"position embedding resampled to {tuple(patch.shape[-2:])}, expected {(h, w)}")
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)


class Backbone(nn.Module):
    """timm ViT + mask token. ``vit`` keeps timm's parameter names (``timm_state_dict`` exports them)."""

    def __init__(self, vit: VisionTransformer, *, fused_attn: bool = True, pos_embed_interp: str = "dino",
                 cls_token_init: str = "dino") -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer) or not vit.has_class_token:
            raise ConfigError("model.arch: MST needs a timm VisionTransformer with a class token")
        last = vit.blocks[-1]
        if type(last) is not Block or not isinstance(last.attn, Attention):
            raise ConfigError(
                f"model.arch: the last block is {type(last).__name__}; MST reads attention from a standard timm Block"
            )
        if pos_embed_interp == "dino" and (vit.no_embed_class or vit.reg_token is not None or vit.pos_embed is None):
            raise ConfigError("model.pos_embed_interp: dino needs a ViT whose position embedding covers the cls token "
                              "and no register tokens (DINO's layout); use timm")
        self.vit = vit
        self.pos_embed_interp = pos_embed_interp
        if cls_token_init == "dino":  # DINO: trunc_normal_(cls_token, std=.02) (SPEC §9); timm: std 1e-6
            nn.init.trunc_normal_(vit.cls_token, std=0.02)
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
        return cls(vit, fused_attn=cfg.fused_attn, pos_embed_interp=cfg.pos_embed_interp,
                   cls_token_init=cfg.cls_token_init)

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
        x = self._pos_embed(x) if self.pos_embed_interp == "dino" else self.vit._pos_embed(x)
        x = self.vit.patch_drop(x)
        return self.vit.norm_pre(x)

    def _pos_embed(self, x: Tensor) -> Tensor:
        """DINO's ``prepare_tokens`` after the patch embedding: (B, h, w, D) → (B, 1 + h·w, D), the cls token
        prepended and DINO's resampled position embedding added (timm's ``_pos_embed`` layout otherwise)."""
        B, h, w, D = x.shape
        vit = self.vit
        x = torch.cat([vit.cls_token.expand(B, -1, -1), x.reshape(B, h * w, D)], dim=1)
        return vit.pos_drop(x + dino_resample_pos_embed(vit.pos_embed, (h, w), tuple(vit.patch_embed.grid_size)))

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
