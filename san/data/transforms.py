"""Image transforms: normalisation, the two-view pair augmentation and view alignment.

L_mi compares the cluster assignments of two augmented views pixel by pixel, so each
view records the crop box and flip it was made with, and `align_views` resamples view
2's dense output onto view 1's pixel grid using exactly the same geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])

# Luma weights (ITU-R BT.601), used for greyscale in contrast/saturation jitter.
_GRAY_NP = np.array([0.299, 0.587, 0.114])
_GRAY_ROW = torch.tensor(_GRAY_NP, dtype=torch.float32).view(1, 1, 3)
# RGB <-> YIQ: hue jitter is a rotation of the (I, Q) chroma plane.
_RGB2YIQ_NP = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB_NP = np.linalg.inv(_RGB2YIQ_NP)
# normalize() as one fused multiply-add: (x - mean) / std = x * (1 / std) - mean / std.
_NORM_SCALE = (1 / STD).view(1, 3, 1, 1)
_NORM_SHIFT = (-MEAN / STD).view(1, 3, 1, 1)


def normalize(img: Tensor) -> Tensor:
    """uint8 (or float in [0,1]) 3xHxW -> ImageNet-normalised float32."""
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    return (x - MEAN.view(3, 1, 1)) / STD.view(3, 1, 1)


def denormalize(x: Tensor) -> Tensor:
    """Normalised 3xHxW or Bx3xHxW -> float in [0,1] (for pictures and reconstruction)."""
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    mean = MEAN.to(x.device, x.dtype).view(shape)
    std = STD.to(x.device, x.dtype).view(shape)
    return (x * std + mean).clamp(0.0, 1.0)


def crop_box(
    height: int, width: int, min_scale: float, u: Sequence[float]
) -> tuple[int, int, int, int]:
    """Random-resized-crop box (x0, y0, x1, y1) in integer pixels, inside the image.

    `u` holds four uniform [0, 1) numbers: area scale, aspect ratio, left and top.
    """
    area = height * width
    scale = min_scale + (1.0 - min_scale) * u[0]
    ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
    w = min(max(int(round(math.sqrt(area * scale * ratio))), 1), width)
    h = min(max(int(round(math.sqrt(area * scale / ratio))), 1), height)
    x0 = min(int(u[2] * (width - w + 1)), width - w)
    y0 = min(int(u[3] * (height - h + 1)), height - h)
    return x0, y0, x0 + w, y0 + h


def _crop(image: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """1x3xhxw crop; an interleaved uint8 image (as decoded) is copied row by row in numpy,
    several times faster than torch's strided copy, into the channels-last layout that
    torch's uint8 resize needs."""
    x0, y0, x1, y1 = box
    interleaved = image.permute(1, 2, 0)
    if image.dtype == torch.uint8 and interleaved.is_contiguous():
        rows = np.ascontiguousarray(interleaved.numpy()[y0:y1, x0:x1])
        return torch.from_numpy(rows).permute(2, 0, 1).unsqueeze(0)
    return image[:, y0:y1, x0:x1].unsqueeze(0)


