"""Tests of san.data: transforms and view alignment, the three sources, shards, streaming."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from san.config import DataConfig
from san.data import (
    INLINE_MAX_BYTES,
    DataError,
    FolderDataset,
    PairLoader,
    ShardDataset,
    SkipBad,
    StreamDataset,
    SyntheticScenes,
    create_dataset,
    eval_sample_transform,
    pack_tensor,
    record_consumed,
    resume_stream,
    stream_checkpoint,
    train_pair_transform,
    unpack_pairs,
    unpack_tensor,
    write_shards,
)
from san.data import shards as shards_module
from san.data.base import decode_image, decode_label, decode_raw
from san.data.shards import SCHEMA, _binary_views, encode_png
from san.data.transforms import (
    PairTransform,
    align_views,
    color_jitter,
    crop_box,
    crop_view,
    denormalize,
    eval_transform,
    finish_views,
    hue_matrices,
    jitter_params,
    normalize,
)
from san.engine import finished_views
from san.storage import filesystem

ROOT = Path(__file__).resolve().parents[1]

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
needs_camvid = pytest.mark.skipif(
    not CAMVID.is_dir(), reason=f"real CamVid data not found at {CAMVID} (shared/data/README.md)"
)


def smooth_image(height: int = 150, width: int = 200) -> torch.Tensor:
    """A float 3xHxW image in [0,1] that varies slowly, so resampling error is small."""
    y, x = torch.meshgrid(torch.arange(height) / height, torch.arange(width) / width, indexing="ij")
    return torch.stack(
        [0.5 + 0.4 * torch.sin(2 * math.pi * x), 0.5 + 0.4 * torch.cos(3 * y), x * y]
    ).float()


# ----------------------------------------------------------------------------- transforms


def test_normalize_roundtrip() -> None:
    img = torch.randint(0, 256, (3, 8, 9), dtype=torch.uint8)
    x = normalize(img)
    assert x.dtype == torch.float32
    assert torch.allclose(denormalize(x), img.float() / 255, atol=1e-6)
    assert denormalize(x.unsqueeze(0)).shape == (1, 3, 8, 9)


def test_pair_transform_shapes_and_determinism() -> None:
    img = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    pair = PairTransform(32, crop_min_scale=0.5, jitter=0.4)
    a = pair(img, torch.Generator().manual_seed(7))
    b = pair(img, torch.Generator().manual_seed(7))
    c = pair(img, torch.Generator().manual_seed(8))
    assert set(a) == {"views", "params"}
    # uint8 views leave the loader; colour jitter and normalisation come later (finish).
    assert a["views"].shape == (2, 3, 32, 32) and a["views"].dtype == torch.uint8
    assert a["params"].shape == (2, 9) and a["params"].dtype == torch.float32
    geometry, jitter = a["params"][:, :5], a["params"][:, 5:]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["views"], c["views"])
    assert not torch.equal(jitter[0], jitter[1])
    for box in geometry[:, :4]:
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        assert (box[2] - box[0]) * (box[3] - box[1]) >= 0.5 * 0.85
    assert set(geometry[:, 4].tolist()) <= {0.0, 1.0}
    views = finish_views(a["views"].clone(), jitter)
    assert views.shape == (2, 3, 32, 32) and not torch.equal(views, normalize(a["views"][0]))
    # Float views would be taken as finished by the training step: refused at the source.
    with pytest.raises(ValueError, match="uint8 3xHxW image.*got torch.float32"):
        pair(img.float() / 255, torch.Generator())


@pytest.mark.parametrize("u", [0.0, 0.5, 1 - 2**-53])
def test_crop_boxes_stay_inside_the_image_at_the_uniforms_extremes(u) -> None:
    """crop_box maps its four uniforms to a box inside the image with the drawn area
    scale, at the smallest and largest numbers torch.rand gives."""
    for height, width, min_scale in [(90, 120, 0.5), (7, 300, 0.1), (1, 1, 0.5)]:
        x0, y0, x1, y1 = crop_box(height, width, min_scale, [u, u, u, u])
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        if u == 0.0:
            assert (x0, y0) == (0, 0)
        if (height, width) == (90, 120):  # a box the image never clamps
            scale = (x1 - x0) * (y1 - y0) / (height * width)
            assert abs(scale - (min_scale + (1 - min_scale) * u)) < 0.1
    # The position is uniform over every place the box fits: both ends are reachable.
    assert crop_box(90, 120, 0.5, [0.0, 0.5, 1 - 2**-53, 1 - 2**-53])[2:] == (120, 90)


def test_batched_colour_jitter_equals_one_image_at_a_time() -> None:
    """color_jitter over a batch gives each image the four jitters in torchvision's order,
    clamped after each, as this plain per-image version does."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 24, generator=generator)
    jitter = torch.tensor(
        [jitter_params(0.4, torch.rand(4, generator=generator).tolist()) for _ in range(6)],
        dtype=torch.float64,
    )
    batched = color_jitter(x.clone(), jitter)
    gray_w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    for image, (brightness, contrast, saturation, angle), got in zip(
        x, jitter.tolist(), batched, strict=True
    ):
        assert 0.6 <= min(brightness, contrast, saturation) <= 1.4 and abs(angle) <= 0.2 * math.pi
        y = (image * brightness).clamp(0, 1)
        mean = (y * gray_w).sum(0).mean()
        y = ((y - mean) * contrast + mean).clamp(0, 1)
        gray = (y * gray_w).sum(0, keepdim=True)
        y = (gray + (y - gray) * saturation).clamp(0, 1)
        y = torch.einsum("ij,jhw->ihw", hue_matrices(torch.tensor([angle]))[0], y).clamp(0, 1)
        assert torch.allclose(got, y, atol=1e-6)
        assert not torch.allclose(got, image, atol=1e-3)
    # The hue matrix is the rotation of the (I, Q) chroma plane, in RGB: greys stay grey.
    rgb2yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        dtype=torch.float64,
    )
    for angle in (0.5, -1.0, math.pi):
        c, s = math.cos(angle), math.sin(angle)
        rotation = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)
        expected = torch.linalg.inv(rgb2yiq) @ rotation @ rgb2yiq
        got = hue_matrices(torch.tensor([angle]))[0]
        assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, atol=1e-6)
    hue = hue_matrices(torch.tensor([0.5]))[0]
    assert torch.allclose(hue @ torch.full((3,), 0.5), torch.full((3,), 0.5), atol=1e-6)
    assert not torch.allclose(hue @ torch.tensor([0.8, 0.2, 0.1]), torch.tensor([0.8, 0.2, 0.1]))


@pytest.mark.parametrize("box", [(5, 7, 100, 80), (0, 0, 120, 90), (10, 10, 20, 20)])
def test_uint8_views_match_the_float_resize_within_one_grey_level(box) -> None:
    """crop_view resizes uint8 images as uint8 (the fast path) and keeps them uint8: the
    views stay within one grey level of resizing the float image, whatever the memory
    layout of the input."""
    generator = torch.Generator().manual_seed(0)
    channels_last = torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8, generator=generator)
    image = channels_last.permute(2, 0, 1)  # the layout decode_image and decode_raw give
    view, unit = crop_view(image, box, 32, flip=False)
    flipped, _ = crop_view(image.contiguous(), box, 32, flip=True)
    as_float, float_unit = crop_view(image.float() / 255, box, 32, flip=False)
    assert view.dtype == torch.uint8 and view.shape == (3, 32, 32)
    assert as_float.dtype == torch.float32 and 0 <= as_float.min() and as_float.max() <= 1
    assert torch.equal(view, flipped.flip(-1))
    assert (view.float() / 255 - as_float).abs().max() < 1 / 255
    x0, y0, x1, y1 = box
    assert unit == float_unit == [x0 / 120, y0 / 90, x1 / 120, y1 / 90]
    # A crop is a strided view of the image's memory: a box outside it is refused, not read.
    for outside in [(x0, y0, 121, y1), (-1, y0, x1, y1), (x0, y0, x0, y1), (x0, 60, x1, 91)]:
        with pytest.raises(ValueError, match=r"crop box .* is not inside a 120x90 image"):
            crop_view(image, outside, 32, flip=False)


