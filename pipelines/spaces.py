"""Declarative search spaces (`tune_spaces/*.yaml`): parse, validate, resolve trial configs.

Kept free of Ray so a bad space file fails in milliseconds, before any cluster or trial
starts, with one line naming the entry. `pipelines/tune.py` turns a `Space` into Tune
objects. The file format:

    base_config: pipelines/configs/tiny.yaml   # used when --config is not given
    config: {optim.max_steps: 8}               # fixed overrides for every trial
    metric: miou                               # what the trials report; mode: max|min
    mode: max
    search: {algorithm: random, num_samples: 4, max_concurrent: 2, seed: 0}  # or optuna
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}            # or none
                                               # grace_period: evaluations before a stop
    resources: {trial_cpus: 1}                 # CPUs of each trial's driver
    params:
      model.tau: {loguniform: [0.05, 0.5]}     # choice|uniform|loguniform|randint|grid
      model.n_clusters: {choice: [4, 6, 8]}    # randint bounds are both inclusive
      ablation:                                # no dot: a named group of overrides
        grid: {full: {}, no_mi: {loss.w_mi: 0}}

Groups let one searched value change several config keys at once (the paper's ablation).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from san.config import Config, ConfigError, from_dict

KINDS = ("choice", "uniform", "loguniform", "randint", "grid")
ALGORITHMS = ("random", "optuna")
SCHEDULERS = ("asha", "none")
MODES = ("max", "min")
TOP_KEYS = (
    "base_config",
    "config",
    "metric",
    "mode",
    "search",
    "scheduler",
    "resources",
    "params",
    "description",
)


class SpaceError(ConfigError):
    """A space file is malformed; the message is one line naming the file and the entry."""


@dataclass
class Param:
    """One searched entry: a config key (or a group name) and its distribution."""

    key: str
    kind: str
    values: list[Any] = field(default_factory=list)  # choice / grid (group: the labels)
    low: float | None = None  # uniform / loguniform / randint
    high: float | None = None
    variants: dict[str, dict[str, Any]] | None = None  # group: label -> dotted overrides

    @property
    def is_group(self) -> bool:
        return self.variants is not None

    def describe(self) -> str:
        """Human-readable distribution, as logged to the sweep's MLflow params."""
        if self.kind in ("choice", "grid"):
            return f"{self.kind}({', '.join(str(v) for v in self.values)})"
        return f"{self.kind}({self.low:g}, {self.high:g})"


