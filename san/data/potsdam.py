"""Potsdam and Potsdam-3: ISPRS Potsdam tiles as IIC prepared them (IIC, STEGO).

Layout (IIC's preprocessed download: the orthophotos already cut into 200x200 tiles,
saved as MATLAB files):

    <root>/imgs/<id>.mat    key "img": uint8 HxWx4 (R, G, B, IR)
    <root>/gt/<id>.mat      key "gt": int HxW with 0-5 (absent for unlabelled tiles)
    <root>/{all,unlabelled_train,labelled_train,labelled_test}.txt   one id per line

Split names: the list names above, plus STEGO's aliases `train` -> labelled_train and
`val` -> labelled_test. IIC's own protocol trains on `all` and evaluates on labelled_test.
Only the RGB channels are kept (the models take 3 channels; IIC's 4-channel input is not
reproduced). Tiles are stored in the shards as PNG.

Six classes in IIC's id order (ISPRS: impervious surfaces, building, low vegetation, tree,
car, clutter/background). Potsdam-3 merges them as IIC's `Potsdam._fine_to_coarse_dict`:
{0, 4} roads and cars, {1, 5} buildings and clutter, {2, 3} vegetation and trees.
Any other id (negative, or 255) is ignored.
"""

from __future__ import annotations

import io

import numpy as np

from san.data.base import DataError, encode_png, first_line
from san.data.layout import LayoutDataset, lookup_table

SPLIT_ALIASES = {"train": "labelled_train", "val": "labelled_test"}
SPLIT_LISTS = ("all", "unlabelled_train", "labelled_train", "labelled_test")

CLASS_NAMES = ["roads", "buildings", "vegetation", "trees", "cars", "clutter"]
CLASS_NAMES_3 = ["roads and cars", "buildings and clutter", "vegetation and trees"]
FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}


def load_mat(data: bytes, key: str, sample_id: str) -> np.ndarray:
    """One array from .mat bytes; DataError naming the sample when unreadable or keyless."""
    import scipy.io  # 0.13 s at import, for Potsdam's .mat files only

    try:
        content = scipy.io.loadmat(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for corrupt files
        message = f"{key} of {sample_id!r} is not a readable .mat file: {first_line(exc)}"
        raise DataError(message) from None
    if key not in content:
        raise DataError(f"{key} of {sample_id!r}: .mat file has no {key!r} array")
    return np.asarray(content[key])


class Potsdam(LayoutDataset):
    """IIC's Potsdam tiles with the 6 ISPRS classes."""

    class_names = CLASS_NAMES
    n_classes = len(CLASS_NAMES)
    table = lookup_table({i: i for i in range(len(CLASS_NAMES))})
    LAYOUT = (
        "<root>/imgs/<id>.mat, <root>/gt/<id>.mat and <root>/<split>.txt "
        f"(split one of {list(SPLIT_LISTS)} or {list(SPLIT_ALIASES)})"
    )

    def __init__(self, root: str, split: str) -> None:
        super().__init__(root, split)
        name = SPLIT_ALIASES.get(split, split)
        listed = self.read_text(self.path(f"{name}.txt"))
        self.require_dir(self.path("imgs"))
        gt_dir = self.path("gt")
        labelled = set(self.fs.find(gt_dir)) if self.fs.isdir(gt_dir) else set()
        for line in listed.splitlines():
            sample_id = line.strip()
            if not sample_id:
                continue
            label_path = self.path("gt", f"{sample_id}.mat")
            self.ids.append(sample_id)
            self.image_paths.append(self.path("imgs", f"{sample_id}.mat"))
            self.label_paths.append(label_path if label_path in labelled else None)
        self.check_not_empty()

    def load_image(self, data: bytes, sample_id: str) -> tuple[np.ndarray, bytes]:
        image = load_mat(data, "img", sample_id)
        if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
            raise DataError(
                f"img of {sample_id!r} is {image.dtype} {image.shape}; expected uint8 HxWx(3|4)"
            )
        rgb = np.ascontiguousarray(image[:, :, :3])
        return rgb, encode_png(rgb)

    def load_label(self, data: bytes, sample_id: str) -> np.ndarray:
        label = load_mat(data, "gt", sample_id)
        if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
            raise DataError(f"gt of {sample_id!r} is {label.dtype} {label.shape}; expected int HxW")
        return label


class Potsdam3(Potsdam):
    """Potsdam with IIC's 3-class merge."""

    class_names = CLASS_NAMES_3
    n_classes = len(CLASS_NAMES_3)
    table = lookup_table(FINE_TO_COARSE)