def crop_view(
    image: Tensor, box: tuple[int, int, int, int], size: int, flip: bool
) -> tuple[Tensor, tuple[float, float, float, float]]:
    """Crop pixel box (x0, y0, x1, y1) of a 3xHxW image, resize to size^2, maybe flip.

    A uint8 image stays uint8 (torch's vectorised antialiased uint8 resize is several times
    faster than float on CPU, and the pixels were 8-bit to begin with); a float image is
    resized in float. Returns the view, in the image's dtype, and the box in [0,1]
    coordinates of the original image; the pixel box edges map to the view's edges, which
    is the geometry `align_views` assumes.
    """
    height, width = image.shape[-2:]
    x0, y0, x1, y1 = box
    view = F.interpolate(
        _crop(image, box), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    if flip:
        view = view.flip(-1)
    return view, (x0 / width, y0 / height, x1 / width, y1 / height)


# Hue rotation by angle h in YIQ, as an RGB matrix: _HUE_A + cos(h) _HUE_COS + sin(h) _HUE_SIN.
_HUE_A = np.outer(_YIQ2RGB_NP[:, 0], _RGB2YIQ_NP[0]).tolist()
_HUE_COS = (_YIQ2RGB_NP[:, 1:] @ _RGB2YIQ_NP[1:]).tolist()
_HUE_SIN = (_YIQ2RGB_NP[:, 1:] @ np.array([[0.0, -1.0], [1.0, 0.0]]) @ _RGB2YIQ_NP[1:]).tolist()
_GRAY_LIST = _GRAY_NP.tolist()


def jitter_params(strength: float, u: Sequence[Sequence[float]]) -> tuple[Tensor, Tensor]:
    """Colour jitter of B images as one affine map each, from 4 uniform [0, 1) draws each.

    Brightness b (x -> b x), contrast c (x -> c x + (1 - c) mean grey), saturation s
    (x -> s x + (1 - s) grey, a 3x3 matrix S) and hue (a rotation H of the YIQ chroma plane)
    compose to `x -> A x + k mean_grey(x)` with A = c b H S and k = (1 - c) b, because S and
    H leave grey unchanged. Returns (A: B x 3 x 3, k: B x 1 x 1). Plain Python floats: on
    3x3 matrices numpy's or torch's per-call overhead costs more than the arithmetic.
    """
    rows = []
    for ub, uc, us, uh in u:
        b = 1 + strength * (2 * ub - 1)
        c = 1 + strength * (2 * uc - 1)
        sat = 1 + strength * (2 * us - 1)
        # A full hue circle is too much for "the same scene": a quarter of strength, in turns.
        hue = (2 * uh - 1) * (strength / 4) * 2 * math.pi
        cos, sin = math.cos(hue), math.sin(hue)
        h = [
            [a + cos * p + sin * q for a, p, q in zip(ra, rp, rq, strict=True)]
            for ra, rp, rq in zip(_HUE_A, _HUE_COS, _HUE_SIN, strict=True)
        ]
        # (H S)[i][j] = sat H[i][j] + (1 - sat) (sum_m H[i][m]) grey[j]
        a_rows = []
        for hi in h:
            row_sum = (1 - sat) * sum(hi)
            a_rows.append(
                [c * b * (sat * hij + row_sum * g) for hij, g in zip(hi, _GRAY_LIST, strict=True)]
            )
        rows.append([[*a_row, (1 - c) * b] for a_row in a_rows])
    table = torch.tensor(rows, dtype=torch.float32)  # B x 3 x 4: A | k
    return table[:, :, :3], table[:, :1, 3:]


def color_jitter(x: Tensor, params: tuple[Tensor, Tensor]) -> Tensor:
    """Brightness, contrast, saturation and hue jitter of float [0,1] images, B x 3 x H x W.

    `params` comes from `jitter_params`: the four jitters are applied as one affine colour
    map and clamped to [0, 1] once at the end (torchvision clamps after each; that differs
    only for pixels pushed out of range midway, and each clamp is an extra pass). The
    batch goes through at once: at view sizes per-operation overhead is what costs.
    """
    a, k = params
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    mean_grey = _GRAY_ROW @ flat.mean(-1, keepdim=True)
    return torch.baddbmm(mean_grey * k, a, flat).clamp_(0, 1).view(b, c, h, w)


class PairTransform:
    """Two random views of one image, with the crop box and flip each came from.

    Works in two stages, so that the per-image work is only the geometry:

    - `__call__(image, generator)`, per image (in a loader worker): crops, resizes and
      flips both views and draws their colour jitter. Returns {"views": 2 x 3 x S x S in
      the image's dtype (uint8 for decoded images), "geometry": float 2 x 5, "colour":
      float 2 x 4}. A geometry row is the view's crop box (x0, y0, x1, y1) in [0, 1]
      coordinates of the image, then 1.0 if the view was flipped; a colour row holds the
      uniform draws `jitter_params` turns into the view's colour jitter.
    - `finish(views, colour)`, per batch (B x 2 x ...): applies the colour jitter and the
      normalisation to all views at once. At view sizes an operation's fixed overhead
      costs more than its arithmetic, so once per batch instead of once per image halves
      the cost of a sample.
    """

    # Uniform numbers per view: crop (scale, ratio, left, top), flip, jitter (4).
    _DRAWS = 9

    def __init__(
        self, image_size: int, crop_min_scale: float = 0.5, jitter: float = 0.4, flip: bool = True
    ) -> None:
        if not 0 < crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale={crop_min_scale} must be in (0, 1]")
        self.image_size = image_size
        self.crop_min_scale = crop_min_scale
        self.jitter = jitter
        self.flip = flip

    def __call__(self, image: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """3xHxW image -> {"views", "geometry", "colour"} (see the class docstring)."""
        height, width = image.shape[-2:]
        # One draw for both views: a generator call costs more than the arithmetic it feeds.
        u = torch.rand(2, self._DRAWS, generator=generator, dtype=torch.float64)
        views, geometry = [], []
        for draws in u.tolist():
            box = crop_box(height, width, self.crop_min_scale, draws[:4])
            flip = self.flip and draws[4] < 0.5
            view, unit = crop_view(image, box, self.image_size, flip)
            views.append(view)
            geometry.append([*unit, float(flip)])
        return {
            "views": torch.stack(views),
            "geometry": torch.tensor(geometry, dtype=torch.float32),
            "colour": u[:, 5:],
        }

    def finish(self, views: Tensor, colour: Tensor) -> Tensor:
        """B x 2 x 3 x S x S views (uint8 or float [0, 1]) + B x 2 x 4 colour draws ->
        jittered, ImageNet-normalised float views of the same shape."""
        b, n, c, h, w = views.shape
        x = views.reshape(b * n, c, h, w).float()
        if views.dtype == torch.uint8:
            x = x.mul_(1 / 255)
        if self.jitter > 0:
            x = color_jitter(x, jitter_params(self.jitter, colour.reshape(b * n, -1).tolist()))
        return torch.addcmul(_NORM_SHIFT, x, _NORM_SCALE).view(b, n, c, h, w)


def _axis_grid(
    n: int, lo1: Tensor, hi1: Tensor, flip1: Tensor, lo2: Tensor, hi2: Tensor, flip2: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-batch grid coordinates (B x n) in view 2 of view 1's pixel centres on one axis."""
    u = (torch.arange(n, device=lo1.device, dtype=lo1.dtype) + 0.5) / n
    u = u.unsqueeze(0)
    u = torch.where(flip1.view(-1, 1), 1 - u, u)
    x = lo1.view(-1, 1) + u * (hi1 - lo1).view(-1, 1)
    v = (x - lo2.view(-1, 1)) / (hi2 - lo2).view(-1, 1)
    v = torch.where(flip2.view(-1, 1), 1 - v, v)
    inside = (v >= 0) & (v <= 1)
    return 2 * v - 1, inside


def align_views(
    a2: Tensor, box1: Tensor, flip1: Tensor, box2: Tensor, flip2: Tensor
) -> tuple[Tensor, Tensor]:
    """Resample view 2's dense map (B x C x h x w) onto view 1's pixel grid.

    Returns the aligned map and a B x h x w bool mask of the view-1 pixels that fall
    inside view 2's crop. Differentiable with respect to `a2`.
    """
    b, _, h, w = a2.shape
    box1 = box1.to(a2.device, torch.float32)
    box2 = box2.to(a2.device, torch.float32)
    flip1 = flip1.to(a2.device, torch.bool).view(b)
    flip2 = flip2.to(a2.device, torch.bool).view(b)
    no_flip = torch.zeros_like(flip1)
    gx, in_x = _axis_grid(w, box1[:, 0], box1[:, 2], flip1, box2[:, 0], box2[:, 2], flip2)
    gy, in_y = _axis_grid(h, box1[:, 1], box1[:, 3], no_flip, box2[:, 1], box2[:, 3], no_flip)
    grid = torch.stack([gx.view(b, 1, w).expand(b, h, w), gy.view(b, h, 1).expand(b, h, w)], dim=-1)
    aligned = F.grid_sample(
        a2, grid.to(a2.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    mask = in_y.view(b, h, 1) & in_x.view(b, 1, w)
    return aligned, mask


def eval_transform(
    image: Tensor, label: Tensor | None, image_size: int
) -> tuple[Tensor, Tensor | None]:
    """Resize the shorter side to image_size, centre-crop a square; labels use nearest."""
    height, width = image.shape[-2:]
    scale = image_size / min(height, width)
    new_h = max(image_size, int(round(height * scale)))
    new_w = max(image_size, int(round(width * scale)))
    top = (new_h - image_size) // 2
    left = (new_w - image_size) // 2
    x = image.float().unsqueeze(0) / 255.0
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    x = normalize(x[0].clamp(0, 1))[:, top : top + image_size, left : left + image_size]
    if label is None:
        return x.contiguous(), None
    y = label.float().view(1, 1, height, width)
    y = F.interpolate(y, size=(new_h, new_w), mode="nearest-exact")[0, 0]
    y = y[top : top + image_size, left : left + image_size].round().to(torch.int64)
    return x.contiguous(), y.contiguous()
