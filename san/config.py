"""Typed, validated experiment configs.

One `Config` holds everything a run needs. It is loaded from YAML, then patched
with dotted `key=value` overrides (`model.n_clusters=27`), then validated. Every
field carries its default here, with the advice a user needs, so this file is the
reference for what can be set.

A bad value fails at load time with one line (`ConfigError`) naming the field,
the value and what is allowed, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range (one-line message)."""


@dataclass
class ModelConfig:
    # Which model family: "san" (the paper), "iic" (L_mi alone on the CNN) or
    # "kmeans" (online k-means on the CNN's pixel embeddings, PiCIE-style).
    name: str = "san"
    # timm CNN for the pixel encoder (unpretrained). resnet18 is the workhorse;
    # resnet10t is the cheapest real choice for laptops and tests.
    encoder: str = "resnet18"
    # Output stride of the pixel embeddings: 4 is sharper but 4x the SEAT cost of 8.
    stride: int = 8
    # D, the pixel/semantic embedding width. 64-128 is plenty for K <= 30.
    embed_dim: int = 64
    # timm ViT for the semantic generator (unpretrained unless vit_weights is given).
    vit: str = "vit_tiny_patch16_224"
    # ViT patch size; with small images use 8 so there are enough tokens to pool.
    vit_patch_size: int = 16
    # Override the ViT depth (null keeps the architecture's own); 2-4 for tests.
    vit_depth: int | None = None
    # Optional local weights file for the ViT: a state_dict as timm or DINO publish it
    # (e.g. DINO ViT-S/8); its position embeddings and patch kernels are resampled to this
    # image and patch size. Nothing is ever downloaded.
    vit_weights: str | None = None
    # K, the number of clusters (semantic embeddings). Set it to the number of
    # classes for the standard protocol, or larger to over-cluster.
    n_clusters: int = 5
    # SEAT softmax temperature tau: lower gives harder assignments; 0.05-0.2 works.
    tau: float = 0.1
    # Where SEAT's reconstruction Z' (which L_rec's decoder reads) and L_con live. "unit":
    # Z' = A norm(S), compared with norm(Z), on the sphere the assignment is made on.
    # "raw": Z' = A S compared with Z, as DESIGN.md writes L_con; on CamVid its centres
    # collapse and its probe mIoU drops 7 points (benchmarks/results/quality_seat_space.md),
    # so keep it for ablations.
    seat_space: str = "unit"
    # Width of the light reconstruction decoder.
    decoder_dim: int = 32


@dataclass
class LossConfig:
    # Weights of the four SAN terms; 0 switches a term off and skips its compute.
    # Models without the needed output ("iic" has no decoder) skip that term too.
    w_mi: float = 1.0
    w_con: float = 1.0
    w_rec: float = 1.0
    w_orth: float = 0.1
    # lambda, the IIC entropy coefficient: 1.0 is plain mutual information;
    # >1 pushes harder for balanced clusters (helps against collapse).
    mi_lambda: float = 1.0
    # Momentum of the k-means baseline's centroid update (used by model.name=kmeans).
    kmeans_momentum: float = 0.99


