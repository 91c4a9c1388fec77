"""Viz: the pictures logged to MLflow must decode and keep ids visually apart."""

import io

import numpy as np
import torch
from PIL import Image

from san.viz import colorize, confusion_plot, overlay_panel, palette, save_png


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def test_palette_is_distinct_deterministic_and_never_black() -> None:
    colours = palette(300)
    assert colours.shape == (300, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 300
    assert not (colours == 0).all(axis=1).any()
    np.testing.assert_array_equal(palette(300), colours)


def test_colorize_distinct_ids_get_distinct_colours_and_ignore_is_black() -> None:
    mask = torch.arange(12).reshape(3, 4)
    mask[2, 3] = 255
    rgb = colorize(mask)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert rgb[2, 3].tolist() == [0, 0, 0]
    colours = {tuple(rgb[i, j]) for i in range(3) for j in range(4) if (i, j) != (2, 3)}
    assert len(colours) == 11 and (0, 0, 0) not in colours
    # The same id gets the same colour whatever else is in the mask.
    assert colorize(np.array([[5]]))[0, 0].tolist() == rgb[1, 1].tolist()


def test_overlay_panel_png_has_grid_size() -> None:
    images = torch.rand(2, 3, 16, 20)
    preds = torch.randint(0, 4, (2, 16, 20))
    targets = torch.randint(0, 4, (2, 16, 20))
    targets[0, :4] = 255
    with_gt = _decode(overlay_panel(images, preds, targets))
    assert with_gt.size == (3 * 20 + 2 * 2, 2 * 16 + 2)
    no_gt = _decode(overlay_panel(images, preds[:, ::4, ::4], None, mapping=[1, 0, 3, 2]))
    assert no_gt.size == (2 * 20 + 2, 2 * 16 + 2)
    # alpha=1 shows the colours alone: ignored ground-truth pixels are black.
    pixels = np.asarray(_decode(overlay_panel(images, preds, targets, alpha=1.0)))
    assert (pixels[0:4, 2 * 22 : 2 * 22 + 20] == 0).all()


def test_confusion_plot_decodes(tmp_path) -> None:
    matrix = np.array([[2, 8, 0], [5, 1, 1], [0, 2, 6], [0, 0, 0]])
    data = confusion_plot(matrix, class_names=["sky", "road", "car"], mapping=[1, 0, 2, -1])
    image = _decode(data)
    assert image.mode == "RGB"
    assert image.width > 3 * 6 and image.height > 4 * 6
    path = save_png(data, tmp_path / "plots" / "cm.png")
    assert _decode(path.read_bytes()).size == image.size
    _decode(confusion_plot(torch.tensor(matrix)))