LOADER_THEN_SLEEP = """
import sys, time
from san.config import DataConfig
from san.data import PairLoader, StreamDataset, create_dataset, train_pair_transform
cfg = DataConfig(dataset="synthetic", image_size=32, synthetic_train_size=64)
stream = StreamDataset(create_dataset(cfg, "train"), train_pair_transform(cfg), seed=0)
loader = PairLoader(
    stream, batch_size=4, num_workers=2, persistent_workers=True, prefetch_factor=4
)
next(iter(loader))
time.sleep(1)  # the workers fill the queue's pipe, as they do while a step runs
print(*(w.pid for w in loader._iterator._workers), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_loader_workers_end_when_the_training_process_is_killed() -> None:
    """torch's loader workers outlived a SIGKILLed training worker (their exit waits on a
    pipe their siblings hold), keeping its sockets open: Ray's restart of the worker
    group waited over 7 minutes. PairLoader's workers die with their parent."""
    with subprocess.Popen(
        [sys.executable, "-c", LOADER_THEN_SLEEP], stdout=subprocess.PIPE, text=True
    ) as proc:
        hung = threading.Timer(120, proc.kill)  # a hang reads as an empty line, and fails
        hung.start()
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 2, "the loader did not start its two workers"
        finally:
            hung.cancel()
            proc.kill()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"

    deadline = time.monotonic() + 10
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:  # a failing run leaves nothing behind either
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"loader workers {left} outlived their parent"


def test_collate_packs_two_tensors_and_the_step_finishes_them_as_one_sample_would() -> None:
    """PairLoader's batches carry each sample's uint8 views and its numbers; finishing the
    batch on the training device (`finished_views`, as Trainer.step does) gives the views
    of finishing each sample on its own."""
    train = train_pair_transform(DataConfig(image_size=16))
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    samples = [
        {**train({"image": img, "id": f"s{i}"}, torch.Generator().manual_seed(i)), "reader": 3,
         "bad_skipped": i}
        for i in range(3)
    ]  # fmt: skip
    # A sample holds lists (`PairTransform.views`); `PairTransform.__call__` packs the same.
    pair = PairTransform(16, DataConfig().crop_min_scale, DataConfig().jitter)
    whole = [pair(img, torch.Generator().manual_seed(i)) for i in range(3)]
    for s, w in zip(samples, whole, strict=True):
        assert torch.equal(torch.stack(s["views"]), w["views"])
        assert torch.equal(torch.tensor(s["params"]), w["params"])
    alone = [finish_views(w["views"].clone(), w["params"][:, 5:]) for w in whole]
    packed = train.collate(samples)
    assert sorted(k for k, v in packed.items() if isinstance(v, torch.Tensor)) == [
        "params", "views"
    ]  # fmt: skip
    assert packed["views"].dtype == torch.uint8
    batch = unpack_pairs(packed)
    assert set(batch) == {"view1", "view2", "box1", "box2", "flip1", "flip2", "jitter1",
                          "jitter2", "id", "reader", "bad_skipped", "epoch",
                          "position"}  # fmt: skip
    for i, s in enumerate(whole):
        assert torch.equal(batch["view1"][i], s["views"][0])
        assert torch.equal(batch["box1"][i], s["params"][0, :4])
        assert torch.equal(batch["box2"][i], s["params"][1, :4])
        assert batch["flip1"][i].item() == bool(s["params"][0, 4])
        assert torch.equal(batch["jitter2"][i], s["params"][1, 5:])
    assert batch["flip1"].dtype == torch.bool and batch["view1"].shape == (3, 3, 16, 16)
    assert batch["id"] == ["s0", "s1", "s2"]
    assert batch["reader"].tolist() == [3, 3, 3] and batch["bad_skipped"].tolist() == [0, 1, 2]
    finished = finished_views(batch, colour_jitter=True)
    assert finished.dtype == torch.float32 and finished.shape == (6, 3, 16, 16)
    for i in range(3):
        assert torch.allclose(finished[i], alone[i][0], atol=1e-6)
        assert torch.allclose(finished[3 + i], alone[i][1], atol=1e-6)
    plain = finished_views(batch, colour_jitter=False)
    assert torch.allclose(plain[0], normalize(batch["view1"][0]), atol=1e-6)
    # Pre-made float views are taken as finished.
    ready = {"view1": finished[:3], "view2": finished[3:]}
    assert torch.equal(finished_views(ready, colour_jitter=True), finished)


@pytest.mark.parametrize("shape", [(4, 2, 3, 8, 8), (2, 2, 3, 400, 400)])
def test_small_batches_cross_inline_and_big_ones_as_tensors(shape) -> None:
    """A loader worker hands a small batch over as bytes (pickled through the pipe) and a
    big one as a shared-memory tensor; both arrive as the same tensor."""
    tensor = torch.randint(0, 256, shape, dtype=torch.uint8)
    crossed = pickle.loads(pickle.dumps(pack_tensor(tensor)))
    small = tensor.numel() <= INLINE_MAX_BYTES
    assert isinstance(crossed, tuple) == small
    again = unpack_tensor(crossed)
    assert torch.equal(again, tensor) and again.dtype == torch.uint8
    again.zero_()  # writable, and not the sender's memory
    assert tensor.any()


def _aligned_error(box1, flip1, box2, flip2, size=64, pool=1):
    img = smooth_image()
    v1, unit1 = crop_view(img, box1, size, flip1)
    v2, unit2 = crop_view(img, box2, size, flip2)
    if pool > 1:  # dense maps at a lower resolution than the views, as the model gives
        v1 = torch.nn.functional.avg_pool2d(v1[None], pool)[0]
        v2 = torch.nn.functional.avg_pool2d(v2[None], pool)[0]
    aligned, mask = align_views(
        v2[None],
        torch.tensor([unit1]),
        torch.tensor([flip1]),
        torch.tensor([unit2]),
        torch.tensor([flip2]),
    )
    mask = mask[0]
    err = (aligned[0] - v1).abs().amax(0)[mask]
    return err, mask


@pytest.mark.parametrize("flip1", [False, True])
@pytest.mark.parametrize("flip2", [False, True])
@pytest.mark.parametrize("pool", [1, 4])
def test_align_views_matches_view1(flip1: bool, flip2: bool, pool: int) -> None:
    err, mask = _aligned_error((20, 30, 150, 140), flip1, (70, 10, 190, 120), flip2, pool=pool)
    # Overlap in x: [70,150] of view1's [20,150] -> 80/130; in y: [30,120] of [30,140] -> 90/110.
    expected = (80 / 130) * (90 / 110)
    assert abs(mask.float().mean().item() - expected) < 0.08
    assert err.max().item() < 0.02


def test_align_views_pair_transform_geometry() -> None:
    """The boxes and flips PairTransform reports really describe its views."""
    img = (smooth_image() * 255).round().to(torch.uint8)
    pair = PairTransform(48, crop_min_scale=0.4, jitter=0.0)
    checked = 0
    for seed in range(12):
        out = pair(img, torch.Generator().manual_seed(seed))
        view1, view2 = finish_views(out["views"], None)
        (box1, flip1), (box2, flip2) = ((p[:4], p[4:5] > 0.5) for p in out["params"])
        aligned, mask = align_views(view2[None], box1[None], flip1, box2[None], flip2)
        if mask.sum() < 50:
            continue
        err = (denormalize(aligned[0]) - denormalize(view1)).abs().amax(0)[mask[0]]
        assert err.max().item() < 0.03, seed
        checked += 1
    assert checked >= 6


def test_align_views_flip_and_disjoint() -> None:
    a = torch.randn(2, 5, 6, 7, requires_grad=True)
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0]])
    no, yes = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    aligned, mask = align_views(a, box, no, box, yes)
    assert mask.all()
    assert torch.allclose(aligned, a.flip(-1), atol=1e-5)
    aligned.sum().backward()
    assert a.grad is not None and torch.allclose(a.grad, torch.ones_like(a))

    far = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.6, 0.0, 1.0, 1.0]])
    other = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]])
    _, mask = align_views(a.detach(), far, no, other, yes)
    assert not mask.any()


