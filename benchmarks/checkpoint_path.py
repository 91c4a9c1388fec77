"""Checkpointing to object storage: how long the training loop waits at each checkpoint.

    .venv/bin/python benchmarks/checkpoint_path.py [--quick] [--repeats N]

Runs pipelines/train.py's `train()` (local Ray Train, 1 worker; MLflow in a SQLite file)
on synthetic scenes with default.yaml's model (its AdamW state makes a checkpoint about
three times the weights), checkpointing every few steps to a bucket of a real local S3
endpoint (moto's server), once per value of run.checkpoint_upload, alternating:

- "sync": the loop waits for each upload before training on;
- "async" (the default): Ray Train uploads in a background thread while the loop trains.

Each pair runs over two links to the endpoint: straight (127.0.0.1), and through a proxy
that caps uploads at --link-mbps, sleeping between chunks: a remote store's network,
whose waiting costs this machine no CPU. The loop logs checkpoint_wait_s to MLflow, the
seconds from gathering the state to training on (evaluation, which both pay, is not in
it). The table gives its median per mode and link, each run's wall time, and the CPU
the endpoint used per checkpoint.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, CpuMeter, machine, median, parse_args, table, write_results

sys.path.insert(0, str(ROOT / "tests"))
from services import S3Server  # noqa: E402

MODES = ("sync", "async")


class ThrottledLink:
    """A TCP proxy on 127.0.0.1 in front of `target_port`; bytes toward the target (uploads)
    are capped at `rate` bytes/s (None: not capped) by sleeping, not spinning. The cap is
    shared by all connections, as a link's bandwidth is (pyarrow uploads a file's parts
    over several at once)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.rate: float | None = None
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the link has sent every chunk handed to it so far
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst, capped in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, capped), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, capped: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if capped and self.rate:
                    with self._lock:
                        self._free_at = max(self._free_at, time.monotonic())
                        self._free_at += len(chunk) / self.rate
                        sent_at = self._free_at
                    time.sleep(max(0.0, sent_at - time.monotonic()))
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # the other side closed
            pass

    def close(self) -> None:
        self.server.close()


def run_once(mode: str, tag: str, bucket: str, steps: int, every: int, endpoint_pid: int) -> dict:
    """One training run with run.checkpoint_upload=mode: its wall time, the loop's wait at
    each checkpoint, and the CPU seconds the S3 endpoint used meanwhile."""
    from pipelines import tracking
    from pipelines.common import CONFIG_DIR
    from pipelines.train import train
    from san.config import load_config

    overrides = [
        f"run.name=checkpoint-path-{tag}",
        f"run.storage={bucket}/runs",
        f"run.checkpoint_upload={mode}",
        f"optim.max_steps={steps}",
        f"run.checkpoint_every={every}",
        f"run.log_every={every}",
        "run.keep_checkpoints=0",
        "run.probe_steps=0",
        "run.n_viz_images=0",
        "run.experiment=san-checkpoint-path",
        "data.image_size=32",
        "data.synthetic_val_size=8",
        "data.loader_workers=0",
        "optim.batch_size=4",
        # One core for training, the other left to the endpoint: a remote store does its
        # share of an upload on its own machines.
        "run.cpus_per_worker=1",
    ]
    cfg = load_config(CONFIG_DIR / "default.yaml", overrides)
    meter = CpuMeter(endpoint_pid)
    meter.start()
    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    meter.stop()
    history = tracking.client().get_metric_history(result["mlflow_run_id"], "checkpoint_wait_s")
    return {
        "seconds": seconds,
        "waits": [m.value for m in sorted(history, key=lambda m: m.step)],
        "endpoint_cpu_s": meter.used_s,
        "checkpoint": result["checkpoint"],
    }


def upload_alone(checkpoint: str, work: Path, rounds: int) -> tuple[float, float]:
    """(MiB, median seconds) of copying one checkpoint folder to the endpoint with pyarrow,
    as Ray Train uploads it."""
    import pyarrow.fs as pafs

    from san.storage import pyarrow_filesystem

    fs, path = pyarrow_filesystem(checkpoint)
    local = work / "one-checkpoint"
    local.mkdir()
    pafs.copy_files(path, str(local), fs, pafs.LocalFileSystem())
    size = sum(p.stat().st_size for p in local.iterdir()) / 2**20
    times = []
    for i in range(rounds):
        _, target = pyarrow_filesystem(f"{checkpoint}-copy-{i}")
        start = time.perf_counter()
        pafs.copy_files(str(local), target, pafs.LocalFileSystem(), fs)
        times.append(time.perf_counter() - start)
    return size, median(times)


