"""Bilinear upsampling that stays fast under `torch.compile` (`optim.compile`).

Why not plain `F.interpolate` everywhere: when torch.compile traces a model, PyTorch
decomposes bilinear upsampling into gathers, whose backward is a scatter-add
(`index_put` with accumulate). Inductor's CPU code runs that scatter serially: at the
default 96 px the decoder's last x2 upsample alone took 133 ms of a ~1 s float32 step,
and a compiled training step ran at 0.78-0.83x of eager (benchmarks/results/cpu_step.md).
An exact x2 resize needs no gather: with align_corners=False each output pixel is
0.75 x its source pixel + 0.25 x the neighbour on its side (the edge pixel repeated),
so written with slices both passes and their backward are elementwise and fuse.
Eager keeps PyTorch's native kernel, which is faster there than the sliced form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, h, w) to (B, C, *size), bilinear, align_corners=False.

    The same values as `F.interpolate` (to rounding); under torch.compile an exact
    doubling takes the gather-free path.
    """
    h, w = x.shape[-2:]
    if torch.compiler.is_compiling() and tuple(size) == (2 * h, 2 * w):
        return _double(_double(x, dim=3), dim=2)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _double(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x2 bilinear (align_corners=False) along one axis, from slices only."""
    n = x.shape[dim]
    before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
    after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
    # Output 2i sits a quarter pixel before source i, output 2i+1 a quarter after it.
    even = 0.75 * x + 0.25 * before
    odd = 0.75 * x + 0.25 * after
    return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)


class Upsample2x(nn.Module):
    """x2 bilinear upsampling as a module (the decoder's stages)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_bilinear(x, (2 * x.shape[-2], 2 * x.shape[-1]))
