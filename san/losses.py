"""SAN's losses. Each term has a weight; weight 0 switches it off and skips its compute.

- L_mi: IIC mutual information between the two views' pixel assignments, aligned
  pixel to pixel through the views' crop geometry.
- L_con: consistency sustainer, L2 between Z and the SEAT reconstruction Z' (both on the
  unit sphere unless model.seat_space=raw; see SEAT).
- L_rec: L2 between the (normalised) view and the decoder's reconstruction.
- L_orth: ||norm(S) norm(S)^T - I||_F^2, uniformity of the centres.

A term whose model output is missing (IIC has no decoder or centres) is skipped:
that is how the baselines run through the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from san.config import LossConfig
from san.data.transforms import align_views

TERMS = ("mi", "con", "rec", "orth")


def mutual_information_loss(
    assign1: torch.Tensor, assign2: torch.Tensor, valid: torch.Tensor, lam: float = 1.0
) -> torch.Tensor:
    """IIC's loss: -sum P_ij (log P_ij - lam log P_i - lam log P_j).

    P is the joint distribution of (cluster in view 1, cluster in view 2) over the
    valid, aligned pixels. lam = 1 gives -I(view1; view2); lam > 1 rewards high
    marginal entropy more, which counters collapse onto few clusters.
    Computed in float32: the logs of small probabilities underflow in half precision.
    """
    mask = valid.unsqueeze(1).float()
    joint = torch.einsum("bihw,bjhw->ij", assign1.float() * mask, assign2.float() * mask)
    joint = joint / joint.sum().clamp_min(1e-8)
    joint = ((joint + joint.T) / 2).clamp_min(1e-8)
    p_i = joint.sum(dim=1, keepdim=True)
    p_j = joint.sum(dim=0, keepdim=True)
    return -(joint * (joint.log() - lam * p_i.log() - lam * p_j.log())).sum()


def consistency_loss(z: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
    """Mean squared distance per pixel between the pixel features and Z'."""
    return (z.float() - z_rec.float()).pow(2).sum(dim=1).mean()


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(recon.float(), images.float())


def orthogonality_loss(centres: torch.Tensor) -> torch.Tensor:
    """Zero exactly when the normalised centres are orthonormal."""
    unit = F.normalize(centres.float(), dim=1)
    gram = unit @ unit.T
    return (gram - torch.eye(gram.shape[0], device=gram.device)).pow(2).sum()


class SANLoss(nn.Module):
    """Weighted sum of the active terms; returns (total, {term: value}) for logging."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.weights = {"mi": cfg.w_mi, "con": cfg.w_con, "rec": cfg.w_rec, "orth": cfg.w_orth}
        self.mi_lambda = cfg.mi_lambda

    def active_terms(self, outputs: dict[str, torch.Tensor]) -> list[str]:
        needs = {"mi": "assign", "con": "z_con", "rec": "recon", "orth": "centres"}
        return [t for t in TERMS if self.weights[t] > 0 and needs[t] in outputs]

    def forward(
        self,
        out1: dict[str, torch.Tensor],
        out2: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms: dict[str, torch.Tensor] = {}
        active = self.active_terms(out1)
        if "mi" in active:
            aligned, valid = align_views(
                out2["assign"], batch["box1"], batch["flip1"], batch["box2"], batch["flip2"]
            )
            terms["mi"] = mutual_information_loss(out1["assign"], aligned, valid, self.mi_lambda)
        if "con" in active:
            terms["con"] = (
                consistency_loss(out1["z_con"], out1["z_rec"])
                + consistency_loss(out2["z_con"], out2["z_rec"])
            ) / 2
        if "rec" in active:
            terms["rec"] = (
                reconstruction_loss(out1["recon"], batch["view1"])
                + reconstruction_loss(out2["recon"], batch["view2"])
            ) / 2
        if "orth" in active:
            terms["orth"] = (
                orthogonality_loss(out1["centres"]) + orthogonality_loss(out2["centres"])
            ) / 2
        if not terms:
            raise ValueError("no active loss term: every weight the model supports is 0")
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms
