"""Semantic generator: K batch-wise semantic embeddings (the cluster centres).

A ViT turns each image into tokens; K learnable queries attend over the tokens of
the *whole batch* at once, so each centre summarises one semantic concept as it
appears across the batch rather than within one image.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn


class SemanticGenerator(nn.Module):
    """Images (B, 3, H, W) -> semantic embeddings S (K, D)."""

    def __init__(
        self,
        vit: str,
        image_size: int,
        patch_size: int,
        n_clusters: int,
        embed_dim: int,
        depth: int | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        kwargs = {"img_size": image_size, "patch_size": patch_size, "num_classes": 0}
        if depth is not None:
            kwargs["depth"] = depth
        self.vit = timm.create_model(vit, pretrained=False, **kwargs)
        if weights:
            self._load_weights(weights)
        width = self.vit.num_features
        self.queries = nn.Parameter(torch.randn(n_clusters, width) * width**-0.5)
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))
        self.scale = width**-0.5

    def _load_weights(self, path: str) -> None:
        """Load a ViT checkpoint as published (timm's, DINO's: any image and patch size).

        timm's own filter adapts it: it unwraps {"model": ...}, converts DINOv2 and CLIP
        layouts, and resamples the position embeddings and patch kernels to this model's
        grid (a 224-px, patch-16 checkpoint for a 96-px, patch-8 model). The classifier
        is dropped: this ViT has none. Anything else that does not fit is refused.
        """
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if not Path(path).is_file():
            raise FileNotFoundError(f"model.vit_weights={path!r}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            if isinstance(self.vit, VisionTransformer):
                state = checkpoint_filter_fn(state, self.vit)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            missing, unexpected = self.vit.load_state_dict(state, strict=False)
        except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise ValueError(
                f"model.vit_weights={path!r} does not fit model.vit: {reason}"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"model.vit_weights={path!r} does not fit model.vit: missing "
                f"{', '.join(missing[:3]) or 'none'}{', ...' if len(missing) > 3 else ''}; "
                f"unexpected {', '.join(unexpected[:3]) or 'none'}"
                f"{', ...' if len(unexpected) > 3 else ''}"
            )

    @property
    def sequence_length(self) -> int:
        """Tokens per image in each ViT attention (patches plus class/register tokens)."""
        return self.vit.patch_embed.num_patches + self.vit.num_prefix_tokens

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens without the class/register tokens: (B, N, width)."""
        tokens = self.vit.forward_features(images)
        return tokens[:, self.vit.num_prefix_tokens :]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.tokens(images)).flatten(0, 1)  # (B*N, width): the batch pool
        attn = (self.to_q(self.queries) @ self.to_k(tokens).T * self.scale).softmax(dim=-1)
        pooled = self.queries + attn @ self.to_v(tokens)
        return self.proj(pooled)
