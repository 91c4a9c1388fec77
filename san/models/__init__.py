"""Model registry: `create_model(cfg, image_size)` is the one way in (timm-style)."""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Callable

import torch
from torch import nn

from san.config import Config, ConfigError, ModelConfig
from san.models.san import IIC, SAN, KMeansEmbeddings, SegmentationModel

MODELS: dict[str, Callable[..., SegmentationModel]] = {
    "san": SAN,
    "iic": IIC,
    "kmeans": KMeansEmbeddings,
}


def create_model(
    cfg: Config | ModelConfig, image_size: int | None = None, *, vit_weights: bool = True
) -> SegmentationModel:
    """Build the model named by `cfg.model.name` (or a bare ModelConfig plus image size).

    `vit_weights=False` leaves `model.vit_weights` unread: for a model whose weights a
    checkpoint then replaces, so evaluating or predicting needs no copy of a file that
    training read on another machine.
    """
    if not vit_weights:
        if isinstance(cfg, Config):
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vit_weights=None))
        else:
            cfg = dataclasses.replace(cfg, vit_weights=None)
    if isinstance(cfg, Config):
        model_cfg, image_size = cfg.model, cfg.data.image_size
        # L_rec off: no decoder is built (nothing would train it).
        with_decoder = cfg.loss.w_rec > 0
        if model_cfg.name == "kmeans":
            return KMeansEmbeddings(
                model_cfg, image_size, cfg.loss.kmeans_momentum, with_decoder=with_decoder
            )
        if model_cfg.name == "san":
            return SAN(model_cfg, image_size, with_decoder=with_decoder)
    else:
        model_cfg = cfg
    if image_size is None:
        raise ValueError("create_model needs image_size with a bare ModelConfig")
    if model_cfg.name not in MODELS:
        raise ValueError(
            f"model.name={model_cfg.name!r} is not registered; choose from {list(MODELS)}"
        )
    return MODELS[model_cfg.name](model_cfg, image_size)


def check_model_config(cfg: Config, read_weights: bool = False) -> None:
    """Raise a one-line ConfigError if `cfg`'s model cannot be built.

    `san.config` checks types and ranges without importing timm (1.7 s); this catches the
    rest before any worker starts: a name timm does not know, a CNN with no feature level
    at `model.stride`, a `model.vit` that is not a ViT. The model is built on the meta
    device (0.05 s, no memory). `model.vit_weights` is read only with `read_weights`: the
    file is loaded and its names and shapes checked against the model, into which nothing
    is copied. It has to exist where the workers run, which need not be here.
    """
    import timm

    for field in ("encoder", "vit"):
        name = getattr(cfg.model, field)
        if not timm.is_model(name):
            near = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(
                f"model.{field}={name!r} is not a timm model: use a name from "
                f"timm.list_models(){hint}"
            )
    model_cfg = cfg.model
    try:
        with torch.device("meta"), warnings.catch_warnings():
            # torch warns for each weight that a copy into a meta tensor does nothing.
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            create_model(cfg, vit_weights=read_weights)
    except Exception as exc:  # noqa: BLE001 - timm and torch raise many types
        message = " ".join(str(exc).split())
        if isinstance(exc, ValueError | FileNotFoundError) and message.startswith("model."):
            raise ConfigError(message) from None  # ours: it names the field already
        raise ConfigError(
            f"model settings (encoder={model_cfg.encoder!r}, vit={model_cfg.vit!r}, "
            f"stride={model_cfg.stride}) cannot be built: {type(exc).__name__}: {message}"
        ) from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "SAN",
    "IIC",
    "KMeansEmbeddings",
    "SegmentationModel",
    "check_model_config",
    "create_model",
]
