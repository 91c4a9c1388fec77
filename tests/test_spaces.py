"""Search-space files: parsing, validation (one line naming the entry), trial configs. No Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipelines.common import UserError
from pipelines.spaces import SpaceError, load_space, trial_overrides
from pipelines.tune import concurrency_that_fits, num_samples_total, sweep_config, trial_config
from san.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "tune_spaces").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spaces_load_and_validate(path: Path) -> None:
    space = load_space(path)
    cfg = sweep_config(space, None, [])
    assert space.params and cfg.run.name


def test_required_spaces_are_shipped() -> None:
    assert {"quick", "san_paper", "ablation"} <= {p.stem for p in SHIPPED}
    paper = load_space(ROOT / "tune_spaces" / "san_paper.yaml")
    keys = {p.key for p in paper.params}
    assert {"model.n_clusters", "model.tau", "loss.mi_lambda", "optim.lr"} <= keys
    assert {"loss.w_mi", "loss.w_con", "loss.w_rec", "loss.w_orth"} <= keys


def test_ablation_switches_each_loss_off_in_turn() -> None:
    space = load_space(ROOT / "tune_spaces" / "ablation.yaml")
    group = next(p for p in space.params if p.is_group)
    offs = [trial_overrides(space, {group.key: label}) for label in group.values]
    for term in ("w_mi", "w_con", "w_rec", "w_orth"):
        assert {f"loss.{term}": 0} in offs
    assert {} in offs  # the full objective is the reference
    assert num_samples_total(space, space.num_samples) == len(group.values) * 2


def test_trial_config_applies_sampled_values_and_groups(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "base_config: pipelines/configs/tiny.yaml\n"
        "config: {optim.max_steps: 4}\n"
        "params:\n"
        "  model.tau: {uniform: [0.05, 0.2]}\n"
        "  variant: {grid: {a: {loss.w_rec: 0, model.n_clusters: 3}, b: {}}}\n",
    )
    space = load_space(path)
    base = sweep_config(space, None, ["optim.lr=0.002"])
    cfg = trial_config(base.to_dict(), space, {"model.tau": 0.07, "variant": "a"}, "s", "t1")
    assert (cfg.model.tau, cfg.loss.w_rec, cfg.model.n_clusters) == (0.07, 0.0, 3)
    assert (cfg.optim.max_steps, cfg.optim.lr, cfg.run.name) == (4, 0.002, "s-t1")


@pytest.mark.parametrize(
    "text, entry",
    [
        ("params: {model.nope: {choice: [1, 2]}}", "params.model.nope"),
        ("params: {model.tau: {normal: [0, 1]}}", "params.model.tau"),
        ("params: {model.tau: {uniform: [0.5, 0.1]}}", "params.model.tau"),
        ("params: {optim.lr: {loguniform: [0, 0.1]}}", "params.optim.lr"),
        ("params: {model.n_clusters: {randint: [2.5, 8]}}", "params.model.n_clusters"),
        # integer bounds on an int setting: accepted, then every trial failed on a float
        ("params: {model.n_clusters: {uniform: [4, 8]}}", "params.model.n_clusters"),
        ("params: {optim.max_steps: {loguniform: [10, 100]}}", "params.optim.max_steps"),
        # a value 37% into these ranges is a whole number, which an int setting took
        ("params: {optim.warmup_steps: {uniform: [0, 100]}}", "params.optim.warmup_steps"),
        ("params: {optim.max_steps: {uniform: [1000, 3000]}}", "params.optim.max_steps"),
        ("params: {model.n_clusters: {choice: [1, 4]}}", "params.model.n_clusters"),
        ("params: {model.tau: {choice: []}}", "params.model.tau"),
        ("params: {model.tau: {choice: [0.1], grid: [0.2]}}", "params.model.tau"),
        ("params: {ab: {grid: {no_mi: {loss.w_mi: -1}}}}", "params.ab.no_mi"),
        ("params: {ab: {uniform: [0, 1]}}", "params.ab"),
        ("params: {model.tau: {choice: [0.1]}}\nsearch: {algorithm: bayes}", "search.algorithm"),
        ("params: {model.tau: {choice: [0.1]}}\nsearch: {num_samples: 0}", "search.num_samples"),
        ("params: {model.tau: {choice: [0.1]}}\nscheduler: {name: hyperband}", "scheduler.name"),
        ("params: {model.tau: {choice: [0.1]}}\nscheduler: {grace: 1}", "scheduler.grace"),
        ("params: {model.tau: {choice: [0.1]}}\nmode: up", "mode"),
        ("params: {model.tau: {choice: [0.1]}}\nconfig: {optim.lr: -1}", "config"),
        ("params: {model.tau: {choice: [0.1]}}\nsearchh: {}", "searchh"),
        ("params: {}", "params"),
        (
            "params: {model.tau: {choice: [0.1]}}\nresources: {trial_cpus: 0}",
            "resources.trial_cpus",
        ),
        (
            "search: {algorithm: optuna}\nparams: {model.tau: {grid: [0.1, 0.2]}}",
            "params.model.tau",
        ),
        ("params: {model.tau: {choice: [0.1]}}\nmetric: mIoU", "metric"),
        (
            "params: {model.tau: {choice: [0.1]}}\nmetric: probe_miou\n"
            "config: {run.probe_steps: 0}",
            "metric",
        ),
        # valid as a config value; only building the model shows timm has no such name
        ("params: {model.encoder: {choice: [resnet10t, resnet1t]}}", "params.model.encoder"),
    ],
)
def test_bad_space_is_one_line_naming_the_entry(tmp_path: Path, text: str, entry: str) -> None:
    space_path = write(tmp_path, "base_config: pipelines/configs/tiny.yaml\n" + text)
    with pytest.raises(SpaceError) as info:
        sweep_config(load_space(space_path), None, [])
    message = str(info.value)
    assert "\n" not in message
    assert f"entry {entry!r}" in message, message
    if "uniform: [" in text and any(k in text for k in ("n_clusters", "_steps")):
        assert "samples floats between the bounds; an int setting needs randint" in message


def test_command_line_overrides_are_checked_with_the_space(tmp_path: Path) -> None:
    """Trials sample on top of the command line's overrides: a space value that is valid
    alone but not with them is refused before Ray starts (it failed in its trials, and
    the sweep's summary then ended in a traceback, its MLflow run left RUNNING)."""
    space_path = write(
        tmp_path,
        "base_config: pipelines/configs/tiny.yaml\nparams: {loss.w_mi: {choice: [0.0, 1.0]}}",
    )
    assert sweep_config(load_space(space_path), None, []).loss.w_mi == 1.0
    with pytest.raises(SpaceError) as info:
        sweep_config(load_space(space_path), None, ["model.name=iic"])
    message = str(info.value)
    assert "entry 'params.loss.w_mi'" in message and "(with model.name=iic)" in message
    assert "\n" not in message
    # An override of a key the space fixes wins, in the check as in the trials: the
    # space's 60 px images do not divide into tiny.yaml's 8 px patches, the override's 48 do.
    space_path.write_text(space_path.read_text() + "\nconfig: {data.image_size: 60}")
    with pytest.raises(SpaceError, match="entry 'config': data.image_size=60 must be"):
        sweep_config(load_space(space_path), None, [])
    cfg = sweep_config(load_space(space_path), None, ["data.image_size=48"])
    assert (cfg.data.image_size, cfg.model.vit_patch_size) == (48, 8)


def test_a_config_given_as_space_is_named_as_such() -> None:
    with pytest.raises(SpaceError, match="is a training config .* pass it as --config"):
        load_space(ROOT / "pipelines" / "configs" / "tiny.yaml")


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(write(tmp_path, "params: [unclosed"))


def test_cli_bad_space_fails_before_ray(tmp_path: Path) -> None:
    """The CLI prints one `error:` line and exits 2 without starting Ray (no ray import)."""
    import subprocess

    path = write(tmp_path, "params: {model.tau: {loguniform: [-1, 1]}}\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "tune.py"), "--space", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "params.model.tau" in lines[0]


def test_local_concurrency_is_capped_to_what_fits() -> None:
    """Drivers of too many trials would take every CPU and no worker group could start.
    Checked against the resources the local Ray reports; a cluster may autoscale."""

    space = load_space(ROOT / "tune_spaces" / "quick.yaml")  # 2 at once, trial_cpus 1
    cfg = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml", ["run.cpus_per_worker=1"])
    assert concurrency_that_fits(space, cfg, {"CPU": 4.0}) == 2  # 2 x (1 + 1) fits
    assert concurrency_that_fits(space, cfg, {"CPU": 3.0}) == 1
    with pytest.raises(UserError, match=r"one trial needs 2 CPUs .* the local Ray has 1;"):
        concurrency_that_fits(space, cfg, {"CPU": 1.0})
    # Trials asking for GPUs a local Ray lacks: their worker groups waited forever (Ray
    # Train retrying every 60 s).
    gpu = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml", ["run.use_gpu=true"])
    with pytest.raises(UserError, match="needs a GPU per worker but the local Ray has 0"):
        concurrency_that_fits(space, gpu, {"CPU": 4.0})
    assert concurrency_that_fits(space, gpu, {"CPU": 4.0, "GPU": 1.0}) == 2


def test_searching_k_on_many_to_one_miou_is_warned_about(tmp_path: Path, caplog) -> None:
    base = "base_config: pipelines/configs/tiny.yaml\n"
    cases = {
        "params: {model.n_clusters: {choice: [4, 8]}}": True,
        "params: {g: {grid: {a: {model.n_clusters: 4}, b: {model.n_clusters: 8}}}}": True,
        "params: {g: {grid: {a: {model.tau: 0.1}, b: {model.tau: 0.2}}}}": False,
        "params: {model.n_clusters: {choice: [4, 8]}}\nmetric: miou_one_to_one": False,
    }
    for text, warned in cases.items():
        caplog.clear()
        sweep_config(load_space(write(tmp_path, base + text)), None, [])
        assert ("miou_one_to_one compares K" in caplog.text) == warned, text


def test_a_class_metric_must_name_a_class_of_the_data(tmp_path: Path) -> None:
    """metric: iou/region9 on 5-class data passed, then Tune ended the sweep in a traceback
    at the first result without it. Checked against the val data's class names, as
    evaluation writes them (characters metric names refuse become _)."""
    from pipelines.loop import eval_class_names
    from pipelines.spaces import check_class_metric

    def space(metric: str):
        text = f"base_config: pipelines/configs/tiny.yaml\nmetric: {metric}\n"
        return load_space(write(tmp_path, text + "params: {model.tau: {choice: [0.1]}}"))

    cfg = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml", ["data.synthetic_classes=5"])
    names = eval_class_names(cfg)
    assert names == [f"region{i}" for i in range(5)]
    check_class_metric(space("iou/region4"), names)
    check_class_metric(space("miou"), names)  # not a class metric: check_metric's
    with pytest.raises(SpaceError, match="'iou/region9' names no class of the data; choose"):
        check_class_metric(space("iou/region9"), names)
    check_class_metric(space("'iou/road _paved_'"), ["road (paved)", "sky"])
