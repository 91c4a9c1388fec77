"""Standard-layout adapters, each on a tiny fixture written in that dataset's real layout.

Every fixture puts known raw label ids on known pixels, so the class mapping is checked
pixel by pixel, together with counts, class names and the records shards are made from.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from san.config import DataConfig, load_config
from san.data import (
    Cityscapes27,
    CocoStuff27,
    DataError,
    Potsdam,
    Potsdam3,
    create_dataset,
    decode_label,
)
from san.data.cocostuff import FINE_TO_COARSE


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _save_jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _stripes(values: list[int], h: int, dtype=np.uint8) -> np.ndarray:
    """An h x len(values) label whose column j holds values[j]."""
    return np.tile(np.asarray(values, dtype=dtype), (h, 1))


def _label(record: dict) -> np.ndarray:
    return decode_label(record["label_bytes"], record["id"]).numpy()


# ----------------------------------------------------------------------------- COCO-Stuff


COCO_RAW = [0, 1, 15, 71, 93, 105, 148, 170, 181, 255]
COCO_EXPECTED = [9, 11, 7, 0, 22, 23, 21, 18, 24, 255]


def _coco(root: Path) -> None:
    """images/, annotations/ (stuffthingmaps ids) and curated/ lists, as PiCIE/STEGO read them."""
    for split, ids in (("val2017", ["000000000139", "000000000285"]), ("train2017", ["9"])):
        for n, sample_id in enumerate(ids):
            _save_jpg(root / "images" / split / f"{sample_id}.jpg", _rgb(6, 10, n))
            _save_png(root / "annotations" / split / f"{sample_id}.png", _stripes(COCO_RAW, 6))
        lists = root / "curated" / split
        lists.mkdir(parents=True)
        (lists / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(ids) + "\n")
    # On disk but not in the curated list: must not be read.
    _save_jpg(root / "images" / "val2017" / "000000000632.jpg", _rgb(6, 10, 9))


def test_cocostuff27(tmp_path: Path) -> None:
    _coco(tmp_path)
    val = CocoStuff27(str(tmp_path), "val")
    assert val.ids == ["000000000139", "000000000285"]
    assert len(CocoStuff27(str(tmp_path), "train2017")) == 1
    assert val.n_classes == 27 and len(set(val.class_names)) == 27
    assert val.class_names[9] == "person" and val.class_names[23] == "sky"
    sample = val[0]
    assert sample["image"].shape == (3, 6, 10)
    assert sample["label"][0].tolist() == COCO_EXPECTED
    record = val.record(1)
    assert record["image_bytes"] == (tmp_path / "images/val2017/000000000285.jpg").read_bytes()
    assert (record["width"], record["height"]) == (10, 6)
    assert _label(record)[3].tolist() == COCO_EXPECTED


def test_cocostuff27_mapping_table() -> None:
    """All 182 fine ids: the 91 thing ids go to the 12 thing classes, the 91 stuff to 15."""
    assert sorted(FINE_TO_COARSE) == list(range(182))
    assert {FINE_TO_COARSE[i] for i in range(91)} == set(range(12))
    assert {FINE_TO_COARSE[i] for i in range(91, 182)} == set(range(12, 27))


# ----------------------------------------------------------------------------- Cityscapes


CITY_RAW = [0, 6, 7, 8, 11, 21, 23, 24, 26, 33]
CITY_EXPECTED = [255, 255, 0, 1, 4, 14, 16, 17, 19, 26]


def _cityscapes(root: Path) -> None:
    """leftImg8bit/ + gtFine/ per city, with gtFine's other files beside the labelIds."""
    samples = [
        ("val", "frankfurt", "frankfurt_000000_000294"),
        ("val", "lindau", "lindau_000001_000019"),
    ]
    samples.append(("train", "aachen", "aachen_000000_000019"))
    for n, (split, city, sample_id) in enumerate(samples):
        _save_png(
            root / "leftImg8bit" / split / city / f"{sample_id}_leftImg8bit.png", _rgb(4, 10, n)
        )
        gt = root / "gtFine" / split / city
        _save_png(gt / f"{sample_id}_gtFine_labelIds.png", _stripes(CITY_RAW, 4))
        _save_png(gt / f"{sample_id}_gtFine_color.png", _rgb(4, 10, 7))
        _save_png(gt / f"{sample_id}_gtFine_instanceIds.png", _stripes(CITY_RAW, 4, np.uint16))
        (gt / f"{sample_id}_gtFine_polygons.json").write_text("{}")


def test_cityscapes27(tmp_path: Path) -> None:
    _cityscapes(tmp_path)
    val = Cityscapes27(str(tmp_path), "val")
    assert val.ids == ["frankfurt_000000_000294", "lindau_000001_000019"]
    assert len(Cityscapes27(str(tmp_path), "train")) == 1
    assert val.n_classes == 27 and val.class_names[0] == "road" and val.class_names[-1] == "bicycle"
    assert val[1]["label"][2].tolist() == CITY_EXPECTED
    record = val.record(0)
    src = tmp_path / "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    assert record["image_bytes"] == src.read_bytes()
    assert _label(record)[0].tolist() == CITY_EXPECTED


