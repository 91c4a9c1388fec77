"""One SAN training step on this CPU at the paper-like size (issue 2): batch 16, 96x96.

    .venv/bin/python benchmarks/cpu_step.py [--quick] [--steps N]

Model: the config defaults (resnet18 pixel encoder + vit_tiny_patch16_224, patch 16,
full depth 12). A step is Trainer.step on a pre-made batch (no data path): one
forward of both views (2 x 16 images), all four losses, backward, AdamW. Forward
alone is timed too, so the backward + optimiser share is visible. img/s counts
source images (16 per step), not views.
"""

from __future__ import annotations

import time

import torch
from common import (
    build_trainer,
    machine,
    median,
    parse_args,
    repeat,
    table,
    timed_steps,
    write_results,
)

from san.config import load_config
from san.models import count_parameters


def batch(n: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n)
    flip = torch.zeros(n, dtype=torch.bool)
    return {
        "view1": torch.randn(n, 3, size, size, generator=g),
        "view2": torch.randn(n, 3, size, size, generator=g),
        "box1": box,
        "box2": box,
        "flip1": flip,
        "flip2": flip,
    }


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0], lambda p: p.add_argument("--steps", type=int, default=None)
    )
    size, n = (32, 2) if args.quick else (96, 16)
    steps = args.steps or (2 if args.quick else 3)
    overrides = [f"data.image_size={size}", f"optim.batch_size={n}"]
    if args.quick:
        overrides += ["model.encoder=resnet10t", "model.vit_depth=1", "model.vit_patch_size=8"]
    cfg = load_config(None, overrides)
    facts = machine()
    trainer = build_trainer(cfg)
    model = trainer.model
    data = batch(n, size)
    both = torch.cat([data["view1"], data["view2"]])
    # Both thread counts, alternating: on this shared machine 2 OpenMP threads can lose
    # to 1 when other jobs hold the cores.
    thread_counts = [1] if args.quick else [2, 1]
    step_times: dict[int, list[float]] = {t: [] for t in thread_counts}
    fwd_times: dict[int, list[float]] = {t: [] for t in thread_counts}
    trainer.step(data)  # warm-up
    for r in range(1 if args.quick else 2):
        for threads in thread_counts if r % 2 == 0 else list(reversed(thread_counts)):
            torch.set_num_threads(threads)
            result = timed_steps(trainer, repeat(data), steps, warmup=0)
            step_times[threads].append(result["step_s_median"])
            model.train()
            with torch.no_grad():
                for _ in range(max(2, steps // 2)):
                    start = time.perf_counter()
                    model(both)
                    fwd_times[threads].append(time.perf_counter() - start)
    rows = []
    for threads in thread_counts:
        fwd_s, step_s = median(fwd_times[threads]), median(step_times[threads])
        rows.append([threads, "forward (no grad), 2 views", fwd_s * 1000, n / fwd_s, 2 * n / fwd_s])
        rows.append(
            [threads, "training step (fwd + bwd + AdamW)", step_s * 1000, n / step_s,
             2 * n / step_s]
        )  # fmt: skip
    header = ["torch threads", "what", "median ms", "img/s (source images)", "views/s"]
    setup = (
        f"{cfg.model.encoder} + {cfg.model.vit} (patch {cfg.model.vit_patch_size}, depth "
        f"{cfg.model.vit_depth or 'full (12)'}), stride {cfg.model.stride}, D "
        f"{cfg.model.embed_dim}, K {cfg.model.n_clusters}; batch {n} at {size}x{size} "
        f"(2 views each, one forward of {2 * n}); {count_parameters(model) / 1e6:.2f} M "
        f"parameters; precision {cfg.optim.precision}; {steps} timed steps after 1 warm-up; "
        "alternating thread counts."
    )
    notes = (
        "Measured on a shared, loaded 2-core machine: read the img/s as an order of "
        "magnitude (load average is in the header), not a precise rate."
    )
    write_results(
        "cpu_step",
        "SAN training step on CPU: batch 16, 96x96, resnet18 + ViT-tiny/16 (full depth)",
        args.out,
        facts,
        table(header, rows),
        notes=notes,
        sections=[("Setup", setup)],
    )


if __name__ == "__main__":
    main()
