"""pipelines/prepare_data.py: standard layout -> Parquet shards + manifest, as a user runs it.

The CamVid tests read ../shared/data/camvid in place (skipped when absent); the rest use
tiny folders the tests write.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from services import free_port

from pipelines.common import UserError
from pipelines.prepare_data import main
from san.data import FolderDataset, ShardDataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "prepare_data.py"
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
needs_camvid = pytest.mark.skipif(
    not CAMVID.is_dir(), reason=f"real CamVid data not found at {CAMVID} (shared/data/README.md)"
)
CAMVID_CLASSES = "sky,building,pole,road,pavement,tree,sign/symbol,fence,car,pedestrian,bicyclist"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def manifest_of(url: Path) -> dict:
    return json.loads((url / "manifest.json").read_text())


@pytest.fixture(scope="module")
def camvid_val(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """CamVid val prepared once, through the script, as a user would run it."""
    if not CAMVID.is_dir():
        pytest.skip(f"real CamVid data not found at {CAMVID} (shared/data/README.md)")
    out = tmp_path_factory.mktemp("prep") / "camvid"
    proc = run_script(
        "--dataset", "folder", "--source", str(CAMVID), "--out", str(out),
        "--split", "val", "--shard-size", "40", "--class-names", CAMVID_CLASSES,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, last_json(proc.stdout)


@needs_camvid
def test_camvid_val_shards(camvid_val: tuple[Path, dict]) -> None:
    out, result = camvid_val
    summary = result["splits"]["val"]
    assert summary["status"] == "written" and summary["n_images"] == 101
    assert summary["n_shards"] == 3 and summary["n_skipped"] == 0
    manifest = manifest_of(out / "val")
    assert manifest["n_images"] == 101 and manifest["n_labelled"] == 101
    assert manifest["n_source"] == 101 and manifest["skipped"] == []
    assert manifest["class_names"] == CAMVID_CLASSES.split(",") and manifest["n_classes"] == 11
    assert manifest["dataset"] == "folder" and manifest["source_fingerprint"]["n_items"] == 101
    assert [s["rows"] for s in manifest["shards"]] == [40, 40, 21]
    for shard in manifest["shards"]:
        data = (out / "val" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert sorted(p.name for p in (out / "val").iterdir()) == [
        "manifest.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"
    ]  # fmt: skip
    # Bit-exact: every stored image and label is the source file's bytes.
    seen = 0
    for shard in manifest["shards"]:
        table = pq.read_table(out / "val" / shard["file"]).to_pylist()
        for row in table:
            assert row["image"] == (CAMVID / "val" / "images" / f"{row['id']}.jpg").read_bytes()
            assert row["label"] == (CAMVID / "val" / "labels" / f"{row['id']}.png").read_bytes()
            assert (row["width"], row["height"]) == (240, 180)
            seen += 1
    assert seen == 101
    ds = ShardDataset(str(out), "val")
    assert len(ds) == 101 and ds.n_classes == 11
    ds.verify()


@needs_camvid
def test_camvid_rerun_is_idempotent(
    camvid_val: tuple[Path, dict], capsys: pytest.CaptureFixture
) -> None:
    out, _ = camvid_val
    before = mtimes(out)
    main(["--dataset", "folder", "--source", str(CAMVID), "--out", str(out), "--split", "val",
          "--shard-size", "40", "--class-names", CAMVID_CLASSES])  # fmt: skip
    result = last_json(capsys.readouterr().out)
    assert result["splits"]["val"]["status"] == "unchanged"
    assert result["splits"]["val"]["n_images"] == 101
    assert mtimes(out) == before


# ----------------------------------------------------------------------------- tiny folders


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _folder(root: Path, n: int = 4, bad: bool = False) -> Path:
    """root/train/{images,labels}; with `bad`, one corrupt image and one mis-sized label."""
    (root / "train" / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = np.full((8, 10, 3), 20 * i, np.uint8)
        _save(root / "train" / "images" / f"img{i}.png", rgb)
        _save(root / "train" / "labels" / f"img{i}.png", np.full((8, 10), i % 3, np.uint8))
    if bad:
        (root / "train" / "images" / "broken.jpg").write_bytes(b"not a jpeg at all")
        _save(root / "train" / "images" / "wrongsize.png", np.zeros((8, 10, 3), np.uint8))
        _save(root / "train" / "labels" / "wrongsize.png", np.zeros((7, 10), np.uint8))
    return root


def _args(source: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["--dataset", "folder", "--source", str(source), "--out", str(out), "--split", "train",
            "--shard-size", "2", *extra]  # fmt: skip


def test_bad_samples_skipped_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _folder(tmp_path / "src", bad=True)
    out = tmp_path / "out"
    main(_args(source, out, "--on-bad", "skip"))
    captured = capsys.readouterr()
    reported = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert len(reported) == 2
    assert "broken" in reported[0] and "wrongsize" in reported[1] and "10x7" in reported[1]
    summary = last_json(captured.out)["splits"]["train"]
    assert (summary["n_images"], summary["n_skipped"], summary["n_shards"]) == (4, 2, 2)
    manifest = manifest_of(out / "train")
    assert [s["id"] for s in manifest["skipped"]] == ["broken", "wrongsize"]
    assert manifest["n_source"] == 6 and manifest["n_skipped"] == 2
    assert len(ShardDataset(str(out), "train")) == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_bad_sample_fails_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    source = _folder(tmp_path / "src", bad=True)
    out = tmp_path / "out"
    proc = run_script(*_args(source, out, "--on-bad", "fail"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'broken'" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "train" / "manifest.json").exists()
    assert list(out.rglob("*")) == []  # no shards, no temporary prefix


def test_changed_source_is_rewritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _folder(tmp_path / "src", n=5)
    out = tmp_path / "out"
    main(_args(source, out))
    assert manifest_of(out / "train")["n_shards"] == 3
    main(_args(source, out))
    assert last_json(capsys.readouterr().out)["splits"]["train"]["status"] == "unchanged"
    for i in (3, 4):  # fewer images: the stale third shard must go
        (source / "train" / "images" / f"img{i}.png").unlink()
    main(_args(source, out))
    summary = last_json(capsys.readouterr().out)["splits"]["train"]
    assert (summary["status"], summary["n_images"]) == ("written", 3)
    rewritten = manifest_of(out / "train")["shards"]
    assert len(rewritten) == 2 and all(s["file"].startswith("shard-") for s in rewritten)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        ["manifest.json"] + [s["file"] for s in rewritten]
    )  # the stale third shard is gone
    ShardDataset(str(out), "train").verify()
    main(_args(source, out, "--shard-size", "3"))  # other options: rewritten too
    assert last_json(capsys.readouterr().out)["splits"]["train"]["status"] == "written"


def test_failed_rewrite_leaves_the_old_shards_whole(tmp_path: Path) -> None:
    """A rewrite whose move into place fails (here a shard lost from the temporary prefix;
    disk full or a dropped connection alike) used to have removed the old manifest and
    overwritten old shards by then: neither dataset was left. Now the old one reads as
    before, and none of the new shards stays behind."""
    from pipelines.prepare_data import promote
    from san.data import write_shards

    source = _folder(tmp_path / "src", n=5)
    out = tmp_path / "out"
    main(_args(source, out))
    before = sorted(p.name for p in (out / "train").iterdir())
    old = [s["id"] for s in ShardDataset(str(out), "train").iter_partition(0, 1, 0, False, 0)]

    records = list(FolderDataset(str(source), "train").iter_records())[:4]
    manifest = write_shards(records, str(tmp_path / "tmp"), shard_size=2)
    (tmp_path / "tmp" / manifest["shards"][1]["file"]).unlink()
    with pytest.raises(FileNotFoundError):
        promote(str(tmp_path / "tmp"), str(out / "train"), manifest, "abc")
    assert sorted(p.name for p in (out / "train").iterdir()) == before
    dataset = ShardDataset(str(out), "train")
    dataset.verify()
    assert [s["id"] for s in dataset.iter_partition(0, 1, 0, False, 0)] == old


def test_raw_image_encoding(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--image-encoding raw: the same pixels, stored decoded; switching it rewrites the split."""
    source = _folder(tmp_path / "src", n=3)
    out = tmp_path / "out"
    main(_args(source, out, "--image-encoding", "raw"))
    manifest = manifest_of(out / "train")
    assert manifest["image_encoding"] == "raw" and manifest["options"]["image_encoding"] == "raw"
    assert manifest["label_encoding"] == "raw"
    raw = {
        s["id"]: s["image"]
        for s in ShardDataset(str(out), "train").iter_partition(0, 1, 0, False, 0)
    }
    folder = FolderDataset(str(source), "train")
    assert sorted(raw) == sorted(folder.ids)
    for i, sample_id in enumerate(folder.ids):
        assert torch.equal(raw[sample_id], folder[i]["image"])
    capsys.readouterr()
    main(_args(source, out))
    assert last_json(capsys.readouterr().out)["splits"]["train"]["status"] == "written"
    assert manifest_of(out / "train")["image_encoding"] == "source"