# ----------------------------------------------------------------------------- Potsdam


POTSDAM_RAW = [0, 1, 2, 3, 4, 5, -1, 255]
POTSDAM3_EXPECTED = [0, 1, 2, 2, 0, 1, 255, 255]


def _potsdam(root: Path) -> dict[str, np.ndarray]:
    """IIC's tiles: imgs/<id>.mat (RGB+IR), gt/<id>.mat (int32), and the split lists."""
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    images = {}
    for n, sample_id in enumerate(["0", "1", "2"]):
        img = np.random.default_rng(n).integers(0, 256, (5, 8, 4), dtype=np.uint8)
        scipy.io.savemat(root / "imgs" / f"{sample_id}.mat", {"img": img})
        images[sample_id] = img
        if sample_id != "2":  # tile 2 is unlabelled
            gt = _stripes(POTSDAM_RAW, 5, np.int32)
            scipy.io.savemat(root / "gt" / f"{sample_id}.mat", {"gt": gt})
    (root / "all.txt").write_text("0\n1\n2\n")
    (root / "unlabelled_train.txt").write_text("2\n")
    (root / "labelled_train.txt").write_text("0\n")
    (root / "labelled_test.txt").write_text("1\n")
    return images


def test_potsdam_and_potsdam3(tmp_path: Path) -> None:
    images = _potsdam(tmp_path)
    six = Potsdam(str(tmp_path), "all")
    assert six.ids == ["0", "1", "2"] and six.n_classes == 6
    assert six[0]["label"][0].tolist() == [0, 1, 2, 3, 4, 5, 255, 255]
    assert six[2]["label"] is None
    record = six.record(1)
    rgb = np.asarray(Image.open(io.BytesIO(record["image_bytes"])))
    assert np.array_equal(rgb, images["1"][:, :, :3])  # IR dropped, RGB bit-exact
    assert (record["width"], record["height"]) == (8, 5)

    three = Potsdam3(str(tmp_path), "val")  # STEGO's alias for labelled_test
    assert three.ids == ["1"] and three.n_classes == 3
    assert three.class_names == ["roads and cars", "buildings and clutter", "vegetation and trees"]
    assert _label(three.record(0))[4].tolist() == POTSDAM3_EXPECTED
    assert Potsdam3(str(tmp_path), "train").ids == ["0"]
    assert Potsdam(str(tmp_path), "unlabelled_train").record(0)["label_bytes"] is None


def test_bad_samples_name_their_id(tmp_path: Path) -> None:
    _potsdam(tmp_path)
    (tmp_path / "imgs" / "1.mat").write_bytes(b"not a mat file")
    scipy.io.savemat(tmp_path / "gt" / "0.mat", {"gt": np.zeros((4, 8), np.int32)})
    ds = Potsdam(str(tmp_path), "all")
    with pytest.raises(DataError, match="'1'"):
        ds.record(1)
    with pytest.raises(DataError, match=r"'0' is 8x4 but its image is 8x5"):
        ds.record(0)
    assert ds.record(2)["id"] == "2"

    _coco(tmp_path / "coco")
    (tmp_path / "coco/images/val2017/000000000139.jpg").unlink()
    with pytest.raises(DataError, match="'000000000139'.*missing"):
        CocoStuff27(str(tmp_path / "coco"), "val").record(0)


def test_missing_layouts_are_one_line_errors(tmp_path: Path) -> None:
    for cls, needle in ((CocoStuff27, "curated"), (Cityscapes27, "leftImg8bit"), (Potsdam, "txt")):
        with pytest.raises(DataError) as exc:
            cls(str(tmp_path / "nowhere"), "val")
        assert "\n" not in str(exc.value) and needle in str(exc.value)


def test_registry_and_config_choices(tmp_path: Path) -> None:
    _potsdam(tmp_path / "potsdam")
    _cityscapes(tmp_path / "cityscapes")
    _coco(tmp_path / "coco")
    for name, root, n in (
        ("potsdam", "potsdam", 1),
        ("potsdam3", "potsdam", 1),
        ("cityscapes27", "cityscapes", 2),
        ("cocostuff27", "coco", 2),
    ):
        ds = create_dataset(DataConfig(dataset=name, root=str(tmp_path / root)), "val")
        assert len(ds) == n
        samples = list(ds.iter_partition(0, 1, 0, True, 0))
        assert len(samples) == n and samples[0]["image"].dtype.is_floating_point is False
        cfg = load_config(None, [f"data.dataset={name}", f"data.root={tmp_path / root}"])
        assert cfg.data.dataset == name
