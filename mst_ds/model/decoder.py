"""Global image decoder g (SPEC §1.5): all student patch tokens of a global view → the image.

Input: the final-norm patch tokens (B, N, D) of a global view, reshaped to a D×h×w map. Each stage
upsamples ×2; ``len(channels)`` ×2 steps must multiply up to the patch size (DeiT-S patch 16 → 4
stages, the tiny preset's patch 8 → 3), each stage with BN + ReLU (optional).

Cost matters (target: MST step ≤ 1.15 × the DINO step): a dense 3×3 conv before each PixelShuffle would
cost ~0.9 GMAC per stage per 224-px image (~20 % of a DeiT-S forward each at the 56² and 112² stages), so
the ``pixel_shuffle`` stage is depthwise-separable — depthwise 3×3 (spatial mixing, ~free) then a 1×1 to
4·c channels, PixelShuffle(2) — ~0.4 GMAC for all four stages; its last ×2 is ESPCN's sub-pixel output
(1×1 conv to 3·4 channels + PixelShuffle), so nothing but the 3-channel image is full-resolution.
``transposed_conv`` (kernel 4, stride 2, then a 3×3 conv to pixels) is the classic, much dearer
alternative (SPEC §8 measured it costing more than the tiny ViT step).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from mst_ds.config import ConfigError, DecoderConfig


def _stage(kind: str, c_in: int, c_out: int, use_bn: bool, upsample: bool = True) -> nn.Sequential:
    """One stage: (B, c_in, h, w) → (B, c_out, 2h, 2w), or (B, c_out, h, w) when not ``upsample``."""
    if kind == "pixel_shuffle":
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, (4 if upsample else 1) * c_out, 1, bias=not use_bn),
        ]
        if upsample:
            layers.append(nn.PixelShuffle(2))
    else:
        layers = [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=not use_bn)]
    if use_bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class GlobalImageDecoder(nn.Module):
    """(B, N, D) patch tokens on an h×w grid → (B, 3, h·P, w·P) restored image."""

    def __init__(self, embed_dim: int, patch_size: int, cfg: DecoderConfig) -> None:
        super().__init__()
        if not cfg.channels or 2 ** len(cfg.channels) != patch_size:
            raise ConfigError(
                f"decoder.channels: {len(cfg.channels)} ×2 stages give ×{2 ** len(cfg.channels)}, but the patch size is "
                f"{patch_size} (need {int(math.log2(patch_size)) if patch_size > 0 else '?'} stages)"
            )
        self.patch_size = patch_size
        widths = [embed_dim, *cfg.channels]
        S = len(cfg.channels)
        if cfg.kind == "pixel_shuffle":
            # ESPCN-style sub-pixel output: the last stage stays at half resolution and the output conv
            # emits 3·4 channels that PixelShuffle turns into the full-resolution image, so no
            # c-channel map ever exists at full resolution (that map was most of the decoder's cost).
            self.stages = nn.Sequential(*[
                _stage(cfg.kind, widths[i], widths[i + 1], cfg.use_bn, upsample=i < S - 1) for i in range(S)])
            self.to_pixels = nn.Sequential(nn.Conv2d(cfg.channels[-1], 3 * 4, 1), nn.PixelShuffle(2))
        else:
            self.stages = nn.Sequential(*[_stage(cfg.kind, widths[i], widths[i + 1], cfg.use_bn) for i in range(S)])
            self.to_pixels = nn.Sequential(nn.Conv2d(cfg.channels[-1], 3, 3, padding=1))

    def forward(self, patch_tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """patch_tokens (B, N, D) → image (B, 3, h·P, w·P); grid = (h, w), default square √N × √N."""
        B, N, D = patch_tokens.shape
        h, w = grid if grid is not None else (math.isqrt(N), math.isqrt(N))
        x = patch_tokens.to(self.to_pixels[0].weight.dtype).transpose(1, 2).reshape(B, D, h, w)
        return self.to_pixels(self.stages(x))