def test_eval_transform_resize_and_crop() -> None:
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    label = torch.zeros(60, 80, dtype=torch.uint8)
    label[:, 40:] = 3
    label[0, 0] = 255
    x, y = eval_transform(image, label, 30)
    assert x.shape == (3, 30, 30) and x.dtype == torch.uint8
    assert y.shape == (30, 30) and y.dtype == torch.uint8
    assert set(y.unique().tolist()) <= {0, 3, 255}
    # Shorter side 60 -> 30 scales the width to 40; the centre crop keeps columns 5..34,
    # so the class border (column 40 -> 20) lands at crop column 15.
    assert (y[:, :15] == 0).all() and (y[:, 15:] == 3).all()
    x2, y2 = eval_transform(image, None, 30)
    assert y2 is None and torch.equal(x, x2)
    # Float batches are taken as normalised by evaluate(): float pixels are refused here.
    with pytest.raises(ValueError, match="evaluation crops need a uint8 3xHxW image"):
        eval_transform(image.float() / 255, label, 30)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_varied() -> None:
    a = SyntheticScenes(20, 64, 6, seed=0, split="train")
    b = SyntheticScenes(20, 64, 6, seed=0, split="train")
    v = SyntheticScenes(20, 64, 6, seed=0, split="val")
    assert len(a) == 20 and a.n_classes == 6 and a.class_names[0] == "region0"
    s = a[3]
    assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.uint8
    assert s["label"].shape == (64, 64) and s["label"].dtype == torch.uint8
    assert torch.equal(s["image"], b[3]["image"]) and torch.equal(s["label"], b[3]["label"])
    assert not torch.equal(s["image"], v[3]["image"])
    per_image = [len(a[i]["label"].unique()) for i in range(20)]
    assert min(per_image) >= 1 and np.mean(per_image) >= 2.2
    assert set(torch.cat([a[i]["label"].flatten() for i in range(20)]).unique().tolist()) == set(
        range(6)
    )


def test_synthetic_classes_differ_in_appearance() -> None:
    """Mean colour of each class differs from the others (learnable), across images."""
    ds = SyntheticScenes(30, 64, 4)
    means: dict[int, list[torch.Tensor]] = {}
    for i in range(30):
        s = ds[i]
        for c in s["label"].unique().tolist():
            means.setdefault(c, []).append(s["image"][:, s["label"] == c].float().mean(1))
    centre = {c: torch.stack(m).mean(0) for c, m in means.items()}
    for c in centre:
        for d in centre:
            if c < d:
                assert (centre[c] - centre[d]).norm() > 15


def test_synthetic_speed() -> None:
    ds = SyntheticScenes(50, 128, 10)
    ds[0]
    start = time.process_time()
    for i in range(50):
        ds[i]
    per_image_ms = (time.process_time() - start) / 50 * 1000
    # The target is < 5 ms; the bound is loose so a busy test machine does not flake.
    assert per_image_ms < 15, per_image_ms


# ----------------------------------------------------------------------------- folder


