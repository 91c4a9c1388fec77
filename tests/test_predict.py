"""Batch prediction (pipelines/predict.py): the per-batch Predictor, then s3 -> s3 on CamVid val."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.predict import MASK_DIR, Predictor, finished_ids, plan_input
from san import storage
from san.config import load_config
from san.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CAMVID_VAL = ROOT.parent / "shared" / "data" / "camvid" / "val" / "images"


def make_checkpoint(url: str) -> None:
    """A randomly initialised tiny SAN saved as a checkpoint: enough to test the plumbing."""
    cfg = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = create_model(cfg)
    storage.save_checkpoint(url, {"model": model.state_dict(), "step": 0}, cfg.to_dict())


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return im.size


def test_predictor_writes_masks_and_skips(tmp_path: Path) -> None:
    """Without Ray: one batch written (mask size = image size), known-done ids skipped."""
    make_checkpoint(str(tmp_path / "ckpt"))
    images = tmp_path / "in" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (30, 50), "b": (40, 24)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            images / f"{name}.png"
        )
    plan = plan_input(str(tmp_path / "in"), "val")
    assert plan.kind == "folder" and sorted(plan.images) == ["a", "b"]
    out = str(tmp_path / "out")
    predictor = Predictor(str(tmp_path / "ckpt"), out, overlay=True, skip=frozenset({"b"}))
    batch = {
        "id": np.array(["a", "b"], dtype=object),
        "url": np.array([plan.images["a"], plan.images["b"]], dtype=object),
    }
    result = predictor(batch)
    assert list(result["status"]) == ["written", "skipped"]
    assert png_size((tmp_path / "out" / MASK_DIR / "a.png").read_bytes()) == (50, 30)
    assert (tmp_path / "out" / "overlays" / "a.png").is_file()
    assert finished_ids(out) == {"a"}


def test_ids_with_folders_are_kept_and_ids_that_leave_the_output_are_bad(tmp_path: Path) -> None:
    """Shard ids may hold folders (seq01/0001): their masks were written in a subfolder
    that a rerun's listing never saw, so they were redone every time. An id with '..'
    wrote outside the output."""
    make_checkpoint(str(tmp_path / "ckpt"))
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(image)
    out = tmp_path / "out" / "run"
    predictor = Predictor(str(tmp_path / "ckpt"), str(out), overlay=True)
    ids = ["seq01/0001", "../../escaped", "/abs", "a\\b", "seq01//x", "./a"]
    batch = {
        "id": np.array(ids, dtype=object),
        "url": np.array([str(image)] * len(ids), dtype=object),
    }
    assert list(predictor(batch)["status"]) == ["written"] + ["bad"] * 5
    assert png_size((out / MASK_DIR / "seq01" / "0001.png").read_bytes()) == (10, 12)
    assert finished_ids(str(out), overlay=True) == {"seq01/0001"}
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["0001.png", "0001.png", "a.png"]


@pytest.mark.e2e
def test_predict_camvid_s3_to_s3(s3_env, tmp_path: Path) -> None:
    """CamVid val uploaded to a real S3 endpoint, predicted s3 -> s3, then rerun skips all."""
    if not CAMVID_VAL.is_dir():
        pytest.skip(f"CamVid val images not found at {CAMVID_VAL} (see shared/data/README.md)")
    files = sorted(p for p in CAMVID_VAL.iterdir() if p.suffix.lower() == ".jpg")
    bucket = s3_env.make_bucket("predict-test")
    s3 = s3_env.client()
    for path in files:  # read in place, uploaded straight from the shared folder
        s3.upload_file(str(path), "predict-test", f"camvid/val/images/{path.name}")
    checkpoint = f"{bucket}/ckpt/checkpoint_0000000"
    make_checkpoint(checkpoint)
    output = f"{bucket}/pred"
    cmd = [
        sys.executable,
        str(ROOT / "pipelines" / "predict.py"),
        "--checkpoint", checkpoint,
        "--input", f"{bucket}/camvid/val",
        "--output", output,
        "--batch-size", "16",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def run() -> dict:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run()
    assert first == {
        "total": len(files), "written": len(files), "skipped": 0, "bad": 0, "output": output
    }  # fmt: skip
    assert len(files) == 101
    masks = s3.list_objects_v2(Bucket="predict-test", Prefix="pred/masks/")["Contents"]
    assert len(masks) == len(files)
    for path in files[:5]:
        with Image.open(path) as im:
            size = im.size
        mask = storage.read_bytes(f"{output}/{MASK_DIR}/{path.stem}.png")
        assert png_size(mask) == size
    second = run()
    assert second == {
        "total": len(files), "written": 0, "skipped": len(files), "bad": 0, "output": output
    }  # fmt: skip


def test_shard_input_is_planned_and_predicted(tmp_path: Path) -> None:
    """Parquet shards: found through their manifest; rows (encoded bytes) are segmented."""
    from san.data import encode_png, write_shards

    rng = np.random.default_rng(1)
    samples = []
    for name in ("x", "y", "z"):
        pixels = rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)
        samples.append(
            {"id": name, "image_bytes": encode_png(pixels), "label_bytes": None, "width": 28,
             "height": 20}
        )  # fmt: skip
    write_shards(samples, str(tmp_path / "shards" / "val"), shard_size=2)
    plan = plan_input(str(tmp_path / "shards"), "val")
    assert plan.kind == "shards" and len(plan.shards) == 2
    assert all(Path(s).is_file() for s in plan.shards)
    make_checkpoint(str(tmp_path / "ckpt"))
    predictor = Predictor(str(tmp_path / "ckpt"), str(tmp_path / "out"), overlay=False)
    batch = {
        "id": np.array(["x", "y"], dtype=object),
        "image": np.array([s["image_bytes"] for s in samples[:2]], dtype=object),
        "height": np.array([20, 20]),
        "width": np.array([28, 28]),
    }
    assert list(predictor(batch)["status"]) == ["written", "written"]
    assert png_size((tmp_path / "out" / MASK_DIR / "y.png").read_bytes()) == (28, 20)


def test_raw_shard_rows_are_predicted(tmp_path: Path) -> None:
    """Shards written with image_encoding="raw": planned as raw, rows decoded by size."""
    from san.data import encode_png, write_shards

    pixels = np.random.default_rng(2).integers(0, 255, (20, 28, 3), dtype=np.uint8)
    sample = {"id": "r", "image_bytes": encode_png(pixels), "label_bytes": None, "width": 28,
              "height": 20}  # fmt: skip
    write_shards([sample], str(tmp_path / "shards" / "val"), image_encoding="raw")
    plan = plan_input(str(tmp_path / "shards"), "val")
    assert plan.kind == "shards" and plan.image_encoding == "raw"
    make_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "out"
    predictor = Predictor(str(tmp_path / "ckpt"), str(out), overlay=False, image_encoding="raw")
    batch = {
        "id": np.array(["r"], dtype=object),
        "image": np.array([pixels.tobytes()], dtype=object),
        "height": np.array([20]),
        "width": np.array([28]),
    }
    assert list(predictor(batch)["status"]) == ["written"]
    assert png_size((out / MASK_DIR / "r.png").read_bytes()) == (28, 20)
    # The same image through the "source" path gives the same mask.
    source = Predictor(str(tmp_path / "ckpt"), str(tmp_path / "out2"), overlay=False)
    batch["image"] = np.array([sample["image_bytes"]], dtype=object)
    source(batch)
    assert (out / MASK_DIR / "r.png").read_bytes() == (
        tmp_path / "out2" / MASK_DIR / "r.png"
    ).read_bytes()


def test_checkpoint_loads_without_the_vit_weights_file_training_read(tmp_path: Path) -> None:
    """model.vit_weights is training's starting point: the checkpoint replaces those
    weights, so evaluating or predicting elsewhere (the file not copied, or moved) must not
    need the file. Both used to stop with FileNotFoundError."""
    from pipelines.evaluate import load_model

    cfg = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml")
    weights = tmp_path / "vit.pt"
    torch.save(create_model(cfg).semantic.vit.state_dict(), weights)
    cfg = load_config(
        ROOT / "pipelines" / "configs" / "tiny.yaml", [f"model.vit_weights={weights}"]
    )
    model = create_model(cfg)
    url = str(tmp_path / "checkpoint_0000005")
    storage.save_checkpoint(url, {"model": model.state_dict(), "step": 5}, cfg.to_dict())
    weights.unlink()

    loaded, loaded_cfg, _ = load_model(url, [])
    assert loaded_cfg.model.vit_weights == str(weights)  # the run's config, as saved
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].cpu(), tensor), name
    predictor = Predictor(url, str(tmp_path / "out"), overlay=False)
    assert torch.equal(predictor.model.semantic.vit.pos_embed.cpu(), model.semantic.vit.pos_embed)


def test_a_bad_image_is_counted_and_the_rest_predicted(tmp_path: Path) -> None:
    """A corrupt (or vanished) image raised out of the actor and ended the job; sorted
    first, it stopped every rerun before the images after it. Now it is logged by id,
    counted "bad", and the batch's other images get their masks."""
    make_checkpoint(str(tmp_path / "ckpt"))
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG truncated")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(images / "c.png")
    plan = plan_input(str(images), "val")
    out = str(tmp_path / "out")
    predictor = Predictor(str(tmp_path / "ckpt"), out, overlay=False)
    ids = ["a", "b", "c"]
    urls = [plan.images["a"], str(images / "b.png"), plan.images["c"]]  # b: gone since
    result = predictor({"id": np.array(ids, dtype=object), "url": np.array(urls, dtype=object)})
    assert list(result["status"]) == ["bad", "bad", "written"]
    assert finished_ids(out) == {"c"}