@dataclass
class DataConfig:
    # Dataset registry name: "synthetic" (procedural scenes, no download),
    # "folder" (root/<split>/images + labels), "shards" (Parquet shards at root), or a
    # standard layout read in place: "cocostuff27", "cityscapes27", "potsdam", "potsdam3".
    dataset: str = "synthetic"
    # Folder path or fsspec URL (local path or s3://bucket/prefix). Unused for synthetic.
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    # Square side the views and evaluation crops are resized to.
    image_size: int = 96
    # Number of evaluation classes; 0 takes the dataset's own (manifest, classes file,
    # or synthetic_classes). Needed for a folder without a classes file.
    n_classes: int = 0
    # Number of ground-truth classes of the synthetic generator.
    synthetic_classes: int = 5
    # Number of synthetic images per split (train, val).
    synthetic_train_size: int = 512
    synthetic_val_size: int = 64
    # Random-resized-crop scale range of the two views: the views' overlap is what
    # L_mi aligns, so keep the lower bound >= 0.4.
    crop_min_scale: float = 0.5
    # Strength of colour jitter between the views (0 disables).
    jitter: float = 0.4
    # DataLoader worker processes per training worker (0 reads in the main process).
    # One worker delivers about 2800 images/s (two 32 px views each) from CamVid's raw
    # shards and 2000 from its JPEG folder on the project's 2-core test machine, and 1500
    # and 1000 at 480x360 (benchmarks/data_path.py): plenty for a CPU step, but a GPU
    # stepping through thousands of images a second needs several (each takes a core).
    loader_workers: int = 1
    # Limit evaluation to this many validation images (0 = all).
    max_val_images: int = 0
    # Local directory for copies of remote Parquet shards (data.root=s3://...): each shard
    # is fetched once, checked against its manifest sha256 and kept under that checksum,
    # so later epochs and restarts read local disk, not the network. It grows to the
    # dataset's shard bytes and is never pruned; delete it when done. An entry that no
    # longer opens (truncated by a full disk) is fetched again. A relative path is under the
    # project root, ~ the home directory. Empty: read remote shards every epoch (each fetch
    # checked against the manifest too). Local shards are never copied.
    shard_cache: str = ""
    # Bad (corrupt, mis-sized) samples met while streaming are skipped with a warning
    # naming each; past this many per reading process the run stops with an error.
    max_bad_samples: int = 100


@dataclass
class OptimConfig:
    # Images per training worker per step (each gives two views).
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # Linear warm-up steps, then cosine decay to 0 at max_steps.
    warmup_steps: int = 50
    max_steps: int = 500
    # Clip the global gradient norm (0 disables).
    grad_clip: float = 1.0
    # Mixed precision: "none", "bf16" (Ampere+ GPUs; CPUs with AMX or AVX512-BF16) or
    # "fp16" (GPU only). On a CPU with bf16 instructions, bf16 with channels_last makes a
    # training step 1.65-2.0x faster: AMX (Intel Sapphire Rapids and later) and AVX512-BF16
    # (AMD Zen 4, Intel Cooper Lake) alike (benchmarks/results/cpu_step.md), with the same
    # CamVid quality (AMX, 12 seeds: mIoU 19.2 +- 3.0 vs 19.1 +- 2.9 in float32, linear
    # probe 31.4 +- 4.6 vs 31.5 +- 4.1; AVX512-BF16, 6 seeds: paired mIoU -0.3 +- 1.3;
    # results/quality_bf16_cpu.md; the losses always run in float32). On a CPU with
    # neither, bf16 is emulated and slower than float32, down to 14x on AVX2 (a warning
    # says so). "none" by default: float32 runs give the same numbers on every machine.
    precision: str = "none"
    # torch.compile the model (inductor) for the training step; evaluation and checkpoints
    # use the plain module. Meant for long GPU runs (not yet measured on a GPU). On CPU it
    # does not pay: the first step compiles for ~100 s on 2 cores, then a step runs at
    # 0.94-1.05x of eager (benchmarks/results/cpu_step.md), as the convolutions and
    # matmuls that make up the step run in the same oneDNN kernels either way.
    compile: bool = False
    # Store conv weights and feed images in channels_last (NHWC) memory format: faster
    # convolutions on tensor-core GPUs and on CPUs with bf16 instructions, with bf16 (a
    # bf16 step +7-12% on an AMX Xeon, +5-14% on an AVX512-BF16 EPYC; nothing in float32).
    # It changes nothing numerically.
    channels_last: bool = False
    # Precision of the gradients DDP all-reduces between workers (two or more workers;
    # one worker has no all-reduce): "fp32", "bf16" or "fp16". bf16/fp16 halve the bytes
    # each step sends (PyTorch's compression comm hooks: each bucket is cast down and
    # divided by the worker count, summed across workers and cast back). The optimizer
    # still steps in float32, on gradients rounded to 8 (bf16) or 11 (fp16) significant
    # bits. Worth it across nodes, where the all-reduce of a small model like SAN's
    # outweighs its GPU compute (benchmarks/results/scaling.md). On CPUs it does not pay:
    # 2 workers on this project's 2-core machine, all-reduce of the gradients 21.7 -> 14.6
    # ms, step 166 -> 170 ms (the casts cost what the bytes save). CamVid quality with
    # bf16 vs fp32 all-reduce, 2 workers, 6 seeds: no loss
    # (benchmarks/results/quality_grad_allreduce.md).
    # Prefer bf16 (float32's range); fp16 can overflow on large (loss-scaled) gradients.
    grad_allreduce: str = "fp32"


