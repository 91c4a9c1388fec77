"""SAN against its baselines on CamVid, under one budget, through the platform itself.

    python benchmarks/quality.py [--steps 300] [--seeds 0,1,2] [--image-size 64] [--quick]

Trains SAN, IIC and k-means-on-embeddings (same steps, image size, backbone,
K = 11, seeds) with `pipelines/train.py`'s `train()` on CamVid train (images
only), evaluates each on CamVid val (Hungarian pixel accuracy and mIoU, per-class
IoU, a linear probe fitted on train labels), then over-clusters the best method (K = 22, many-to-one
matching). Every run is an MLflow run under one parent run that holds the table
and the overlay panels of the same val images for each method. The table is
printed last and written to benchmarks/results/quality.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.common import CONFIG_DIR, resolve_storage, setup_logging  # noqa: E402

CAMVID = ROOT.parent / "shared" / "data" / "camvid"
CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign", "fence", "car", "pedestrian", "bicyclist",
]  # fmt: skip
METHODS = ("san", "iic", "kmeans")


def run_one(method: str, k: int, seed: int, args, parent_run_id: str) -> dict:
    """Train one method/seed through the platform; returns its final metrics and run id."""
    from pipelines import tracking
    from pipelines.train import train
    from san.config import load_config
    from san.storage import join

    overrides = [
        f"model.name={method}",
        f"model.n_clusters={k}",
        f"run.seed={seed}",
        f"optim.max_steps={args.steps}",
        f"optim.warmup_steps={max(1, args.steps // 10)}",
        f"data.image_size={args.image_size}",
        f"run.checkpoint_every={args.steps}",
        f"run.name=quality-{method}-k{k}-s{seed}-{args.steps}st-{args.image_size}px",
        "run.experiment=san-quality",
        # Each invocation checkpoints under its own MLflow parent run id: with one shared
        # folder a rerun (after a code change, or with other overrides) would resume the
        # earlier runs at their last step and report their models as its own.
        f"run.storage={join(args.storage, parent_run_id)}",
        "run.n_viz_images=4",
        f"data.root={CAMVID}",
        *args.overrides,
    ]
    cfg = load_config(CONFIG_DIR / "camvid.yaml", overrides)
    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    mlflow_client = tracking.client()
    mlflow_client.set_tag(result["mlflow_run_id"], "mlflow.parentRunId", parent_run_id)
    # Copy the run's final overlay panel to the parent so methods sit side by side.
    with tempfile.TemporaryDirectory() as tmp:
        picture = f"pictures/step_{args.steps:07d}_overlay.png"
        local = mlflow_client.download_artifacts(result["mlflow_run_id"], picture, tmp)
        mlflow_client.log_artifact(parent_run_id, local, f"panels/{method}-k{k}-seed{seed}")
    return {"method": method, "k": k, "seed": seed, "seconds": seconds, **result}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["k"]), []).append(row)
    header = (
        "| method | K | seeds | mIoU | pixel acc | probe mIoU | "
        + " | ".join(CLASSES)
        + " |\n|"
        + "---|" * (6 + len(CLASSES))
    )
    lines = [header]
    floor = [r["metrics"]["random_miou"] for r in rows if r["k"] == 11]
    floor_acc = [r["metrics"]["random_pixel_accuracy"] for r in rows if r["k"] == 11]
    for (method, k), group in groups.items():
        metric = [g["metrics"] for g in group]
        per_class = [
            f"{100 * statistics.mean(m.get(f'iou/{i}', 0.0) for m in metric):.1f}"
            for i in range(len(CLASSES))
        ]
        lines.append(
            f"| {method} | {k} | {len(group)} | {mean_std([m['miou'] for m in metric])} | "
            f"{mean_std([m['pixel_accuracy'] for m in metric])} | "
            f"{mean_std([m.get('probe_miou', 0.0) for m in metric])} | "
            + " | ".join(per_class)
            + " |"
        )
    lines.append(
        f"| random assignment | 11 | {len(floor)} | {mean_std(floor)} | {mean_std(floor_acc)} "
        "| - |" + " - |" * len(CLASSES)
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--storage", default="outputs/bench", help="checkpoints go to STORAGE/<parent run id>/"
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results"), help="folder for quality.md"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma list, e.g. san (check one change)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, one seed")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.image_size = 4, "0", 32
        args.overrides = [*args.overrides, "data.max_val_images=8", "optim.batch_size=4"]
    args.storage = resolve_storage(args.storage)
    if not CAMVID.is_dir():
        sys.exit(f"error: CamVid not found at {CAMVID} (see ../shared/data/README.md)")
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - set(METHODS):
        sys.exit(f"error: --methods={args.methods!r}; choose from {','.join(METHODS)}")
    setup_logging()

    from pipelines import tracking
    from pipelines.common import init_ray

    init_ray()
    mlflow_client = tracking.client()
    parent = mlflow_client.create_run(
        tracking.experiment_id("san-quality"),
        run_name=f"quality-{args.steps}st-{args.image_size}px",
        tags={"san.benchmark": "quality"},
    )
    parent_id = parent.info.run_id
    for key, value in {"steps": args.steps, "seeds": args.seeds, "image_size": args.image_size,
                       "overrides": " ".join(args.overrides)}.items():  # fmt: skip
        mlflow_client.log_param(parent_id, key, value)
    started = time.perf_counter()
    rows = [run_one(m, 11, s, args, parent_id) for m in methods for s in seeds]
    means = {m: statistics.mean(r["metrics"]["miou"] for r in rows if r["method"] == m)
             for m in methods}  # fmt: skip
    best = max(means, key=means.get)
    if len(methods) == len(METHODS):  # over-cluster the winner only in the full comparison
        rows += [run_one(best, 22, s, args, parent_id) for s in seeds]
    wall = time.perf_counter() - started

    text = table(rows)
    baselines = [means[m] for m in methods if m != "san"]
    lead = means["san"] - max(baselines) if "san" in means and baselines else float("nan")
    report = (
        f"# Quality: SAN vs baselines on CamVid\n\n"
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.node()}, "
        f"{os.cpu_count()} CPUs; wall time {wall / 60:.1f} min for {len(rows)} runs.\n\n"
        f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`\n\n"
        f"Budget per run: {args.steps} steps, {args.image_size}px, batch from camvid.yaml; "
        f"train on CamVid train images (no labels), evaluate on CamVid val (101 images); "
        f"the linear probe is fitted on frozen embeddings of labelled train images "
        f"(run.probe_images) and scored on every labelled val pixel, as STEGO reports it. "
        f"mIoU and accuracy in %, mean ± std over seeds {args.seeds}; K = 22 rows use "
        f"many-to-one majority matching."
        + (
            f" SAN lead over the best baseline: {100 * lead:.1f} mIoU points."
            if lead == lead
            else ""
        )
        + f"\n\n{text}\n"
    )
    out = Path(args.out) / "quality.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    mlflow_client.log_artifact(parent_id, str(out))
    for method, value in means.items():
        mlflow_client.log_metric(parent_id, f"miou_mean/{method}", value)
    if lead == lead:  # not NaN: SAN and a baseline both ran
        mlflow_client.log_metric(parent_id, "san_lead_points", 100 * lead)
    mlflow_client.set_terminated(parent_id)
    print(report)


if __name__ == "__main__":
    main()
