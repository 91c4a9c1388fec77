"""Pictures for MLflow: segmentation overlays and confusion-matrix heat maps, as PNG bytes.

PIL only (no matplotlib), so workers can render without a display or extra
dependencies; the pipelines log the bytes with `mlflow.log_image`/`log_artifact`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

IGNORE_INDEX = 255
_GAP = 2  # white pixels between panel cells


def palette(n: int) -> np.ndarray:
    """n distinct, deterministic, non-black colours ([n, 3] uint8); black is kept for ignore.

    Colour i is the PASCAL VOC bit-interleaved colour of id i + 1: a bijection on
    24-bit ids, so colours never repeat, and never black.
    """
    if n < 0 or n >= 2**24 - 1:
        raise ValueError(f"palette size must be in 0..{2**24 - 2}, got {n}")
    ids = np.arange(1, n + 1, dtype=np.int64)
    colours = np.zeros((n, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def _to_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def colorize(mask: np.ndarray | Tensor, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """[H, W] integer ids -> [H, W, 3] uint8; ignore_index and negative ids (unmapped) are black."""
    ids = _to_numpy(mask).astype(np.int64)
    if ids.ndim != 2:
        raise ValueError(f"colorize expects an [H, W] mask, got shape {ids.shape}")
    valid = (ids >= 0) & (ids != ignore_index)
    n = int(ids[valid].max()) + 1 if valid.any() else 0
    out = np.zeros((*ids.shape, 3), dtype=np.uint8)
    out[valid] = palette(n)[ids[valid]]
    return out


def _encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _resize_nearest(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Labels at a coarser stride are shown at image size without inventing ids."""
    if ids.shape == (height, width):
        return ids
    index_y = (np.arange(height) * ids.shape[0]) // height
    index_x = (np.arange(width) * ids.shape[1]) // width
    return ids[index_y[:, None], index_x[None, :]]


def overlay_panel(
    images: Tensor,
    preds: Tensor | np.ndarray,
    targets: Tensor | np.ndarray | None = None,
    alpha: float = 0.5,
    mapping: np.ndarray | list[int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> bytes:
    """PNG grid, one row per image: image | prediction overlay | ground truth overlay.

    `images` are float [B, 3, H, W] in [0, 1]; `preds`/`targets` [B, h, w] ids
    (resized nearest to H x W if smaller). Pass the cluster -> class `mapping`
    (from `san.metrics.match_clusters`) so prediction colours match the ground
    truth's; unmapped clusters are then drawn black.
    """
    imgs = _to_numpy(images).astype(np.float32)
    if imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {imgs.shape}")
    batch, _, height, width = imgs.shape
    pred_ids = _to_numpy(preds).astype(np.int64)
    if mapping is not None:
        lookup = np.asarray(mapping, dtype=np.int64)
        ignored = pred_ids == ignore_index
        pred_ids = np.where(ignored, ignore_index, lookup[np.where(ignored, 0, pred_ids)])
    target_ids = None if targets is None else _to_numpy(targets).astype(np.int64)
    for name, ids in (("preds", pred_ids), ("targets", target_ids)):
        if ids is not None and (ids.ndim != 3 or ids.shape[0] != batch):
            raise ValueError(f"{name} must be [B={batch}, H, W], got shape {ids.shape}")

    rgb = (np.clip(imgs.transpose(0, 2, 3, 1), 0.0, 1.0) * 255.0).round()

    def blend(image: np.ndarray, ids: np.ndarray) -> np.ndarray:
        colours = colorize(_resize_nearest(ids, height, width), ignore_index).astype(np.float32)
        return ((1.0 - alpha) * image + alpha * colours).round()

    n_cols = 2 if target_ids is None else 3
    grid = np.full(
        (batch * (height + _GAP) - _GAP, n_cols * (width + _GAP) - _GAP, 3), 255, dtype=np.uint8
    )
    for b in range(batch):
        cells = [rgb[b], blend(rgb[b], pred_ids[b])]
        if target_ids is not None:
            cells.append(blend(rgb[b], target_ids[b]))
        y = b * (height + _GAP)
        for c, cell in enumerate(cells):
            x = c * (width + _GAP)
            grid[y : y + height, x : x + width] = cell.astype(np.uint8)
    return _encode_png(grid)


def confusion_plot(
    matrix: np.ndarray | Tensor,
    class_names: list[str] | None = None,
    mapping: np.ndarray | list[int] | None = None,
) -> bytes:
    """PNG heat map of the row-normalised [K, C] confusion matrix (white 0 -> dark blue 1).

    With a `mapping`, cluster rows are sorted by their matched class, so a good
    model shows a bright diagonal; row labels read "cluster -> class".
    """
    m = _to_numpy(matrix).astype(np.float64)
    if m.ndim != 2:
        raise ValueError(f"confusion matrix must be 2-D, got shape {m.shape}")
    n_clusters, n_classes = m.shape
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"got {len(names)} class_names for {n_classes} classes")
    order = np.arange(n_clusters)
    row_labels = [str(k) for k in range(n_clusters)]
    if mapping is not None:
        lookup = np.asarray(mapping, dtype=np.int64)
        order = np.argsort(np.where(lookup < 0, n_classes, lookup), kind="stable")
        row_labels = [f"{k}->{names[lookup[k]] if lookup[k] >= 0 else '-'}" for k in order]
    rows = m[order]
    norm = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1.0)

    cell = int(np.clip(600 // max(n_clusters, n_classes, 1), 6, 24))
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return int(right - left), int(bottom - top)

    left_margin = max(text_size(t)[0] for t in row_labels) + 6
    top_margin = max(text_size(t)[0] for t in names) + 6
    width = left_margin + n_classes * cell + 1
    height = top_margin + n_clusters * cell + 1
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    # Heat map: interpolate white (0) -> dark blue (1).
    low, high = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    heat = (low + norm[..., None] * (high - low)).round().astype(np.uint8)
    heat = np.repeat(np.repeat(heat, cell, axis=0), cell, axis=1)
    canvas.paste(Image.fromarray(heat), (left_margin, top_margin))

    for r, label in enumerate(row_labels):
        _, text_height = text_size(label)
        y = top_margin + r * cell + (cell - text_height) // 2
        draw.text((2, y), label, fill="black", font=font)
    for c, name in enumerate(names):
        # Column labels are drawn horizontally then rotated to read bottom-up.
        text_width, text_height = text_size(name)
        label = Image.new("RGB", (text_width + 2, text_height + 4), "white")
        ImageDraw.Draw(label).text((1, 0), name, fill="black", font=font)
        label = label.rotate(90, expand=True)
        x = left_margin + c * cell + (cell - label.width) // 2
        canvas.paste(label, (max(x, 0), top_margin - label.height - 2))
    return _encode_png(np.asarray(canvas))


def save_png(data: bytes, path: str | Path) -> Path:
    """Write PNG bytes to a local path, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
