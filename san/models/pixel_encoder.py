"""CNN pixel encoder: a timm backbone with a light FPN-style fusion.

Why a CNN here and a ViT for the semantic generator: convolutions keep the local
detail that per-pixel assignments need, while the ViT's global tokens are what
the cluster centres are pooled from.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from san.models.upsample import upsample_bilinear


class PixelEncoder(nn.Module):
    """Images (B, 3, H, W) -> pixel embeddings Z (B, D, H/stride, W/stride)."""

    def __init__(self, backbone: str, embed_dim: int, stride: int = 8) -> None:
        super().__init__()
        probe = timm.create_model(backbone, pretrained=False, features_only=True)
        reductions = probe.feature_info.reduction()
        # Fuse every level at or below the output stride's coarseness: the target
        # level and all coarser ones (FPN top-down), so context reaches each pixel.
        indices = [i for i, r in enumerate(reductions) if r >= stride]
        if not indices or reductions[indices[0]] != stride:
            raise ValueError(
                f"model.encoder={backbone!r} has no feature level at stride {stride} "
                f"(its strides: {reductions})"
            )
        del probe
        self.backbone = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=indices
        )
        channels = self.backbone.feature_info.channels()
        self.stride = stride
        self.lateral = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim, embed_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim, embed_dim, 1),
            # Zero-mean, unit-variance channels: without this the embeddings share one
            # dominant direction, every pixel is most similar to the same centre under
            # cosine attention, and SEAT collapses onto one cluster from the start.
            nn.BatchNorm2d(embed_dim, affine=False),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        fused = self.lateral[-1](features[-1])
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level])
            fused = lateral + upsample_bilinear(fused, lateral.shape[-2:])
        return self.fuse(fused)