@needs_camvid
def test_folder_camvid() -> None:
    train = FolderDataset(str(CAMVID), "train")
    val = FolderDataset(str(CAMVID), "val")
    assert (len(train), len(val)) == (367, 101)
    assert train.n_classes is None and train.has_labels
    allowed = set(range(11)) | {255}
    for ds in (train, val):
        for i in (0, len(ds) // 2, len(ds) - 1):
            s = ds[i]
            assert s["image"].shape == (3, 180, 240) and s["image"].dtype == torch.uint8
            assert s["label"].shape == (180, 240) and s["label"].dtype == torch.uint8
            assert set(s["label"].unique().tolist()) <= allowed
    assert len(set(train.ids) & set(val.ids)) == 0


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _one_line_data_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        FolderDataset(str(tmp_path / "nowhere"), "train")
    _one_line_data_error(exc, "nowhere", "images")

    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    with pytest.raises(DataError) as exc:
        FolderDataset(str(tmp_path / "empty"), "train")
    _one_line_data_error(exc, "empty", "no .jpg")

    root = tmp_path / "bad" / "train"
    rgb = np.zeros((8, 10, 3), np.uint8)
    _save(root / "images" / "good.png", rgb)
    _save(root / "labels" / "good.png", np.ones((8, 10), np.uint8))
    (root / "images" / "broken.jpg").write_bytes(b"this is not a jpeg")
    _save(root / "images" / "wrongsize.png", rgb)
    _save(root / "labels" / "wrongsize.png", np.ones((8, 9), np.uint8))
    ds = FolderDataset(str(tmp_path / "bad"), "train")
    assert ds.ids == ["broken", "good", "wrongsize"]
    assert ds[1]["label"].shape == (8, 10)
    with pytest.raises(DataError) as exc:
        ds[0]
    _one_line_data_error(exc, "'broken'", "decoded")
    with pytest.raises(DataError) as exc:
        ds[2]
    _one_line_data_error(exc, "'wrongsize'", "9x8", "10x8")


def test_folder_reads_pils_formats_and_names_what_it_ignores(tmp_path: Path, caplog) -> None:
    """.bmp/.webp/.tif images and .PNG labels used to be skipped without a word, as were
    labels with no image: prepare_data reported 2 images of 5, and 0 skipped."""
    images, labels = tmp_path / "train" / "images", tmp_path / "train" / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.webp", "WEBP")):
        Image.fromarray(pixels).save(
            images / name, fmt, **({"lossless": True} if fmt == "WEBP" else {})
        )
    for name, fmt in (("d.bmp", "BMP"), ("e.tif", "TIFF")):
        Image.fromarray(pixels).save(images / name, fmt)
    (images / "notes.txt").write_text("not an image")
    (images / ".DS_Store").write_bytes(b"")
    label = np.ones((12, 16), np.uint8)
    for name in ("a.png", "d.PNG", "zzz.png"):
        (labels / name).write_bytes(encode_png(label))
    Image.fromarray(label).save(labels / "b.tif", "TIFF")  # labels are PNG only

    with caplog.at_level("WARNING", logger="san"):
        ds = FolderDataset(str(tmp_path), "train")
    assert ds.ids == ["a", "b", "c", "d", "e"]
    assert [p is not None for p in ds.label_paths] == [True, False, False, True, False]
    for i in (0, 2, 3, 4):  # lossless formats: the pixels as written
        assert torch.equal(ds[i]["image"], torch.from_numpy(pixels).permute(2, 0, 1))
    assert torch.equal(ds[3]["label"], torch.from_numpy(label))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("1 not images (notes.txt), ignored" in w for w in warnings), warnings
    assert any("1 labels with no image (zzz), ignored" in w for w in warnings), warnings
    assert any("1 labels not PNG (b.tif), ignored" in w for w in warnings), warnings


def test_folder_source_problems_are_one_line(tmp_path: Path) -> None:
    """A URL root collapsed into a local path ("s3:/b/x not found"); a classes.txt not in
    UTF-8 was a UnicodeDecodeError; one naming a class twice gave two classes one metric."""
    with pytest.raises(DataError, match=r"^data.dataset=folder reads a local folder; s3://b/x is"):
        FolderDataset("s3://b/x", "train")
    _save(tmp_path / "images" / "a.png", np.full((12, 16, 3), 100, np.uint8))
    (tmp_path / "classes.txt").write_bytes("caf\xe9\nroad\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"classes.txt is not UTF-8 text \(byte 3\)$"):
        FolderDataset(str(tmp_path), "train")
    (tmp_path / "classes.txt").write_text("sky\nroad\nsky\n")
    with pytest.raises(DataError, match=r"classes.txt names a class twice: 'sky'$"):
        FolderDataset(str(tmp_path), "train")


def test_folder_unlabelled_root_layout_and_classes(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "a.png", np.full((12, 16, 3), 100, np.uint8))
    _save(tmp_path / "images" / "b.jpg", np.full((12, 16, 3), 50, np.uint8))
    (tmp_path / "classes.txt").write_text("sky\nroad\n")
    ds = FolderDataset(str(tmp_path), "train")  # no train/ folder: root is used directly
    assert len(ds) == 2 and ds.class_names == ["sky", "road"] and ds.n_classes == 2
    assert ds[0]["label"] is None and not ds.has_labels
    out = eval_sample_transform(DataConfig(image_size=16))(ds[1])
    assert out["label"].shape == (16, 16) and (out["label"] == 255).all()


# ----------------------------------------------------------------------------- shards


def _pil_rgb(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


@pytest.mark.parametrize(
    "fmt, mode",
    [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "L")]
    + [("PNG", "P"), ("PNG", "RGBA"), ("PNG", "I;16"), ("BMP", "RGB")],
)
def test_decode_image_gives_pils_pixels(fmt: str, mode: str) -> None:
    """JPEG/PNG decode through torchcodec, other formats and 16-bit PNGs through PIL: either
    way the pixels, shape and layout are what PIL's RGB conversion gives, bit for bit."""
    pixels = np.random.default_rng(0).integers(0, 256, (36, 52, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 200)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    decoded = decode_image(buffer.getvalue(), "x")
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 36, 52)
    assert torch.equal(decoded, _pil_rgb(buffer.getvalue()))
    assert decoded.permute(1, 2, 0).is_contiguous()  # H x W x 3 memory, as decoders write
    with pytest.raises(DataError, match="image 'x' could not be decoded"):
        decode_image(buffer.getvalue()[: len(buffer.getvalue()) // 2], "x")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [1, 3, 6])
def test_exif_orientation_leaves_the_stored_pixels(tmp_path: Path, fmt: str, orientation: int):
    """Labels are drawn on the stored pixel grid, which PIL gives. torchcodec turned a file
    with an EXIF orientation upright: turned 180 degrees (3) the labels silently covered the
    wrong pixels, and turned 90 (6) a good sample failed the label size check."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, :12] = 255  # the left quarter is white; the label marks it as class 1
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, exif=exif.tobytes())
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / f"a.{fmt.lower()}").write_bytes(buffer.getvalue())
    label = np.zeros((32, 48), np.uint8)
    label[:, :12] = 1
    (tmp_path / "labels" / "a.png").write_bytes(encode_png(label))

    sample = FolderDataset(str(tmp_path), "train")[0]
    assert sample["image"].shape == (3, 32, 48)
    assert torch.equal(sample["image"], _pil_rgb(buffer.getvalue()))
    assert sample["image"][:, sample["label"] == 1].float().mean() > 250


def test_decode_image_without_torchcodec_uses_pil(tmp_path: Path) -> None:
    """Where torchcodec is missing (the GPU device image) or cannot load its library, PIL
    decodes the same pixels, with one warning saying so."""
    jpeg = io.BytesIO()
    Image.fromarray(np.full((8, 12, 3), 90, np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "x.jpg").write_bytes(jpeg.getvalue())
    script = (
        "import logging, sys; sys.modules['torchcodec'] = None; logging.basicConfig()\n"
        "from san.data.base import decode_image\n"
        f"data = open({str(tmp_path / 'x.jpg')!r}, 'rb').read()\n"
        "images = [decode_image(data, 'x') for _ in range(2)]\n"
        "print(tuple(images[0].shape), images[0].sum().item())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"(3, 8, 12) {_pil_rgb(jpeg.getvalue()).sum().item()}"
    assert done.stderr.count("torchcodec unavailable") == 1
    assert "decoding images with PIL" in done.stderr


def _records(n: int) -> list[dict]:
    """Encoded samples: PNG from the synthetic generator, every third one unlabelled."""
    ds = SyntheticScenes(n, 24, 3, split="shardtest")
    records = list(ds.iter_records())
    for i, record in enumerate(records):
        if i % 3 == 2:
            record["label_bytes"] = None
    return records


def test_shards_roundtrip_bit_exact(tmp_path: Path) -> None:
    records = _records(10)
    url = str(tmp_path / "ds" / "train")
    manifest = write_shards(records, url, shard_size=4, class_names=["a", "b", "c"])
    assert manifest["n_images"] == 10 and manifest["n_shards"] == 3
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["n_classes"] == 3 and manifest["n_labelled"] == 7
    on_disk = json.loads((tmp_path / "ds" / "train" / "manifest.json").read_text())
    assert on_disk == manifest
    files = sorted(p.name for p in (tmp_path / "ds" / "train").iterdir())
    assert files == ["manifest.json"] + [f"shard-{i:05d}.parquet" for i in range(3)]
    rows = []
    for shard in manifest["shards"]:
        path = tmp_path / "ds" / "train" / shard["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        rows += pq.read_table(path).to_pylist()
    for record, row in zip(records, rows, strict=True):
        assert row["id"] == record["id"]
        assert row["image"] == record["image_bytes"]
        assert row["label"] == record["label_bytes"]
        assert (row["width"], row["height"]) == (24, 24)

    for ds in (ShardDataset(str(tmp_path / "ds"), "train"), ShardDataset(url, "ignored")):
        assert len(ds) == 10 and ds.class_names == ["a", "b", "c"] and ds.n_classes == 3
        ds.verify()
        got = {s["id"]: s for s in ds.iter_partition(0, 1, 0, False, 0)}
        assert list(got) == [r["id"] for r in records]
        for record in records:
            s = got[record["id"]]
            expect = np.asarray(Image.open(io.BytesIO(record["image_bytes"])))
            assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), expect)
            if record["label_bytes"] is None:
                assert s["label"] is None
            else:
                assert s["label"].shape == (24, 24)
        assert torch.equal(ds[5]["image"], got[records[5]["id"]]["image"])

    (tmp_path / "ds" / "train" / "shard-00001.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="checksum"):
        ShardDataset(url, "train").verify()
    with pytest.raises(DataError, match="manifest"):
        ShardDataset(str(tmp_path / "nothing"), "train")


def test_raw_shards_hold_the_same_pixels(tmp_path: Path) -> None:
    """image_encoding="raw" stores decoded pixels and label ids: identical images and
    labels, no decode on read."""
    records = _records(6)
    source = write_shards(records, str(tmp_path / "source"), shard_size=4)
    raw = write_shards(records, str(tmp_path / "raw"), shard_size=4, image_encoding="raw")
    assert (source["image_encoding"], raw["image_encoding"]) == ("source", "raw")
    assert (source["label_encoding"], raw["label_encoding"]) == ("png", "raw")
    rows = pq.read_table(tmp_path / "raw" / "shard-00000.parquet").to_pylist()
    assert len(rows[0]["image"]) == 24 * 24 * 3  # uint8 H x W x 3
    assert len(rows[0]["label"]) == 24 * 24 and rows[2]["label"] is None  # uint8 H x W
    label_column = pq.ParquetFile(tmp_path / "raw" / "shard-00000.parquet").metadata
    assert label_column.row_group(0).column(2).compression == "ZSTD"
    # Unique values in a dictionary page are read back with a second copy of each: none.
    for encoding in ("source", "raw"):
        metadata = pq.ParquetFile(tmp_path / encoding / "shard-00000.parquet").metadata
        group = metadata.row_group(0)
        assert not any(group.column(c).has_dictionary_page for c in range(group.num_columns))
    as_source = {
        s["id"]: s
        for s in ShardDataset(str(tmp_path / "source"), "x").iter_partition(0, 1, 0, False, 0)
    }
    as_raw = {
        s["id"]: s
        for s in ShardDataset(str(tmp_path / "raw"), "x").iter_partition(0, 1, 0, False, 0)
    }
    assert list(as_raw) == [r["id"] for r in records]
    for sample_id, sample in as_raw.items():
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 24, 24)
        assert torch.equal(sample["image"], as_source[sample_id]["image"])
        expect = as_source[sample_id]["label"]
        assert (sample["label"] is None) == (expect is None)
        assert expect is None or torch.equal(sample["label"], expect)
    with pytest.raises(ValueError, match="allowed"):
        write_shards(records, str(tmp_path / "bad"), image_encoding="webp")


def test_shards_with_dictionary_pages_read_with_one_warning(tmp_path: Path, caplog) -> None:
    """Shards written before dictionary pages were turned off still read, the same
    samples, and the process says once that rewriting them would read faster; shards
    written now say nothing."""
    records = _records(6)
    write_shards(records, str(tmp_path / "new"), shard_size=4, image_encoding="raw")
    write_shards(records, str(tmp_path / "old"), shard_size=4, image_encoding="raw")
    for name in ("shard-00000.parquet", "shard-00001.parquet"):
        path = tmp_path / "old" / name
        pq.write_table(pq.read_table(path), path)  # pyarrow's default: dictionary pages
    with caplog.at_level("WARNING", logger="san"):
        new = list(ShardDataset(str(tmp_path / "new"), "x").iter_partition(0, 1, 0, False, 0))
        assert not caplog.records
        old = list(ShardDataset(str(tmp_path / "old"), "x").iter_partition(0, 1, 0, False, 0))
        # Another reader of the same shards (each evaluation makes its own) says nothing.
        old += list(ShardDataset(str(tmp_path / "old"), "x").iter_partition(0, 1, 1, True, 0))
    assert [s["id"] for s in old[:6]] == [s["id"] for s in new]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(old, new, strict=False))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert str(tmp_path / "old") in warnings[0] and "prepare_data.py" in warnings[0]


def test_raw_shard_row_of_the_wrong_size_is_skipped_by_name(tmp_path: Path) -> None:
    records = _records(3)
    records[1]["width"] = 25  # the record lies about its size: refused when writing
    with pytest.raises(DataError, match=records[1]["id"]):
        write_shards(records, str(tmp_path / "lying"), image_encoding="raw")
    records[1]["width"] = 24
    write_shards(records, str(tmp_path / "ok"), image_encoding="raw")
    path = tmp_path / "ok" / "shard-00000.parquet"
    table = pq.read_table(path).to_pylist()
    table[1]["image"] = table[1]["image"][:-3]  # truncated pixels, as a damaged writer leaves
    pq.write_table(pa.Table.from_pylist(table, schema=SCHEMA), path)
    ds = ShardDataset(str(tmp_path / "ok"), "x")
    with pytest.raises(DataError, match=f"{records[1]['id']}.*raw bytes"):
        list(ds.iter_partition(0, 1, 0, False, 0))
    ds.on_bad = SkipBad(limit=1)
    assert [s["id"] for s in ds.iter_partition(0, 1, 0, False, 0)] == [
        records[0]["id"],
        records[2]["id"],
    ]
    assert ds.on_bad.count == 1
    # A raw label of the wrong size is refused by name the same way, and skippable.
    table[1]["image"] = table[0]["image"]
    table[0]["label"] = table[0]["label"][:-24]
    pq.write_table(pa.Table.from_pylist(table, schema=SCHEMA), path)
    ds.on_bad = None
    with pytest.raises(DataError, match=f"label '{records[0]['id']}' has 552 raw bytes"):
        list(ds.iter_partition(0, 1, 0, False, 0))
    ds.on_bad = SkipBad(limit=1)
    assert [s["id"] for s in ds.iter_partition(0, 1, 0, False, 0)] == [
        records[1]["id"],
        records[2]["id"],
    ]


def test_shards_from_before_label_encoding_read_their_png_labels(tmp_path: Path) -> None:
    """Raw shards written before `label_encoding` existed kept labels as PNG files and
    say nothing of it: they still read, labels decoded as PNG; an encoding this version
    does not know is a one-line error naming it."""
    records = _records(3)
    write_shards(records, str(tmp_path / "old"), image_encoding="raw")
    path = tmp_path / "old" / "shard-00000.parquet"
    table = pq.read_table(path).to_pylist()
    for row, record in zip(table, records, strict=True):
        row["label"] = record["label_bytes"]
    pq.write_table(pa.Table.from_pylist(table, schema=SCHEMA), path)
    manifest_path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["label_encoding"]
    manifest_path.write_text(json.dumps(manifest))
    samples = list(ShardDataset(str(tmp_path / "old"), "x").iter_partition(0, 1, 0, False, 0))
    for sample, record in zip(samples, records, strict=True):
        expect = None if record["label_bytes"] is None else decode_label(record["label_bytes"], "")
        assert (sample["label"] is None) == (expect is None)
        assert expect is None or torch.equal(sample["label"], expect)
    manifest_path.write_text(json.dumps({**manifest, "label_encoding": "webp"}))
    with pytest.raises(DataError, match=r"label_encoding='webp'; this version reads \['png'"):
        ShardDataset(str(tmp_path / "old"), "x")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: {"files": ["a.parquet"]}, "is not a SAN shard manifest (format None"),
        (lambda m: [m], "is not a SAN shard manifest (format <class 'list'>"),
        (lambda m: {**m, "shards": [{"file": "shard-00000.parquet"}]}, "is damaged: 'shards'"),
        (lambda m: {k: v for k, v in m.items() if k != "shards"}, "is damaged: 'shards'"),
        (lambda m: {**m, "shards": [{**m["shards"][0], "rows": None}]}, "rows a count"),
        (lambda m: {**m, "shards": [{**m["shards"][0], "rows": "3"}]}, "rows a count"),
    ],
    ids=[
        "other-tool",
        "not-an-object",
        "shard-without-rows",
        "no-shards",
        "null-rows",
        "text-rows",
    ],
)
def test_foreign_or_damaged_manifest_is_one_line(tmp_path: Path, edit, expected) -> None:
    """A manifest.json this project did not write was a KeyError('shards') traceback."""
    write_shards(_records(3), str(tmp_path / "s"))
    path = tmp_path / "s" / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(DataError) as info:
        ShardDataset(str(tmp_path / "s"), "train")
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_training_stream_does_not_read_labels(tmp_path: Path) -> None:
    """The train transform drops labels, so sources skip reading and decoding them."""
    write_shards(_records(4), str(tmp_path / "shards"), shard_size=2)
    root = tmp_path / "folder" / "train"
    _save(root / "images" / "x.png", np.zeros((20, 30, 3), np.uint8))
    (root / "labels").mkdir()
    (root / "labels" / "x.png").write_bytes(b"corrupt label that training must never open")
    for dataset, data_root in (("shards", tmp_path / "shards"), ("folder", tmp_path / "folder")):
        cfg = DataConfig(dataset=dataset, root=str(data_root), image_size=16)
        train = create_dataset(cfg, "train")
        batches = list(StreamDataset(train, train_pair_transform(cfg), loop=False))
        assert train.load_labels is False and batches
        evaluated = create_dataset(cfg, "train")
        StreamDataset(evaluated, eval_sample_transform(cfg), loop=False)
        assert evaluated.load_labels is True
    with pytest.raises(DataError, match="label 'x'"):
        list(StreamDataset(evaluated, eval_sample_transform(cfg), loop=False))


@pytest.mark.e2e
def test_remote_shards_are_cached_locally_once_verified(s3_env, tmp_path: Path) -> None:
    """data.shard_cache: each S3 shard is fetched once, checked against its manifest sha256
    and kept under it; later reads need no S3 at all, and a bad fetch is never cached."""
    bucket = s3_env.make_bucket("cached-shards")
    records = _records(5)
    manifest = write_shards(records, f"{bucket}/ds/train", shard_size=2)
    cache = tmp_path / "cache"
    cfg = DataConfig(dataset="shards", root=f"{bucket}/ds", shard_cache=str(cache))
    ds = create_dataset(cfg, "train")
    first = {s["id"]: s["image"] for s in ds.iter_partition(0, 1, 0, True, 0)}
    assert sorted(first) == sorted(r["id"] for r in records)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{shard['sha256']}.parquet" for shard in manifest["shards"]
    )
    for shard in manifest["shards"]:
        assert (
            hashlib.sha256((cache / f"{shard['sha256']}.parquet").read_bytes()).hexdigest()
            == (shard["sha256"])
        )
    # With the shard files gone from the bucket, the cached copies still serve every image.
    fs, _ = filesystem(bucket)
    for shard in manifest["shards"]:
        fs.rm(f"{bucket}/ds/train/{shard['file']}")
    again = {
        s["id"]: s["image"] for s in create_dataset(cfg, "train").iter_partition(0, 1, 1, True, 0)
    }
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)

    # A shard that does not match its manifest is refused by name and leaves no entry.
    fresh = tmp_path / "fresh"
    write_shards(records, f"{bucket}/bad/train", shard_size=2)
    fs.pipe(f"{bucket}/bad/train/shard-00001.parquet", b"not the shard the manifest lists")
    bad = create_dataset(
        DataConfig(dataset="shards", root=f"{bucket}/bad", shard_cache=str(fresh)), "train"
    )
    with pytest.raises(DataError, match="shard-00001.parquet fails its manifest sha256"):
        list(bad.iter_partition(0, 1, 0, False, 0))
    assert len(list(fresh.iterdir())) == 1  # shard 0 only; no temporary files left

    # Local shards are read in place, never copied; an unwritable cache is a one-line error.
    write_shards(records, str(tmp_path / "local"), shard_size=2)
    local = ShardDataset(str(tmp_path / "local"), "x", cache_dir=str(tmp_path / "unused"))
    assert len(list(local.iter_partition(0, 1, 0, False, 0))) == 5
    assert not (tmp_path / "unused").exists()
    (tmp_path / "a-file").write_text("")
    blocked = ShardDataset(f"{bucket}/ds", "train", cache_dir=str(tmp_path / "a-file" / "sub"))
    with pytest.raises(DataError, match=r"data.shard_cache=.*cannot be written"):
        next(blocked.iter_partition(0, 1, 0, False, 0))


def test_shard_cache_expands_the_home_directory(s3_env, tmp_path: Path, monkeypatch) -> None:
    """data.shard_cache=~/... (the shell leaves a ~ after '=' alone) is the home directory,
    as every other local path setting: it was a folder named '~' wherever the run started."""
    bucket = s3_env.make_bucket("home-cache")
    write_shards(_records(3), f"{bucket}/ds/train", shard_size=2)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    ds = ShardDataset(f"{bucket}/ds", "train", cache_dir="~/san-cache")
    assert len(list(ds.iter_partition(0, 1, 0, False, 0))) == 3
    assert len(list((tmp_path / "home" / "san-cache").iterdir())) == 2
    assert not any((tmp_path / "cwd").iterdir())


def test_remote_shards_are_checked_against_their_manifest(s3_env) -> None:
    """Without a cache too, a remote shard's bytes must match its manifest sha256 before
    any of its rows is read: a shard overwritten by another valid Parquet file (here,
    shard 0's) is refused by name, after shard 0's own rows."""
    bucket = s3_env.make_bucket("checked-shards")
    write_shards(_records(4), f"{bucket}/ds/train", shard_size=2)
    fs, _ = filesystem(bucket)
    fs.copy(f"{bucket}/ds/train/shard-00000.parquet", f"{bucket}/ds/train/shard-00001.parquet")
    seen = []
    with pytest.raises(DataError, match="shard-00001.parquet fails its manifest sha256"):
        for sample in ShardDataset(f"{bucket}/ds", "train").iter_partition(0, 1, 0, False, 0):
            seen.append(sample["id"])
    assert seen == ["shardtest-000000", "shardtest-000001"]


def test_a_damaged_shard_cache_entry_is_fetched_again(s3_env, tmp_path: Path) -> None:
    """A cache entry truncated after it was written (a full disk, a killed copy) is not a
    Parquet file any more: it is fetched again and verified, not an error every epoch."""
    bucket = s3_env.make_bucket("healed-shards")
    manifest = write_shards(_records(4), f"{bucket}/ds/train", shard_size=2)
    cache = tmp_path / "cache"
    ds = ShardDataset(f"{bucket}/ds", "train", cache_dir=str(cache))
    first = {s["id"]: s["image"] for s in ds.iter_partition(0, 1, 0, False, 0)}
    entry = cache / f"{manifest['shards'][1]['sha256']}.parquet"
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])
    again = {s["id"]: s["image"] for s in ds.iter_partition(0, 1, 1, False, 0)}
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert entry.read_bytes() == good
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{shard['sha256']}.parquet" for shard in manifest["shards"]
    )


def test_remote_shards_are_fetched_one_ahead(s3_env, tmp_path: Path) -> None:
    """While a remote shard is read, the next is already being fetched (seen here as its
    cache entry appearing), so a reader does not stall on the network at every shard
    boundary; a reader that stops early fetches nothing further."""
    bucket = s3_env.make_bucket("prefetched-shards")
    manifest = write_shards(_records(6), f"{bucket}/ds/train", shard_size=2)
    names = [f"{shard['sha256']}.parquet" for shard in manifest["shards"]]
    cache = tmp_path / "cache"
    stream = ShardDataset(f"{bucket}/ds", "train", cache_dir=str(cache)).iter_partition(
        0, 1, 0, False, 0
    )
    assert next(stream)["id"] == "shardtest-000000"  # the first image of shard 0
    deadline = time.monotonic() + 30
    while not (cache / names[1]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (cache / names[1]).exists()
    stream.close()
    assert sorted(p.name for p in cache.iterdir()) == sorted(names[:2])


def test_epoch_ahead_fetches_give_each_part_its_own_rows(s3_env) -> None:
    """With more parts than shards and a short last shard, a training reader that fetched
    the next epoch's first shard ahead reads every epoch exactly as a reader that fetched
    nothing ahead (a fetch ahead once went to a shard the part did not read, and its
    bytes were read as another shard's)."""
    bucket = s3_env.make_bucket("parts-ahead")
    write_shards(_records(5), f"{bucket}/ds/train", shard_size=4)  # 4 rows and 1
    for part in range(3):
        reference = ShardDataset(f"{bucket}/ds", "train")
        training = ShardDataset(f"{bucket}/ds", "train")
        training.epochs_follow = True
        for epoch in range(4):  # seed 1 shuffles the 2 shards' order in epoch 2
            expect = [s["id"] for s in reference.iter_partition(part, 3, epoch, True, 1)]
            got = [s["id"] for s in training.iter_partition(part, 3, epoch, True, 1)]
            assert got == expect and expect, (part, epoch)
            assert training._ahead is not None  # the next epoch's first shard is on its way


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_binary_views_are_the_column_values(kind) -> None:
    """Rows read as views of Arrow's buffer are the column's bytes, chunked or sliced."""
    values = [b"abc", b"", b"\x00\xff" * 3, b"z"]
    column = pa.chunked_array([pa.array(values[:2], kind), pa.array(values, kind).slice(2)])
    assert [bytes(v) for v in _binary_views(column)] == values


def test_raw_images_wrap_the_column_arrow_read_and_copy_read_only_bytes(tmp_path: Path) -> None:
    """A raw image's tensor is the memory of the column Arrow has just read from its shard
    (no copy); bytes, and read-only views such as a memory-mapped file's, are copied, so
    writing to the tensor never writes through to them."""
    pixels = bytes(range(24))  # 2 x 4 x 3
    pq.write_table(pa.table({"image": [pixels, pixels[::-1]]}), tmp_path / "rows.parquet")
    with pa.memory_map(str(tmp_path / "rows.parquet")) as mapped:
        column = pq.ParquetFile(mapped).read_row_group(0).column("image")
        buffer = column.chunks[0].buffers()[2]
        views = _binary_views(column)
        wrapped = [decode_raw(v, 2, 4, f"r{i}") for i, v in enumerate(views)]
        for view, tensor in zip(views, wrapped, strict=True):
            assert torch.equal(tensor.permute(1, 2, 0).flatten(), torch.tensor(list(bytes(view))))
            assert buffer.address <= tensor.data_ptr() < buffer.address + buffer.size
        wrapped[1][0, 0, 0] = 99  # the tensor is the column's memory, and writable
        assert bytes(views[1])[0] == 99 and bytes(views[0]) == pixels
        mapped.seek(0)
        file_view = memoryview(mapped.read_buffer(24))  # the file's own bytes, read-only
        file_bytes = bytes(file_view)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns when it wraps read-only memory
            for data in (pixels, memoryview(pixels), file_view):
                assert isinstance(data, bytes) or data.readonly
                copied = decode_raw(data, 2, 4, "copied")
                copied[0, 0, 0] = 200
                assert copied[0, 0, 0] == 200 and bytes(data)[0] != 200
        assert bytes(file_view) == file_bytes and pixels == bytes(range(24))


def test_training_fetches_the_next_epochs_first_shard_ahead(s3_env) -> None:
    """A training stream (StreamDataset with loop) reads epoch after epoch: once an epoch's
    last shard is reached, the next epoch's first shard is fetched ahead, so the reader
    does not stall at every epoch boundary. Seen here by deleting every shard once epoch 0
    is read: epoch 1 still gives its first shard's rows, then names the missing one.
    Evaluation (no loop) leaves it off, and a pickled copy carries no fetch in flight."""
    bucket = s3_env.make_bucket("epoch-ahead")
    write_shards(_records(6), f"{bucket}/ds/train", shard_size=2)
    reference = ShardDataset(f"{bucket}/ds", "train")
    epoch1 = [s["id"] for s in reference.iter_partition(0, 1, 1, True, 0)]
    transform = eval_sample_transform(DataConfig(image_size=16))
    assert not StreamDataset(reference, transform, loop=False).source.epochs_follow

    ds = StreamDataset(ShardDataset(f"{bucket}/ds", "train"), transform).source
    assert ds.epochs_follow
    assert len(list(ds.iter_partition(0, 1, 0, True, 0))) == 6
    ds._ahead[1].result(timeout=30)  # the fetch ahead has finished
    assert pickle.loads(pickle.dumps(ds))._ahead is None
    fs, _ = filesystem(bucket)
    fs.rm(f"{bucket}/ds/train", recursive=True)
    seen = []
    with pytest.raises(DataError, match=r"shard-0000\d.parquet cannot be opened"):
        for sample in ds.iter_partition(0, 1, 1, True, 0):
            seen.append(sample["id"])
    assert seen == epoch1[:2]


@pytest.mark.e2e
def test_shards_on_s3(s3_env) -> None:
    """Write and stream shards through a real (moto) S3 endpoint, found from the env."""
    bucket = s3_env.make_bucket("data-shards")
    records = _records(5)
    manifest = write_shards(records, f"{bucket}/camvid/val", shard_size=2)
    ds = ShardDataset(f"{bucket}/camvid", "val")
    assert len(ds) == 5 and ds.manifest == manifest
    ds.verify()
    ids = [s["id"] for part in range(2) for s in ds.iter_partition(part, 2, 0, True, 0)]
    assert sorted(ids) == sorted(r["id"] for r in records)
    loader = DataLoader(
        StreamDataset(ds, eval_sample_transform(DataConfig(image_size=16)), loop=False),
        batch_size=5,
        num_workers=2,
    )
    assert sum(len(b["id"]) for b in loader) == 5


def test_encode_png_roundtrip() -> None:
    label = np.random.default_rng(0).integers(0, 12, (5, 7)).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(label)))), label)


# ----------------------------------------------------------------------------- partitions


def _check_partitions(source, n_parts: int) -> None:
    everything = [s["id"] for s in source.iter_partition(0, 1, 0, False, 0)]
    assert len(everything) == len(source) == len(set(everything))
    for epoch in (0, 1):
        for shuffle in (False, True):
            ids = [
                s["id"]
                for part in range(n_parts)
                for s in source.iter_partition(part, n_parts, epoch, shuffle, 3)
            ]
            counts = Counter(ids)
            assert sorted(counts) == sorted(everything) and max(counts.values()) == 1


@pytest.mark.parametrize("n_parts", [1, 2, 3])
def test_partitions_synthetic(n_parts: int) -> None:
    _check_partitions(SyntheticScenes(11, 16, 3), n_parts)


@pytest.mark.parametrize("n_parts", [1, 2, 3])
@pytest.mark.parametrize("shard_size", [3, 8])  # 4 files (split by file) or 2 (split by row)
def test_partitions_shards(tmp_path: Path, n_parts: int, shard_size: int) -> None:
    write_shards(_records(11), str(tmp_path), shard_size=shard_size)
    _check_partitions(ShardDataset(str(tmp_path), "train"), n_parts)


@pytest.mark.parametrize("n_parts", [2, 3, 5])
def test_shard_parts_are_equal_whatever_the_shard_sizes(tmp_path: Path, n_parts: int) -> None:
    """Every part feeds batches at the same rate, so parts must hold the same number of
    rows (to one), or the smaller parts' images are read more often: shards of 8 and 3
    rows once went one to each of 2 parts. Each part still reads only some of the shards:
    at most its share of them plus the one it shares with each neighbour."""
    write_shards(_records(11), str(tmp_path), shard_size=8)  # shards of 8 and 3 rows
    write_shards(_records(23), str(tmp_path / "more"), shard_size=4)  # 5 of 4, one of 3
    for source in (ShardDataset(str(tmp_path), "x"), ShardDataset(str(tmp_path / "more"), "x")):
        n_files = len(source.shards)
        for epoch in range(4):
            for shuffle in (False, True):
                sizes = [
                    len(list(source.iter_partition(part, n_parts, epoch, shuffle, 3)))
                    for part in range(n_parts)
                ]
                assert sum(sizes) == len(source) and max(sizes) - min(sizes) <= 1, sizes
                for part in range(n_parts):
                    files = source._part_slices(part, n_parts, epoch, shuffle, 3)
                    assert len(files) <= -(-n_files // n_parts) + 1


def test_shuffle_changes_order_by_epoch() -> None:
    ds = SyntheticScenes(20, 16, 3)
    first = [s["id"] for s in ds.iter_partition(0, 1, 0, True, 0)]
    again = [s["id"] for s in ds.iter_partition(0, 1, 0, True, 0)]
    second = [s["id"] for s in ds.iter_partition(0, 1, 1, True, 0)]
    assert first == again and first != second


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_dataset_train_batches(workers: int) -> None:
    cfg = DataConfig(image_size=32, synthetic_train_size=12, synthetic_classes=4)
    source = create_dataset(cfg, "train")
    assert source.image_size == 40
    stream = StreamDataset(source, train_pair_transform(cfg), seed=1, loop=False, shuffle=True)
    loader = PairLoader(stream, batch_size=4, num_workers=workers)
    batches = list(loader)
    ids = [i for b in batches for i in b["id"]]
    assert sorted(ids) == sorted(source[i]["id"] for i in range(12))
    full = [b for b in batches if len(b["id"]) == 4]
    assert full
    b = full[0]
    assert b["view1"].shape == (4, 3, 32, 32) and b["view2"].shape == (4, 3, 32, 32)
    assert b["box1"].shape == (4, 4) and b["flip1"].shape == (4,) and b["flip1"].dtype == torch.bool
    assert "label" not in b
    # Same seed, same augmentation for the same sample (worker split does not matter).
    again = {}
    for b in PairLoader(stream, batch_size=4):
        again.update(zip(b["id"], b["view1"], strict=True))
    for b in batches:
        for i, v in zip(b["id"], b["view1"], strict=True):
            assert torch.equal(again[i], v)


def test_stream_dataset_loops_and_ranks() -> None:
    cfg = DataConfig(image_size=16, synthetic_train_size=5)
    source = create_dataset(cfg, "train")
    transform = train_pair_transform(cfg)
    stream = StreamDataset(source, transform, rank=1, world_size=2, loop=True, shuffle=False)
    it = iter(DataLoader(stream, batch_size=3))
    seen = [i for _ in range(4) for i in next(it)["id"]]
    assert seen == ["train-000001", "train-000003"] * 6  # rank 1 of 2 owns items 1 and 3
    # Shuffled: each epoch is a fresh split of the 5 items, 2 of them for rank 1.
    stream = StreamDataset(source, transform, rank=1, world_size=2, loop=True, shuffle=True)
    it = iter(stream)
    epochs = [{next(it)["id"], next(it)["id"]} for _ in range(6)]
    assert all(len(e) == 2 for e in epochs) and len(set.union(*epochs)) > 2


@pytest.mark.parametrize(("kind", "n_parts"), [("synthetic", 1), ("synthetic", 3),
                                             ("shards", 2), ("shards", 5)])  # fmt: skip
def test_a_part_read_from_a_position_is_the_rest_of_its_epoch(
    kind: str, n_parts: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a resumed run relies on: reading a part from `start` gives exactly what reading
    it whole gives from there on. Shards: 3 files of 2-row groups; parts whose stretch of
    the epoch's rows starts or ends inside a file or inside a row group (2 and 5 parts)."""
    if kind == "shards":
        monkeypatch.setattr(shards_module, "ROW_GROUP", 2)
        write_shards(_records(11), str(tmp_path), shard_size=4)
        source = ShardDataset(str(tmp_path), "train")
        assert [pq.ParquetFile(tmp_path / s["file"]).num_row_groups for s in source.shards] == [
            2, 2, 2
        ]  # fmt: skip
    else:
        source = SyntheticScenes(11, 24, 3, split="train")

    def read(part: int, start: int = 0) -> list[tuple[str, int]]:
        samples = source.iter_partition(part, n_parts, 1, True, 5, start)
        return [(s["id"], s["position"]) for s in samples]

    covered = []
    for part in range(n_parts):
        whole = read(part)
        assert [position for _, position in whole] == list(range(len(whole)))
        covered += [sample_id for sample_id, _ in whole]
        for start in range(len(whole) + 1):
            assert read(part, start) == whole[start:], (part, start)
    assert len(covered) == len(set(covered)) == 11


class OneBadScene(SyntheticScenes):
    """Synthetic scenes whose item 4 is corrupt (skipped by `SkipBad` while streaming)."""

    def __getitem__(self, index: int) -> dict:
        if index == 4:
            raise DataError("scene 4 is corrupt")
        return super().__getitem__(index)


@pytest.mark.parametrize(("stop", "rank", "world_size"), [(3, 0, 1), (4, 1, 2), (7, 0, 1)])
def test_a_resumed_stream_gives_the_batches_the_uninterrupted_one_would(
    stop: int, rank: int, world_size: int
) -> None:
    """Two loader workers (two parts per rank, batches taken from them in turn), parts of
    5 or 6 items in batches of 3, so batches span epochs, and one corrupt item skipped:
    resumed after `stop` batches from what a checkpoint keeps, the stream gives the same
    batches, augmentation included, as the stream that never stopped."""
    cfg = DataConfig(image_size=16)
    transform = train_pair_transform(cfg)

    def batches(n: int, **stream_args) -> list[dict]:
        source = OneBadScene(21, 20, 3, split="train")
        source.on_bad = SkipBad(100)
        stream = StreamDataset(source, transform, rank, world_size, **stream_args)
        it = iter(PairLoader(stream, batch_size=3, num_workers=2))
        return [next(it) for _ in range(n)]

    whole = batches(12, seed=4)
    next_samples: dict[int, tuple[int, int]] = {}
    for batch in whole[:stop]:
        record_consumed(next_samples, batch)
    saved = stream_checkpoint(4, world_size * 2, next_samples, next_reader=stop % 2)
    args, how = resume_stream(saved, stop, seed=4, world_size=world_size, loader_workers=2)
    assert how == f"data: the stream goes on where step {stop} left it"
    rest = batches(12 - stop, **args)
    for expected, got in zip(whole[stop:], rest, strict=True):
        assert got["id"] == expected["id"]
        for key in ("view1", "view2", "box1", "box2", "jitter1"):
            assert torch.equal(got[key], expected[key]), key


def test_a_second_resume_of_a_stream_started_mid_run_goes_on_in_order() -> None:
    """A stream started anew at step 3 (its layout changed), checkpointed at step 5, then
    resumed: the next batch is the second loader worker's, as in the stream that never
    stopped. It was taken to be worker (5 % 2)'s, as if the stream had begun at step 0."""
    transform = train_pair_transform(DataConfig(image_size=16))

    def batches(n: int, **stream_args) -> list[dict]:
        source = SyntheticScenes(20, 20, 3, split="train")
        stream = StreamDataset(source, transform, 0, 1, **stream_args)
        it = iter(PairLoader(stream, batch_size=2, num_workers=2))
        return [next(it) for _ in range(n)]

    started_at, stop = 3, 5
    args, _ = resume_stream(None, started_at, seed=4, world_size=1, loader_workers=2)
    whole = batches(6, **args)
    next_samples: dict[int, tuple[int, int]] = {}
    for batch in whole[: stop - started_at]:
        record_consumed(next_samples, batch)
    saved = stream_checkpoint(args["seed"], 2, next_samples, next_reader=(stop - started_at) % 2)
    args, _ = resume_stream(saved, stop, seed=4, world_size=1, loader_workers=2)
    rest = batches(6 - (stop - started_at), **args)
    assert [b["id"] for b in rest] == [b["id"] for b in whole[stop - started_at :]]


def test_a_stream_whose_layout_changed_starts_anew_and_says_why() -> None:
    saved = stream_checkpoint(4, 2, {0: (1, 3), 1: (1, 2)}, next_reader=0)
    args, how = resume_stream(saved, 12, seed=4, world_size=1, loader_workers=4)
    assert args == {"seed": 16}
    assert how == (
        "data: a new stream, seeded 16: the checkpoint's stream had 2 parts, now 4 "
        "(1 workers x 4 loader workers)"
    )
    args, how = resume_stream(None, 12, seed=4, world_size=2, loader_workers=1)
    assert args == {"seed": 16} and how.endswith("the checkpoint has no stream position")
    # Shards split into parts another way before (layout 1): positions saved then point
    # elsewhere now, unless one part is all the data.
    assert ShardDataset.partition_layout == 2
    old = {k: v for k, v in saved.items() if k != "layout"}  # a checkpoint from before
    args, how = resume_stream(old, 12, seed=4, world_size=1, loader_workers=2, layout=2)
    assert args == {"seed": 16}
    assert how.endswith("the checkpoint's stream split the data into its 2 parts another way")
    args, how = resume_stream(old, 12, seed=4, world_size=2, loader_workers=0, layout=1)
    assert args["start"] == {0: (1, 3), 1: (1, 2)}  # other sources: one layout all along
    saved = stream_checkpoint(4, 2, {0: (1, 3), 1: (1, 2)}, next_reader=0, layout=2)
    args, _ = resume_stream(saved, 12, seed=4, world_size=1, loader_workers=2, layout=2)
    assert args["start"] == {0: (1, 3), 1: (1, 2)}
    one = stream_checkpoint(4, 1, {0: (2, 5)}, next_reader=0)  # layout 1, one part
    args, _ = resume_stream(one, 12, seed=4, world_size=1, loader_workers=0, layout=2)
    assert args["start"] == {0: (2, 5)}


def test_stream_dataset_shards_two_workers(tmp_path: Path) -> None:
    write_shards(_records(9), str(tmp_path), shard_size=2)
    cfg = DataConfig(dataset="shards", root=str(tmp_path), image_size=16)
    stream = StreamDataset(create_dataset(cfg, "train"), eval_sample_transform(cfg), loop=False)
    batches = list(DataLoader(stream, batch_size=4, num_workers=2))
    assert sorted(i for b in batches for i in b["id"]) == [r["id"] for r in _records(9)]
    assert all(b["label"].shape[1:] == (16, 16) for b in batches)


def test_stream_dataset_eval_mixed_labels(tmp_path: Path) -> None:
    root = tmp_path / "val"
    _save(root / "images" / "x.png", np.zeros((20, 30, 3), np.uint8))
    _save(root / "labels" / "x.png", np.full((20, 30), 2, np.uint8))
    _save(root / "images" / "y.png", np.zeros((20, 30, 3), np.uint8))
    cfg = DataConfig(dataset="folder", root=str(tmp_path), image_size=16)
    source = create_dataset(cfg, "val")
    stream = StreamDataset(source, eval_sample_transform(cfg), loop=False, shuffle=False)
    (batch,) = list(DataLoader(stream, batch_size=2))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].dtype == torch.uint8
    assert (batch["label"][0] == 2).all() and (batch["label"][1] == 255).all()
    assert batch["id"] == ["x", "y"]


def test_create_dataset_registry() -> None:
    val = create_dataset(DataConfig(synthetic_val_size=7, image_size=32), "val")
    assert len(val) == 7 and val.split == "val"
    with pytest.raises(DataError) as exc:
        create_dataset(DataConfig(dataset="imagenet"), "train")
    _one_line_data_error(exc, "'imagenet'", "folder", "shards", "synthetic")
