"""What every benchmark shares: arguments, machine facts, the timed step, the results file.

The machine these run on is small and shared (2 cores, other jobs running), so
absolute numbers move from minute to minute. Every benchmark therefore compares
variants *within one run*, alternating A/B repeats, and reports ratios of medians;
those are the numbers to read.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from san.config import Config, load_config  # noqa: E402
from san.data import (  # noqa: E402
    PairLoader,
    StreamDataset,
    create_dataset,
    train_pair_transform,
)
from san.engine import Trainer, apply_memory_format, seed_everything  # noqa: E402
from san.models import create_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TINY_CONFIG = ROOT / "pipelines" / "configs" / "tiny.yaml"
CAMVID = ROOT.parent / "shared" / "data" / "camvid"


def parse_args(description: str, add: Callable[[argparse.ArgumentParser], None] | None = None):
    """--quick (a smoke run under a minute) and --out (results folder), plus extras."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, < 1 min")
    parser.add_argument("--out", default=str(RESULTS), help="folder for <name>.md")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in this process (0: default)"
    )
    if add:
        add(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# What the full (non --quick) runs use: the tests' tiny model at a batch that still
# exercises the data path. The shared 2-core machine runs a default.yaml step in tens
# of seconds under load, which would make alternating repeats take hours.
BENCH = ["optim.batch_size=8", "model.vit_depth=2"]


def config(quick: bool, overrides: list[str] | None = None) -> Config:
    """tiny.yaml (plus BENCH for full runs), patched with overrides."""
    extra = [] if quick else BENCH
    return load_config(TINY_CONFIG, extra + list(overrides or []))


def cpuinfo(field: str) -> str | None:
    """The first `field` value in /proc/cpuinfo (None where there is none: not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or "unknown"


def cpu_bf16_flags() -> str:
    """The CPU's native bf16 instructions (AMX-BF16, AVX512-BF16), from /proc/cpuinfo.

    With AMX a bf16 matmul runs about 4x float32's rate, with AVX512-BF16 2.3x (an AMD
    EPYC, 2 threads); with neither, bf16 is emulated and slower than float32. A bf16
    number means little without this.
    """
    flags = cpuinfo("flags")
    if flags is None:
        return "unknown"
    present = set(flags.split())
    return ", ".join(f for f in ("amx_bf16", "avx512_bf16") if f in present) or "none"


def machine() -> dict[str, str]:
    """Facts that make a number interpretable: when, where, with which versions."""
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency
        ray_version = "not installed"
    load = os.getloadavg()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs ({cpu_model()}), {platform.machine()}",
        "load average at start (1/5/15 min)": f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "cpu bf16 instructions": cpu_bf16_flags(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray_version,
        "torch threads": str(torch.get_num_threads()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats get 3 significant digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    title: str,
    out: str,
    facts: dict[str, str],
    main_table: str,
    notes: str = "",
    sections: list[tuple[str, str]] | None = None,
) -> Path:
    """Write benchmarks/results/<name>.md and print the main table last (what to read)."""
    parts = [f"# {title}", ""]
    parts += [f"- {key}: {value}" for key, value in facts.items()]
    for heading, body in sections or []:
        parts += ["", f"## {heading}", "", body.strip()]
    parts += ["", "## Result", "", main_table]
    if notes:
        parts += ["", "## Notes", "", notes.strip()]
    path = Path(out) / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    for heading, body in sections or []:
        print(f"\n## {heading}\n{body.strip()}")
    if notes:
        print("\n" + notes.strip())
    print(f"\n(written to {path})\n")
    print(main_table, flush=True)
    return path


class CpuMeter:
    """CPU seconds another process (`pid`) used between start() and stop() (`used_s`:
    user + system, all threads, from /proc in 10 ms ticks) and the cores it kept busy
    (`busy`: `used_s` per wall second). Both stay None without a pid or where /proc
    cannot tell (not Linux)."""

    def __init__(self, pid: int = 0) -> None:
        self.pid = pid
        self.used_s: float | None = None
        self.busy: float | None = None
        self._cpu: float | None = None

    def _cpu_s(self) -> float | None:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._cpu, self._wall = (self._cpu_s() if self.pid else None), time.perf_counter()

    def stop(self) -> None:
        cpu = self._cpu_s() if self._cpu is not None else None
        if cpu is not None:
            self.used_s = cpu - self._cpu
            self.busy = self.used_s / (time.perf_counter() - self._wall)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_cores(results: list[dict], key: str) -> str:
    """Median over repeats of a CPU share timed_steps measured ("-" where /proc could not)."""
    values = [res[key] for res in results if res.get(key) is not None]
    return f"{median(values):.2f}" if values else "-"


def train_loader(cfg: Config, rank: int = 0, world_size: int = 1) -> PairLoader:
    """The training DataLoader exactly as pipelines/loop.py builds it."""
    stream = StreamDataset(
        create_dataset(cfg.data, cfg.data.train_split),
        train_pair_transform(cfg.data),
        rank,
        world_size,
        seed=cfg.run.seed + rank * 7919,
    )
    workers = cfg.data.loader_workers
    return PairLoader(
        stream,
        batch_size=cfg.optim.batch_size,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def build_trainer(cfg: Config, prepare: Callable | None = None) -> Trainer:
    """Model + Trainer as pipelines/loop.py makes them (`prepare`: its prepare_ddp_model)."""
    seed_everything(cfg.run.seed)
    model = apply_memory_format(create_model(cfg), cfg.optim)
    if prepare is not None:
        model = prepare(model)
    return Trainer(model, cfg, torch.device("cpu"))


def machine_busy_s() -> float | None:
    """CPU seconds every process on this machine has used since boot (user, nice, system,
    irq and softirq from /proc/stat; not idle, iowait or time the hypervisor stole), or
    None where /proc cannot tell (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_mark() -> tuple[float | None, float, float]:
    """Where the machine's CPU, this process's CPU and the clock stand now, for `cores_since`."""
    return machine_busy_s(), time.process_time(), time.perf_counter()


def cores_since(mark: tuple[float | None, float, float]) -> tuple[float, float | None]:
    """(cores this process kept busy, cores every other process did) since `mark`; the
    second is None where /proc cannot tell."""
    busy, own, wall = mark
    wall = time.perf_counter() - wall
    own = time.process_time() - own
    others = None if busy is None else max(0.0, machine_busy_s() - busy - own) / wall
    return own / wall, others


def wait_until_quiet(
    max_other_cores: float = 0.2, window_s: float = 0.5, limit_s: float = 30
) -> float:
    """Wait until the other processes on this machine use under `max_other_cores` over a
    `window_s` window (or `limit_s` has passed); returns the seconds waited.

    A Ray Train run leaves work behind when fit() returns: its actors exit and Ray
    starts fresh idle workers (each a Python start-up, about a core for a second), which
    would otherwise be timed as part of whatever variant runs next.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        mark = cpu_mark()
        if mark[0] is None:  # /proc cannot tell: nothing to wait for
            break
        time.sleep(window_s)
        if cores_since(mark)[1] < max_other_cores:
            break
    return time.perf_counter() - start


def timed_steps(trainer: Trainer, batches: Iterator[dict], n_steps: int, warmup: int) -> dict:
    """Run warmup steps, then time n_steps one by one (batch fetch included in each).

    Also counts, over the timed steps, the cores this process kept busy (`own_cores`, all
    its threads) and those every other process on the machine did (`other_cores`: Ray's
    daemons and actors, loader workers, anything else running): on a machine with as many
    cores as the step has threads, the others' share is taken from the step.
    """
    for _ in range(warmup):
        trainer.step(next(batches))
    times = []
    mark = cpu_mark()
    for _ in range(n_steps):
        start = time.perf_counter()
        trainer.step(next(batches))
        times.append(time.perf_counter() - start)
    if not times:  # warm-up only
        return {}
    own_cores, other_cores = cores_since(mark)
    return {
        "step_s_median": median(times),
        "step_s_mean": sum(times) / len(times),
        "steps_per_s": len(times) / sum(times),
        "step_s": times,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "own_cores": own_cores,
        "other_cores": other_cores,
    }


def repeat(batch: dict) -> Iterator[dict]:
    """The same pre-made batch forever: a training step with no data path at all."""
    while True:
        yield batch


def init_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray whose workers can import `benchmarks` (PYTHONPATH is inherited)."""
    here = str(Path(__file__).resolve().parent)  # scripts import this module as `common`
    paths = [str(ROOT), here, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    from pipelines.common import init_ray as pipelines_init_ray

    pipelines_init_ray(num_cpus=num_cpus)


def ray_timed_worker(loop_config: dict) -> None:
    """Ray Train worker: what pipelines/loop.py does per step, timed; rank 0 writes JSON.

    Same thread setting as loop.py (torch threads = run.cpus_per_worker), same
    `prepare_ddp_model` (skipped when `loop_config["ddp"]` is false), Trainer and
    DataLoader; workers start their timed steps together, and a `ray.train.report` at the
    end is a barrier.
    """
    import json

    import ray.train

    from pipelines.loop import prepare_ddp_model
    from san.config import from_dict

    entered = time.time()
    cfg = from_dict(loop_config["config"])
    torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    trainer = build_trainer(cfg, prepare_ddp_model if loop_config["ddp"] else None)
    batches = iter(train_loader(cfg, rank, world))
    ready = time.time()
    timed_steps(trainer, batches, 0, loop_config["warmup"])
    if world > 1:  # time the workers' steps side by side, also when no all-reduce syncs them
        torch.distributed.barrier()
    result = timed_steps(trainer, batches, loop_config["steps"], 0)
    result.update(entered_at=entered, ready_at=ready, world_size=world)
    if world > 1:
        every_rank: list = [None] * world
        torch.distributed.all_gather_object(every_rank, result["step_s"])
        result["step_s_by_rank"] = every_rank
        if loop_config["ddp"]:  # the independent-models fit's all-reduce times go unread
            result["allreduce_s"] = allreduce_time(trainer.model)
            result["allreduce_s_bf16"] = allreduce_time(trainer.model, torch.bfloat16)
    if rank == 0:
        Path(loop_config["out_file"]).write_text(json.dumps(result))
    ray.train.report({"steps_per_s": result["steps_per_s"]})


def ray_fit(
    cfg: Config, steps: int, warmup: int, workdir: Path, tag: str, ddp: bool = True
) -> dict:
    """One TorchTrainer.fit of ray_timed_worker; adds start-up (fit call -> loop entered).
    `ddp=False`: each worker trains its own copy of the model, with no gradient all-reduce."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_file = workdir / f"{tag}.json"
    trainer = TorchTrainer(
        ray_timed_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "steps": steps,
            "warmup": warmup,
            "out_file": str(out_file),
            "ddp": ddp,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
        ),
        run_config=RunConfig(name=tag, storage_path=str(workdir / "ray")),
    )
    start = time.time()
    trainer.fit()
    total = time.time() - start
    result = json.loads(out_file.read_text())
    result["startup_s"] = result["entered_at"] - start
    result["fit_total_s"] = total
    return result


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes DDP all-reduces per step: every trainable parameter's gradient (fp32)."""
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def allreduce_time(
    model: torch.nn.Module, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> float:
    """Median seconds of one all-reduce of a flat buffer of the model's gradients in `dtype`
    (bf16: what optim.grad_allreduce=bf16 sends)."""
    import torch.distributed as dist

    buffer = torch.ones(gradient_bytes(model) // 4, dtype=dtype)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    return median(times)
