"""SAN and the two baselines that share its pixel encoder (IIC, k-means).

Every model returns the same output dict from `forward`, so one loss, one
training loop and one evaluation serve all three:

- "z": pixel embeddings (B, D, h, w)
- "logits": cluster scores (B, K, h, w); argmax is the segmentation
- "assign": softmax of the logits (B, K, h, w)
- optional "z_con"/"z_rec" (L_con), "recon" (L_rec), "centres" (L_orth)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from san.config import ModelConfig
from san.models.decoder import Decoder
from san.models.pixel_encoder import PixelEncoder
from san.models.seat import SEAT
from san.models.semantic import SemanticGenerator


class SegmentationModel(nn.Module):
    """Shared inference helpers; subclasses implement `forward`."""

    n_clusters: int

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Cluster index per input pixel, (B, H, W)."""
        logits = self.forward(images)["logits"]
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)


class SAN(SegmentationModel):
    """Semantic Attention Network: CNN pixels attend to ViT-pooled batch-wise centres.

    The centres depend on the batch. At evaluation the model uses a running
    average of them instead (a buffer, like BatchNorm's statistics), so cluster
    k means the same thing in every evaluation batch and the prediction does not
    depend on which images happen to share a batch.
    """

    def __init__(self, cfg: ModelConfig, image_size: int, with_decoder: bool = True) -> None:
        super().__init__()
        self.n_clusters = cfg.n_clusters
        self.encoder = PixelEncoder(cfg.encoder, cfg.embed_dim, cfg.stride)
        self.semantic = SemanticGenerator(
            cfg.vit,
            image_size,
            cfg.vit_patch_size,
            cfg.n_clusters,
            cfg.embed_dim,
            depth=cfg.vit_depth,
            weights=cfg.vit_weights,
        )
        self.seat = SEAT(cfg.tau, cfg.seat_space)
        # Without L_rec the decoder would be dead weight, so it is not built.
        self.decoder = Decoder(cfg.embed_dim, cfg.decoder_dim, cfg.stride) if with_decoder else None
        self.centre_momentum = 0.9
        self.register_buffer("running_centres", torch.zeros(cfg.n_clusters, cfg.embed_dim))
        self.register_buffer("centres_seen", torch.zeros((), dtype=torch.long))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(images)
        if self.training or self.centres_seen == 0:
            centres = self.semantic(images)
            if self.training:
                self._update_running_centres(centres.detach())
        else:
            centres = self.running_centres
        out = self.seat(z, centres)
        out.update(z=z, centres=centres)
        if self.decoder is not None:
            out["recon"] = self.decoder(out["z_rec"])
        return out

    @torch.no_grad()
    def _update_running_centres(self, centres: torch.Tensor) -> None:
        centres = centres.float()
        # The first batch's centres replace the zeros (lerp weight 1 is exact), later ones
        # are averaged in. No Python branch on the buffer: torch.compile (optim.compile)
        # would break the forward into two graphs there and compile again at step two.
        weight = torch.where(self.centres_seen == 0, 1.0, 1 - self.centre_momentum)
        self.running_centres.lerp_(centres, weight)
        self.centres_seen += 1


class IIC(SegmentationModel):
    """IIC baseline: the same CNN with a 1x1 cluster head, trained by L_mi alone."""

    def __init__(self, cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        self.n_clusters = cfg.n_clusters
        self.encoder = PixelEncoder(cfg.encoder, cfg.embed_dim, cfg.stride)
        self.head = nn.Conv2d(cfg.embed_dim, cfg.n_clusters, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(images)
        logits = self.head(z)
        return {"z": z, "logits": logits, "assign": logits.softmax(dim=1)}


class KMeansEmbeddings(SegmentationModel):
    """k-means baseline (PiCIE-style): cluster the CNN's learned pixel embeddings.

    The centroids are fitted by online mini-batch k-means on the detached,
    normalised embeddings, so no gradient flows through clustering. The encoder
    learns as PiCIE's does, from its own clusters across the two views: L_mi on the
    soft assignments to the (fixed) centroids, plus L_rec from the embeddings. It
    differs from SAN only in where the centres come from (k-means, not the ViT over
    the batch) and in having no L_con and L_orth.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        image_size: int,
        momentum: float = 0.99,
        with_decoder: bool = True,
    ) -> None:
        super().__init__()
        self.n_clusters = cfg.n_clusters
        self.tau = cfg.tau
        self.momentum = momentum
        self.encoder = PixelEncoder(cfg.encoder, cfg.embed_dim, cfg.stride)
        # Without L_rec no gradient reaches a decoder, which DDP refuses at the second step.
        self.decoder = Decoder(cfg.embed_dim, cfg.decoder_dim, cfg.stride) if with_decoder else None
        self.register_buffer("centroids", torch.zeros(cfg.n_clusters, cfg.embed_dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(images)
        z_unit = F.normalize(z, dim=1)
        if self.training:
            self._update_centroids(z_unit.detach())
        logits = torch.einsum("bdhw,kd->bkhw", z_unit, F.normalize(self.centroids, dim=1))
        logits = logits / self.tau
        out = {"z": z, "logits": logits, "assign": logits.softmax(dim=1)}
        if self.decoder is not None:
            out["recon"] = self.decoder(z)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.decoder is None:  # checkpoints from before carry a decoder L_rec=0 never trained
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("decoder.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def _update_centroids(self, z_unit: torch.Tensor) -> None:
        pixels = z_unit.permute(0, 2, 3, 1).reshape(-1, z_unit.shape[1]).float()
        if not self.initialised:
            # k-means++-lite: start from distinct random pixels of the first batch.
            pick = torch.randperm(pixels.shape[0], device=pixels.device)[: self.n_clusters]
            self.centroids.copy_(pixels[pick])
            self.initialised.fill_(True)
            return
        nearest = (pixels @ F.normalize(self.centroids, dim=1).T).argmax(dim=1)
        sums = torch.zeros_like(self.centroids).index_add_(0, nearest, pixels)
        counts = torch.bincount(nearest, minlength=self.n_clusters).unsqueeze(1)
        seen = counts.squeeze(1) > 0
        means = sums[seen] / counts[seen]
        self.centroids[seen] = self.momentum * self.centroids[seen] + (1 - self.momentum) * means
