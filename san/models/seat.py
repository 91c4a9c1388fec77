"""SEAT, the semantic attention: soft assignment of each pixel to the K centres."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPACES = ("unit", "raw")


class SEAT(nn.Module):
    """A = softmax(<norm(Z), norm(S)> / tau) over K, and the reconstruction Z' from A.

    Cosine similarity keeps the assignment scale-free, so tau alone sets how hard it is.
    `space` says where Z' and the features L_con compares it with ("z_con") live:

    - "unit": Z' = A norm(S) against norm(Z), on the unit sphere the assignment is made
      on. Neither side can lower L_con by shrinking, since A ignores their lengths.
    - "raw": Z' = A S against Z, DESIGN.md's formula as written. L_con then also pulls
      the lengths of Z and S together (and both towards 0, which A does not see).
    """

    def __init__(self, tau: float, space: str = "unit") -> None:
        super().__init__()
        if space not in SPACES:
            raise ValueError(f"SEAT space {space!r} is not one of {list(SPACES)}")
        self.tau = tau
        self.space = space

    def forward(self, z: torch.Tensor, centres: torch.Tensor) -> dict[str, torch.Tensor]:
        z_unit = F.normalize(z, dim=1)
        s_unit = F.normalize(centres, dim=1)
        logits = torch.einsum("bdhw,kd->bkhw", z_unit, s_unit) / self.tau
        assign = logits.softmax(dim=1)
        unit = self.space == "unit"
        z_rec = torch.einsum("bkhw,kd->bdhw", assign, s_unit if unit else centres)
        return {"logits": logits, "assign": assign, "z_con": z_unit if unit else z, "z_rec": z_rec}