def main() -> None:
    def add(parser) -> None:
        parser.add_argument("--repeats", type=int, default=None)
        parser.add_argument("--link-mbps", type=float, default=400.0, help="capped link, Mbit/s")

    args = parse_args(__doc__.splitlines()[0], add)
    repeats = args.repeats or (1 if args.quick else 3)
    steps, every = (4, 2) if args.quick else (72, 24)
    capped = f"capped at {args.link_mbps:g} Mbit/s"
    links = {"127.0.0.1": None, capped: args.link_mbps * 1e6 / 8}
    facts = machine()
    work = Path(tempfile.mkdtemp(prefix="san-bench-checkpoint-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    s3 = S3Server(work)
    link = None
    try:
        s3.start()
        link = ThrottledLink(s3.port)
        proxied = f"http://127.0.0.1:{link.port}"
        os.environ.update(s3.env, AWS_ENDPOINT_URL=proxied, AWS_ENDPOINT_URL_S3=proxied)
        bucket = s3.make_bucket("bench-checkpoints")
        # Untimed: starts Ray and warms imports and caches, which the first timed run
        # would otherwise pay alone.
        run_once("async", "warm-up", bucket, 2, 2, s3.proc.pid)
        runs: dict[tuple[str, str], list[dict]] = {(n, m): [] for n in links for m in MODES}
        for r in range(repeats):
            for name, rate in links.items():
                link.rate = rate
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    tag = f"{mode}-{'capped' if rate else 'direct'}-{r}"
                    run = run_once(mode, tag, bucket, steps, every, s3.proc.pid)
                    runs[(name, mode)].append(run)
                    print(f"repeat {r} {name} {mode}: {run}", flush=True)
        link.rate = None
        checkpoint = runs[("127.0.0.1", "sync")][0]["checkpoint"]
        size, upload_s = upload_alone(checkpoint, work, 3 if args.quick else 5)
    finally:
        if link:
            link.close()
        s3.stop()
        import ray

        ray.shutdown()
    rows = []
    for name in links:
        base = runs[(name, "sync")]
        for mode in MODES:
            done = runs[(name, mode)]
            waits = [w for run in done for w in run["waits"]]
            rows.append(
                [
                    name,
                    mode,
                    len(done[0]["waits"]),
                    median(waits),
                    median(waits) / median([w for run in base for w in run["waits"]]),
                    ", ".join(f"{w:.2f}" for w in waits),
                    median([run["seconds"] for run in done]),
                    median([a["seconds"] / b["seconds"] for a, b in zip(done, base, strict=True)]),
                    median([(run["endpoint_cpu_s"] or 0) / len(run["waits"]) for run in done]),
                ]
            )
    main_table = table(
        [
            "link to the endpoint",
            "run.checkpoint_upload",
            "checkpoints per run",
            "median checkpoint_wait_s",
            "x sync (wait)",
            "every checkpoint_wait_s",
            "median run s",
            "x sync (run, median of repeats)",
            "endpoint CPU s per checkpoint",
        ],
        rows,
    )
    setup = (
        f"default.yaml's model at 32 px, batch 4, {steps} steps, a checkpoint every {every} "
        f"steps (the last one too), {repeats} alternating repeats per mode and link, after "
        f"an untimed warm-up run; the training worker computes on one core "
        f"(run.cpus_per_worker=1). Storage: a bucket of a local S3 endpoint (moto server, "
        f"on the same machine: its share of an upload runs on the other core). One "
        f"checkpoint: {size:.1f} MiB (weights, AdamW state, config, manifest); uploading it "
        f"alone over 127.0.0.1 (pyarrow copy_files, as Ray Train does) takes {upload_s:.2f} "
        f"s (median)."
    )
    notes = """
checkpoint_wait_s is what the training loop spends per checkpoint besides evaluation:
gathering the state, writing it (torch.save, sha256 manifest) to local disk, and with
"sync" the upload. With "async" the upload overlaps training; a run still ends only after
its last upload, so at best a run saves the uploads of all its checkpoints but the last.
Over 127.0.0.1 an upload is CPU work on this 2-core machine (moto's Python endpoint, the
client's HTTP and checksums) that, overlapped, competes with training's steps; over a
link that waits on the network (the capped rows, as a remote S3 or MinIO), the loop
trains through the upload. Either way the saving needs an upload to take less time than
the steps between two checkpoints: closer checkpoints queue their uploads (one at a
time, each a local copy on disk) and the run waits for the queue at its end.
"""
    write_results(
        "checkpoint_path",
        "Checkpointing to object storage: training-loop wait per checkpoint",
        args.out,
        facts,
        main_table,
        notes,
        sections=[("Setup", setup)],
    )


if __name__ == "__main__":
    main()