@dataclass
class RunConfig:
    # Run name: checkpoints live under <storage>/<name>; rerunning the same name resumes.
    name: str = "san-default"
    # Where checkpoints go: a local folder or s3://bucket/prefix.
    storage: str = "outputs/ray"
    # MLflow experiment name (the tracking URI comes from MLFLOW_TRACKING_URI).
    experiment: str = "san"
    seed: int = 0
    # Ray Train workers (one per GPU; CPU workers where there is none).
    num_workers: int = 1
    # "auto" uses GPUs when the cluster has them at the job's start; "true"/"false" force
    # it. On an autoscaling cluster whose GPU nodes may be down at that moment (min
    # workers 0, pods still starting) pass "true", or "auto" trains on CPU workers.
    use_gpu: str = "auto"
    # CPUs reserved per worker; torch computes with this many threads (pipelines/loop.py).
    # On CPU workers, reserve the cores the step should use, but note that where the
    # workers fill every core, Ray's own processes (0.05-0.15 of a core on the 2-core test
    # VM, benchmarks/results/ray_overhead.md) and busy loader workers take their share
    # from the step. Two 1-CPU workers on 2 cores gave 1.4-1.65x one worker's images/s
    # (results/scaling.md).
    cpus_per_worker: int = 1
    # Checkpoint (and evaluate) every N steps; the last step is always checkpointed.
    checkpoint_every: int = 100
    # Print a progress line (and log losses to MLflow) every N steps.
    log_every: int = 10
    # Keep this many most recent checkpoints in storage (0 keeps all). A sweep's trial
    # that ASHA stops may save one more while the decision reaches it; the sweep deletes
    # that one at its end, so the trial keeps the checkpoint its result names.
    keep_checkpoints: int = 3
    # How a checkpoint reaches run.storage: "async" writes it to local disk (under
    # <tmp>/san-checkpoints/, emptied when the run starts or restarts) and trains on
    # while Ray Train uploads it in a background thread (then deletes the local copy);
    # "sync" waits for the upload at every checkpoint; "auto" is async for a training run
    # and sync for a sweep's trial, as Ray passes a checkpoint's metrics on (to the
    # sweep's scheduler too) only once it is uploaded, and a waiting trial is stopped one
    # upload sooner. Either way Ray registers (and a restart resumes from) a checkpoint
    # only once it is fully uploaded, and a run ends only after its last upload. Async
    # takes the upload out of the training loop's wait (the checkpoint_wait_s metric; an
    # 81 MiB checkpoint to an S3 endpoint behind a 400 Mbit/s link: 3.1 -> 0.4 s, and
    # runs of 3 checkpoints took 0.87x as long: benchmarks/results/checkpoint_path.md).
    # It pays while an upload takes less than checkpoint_every's steps: closer
    # checkpoints queue their uploads (a local copy each) and the run waits at its end.
    checkpoint_upload: str = "auto"
    # Restarts of the worker group after a worker dies (resumes from the last checkpoint).
    max_failures: int = 1
    # Fixed validation images drawn as overlay panels at each evaluation.
    n_viz_images: int = 4
    # The linear probe, STEGO's second number: at each evaluation a linear layer is fitted
    # on frozen pixel embeddings of labelled train-split images (data.train_split, whose
    # labels training never sees) and scored on every labelled val pixel. Most L-BFGS
    # iterations of the fit (it stops earlier once converged; 100 is within 0.001 probe
    # mIoU of 300 on CamVid, in about 0.5 s on a CPU); 0 disables the probe, and then
    # the train split needs no labels.
    probe_steps: int = 100
    # Train images the probe is fitted on (64 random labelled pixels each), a fixed
    # random sample (run.seed) of the split: every evaluation of a run uses the same
    # images. Costs a forward pass over them per evaluation.
    probe_images: int = 256


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted `section.key -> value`, as logged to MLflow params."""
        return flatten(self.to_dict())


# Allowed values and ranges, checked by `validate`. Kept as data so the error
# message can say exactly what is allowed.
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.name": ("san", "iic", "kmeans"),
    "model.stride": (4, 8),
    "model.seat_space": ("unit", "raw"),
    "data.dataset": (
        "synthetic",
        "folder",
        "shards",
        "cocostuff27",
        "cityscapes27",
        "potsdam",
        "potsdam3",
    ),
    "optim.precision": ("none", "bf16", "fp16"),
    "optim.grad_allreduce": ("fp32", "bf16", "fp16"),
    "run.use_gpu": ("auto", "true", "false"),
    "run.checkpoint_upload": ("auto", "async", "sync"),
}
# (lower, upper, lower_inclusive); upper is inclusive, None means unbounded.
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "model.embed_dim": (1, None, True),
    "model.vit_patch_size": (1, None, True),
    "model.vit_depth": (1, None, True),
    "model.n_clusters": (2, None, True),
    "model.tau": (0, None, False),
    "model.decoder_dim": (1, None, True),
    "loss.w_mi": (0, None, True),
    "loss.w_con": (0, None, True),
    "loss.w_rec": (0, None, True),
    "loss.w_orth": (0, None, True),
    "loss.mi_lambda": (0, None, True),
    "loss.kmeans_momentum": (0, 1, True),
    "data.image_size": (16, None, True),
    "data.n_classes": (0, 1000, True),
    "data.synthetic_classes": (2, 20, True),
    "data.synthetic_train_size": (1, None, True),
    "data.synthetic_val_size": (1, None, True),
    "data.crop_min_scale": (0, 1, False),
    "data.jitter": (0, 1, True),
    "data.loader_workers": (0, None, True),
    "data.max_val_images": (0, None, True),
    "data.max_bad_samples": (0, None, True),
    "optim.batch_size": (1, None, True),
    "optim.lr": (0, None, False),
    "optim.weight_decay": (0, None, True),
    "optim.warmup_steps": (0, None, True),
    "optim.max_steps": (1, None, True),
    "optim.grad_clip": (0, None, True),
    "run.num_workers": (1, None, True),
    "run.cpus_per_worker": (1, None, True),
    "run.checkpoint_every": (1, None, True),
    "run.log_every": (1, None, True),
    "run.keep_checkpoints": (0, None, True),
    "run.max_failures": (0, None, True),
    "run.n_viz_images": (0, None, True),
    "run.probe_steps": (0, None, True),
    "run.probe_images": (1, None, True),
}


def _describe_range(low: float, high: float | None, inclusive: bool) -> str:
    left = ">=" if inclusive else ">"
    text = f"{left} {low:g}"
    return text if high is None else f"{text} and <= {high:g}"


def validate(cfg: Config) -> Config:
    """Check choices, ranges and cross-field rules; raise one-line `ConfigError`."""
    flat = cfg.flat()
    for key, value in flat.items():
        # NaN passes every range test (each comparison is False) and would, say, switch
        # colour jitter off without a word; no setting means anything by inf.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is not allowed; give a finite number")
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not allowed; choose one of {list(allowed)}")
    for key, (low, high, inclusive) in RANGES.items():
        value = flat[key]
        if value is None:
            continue
        too_low = value < low if inclusive else value <= low
        if too_low or (high is not None and value > high):
            raise ConfigError(
                f"{key}={value!r} is out of range; allowed: {_describe_range(low, high, inclusive)}"
            )
    if cfg.data.image_size % cfg.model.vit_patch_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} must be a multiple of "
            f"model.vit_patch_size={cfg.model.vit_patch_size}"
        )
    if cfg.data.image_size % cfg.model.stride:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} must be a multiple of "
            f"model.stride={cfg.model.stride}"
        )
    if cfg.data.dataset != "synthetic" and not cfg.data.root:
        raise ConfigError(
            f"data.root is empty but data.dataset={cfg.data.dataset!r} needs it; "
            "give a folder path or URL"
        )
    if "://" in cfg.data.shard_cache:
        raise ConfigError(
            f"data.shard_cache={cfg.data.shard_cache!r} must be a local directory (it holds "
            "local copies of remote shards), or empty"
        )
    if cfg.model.name == "iic" and cfg.loss.w_mi == 0:
        raise ConfigError("loss.w_mi=0 leaves model.name='iic' nothing to learn; set loss.w_mi > 0")
    if cfg.model.name == "kmeans" and cfg.loss.w_mi == 0 and cfg.loss.w_rec == 0:
        raise ConfigError(
            "loss.w_mi=0 and loss.w_rec=0 leave model.name='kmeans' nothing to learn; "
            "set one of them > 0"
        )
    if cfg.model.name == "san" and not any(
        (cfg.loss.w_mi, cfg.loss.w_con, cfg.loss.w_rec, cfg.loss.w_orth)
    ):
        raise ConfigError("all four loss weights are 0; set at least one of loss.w_* > 0")
    name = cfg.run.name
    if name.strip() != name or not name or any(c in name for c in "/'\"`"):
        # It names a storage folder, and MLflow searches runs by it in a quoted filter.
        raise ConfigError(
            f"run.name={name!r} must be non-empty, without /, quotes, backticks or "
            "surrounding spaces"
        )
    return cfg


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert `value` to the annotated type, or raise a one-line ConfigError."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ConfigError(f"{key}=None is not allowed; expected {annotation.__name__}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} has the wrong type; expected a bool (true/false)")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected an int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:  # 1e3: YAML 1.1 reads exponents without a dot as strings
                number = float(value)
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise ConfigError(f"{key}={value!r} has the wrong type; expected an int")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type; expected a number")
    if annotation is str:
        if isinstance(value, bool):  # YAML reads true/false (also yes/no, on/off) as bools
            return "true" if value else "false"
        if isinstance(value, str | int | float):
            return str(value)
        raise ConfigError(f"{key}={value!r} has the wrong type; expected a string")
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")  # pragma: no cover


SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "loss": LossConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


def flatten(sections: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict (`Config.to_dict`, or one saved with a checkpoint) as dotted
    `section.key -> value`. Entries that are not sections are left out; nothing is
    validated, so a config from an older version flattens too."""
    return {
        f"{section}.{key}": value
        for section, values in sections.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as read from YAML)."""
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(values).__name__}")
    sections: dict[str, Any] = {}
    for section, content in values.items():
        if section not in SECTION_TYPES:
            raise ConfigError(f"unknown config section {section!r}; allowed: {list(SECTION_TYPES)}")
        if content is None:
            content = {}
        if not isinstance(content, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {content!r}")
        types_ = _field_types(SECTION_TYPES[section])
        kwargs = {}
        for key, value in content.items():
            dotted = f"{section}.{key}"
            if key not in types_:
                raise ConfigError(
                    f"unknown config key {dotted!r}; allowed in {section}: {list(types_)}"
                )
            kwargs[key] = _coerce(dotted, value, types_[key])
        sections[section] = SECTION_TYPES[section](**kwargs)
    return validate(Config(**sections))


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested dict; values are parsed as YAML scalars."""
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(values).__name__}")
    # A section that is not a mapping stays as it is, for from_dict to name.
    values = {k: dict(v or {}) if isinstance(v, dict | None) else v for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"override key {dotted!r} must look like section.key (e.g. model.tau)"
            )
        section, key = parts
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed = raw
        content = values.setdefault(section, {})
        if not isinstance(content, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {content!r}")
        content[key] = parsed
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply dotted overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return from_dict(apply_overrides(values, overrides or []))