def test_input_planning_refuses_what_it_cannot_name(tmp_path: Path) -> None:
    """a.jpg beside a.png: one was silently dropped (masks are named by id). A file as
    --input planned <file>/<file>. A manifest.json of another tool in an image folder
    was a KeyError traceback; it is not shards, so the images are read."""
    from pipelines.common import UserError

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / name)
    (folder / "manifest.json").write_text(json.dumps({"images": ["a.png", "b.png"]}))
    assert sorted(plan_input(str(folder), "val").images) == ["a", "b"]
    with pytest.raises(UserError, match="is a file: give the folder"):
        plan_input(str(folder / "a.png"), "val")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.jpg")
    with pytest.raises(UserError, match=r"images sharing an id .*\['a'\]"):
        plan_input(str(folder), "val")
    shards = tmp_path / "shards"
    shards.mkdir()
    damaged = {"format": "san-parquet-shards", "shards": [{"file": "shard-00000.parquet"}]}
    (shards / "manifest.json").write_text(json.dumps(damaged))
    with pytest.raises(UserError, match="manifest.json is damaged: 'shards' must list"):
        plan_input(str(shards), "val")


def test_actors_asking_for_gpus_a_local_ray_lacks_is_one_line(monkeypatch) -> None:
    """--num-gpus 1 on a machine without one: Ray Data waited forever for the actor."""
    from pipelines.common import UserError
    from pipelines.predict import check_local_actor_gpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match="need 2 GPUs but the local Ray has 1"):
        check_local_actor_gpus(num_actors=2, num_gpus=1, have=1)
    check_local_actor_gpus(num_actors=2, num_gpus=0.5, have=1)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster may autoscale
    check_local_actor_gpus(num_actors=2, num_gpus=1, have=0)


