"""Image transforms: normalisation, the two-view pair augmentation and view alignment.

L_mi compares the cluster assignments of two augmented views pixel by pixel, so each
view records the crop box and flip it was made with, and `align_views` resamples view
2's dense output onto view 1's pixel grid using exactly the same geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])

# Luma weights (ITU-R BT.601), used for greyscale in contrast/saturation jitter.
_GRAY = torch.tensor([0.299, 0.587, 0.114])
# RGB -> YIQ: hue jitter is a rotation of the (I, Q) chroma plane (`_hue_basis`).
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_basis() -> Tensor:
    """3 x 9: the rotation by `a` of the (I, Q) plane is KEEP + cos(a) COS + sin(a) SIN,
    so its RGB matrix, YIQ2RGB @ rotation @ RGB2YIQ, is that sum of three fixed matrices
    (rows here, flattened): a batch's hue matrices are then one small matmul, not a 3x3
    product per image (17 us against 32 for 16 views)."""
    rgb2yiq = _RGB2YIQ.double()
    yiq2rgb = torch.linalg.inv(rgb2yiq)
    keep = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    cos = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    sin = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    return torch.stack([(yiq2rgb @ m @ rgb2yiq).flatten() for m in (keep, cos, sin)])


_HUE_BASIS = _hue_basis()


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


def require_uint8(image: Tensor, what: str) -> None:
    """Refuse non-uint8 pixels: batches of float images are taken as already normalised
    (pre-made batches), so float pixels from a dataset would silently skip colour jitter
    and normalisation."""
    if image.dtype != torch.uint8:
        raise ValueError(
            f"{what} need a uint8 3xHxW image (what every source decodes to); "
            f"got {image.dtype}: a dataset must yield uint8 pixels"
        )


def crop_box(
    height: int, width: int, min_scale: float, uniforms: Sequence[float]
) -> tuple[int, int, int, int]:
    """Four uniform [0, 1) numbers -> a random-resized-crop box (x0, y0, x1, y1) in integer
    pixels, inside the image: area scale in [min_scale, 1], aspect ratio log-uniform in
    [3/4, 4/3], then a uniform position."""
    u_scale, u_ratio, u_x, u_y = uniforms
    area = height * width
    scale = min_scale + (1.0 - min_scale) * u_scale
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u_ratio
    ratio = math.exp(log_ratio)
    w = int(round(math.sqrt(area * scale * ratio)))
    h = int(round(math.sqrt(area * scale / ratio)))
    w = min(max(w, 1), width)
    h = min(max(h, 1), height)
    x0 = min(int(u_x * (width - w + 1)), width - w)
    y0 = min(int(u_y * (height - h + 1)), height - h)
    return x0, y0, x0 + w, y0 + h


def crop_view(
    image: Tensor, box: tuple[int, int, int, int], size: int, flip: bool
) -> tuple[Tensor, list[float]]:
    """Crop pixel box (x0, y0, x1, y1) of a 3xHxW image, resize to size^2, maybe flip.

    The view keeps the image's dtype: a uint8 image gives a uint8 view, which is how views
    leave the loader (a quarter of float32's bytes) until `finish_views` makes them float
    on the training device. torch's uint8 antialiased resize is also about 3x faster than
    the float one on a channels-last crop (what `decode_image` gives), and differs from it
    by less than one grey level (it is rounded to uint8, as the source pixels are).
    Returns the view and the box in [0,1] coordinates of the original image (plain floats:
    `PairTransform` makes one tensor of both views' numbers); the pixel box edges map to
    the view's edges, which is the geometry `align_views` assumes.
    """
    channels, height, width = image.shape
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"crop box {box} is not inside a {width}x{height} image: (x0, y0, x1, y1) needs "
            f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}"
        )
    # The crop as one strided view, batch dimension included: slicing and unsqueezing
    # take three view ops (3.5 us against 1.2, two views per image).
    channel_step, row_step, column_step = image.stride()
    crop = image.as_strided(
        (1, channels, y1 - y0, x1 - x0),
        (channels * channel_step, channel_step, row_step, column_step),
        image.storage_offset() + y0 * row_step + x0 * column_step,
    )
    if crop.dtype != torch.uint8:
        crop = crop.float()
    view = F.interpolate(
        crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    if flip:
        view = view.flip(-1)
    return view, [x0 / width, y0 / height, x1 / width, y1 / height]


def jitter_params(strength: float, uniforms: Sequence[float]) -> list[float]:
    """Four uniform [0, 1) numbers -> one view's colour jitter: [brightness, contrast,
    saturation, hue angle in radians], for `color_jitter`."""
    low, high = 1 - strength, 1 + strength
    brightness, contrast, saturation = (low + (high - low) * u for u in uniforms[:3])
    # A full hue circle is too much for "the same scene": a quarter of strength, in turns.
    turns = -strength / 4 + (strength / 2) * uniforms[3]
    return [brightness, contrast, saturation, turns * 2 * math.pi]


def hue_matrices(angles: Tensor) -> Tensor:
    """N hue angles (radians) -> N x 3 x 3 RGB matrices rotating the (I, Q) chroma plane by
    each, on the angles' device (so jitter on a GPU never waits for the host)."""
    angles = angles.to(torch.float64)
    weights = torch.stack([torch.ones_like(angles), torch.cos(angles), torch.sin(angles)], -1)
    return (weights @ _HUE_BASIS.to(angles.device)).float().view(-1, 3, 3)


def color_jitter(x: Tensor, jitter: Tensor) -> Tensor:
    """Brightness, contrast, saturation and hue jitter of float [0,1] images (overwrites x).

    x: B x 3 x H x W; jitter: B x 4, one `jitter_params` row per image. Clamped to [0, 1]
    after each of the four, as torchvision does. All images go through each operation at
    once: at view sizes an operation's fixed overhead costs more than its arithmetic.
    """
    b = x.shape[0]
    jitter = jitter.to(x.device)
    brightness, contrast, saturation = jitter[:, :3].to(x.dtype).view(b, 3, 1, 1, 1).unbind(1)
    hue = hue_matrices(jitter[:, 3]).to(x.dtype)
    # Greys and channel mixes as matmuls over B x 3 x (H W): one op each, not a product
    # and a sum (this function: 160 us for 16 32-px views, 215 with products and sums).
    gray_row = _GRAY.to(x.device, x.dtype).view(1, 1, 3)
    x = x.mul_(brightness).clamp_(0, 1)
    mean = (x.reshape(b, 3, -1).mean(2) @ gray_row.view(3, 1)).view(b, 1, 1, 1)
    x = x.mul_(contrast).add_(mean * (1 - contrast)).clamp_(0, 1)  # mean + c (x - mean)
    gray = (gray_row @ x.reshape(b, 3, -1)).view(b, 1, *x.shape[2:])
    x = torch.lerp(gray, x, saturation).clamp_(0, 1)  # gray + s (x - gray)
    return (hue @ x.reshape(b, 3, -1)).view(x.shape).clamp_(0, 1)


def finish_views(views: Tensor, jitter: Tensor | None) -> Tensor:
    """N x 3 x S x S views from `PairTransform` (uint8, or float in [0, 1]) + their N x 4
    `jitter_params` rows (None: no colour jitter) -> jittered, ImageNet-normalised float32.

    The per-batch half of the augmentation. It runs wherever `views` are: `Trainer.step`
    calls it on the training device, so a GPU does the colour work and the loader ships
    uint8. Float input is overwritten (it is scratch).
    """
    x = views.float().div_(255.0) if views.dtype == torch.uint8 else views
    if jitter is not None:
        x = color_jitter(x, jitter)
    mean, std = (m.to(x.device).view(1, 3, 1, 1) for m in (MEAN, STD))
    return x.sub_(mean).div_(std)


# Per view: crop area scale, aspect ratio, x and y position, flip, four colour jitters.
UNIFORMS_PER_VIEW = 9


class PairTransform:
    """Two random views of one image, with the crop box, flip and colour jitter of each.

    Works in two stages, so that colour work is done once per batch, on the training device:

    - `__call__(image, generator)`, per image, in the loader: draws both views' random
      numbers (one draw of `UNIFORMS_PER_VIEW` each), crops, resizes and flips. Returns
      {"views": uint8 2 x 3 x S x S, not yet jittered, "params": float32 2 x 9}. A params
      row is the view's crop box (x0, y0, x1, y1) in [0, 1] coordinates of the image, 1.0
      if the view was flipped (else 0.0), then the view's four `jitter_params`.
    - `finish_views(views, jitter)`, per batch (N x ...), on the training device: colour
      jitter and normalisation (`san.engine.finished_views` calls it in `Trainer.step`).

    The views are the same floats as jittering and normalising each view on its own
    (tested), so batching changes speed, not training.
    """

    def __init__(
        self, image_size: int, crop_min_scale: float = 0.5, jitter: float = 0.4, flip: bool = True
    ) -> None:
        if not 0 < crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale={crop_min_scale} must be in (0, 1]")
        self.image_size = image_size
        self.crop_min_scale = crop_min_scale
        self.jitter = jitter
        self.flip = flip

    def _draw(
        self, height: int, width: int, uniforms: Sequence[float]
    ) -> tuple[tuple[int, int, int, int], bool, list[float]]:
        """One view's `UNIFORMS_PER_VIEW` uniform numbers -> its crop box, flip and jitter."""
        box = crop_box(height, width, self.crop_min_scale, uniforms[:4])
        flip = self.flip and uniforms[4] < 0.5
        if self.jitter > 0:
            return box, flip, jitter_params(self.jitter, uniforms[5:])
        return box, flip, [1.0, 1.0, 1.0, 0.0]

    def __call__(self, image: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """uint8 3xHxW image -> {"views", "params"} (`require_uint8`)."""
        views, params = self.views(image, generator)
        return {"views": torch.stack(views), "params": torch.tensor(params, dtype=torch.float32)}

    def views(self, image: Tensor, generator: torch.Generator) -> tuple[list[Tensor], list]:
        """`__call__`'s work, left as a list of both views and a list of both params rows.

        `TrainPairTransform.collate` makes one tensor of a batch's views and one of its
        numbers: at a view's size a tensor op's fixed cost is a sizeable part of the
        per-image work, and a stack and a tensor for each image, then a stack of those
        for the batch, cost 13 us of this stage's 120 per image.
        """
        require_uint8(image, "training views")
        height, width = image.shape[-2:]
        # All of an image's random numbers in one draw: a torch call per number cost a
        # fifth of this stage's time (8 calls per image, 28 of its 139 us).
        n = UNIFORMS_PER_VIEW
        uniforms = torch.rand(2 * n, generator=generator, dtype=torch.float64).tolist()
        views, params = [], []
        for first in (0, n):
            box, flip, jitter = self._draw(height, width, uniforms[first : first + n])
            view, unit = crop_view(image, box, self.image_size, flip)
            views.append(view)
            params.append([*unit, float(flip), *jitter])
        return views, params


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
    """uint8 3xHxW image (+ uint8 HxW label) -> uint8 3 x S x S (+ uint8 S x S): the shorter
    side resized to S = image_size (antialiased bilinear; labels nearest), centre-cropped.

    The image stays uint8, as training views do: normalisation waits for the evaluation
    device (`san.engine.evaluate` calls `finish_views`), and a batch crosses from a loader
    worker at a quarter of float32's bytes. The uint8 resize is also the faster one, and
    within one grey level of the float resize.
    """
    require_uint8(image, "evaluation crops")
    height, width = image.shape[-2:]
    scale = image_size / min(height, width)
    new_h = max(image_size, int(round(height * scale)))
    new_w = max(image_size, int(round(width * scale)))
    top = (new_h - image_size) // 2
    left = (new_w - image_size) // 2
    x = F.interpolate(
        image.unsqueeze(0),
        size=(new_h, new_w),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0, :, top : top + image_size, left : left + image_size]
    if label is None:
        return x.contiguous(), None
    y = F.interpolate(label.view(1, 1, height, width), size=(new_h, new_w), mode="nearest-exact")
    return x.contiguous(), y[0, 0, top : top + image_size, left : left + image_size].contiguous()
