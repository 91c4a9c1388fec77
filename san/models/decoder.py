"""Light reconstruction decoder: SEAT features back to the image (against collapse)."""

from __future__ import annotations

import math

import torch
from torch import nn

from san.models.upsample import Upsample2x


class Decoder(nn.Module):
    """Features (B, D, h, w) at `stride` -> image (B, 3, h*stride, w*stride)."""

    def __init__(self, embed_dim: int, width: int, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, width, 3, padding=1), nn.GELU()]
        for _ in range(int(math.log2(stride))):
            layers += [
                Upsample2x(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.GELU(),
            ]
        layers.append(nn.Conv2d(width, 3, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
