"""SEAT, the semantic attention: soft assignment of each pixel to the K centres."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SEAT(nn.Module):
    """A = softmax(<norm(Z), norm(S)> / tau) over K; Z' = A norm(S).

    Cosine similarity keeps the assignment scale-free, so tau alone sets how hard
    it is. Z' lives on the centres' unit sphere, which is what L_con compares
    norm(Z) against.
    """

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, z: torch.Tensor, centres: torch.Tensor) -> dict[str, torch.Tensor]:
        z_unit = F.normalize(z, dim=1)
        s_unit = F.normalize(centres, dim=1)
        logits = torch.einsum("bdhw,kd->bkhw", z_unit, s_unit) / self.tau
        assign = logits.softmax(dim=1)
        z_rec = torch.einsum("bkhw,kd->bdhw", assign, s_unit)
        return {"logits": logits, "assign": assign, "z_unit": z_unit, "z_rec": z_rec}
