"""Accelerator speed switches: bf16 autocast, channels_last, fused AdamW, torch.compile; MFU.

    .venv/bin/python benchmarks/gpu.py [--quick] [--compile] [--steps N]

Each variant is the training Trainer.step with config switches (optim.precision,
optim.channels_last, optim.compile), not benchmark-only code; the fused AdamW is
what build_optimizer picks on CUDA and CPU. img/s counts source images (two views each).
MFU = (counted training FLOPs per image x img/s) / the device's bf16 matmul rate
measured here. On a machine without a GPU the same code runs on the CPU with a
small model, as a test of the code path: the results file then says so.
"""

from __future__ import annotations

import time

import torch
from common import machine, median, parse_args, table, write_results

from san.config import load_config
from san.data.transforms import jitter_params
from san.engine import Trainer, apply_memory_format, seed_everything
from san.models import create_model


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bf16_rate(dev: torch.device, quick: bool) -> float:
    """Measured dense bf16 matmul FLOP/s: the denominator of MFU."""
    n = 8192 if dev.type == "cuda" else (256 if quick else 1024)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    sync(dev)
    repeats = 20 if dev.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(dev)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def make_batch(n: int, size: int) -> dict:
    """A batch as the loader delivers it: uint8 views and their colour-jitter numbers on
    the host, so each timed step includes the copy to the device and the colour jitter and
    normalisation there (`finished_views`), as in training."""
    g = torch.Generator().manual_seed(0)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n)
    flip = torch.zeros(n, dtype=torch.bool)
    jitter = torch.tensor(
        [jitter_params(0.4, torch.rand(4, generator=g).tolist()) for _ in range(n)]
    )
    return {
        "view1": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        "view2": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        "box1": box,
        "box2": box,
        "flip1": flip,
        "flip2": flip,
        "jitter1": jitter,
        "jitter2": jitter.flip(0),
    }


def build(overrides: list[str], dev: torch.device) -> Trainer:
    cfg = load_config(None, overrides)
    seed_everything(0)
    model = apply_memory_format(create_model(cfg).to(dev), cfg.optim)
    return Trainer(model, cfg, dev)


def timed(trainer: Trainer, batch: dict, steps: int, warmup: int, dev) -> float:
    for _ in range(warmup):
        trainer.step(batch)
    sync(dev)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(batch)
        sync(dev)
        times.append(time.perf_counter() - start)
    return median(times)


def count_flops(overrides: list[str], batch: dict, dev) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    trainer = build(overrides, dev)
    with FlopCounterMode(display=False) as counter:
        trainer.step(batch)
    return float(counter.get_total_flops())


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        lambda p: (
            p.add_argument("--compile", action="store_true", help="add the torch.compile variant"),
            p.add_argument("--steps", type=int, default=None),
        ),
    )
    dev = device()
    on_gpu = dev.type == "cuda"
    if on_gpu:
        size, n = 96, 64
        model = ["model.encoder=resnet18", "model.vit_patch_size=16"]
    elif args.quick:
        size, n = 32, 2
        model = ["model.encoder=resnet10t", "model.vit_depth=1", "model.vit_patch_size=8"]
    else:
        size, n = 64, 8
        model = ["model.encoder=resnet10t", "model.vit_depth=4", "model.vit_patch_size=8"]
    steps = args.steps or (2 if args.quick else (30 if on_gpu else 6))
    warmup = 5 if on_gpu else 1
    base = model + [f"data.image_size={size}", f"optim.batch_size={n}"]
    variants = {
        "fp32": [],
        "bf16 autocast": ["optim.precision=bf16"],
        "bf16 + channels_last": ["optim.precision=bf16", "optim.channels_last=true"],
    }
    if args.compile:
        variants["bf16 + channels_last + compile"] = [
            "optim.precision=bf16",
            "optim.channels_last=true",
            "optim.compile=true",
        ]
    facts = machine()
    facts["device"] = torch.cuda.get_device_name(0) if on_gpu else "CPU (no GPU on this machine)"
    batch = make_batch(n, size)
    peak = bf16_rate(dev, args.quick)
    flops = count_flops(base, batch, dev) / n
    trainers = {name: build(base + extra, dev) for name, extra in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for trainer in trainers.values():  # compile and warm every variant first
        timed(trainer, batch, 0, warmup, dev)
    repeats = 1 if args.quick else 2
    for r in range(repeats):
        for name in list(trainers) if r % 2 == 0 else list(reversed(trainers)):
            times[name].append(timed(trainers[name], batch, steps, 0, dev))
    rows = []
    fp32 = median(times["fp32"])
    for name, trainer in trainers.items():
        step = median(times[name])
        img_s = n / step
        fused = bool(trainer.optimizer.defaults.get("fused"))
        rows.append([name, step * 1000, img_s, fp32 / step, flops * img_s / peak * 100, fused])
    header = ["variant", "median step ms", "img/s", "x fp32", "MFU %", "fused AdamW"]
    where = (
        f"Measured on {facts['device']}."
        if on_gpu
        else "NOT measured on a GPU: this machine has none. The CPU run only tests the code "
        "path (same switches, small model); its img/s and MFU say nothing about a GPU. "
        "Run `python benchmarks/gpu.py --compile` on a GPU machine for the real numbers."
    )
    setup = (
        f"{' '.join(base)}; training FLOPs per source image (fwd + bwd, both views, counted "
        f"by torch.utils.flop_counter): {flops / 1e9:.2f} GFLOP; measured bf16 matmul rate "
        f"{peak / 1e12:.3f} TFLOP/s; {repeats} alternating repeats of {steps} steps."
    )
    write_results(
        "gpu",
        "Accelerator switches: bf16, channels_last, fused AdamW, torch.compile",
        args.out,
        facts,
        table(header, rows),
        notes=where,
        sections=[("Setup", setup)],
    )


if __name__ == "__main__":
    main()
