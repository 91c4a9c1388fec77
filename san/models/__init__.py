"""Model registry: `create_model(cfg, image_size)` is the one way in (timm-style)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from san.config import Config, ModelConfig
from san.models.san import IIC, SAN, KMeansEmbeddings, SegmentationModel

MODELS: dict[str, Callable[..., SegmentationModel]] = {
    "san": SAN,
    "iic": IIC,
    "kmeans": KMeansEmbeddings,
}


def create_model(cfg: Config | ModelConfig, image_size: int | None = None) -> SegmentationModel:
    """Build the model named by `cfg.model.name` (or a bare ModelConfig plus image size)."""
    if isinstance(cfg, Config):
        model_cfg, image_size = cfg.model, cfg.data.image_size
        if model_cfg.name == "kmeans":
            return KMeansEmbeddings(model_cfg, image_size, cfg.loss.kmeans_momentum)
        if model_cfg.name == "san":
            return SAN(model_cfg, image_size, with_decoder=cfg.loss.w_rec > 0)
    else:
        model_cfg = cfg
    if image_size is None:
        raise ValueError("create_model needs image_size with a bare ModelConfig")
    if model_cfg.name not in MODELS:
        raise ValueError(
            f"model.name={model_cfg.name!r} is not registered; choose from {list(MODELS)}"
        )
    return MODELS[model_cfg.name](model_cfg, image_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "SAN", "IIC", "KMeansEmbeddings", "SegmentationModel", "create_model"]
