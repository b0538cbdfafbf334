"""DINO projection head (DINO's ``DINOHead``; MST's setting "follows [2]" [S §7])."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from mst_ds.config import HeadConfig


class DINOHead(nn.Module):
    """MLP (GELU, optional BN) → L2-normalise → weight-normalised linear to K prototypes.

    in_dim → hidden_dim (× nlayers−1) → bottleneck_dim → out_dim. ``last_layer`` uses
    ``torch.nn.utils.parametrizations.weight_norm`` (the legacy hook version breaks ``deepcopy``);
    its gain ``last_layer.parametrizations.weight.original0`` starts at 1 and is frozen when
    ``norm_last_layer`` (DINO's option).
    """

    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        if cfg.nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, cfg.bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [cfg.hidden_dim] * (cfg.nlayers - 1)
            for a, b in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(a, b))
                if cfg.use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
            layers.append(nn.Linear(cfg.hidden_dim, cfg.bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = parametrizations.weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        if cfg.norm_last_layer:
            gain.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, in_dim) → logits (B, out_dim) in the head's parameter dtype."""
        x = self.mlp(x.to(self.last_layer.parametrizations.weight.original1.dtype))
        x = nn.functional.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