@dataclass
class Space:
    name: str
    path: str
    params: list[Param]
    metric: str = "miou"
    mode: str = "max"
    algorithm: str = "random"
    num_samples: int = 1
    max_concurrent: int = 1
    seed: int | None = None
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    trial_cpus: float = 1.0
    base_config: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def searches_cluster_count(self) -> bool:
        """True when trials can differ in model.n_clusters (a searched key or a group's)."""
        for param in self.params:
            if param.key == "model.n_clusters":
                return True
            if (
                param.is_group
                and len({str(v.get("model.n_clusters")) for v in param.variants.values()}) > 1
            ):
                return True
        return False

    def summary(self) -> dict[str, str]:
        """Everything that defines the sweep, flat, for the parent run's params."""
        out = {
            "sweep.space": self.path,
            "sweep.metric": self.metric,
            "sweep.mode": self.mode,
            "sweep.algorithm": self.algorithm,
            "sweep.num_samples": str(self.num_samples),
            "sweep.max_concurrent": str(self.max_concurrent),
            "sweep.seed": str(self.seed),
            "sweep.scheduler": self.scheduler,
            "sweep.trial_cpus": str(self.trial_cpus),
        }
        if self.scheduler == "asha":
            out["sweep.grace_period"] = str(self.grace_period)
            out["sweep.reduction_factor"] = str(self.reduction_factor)
        for key, value in self.config.items():
            out[f"sweep.fixed.{key}"] = str(value)
        for param in self.params:
            out[f"space.{param.key}"] = param.describe()[:500]
        return out


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.key` in a nested config dict."""
    section, name = key.split(".", 1)
    values.setdefault(section, {})[name] = value


def apply_values(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of nested `values` with dotted `overrides` (typed values, not strings) applied."""
    out = copy.deepcopy(values)
    for key, value in overrides.items():
        set_dotted(out, key, value)
    return out


def trial_overrides(space: Space, sampled: dict[str, Any]) -> dict[str, Any]:
    """Dotted config overrides for one trial: groups expanded into the keys they set."""
    out: dict[str, Any] = {}
    for param in space.params:
        if param.key not in sampled:
            continue
        value = sampled[param.key]
        if param.is_group:
            out.update(param.variants[value])
        else:
            out[param.key] = value
    return out


def _fail(path: str, entry: str, message: str) -> SpaceError:
    return SpaceError(f"space file {path!r}: entry {entry!r}: {message}")


def _number(path: str, entry: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(path, entry, f"{value!r} is not a finite number")
    return value


def _mapping(path: str, entry: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, entry, f"must be a mapping, got {value!r}")
    return value


def _positive_int(path: str, entry: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(path, entry, f"{value!r} must be an integer >= 1")
    return value


def _check_keys(path: str, entry: str, given: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise _fail(
            path,
            f"{entry}.{unknown[0]}" if entry else unknown[0],
            f"unknown key; allowed: {list(allowed)}",
        )


def _parse_param(path: str, key: str, spec: Any) -> Param:
    entry = f"params.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(
            path, entry, f"must be one mapping like {{choice: [...]}}; kinds: {list(KINDS)}"
        )
    kind, arg = next(iter(spec.items()))
    if kind not in KINDS:
        raise _fail(path, entry, f"unknown distribution {kind!r}; allowed: {list(KINDS)}")
    if "." not in key:  # a group: label -> overrides
        if kind not in ("choice", "grid"):
            raise _fail(
                path, entry, f"a group (no dot in the name) needs choice or grid, not {kind}"
            )
        if not isinstance(arg, dict) or not arg:
            raise _fail(path, entry, "a group needs a non-empty mapping of label -> overrides")
        variants = {}
        for label, overrides in arg.items():
            overrides = _mapping(path, f"{entry}.{label}", overrides)
            for dotted in overrides:
                if "." not in str(dotted):
                    raise _fail(path, f"{entry}.{label}", f"{dotted!r} is not a section.key")
            variants[str(label)] = dict(overrides)
        return Param(key, kind, values=list(variants), variants=variants)
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise _fail(path, entry, f"{kind} needs a non-empty list of values")
        return Param(key, kind, values=list(arg))
    if not isinstance(arg, list) or len(arg) != 2:
        raise _fail(path, entry, f"{kind} needs [low, high]")
    low, high = (_number(path, entry, v) for v in arg)
    if not low < high:
        raise _fail(path, entry, f"{kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise _fail(path, entry, f"loguniform needs low > 0, got {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise _fail(path, entry, f"randint needs integer bounds, got [{low}, {high}]")
    return Param(key, kind, low=low, high=high)


def _candidates(param: Param) -> list[tuple[str, dict[str, Any], str]]:
    """Concrete settings to check against the config, each with what to add to the error:
    every listed value, range endpoints (and a value inside a float range)."""
    entry = f"params.{param.key}"
    if param.is_group:
        return [(f"{entry}.{k}", v, "") for k, v in param.variants.items()]
    if param.kind in ("choice", "grid"):
        return [(entry, {param.key: v}, "") for v in param.values]
    if param.kind == "randint":
        return [(entry, {param.key: v}, "") for v in (int(param.low), int(param.high))]
    # Tune samples floats between the bounds: one inside the range catches an int setting
    # given integer bounds, which passed here and then failed in every trial.
    inside = param.low + 0.37 * (param.high - param.low)
    if param.kind == "loguniform":
        inside = param.low * (param.high / param.low) ** 0.37
    if float(inside).is_integer():  # [0, 100] gave 37.0, which an int setting takes
        inside += min(0.5, (param.high - inside) / 2)
    hint = f" ({param.kind} samples floats between the bounds; an int setting needs randint)"
    return [(entry, {param.key: v}, "") for v in (param.low, param.high)] + [
        (entry, {param.key: inside}, hint)
    ]


def check_against_config(
    space: Space, values: dict[str, Any], cli_overrides: list[str] | None = None
) -> None:
    """`values` (nested dict) is the base config with the space's fixed `config` applied:
    it must be valid, and so must each candidate value on top of it. With `cli_overrides`,
    `values` holds them too (they win over the space's config, so it is not checked
    without them) and the error names them."""
    context = f" (with {' '.join(cli_overrides)})" if cli_overrides else ""
    fixed = [] if cli_overrides else [("config", space.config, "")]
    for entry, overrides, hint in fixed + [c for p in space.params for c in _candidates(p)]:
        try:
            from_dict(apply_values(values, overrides))
        except ConfigError as exc:
            raise _fail(space.path, entry, f"{exc}{context}{hint}") from None


def check_class_metric(space: Space, class_names: list[str]) -> None:
    """An iou/<class> metric must name one of the val split's classes (`class_names`, as
    evaluation names them): any other name would reach Tune as NaN from every trial, and
    the sweep would end, after all its trials, without a best one."""
    from san.metrics import class_metric_name

    if not space.metric.startswith("iou/"):
        return
    known = [f"iou/{class_metric_name(name)}" for name in class_names]
    if space.metric not in known:
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        raise _fail(
            space.path,
            "metric",
            f"{space.metric!r} names no class of the data; choose from {shown}",
        )


def check_metric(space: Space, cfg: Config) -> None:
    """The space's metric must be one the trials report: a typo would otherwise end the
    sweep after its first trial's first evaluation, in a Tune traceback. (iou/<class> is
    checked against the data's classes once the data is read: `check_class_metric`.)"""
    from pipelines.loop import PROBE_METRICS, REPORTED_METRICS

    reported = REPORTED_METRICS + (PROBE_METRICS if cfg.run.probe_steps else ())
    if space.metric in reported or space.metric.startswith("iou/"):
        return
    why = " (the probe runs only with run.probe_steps > 0)" if space.metric in PROBE_METRICS else ""
    raise _fail(
        space.path,
        "metric",
        f"{space.metric!r} is not reported by the trials{why}; "
        f"choose from {', '.join(reported)} or iou/<class name>",
    )


def check_models(space: Space, cfg: Config) -> None:
    """Every model a trial can build, built on the meta device before Ray starts: a timm
    name or stride that `from_dict` cannot judge fails here in one line, not in each trial.
    """
    from san.models import check_model_config  # imports timm: only the sweep's driver

    check_model_config(cfg)
    values = cfg.to_dict()
    for entry, overrides, _ in [c for p in space.params for c in _candidates(p)]:
        if any(str(key).startswith("model.") for key in overrides):
            try:
                check_model_config(from_dict(apply_values(values, overrides)))
            except ConfigError as exc:
                raise _fail(space.path, entry, str(exc)) from None


def load_space(path: str | Path) -> Space:
    """Read and validate the structure of a space file (not yet against a config)."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise SpaceError(f"space file {name!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise SpaceError(f"space file {name!r} is not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"space file {name!r} must hold a mapping")
    if {"model", "data", "optim", "run"} & set(raw) and "params" not in raw:
        raise SpaceError(
            f"space file {name!r} is a training config (model/data/optim/run sections), not "
            "a search space: pass it as --config, and a space (tune_spaces/) as --space"
        )
    _check_keys(name, "", raw, TOP_KEYS)
    params_raw = _mapping(name, "params", raw.get("params"))
    if not params_raw:
        raise _fail(name, "params", "needs at least one searched entry")
    params = [_parse_param(name, str(k), v) for k, v in params_raw.items()]

    search = _mapping(name, "search", raw.get("search"))
    _check_keys(name, "search", search, ("algorithm", "num_samples", "max_concurrent", "seed"))
    scheduler = _mapping(name, "scheduler", raw.get("scheduler"))
    _check_keys(name, "scheduler", scheduler, ("name", "grace_period", "reduction_factor"))
    resources = _mapping(name, "resources", raw.get("resources"))
    _check_keys(name, "resources", resources, ("trial_cpus",))
    config = _mapping(name, "config", raw.get("config"))
    for key in config:
        if "." not in str(key):
            raise _fail(name, f"config.{key}", "must be a dotted section.key")

    space = Space(name=path.stem, path=name, params=params, config=dict(config))
    space.metric = str(raw.get("metric", space.metric))
    space.mode = raw.get("mode", space.mode)
    if space.mode not in MODES:
        raise _fail(name, "mode", f"{space.mode!r} is not allowed; choose one of {list(MODES)}")
    space.algorithm = search.get("algorithm", space.algorithm)
    if space.algorithm not in ALGORITHMS:
        raise _fail(
            name, "search.algorithm", f"{space.algorithm!r}; choose one of {list(ALGORITHMS)}"
        )
    space.num_samples = _positive_int(name, "search.num_samples", search.get("num_samples", 1))
    space.max_concurrent = _positive_int(
        name, "search.max_concurrent", search.get("max_concurrent", 1)
    )
    seed = search.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _fail(name, "search.seed", f"{seed!r} must be an integer")
    space.seed = seed
    space.scheduler = scheduler.get("name", space.scheduler)
    if space.scheduler not in SCHEDULERS:
        raise _fail(
            name, "scheduler.name", f"{space.scheduler!r}; choose one of {list(SCHEDULERS)}"
        )
    space.grace_period = _positive_int(
        name, "scheduler.grace_period", scheduler.get("grace_period", 1)
    )
    space.reduction_factor = _positive_int(
        name, "scheduler.reduction_factor", scheduler.get("reduction_factor", 2)
    )
    if space.reduction_factor < 2:
        raise _fail(name, "scheduler.reduction_factor", "must be >= 2")
    cpus = _number(name, "resources.trial_cpus", resources.get("trial_cpus", 1))
    if cpus <= 0:  # Ray cannot place a trial that reserves nothing
        raise _fail(name, "resources.trial_cpus", f"{cpus!r} must be > 0 (e.g. 0.5)")
    space.trial_cpus = float(cpus)
    base = raw.get("base_config")
    if base is not None and not isinstance(base, str):
        raise _fail(name, "base_config", f"{base!r} must be a path")
    space.base_config = base
    if space.algorithm == "optuna":
        for param in params:
            if param.kind == "grid":
                raise _fail(
                    name,
                    f"params.{param.key}",
                    "grid is not supported by search.algorithm=optuna; use choice or random",
                )
    return space