def test_a_rerun_with_overlay_draws_the_missing_overlays(tmp_path: Path) -> None:
    """Masks written without --overlay made a rerun with it skip every image: 0 written,
    no overlay. Finished now means both are there when overlays are asked for."""
    out = tmp_path / "out"
    (out / MASK_DIR).mkdir(parents=True)
    (out / "overlays").mkdir()
    for name in ("a", "b"):
        (out / MASK_DIR / f"{name}.png").write_bytes(b"mask")
    (out / "overlays" / "a.png").write_bytes(b"overlay")
    assert finished_ids(str(out)) == {"a", "b"}
    assert finished_ids(str(out), overlay=True) == {"a"}


def test_more_clusters_than_an_8_bit_mask_holds_is_one_line(tmp_path: Path) -> None:
    """Cluster ids past 255 wrapped around in the uint8 masks."""
    from pipelines.common import UserError
    from pipelines.predict import predict

    cfg = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml", ["model.n_clusters=300"])
    url = str(tmp_path / "ckpt")
    storage.save_checkpoint(
        url, {"model": create_model(cfg).state_dict(), "step": 0}, cfg.to_dict()
    )
    with pytest.raises(UserError, match="model.n_clusters=300 has ids past 255"):
        predict(url, str(tmp_path), str(tmp_path / "out"))
