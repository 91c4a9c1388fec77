"""Training steps/s through Ray Train (1 worker) against a plain PyTorch loop, same run.

    .venv/bin/python benchmarks/ray_overhead.py [--quick] [--repeats N] [--steps N]

Both sides run the same model, data pipeline (StreamDataset + DataLoader as
pipelines/loop.py builds it), batch size and Trainer.step; the only difference is
that one runs inside a Ray Train worker (TorchTrainer, prepare_model, the thread
count loop.py sets from run.cpus_per_worker) and the other in this process. They
alternate (A B C, C B A, ...) so the machine's background load hits both alike.
Target: Ray Train >= 0.95x the plain loop in steady state; start-up (fit() call to
the worker entering its loop) is reported separately.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import (
    build_trainer,
    config,
    init_ray,
    machine,
    median,
    median_cores,
    parse_args,
    ray_fit,
    table,
    timed_steps,
    train_loader,
    wait_until_quiet,
    write_results,
)


def plain_loop(cfg, steps: int, warmup: int) -> dict:
    """The hand-written loop: same Trainer and DataLoader in this process, default threads."""
    trainer = build_trainer(cfg)
    loader = train_loader(cfg)
    result = timed_steps(trainer, iter(loader), steps, warmup)
    del loader  # stop its persistent workers before the next variant runs
    return result


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        lambda p: (
            p.add_argument("--repeats", type=int, default=None),
            p.add_argument("--steps", type=int, default=None),
        ),
    )
    repeats = args.repeats or (1 if args.quick else 2)
    steps = args.steps or (3 if args.quick else 10)
    warmup = 2 if args.quick else 3
    facts = machine()
    init_ray(num_cpus=2)
    base = config(args.quick)
    # Paired by thread count: on a loaded machine 2 OpenMP threads can be far slower than
    # 1 (a descheduled thread stalls the team), so Ray with 1 CPU is compared with a plain
    # loop on 1 thread, and Ray with 2 CPUs with a plain loop on 2.
    variants = {
        "plain loop, 2 threads": (None, 2),
        "Ray Train, 1 worker, cpus_per_worker=2": (base_with(base, 2), 2),
        "plain loop, 1 thread": (None, 1),
        "Ray Train, 1 worker, cpus_per_worker=1": (base_with(base, 1), 1),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                cfg, threads = variants[name]
                waited = wait_until_quiet()
                if cfg is None:
                    torch.set_num_threads(threads)
                    res = plain_loop(base, steps, warmup)
                else:
                    res = ray_fit(
                        cfg, steps, warmup, Path(tmp), f"ray-{r}-{list(variants).index(name)}"
                    )
                runs[name].append(res)
                print(
                    f"repeat {r} {name}: {res['steps_per_s']:.3f} steps/s (waited "
                    f"{waited:.1f} s for a quiet machine; other processes "
                    f"{median_cores([res], 'other_cores')} cores while timed)",
                    flush=True,
                )
    rows = []
    for name, results in runs.items():
        plain = runs[
            f"plain loop, {variants[name][1]} thread" + ("s" if variants[name][1] > 1 else "")
        ]
        ratios = [
            res["steps_per_s"] / p["steps_per_s"] for res, p in zip(results, plain, strict=True)
        ]
        med_ratios = [
            p["step_s_median"] / res["step_s_median"] for res, p in zip(results, plain, strict=True)
        ]
        rows.append(
            [
                name,
                median([res["steps_per_s"] for res in results]),
                median([res["step_s_median"] for res in results]) * 1000,
                median(ratios),
                median(med_ratios),
                ", ".join(f"{x:.2f}" for x in ratios),
                median_cores(results, "own_cores"),
                median_cores(results, "other_cores"),
                results[0]["threads"],
                results[0]["omp_num_threads"],
                f"{median([res['startup_s'] for res in results]):.1f}"
                if "startup_s" in results[0]
                else "-",
            ]
        )
    header = [
        "variant",
        "steps/s (median of repeats)",
        "median step ms",
        "x plain, same threads (steps/s)",
        "x plain, same threads (median step)",
        "per-repeat x plain",
        "step process cores",
        "other processes cores",
        "torch threads",
        "OMP_NUM_THREADS",
        "start-up s",
    ]
    cfg = base
    setup = (
        f"model {cfg.model.name} ({cfg.model.encoder} + {cfg.model.vit} depth "
        f"{cfg.model.vit_depth}, patch {cfg.model.vit_patch_size}), {cfg.data.image_size}px, "
        f"batch {cfg.optim.batch_size} (x2 views), data {cfg.data.dataset}, "
        f"loader_workers {cfg.data.loader_workers}; {repeats} alternating repeats of "
        f"{warmup} warm-up + {steps} timed steps per variant."
    )
    write_results(
        "ray_overhead",
        "Ray Train overhead: steps/s through Ray Train vs a plain PyTorch loop",
        args.out,
        facts,
        table(header, rows),
        notes=NOTES,
        sections=[("Setup", setup)],
    )


def base_with(cfg, cpus: int):
    from san.config import from_dict

    values = cfg.to_dict()
    values["run"]["cpus_per_worker"] = cpus
    values["run"]["num_workers"] = 1
    return from_dict(values)


NOTES = """
Start-up is the time from `TorchTrainer.fit()` to the worker entering its loop
(worker group, placement group, process group); it is paid once per run and is
not part of the steady-state ratio. "x plain" is the Ray variant's rate over the
plain loop's in the same repeat; target >= 0.95. The plain loop uses torch's
default thread count (one per core); inside Ray, pipelines/loop.py sets torch's
threads to run.cpus_per_worker and Ray sets OMP_NUM_THREADS to the same, so a
worker that reserves fewer CPUs than the machine has computes with fewer threads.

"step process cores" and "other processes cores" are the CPU the timing process
(all its threads) and every other process on the machine used during the timed
steps, from /proc (medians over repeats). Ray's daemons (raylet, GCS, dashboard, log
monitor) run through both kinds of variant; during a fit, Train's controller and
helper actors run too, each a Ray worker process that wakes about a hundred times a
second. Where the step's threads fill every core, what those processes take is taken
from the step; with a core to spare it is not. Before each variant the benchmark waits
until other processes use under 0.2 cores, because the fit before it leaves work
behind (its actors exit and Ray starts fresh idle workers).
"""


if __name__ == "__main__":
    main()