def test_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        main(_args(tmp_path / "nowhere", tmp_path / "out"))
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="no .jpg") as exc:
        main(_args(tmp_path / "empty", tmp_path / "out"))
    assert "\n" not in str(exc.value)
    source = _folder(tmp_path / "src", n=0, bad=True)
    with pytest.raises(UserError, match="no samples"):
        main(_args(source, tmp_path / "out2", "--on-bad", "skip"))


@pytest.mark.e2e
def test_s3_output(s3_env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Shards written to and read back from a real (moto) S3 endpoint; rerun is a no-op."""
    bucket = s3_env.make_bucket("prepared")
    source = _folder(tmp_path / "src", n=5, bad=True)
    url = f"{bucket}/tiny"
    main(_args(source, url))
    summary = last_json(capsys.readouterr().out)["splits"]["train"]
    assert (summary["n_images"], summary["n_skipped"], summary["status"]) == (5, 2, "written")
    ds = ShardDataset(url, "train")
    assert len(ds) == 5 and [s["id"] for s in ds.manifest["skipped"]] == ["broken", "wrongsize"]
    ds.verify()
    keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket="prepared")["Contents"])
    assert keys == ["tiny/train/manifest.json"] + [
        f"tiny/train/shard-0000{i}.parquet" for i in range(3)
    ]
    main(_args(source, url))
    assert last_json(capsys.readouterr().out)["splits"]["train"]["status"] == "unchanged"

    with pytest.raises(UserError, match="does not exist") as exc:
        main(_args(source, "s3://no-such-bucket/x"))
    assert "\n" not in str(exc.value)


def test_unreachable_s3_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    source = _folder(tmp_path / "src", n=1)
    with pytest.raises(UserError, match="unreachable") as exc:
        main(_args(source, "s3://bucket/prefix"))
    assert "\n" not in str(exc.value)
