"""Config loading: defaults, YAML, dotted overrides, one-line errors."""

from pathlib import Path

import pytest

from san.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "configs"


def test_defaults_are_valid_and_documented_files_load():
    assert isinstance(load_config(), Config)
    for path in CONFIGS.glob("*.yaml"):
        cfg = load_config(path)
        assert cfg.model.n_clusters >= 2, path


def test_overrides_are_typed():
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["model.n_clusters=27", "model.tau=0.05", "optim.compile=true", "model.vit_depth=null"],
    )
    assert cfg.model.n_clusters == 27 and isinstance(cfg.model.n_clusters, int)
    assert cfg.model.tau == pytest.approx(0.05)
    assert cfg.optim.compile is True
    assert cfg.model.vit_depth is None
    assert cfg.optim.precision == "none"  # the string "none" is a value, not null
    # YAML reads true/yes as a bool and 1e3 as a string; both mean what they say
    cfg = load_config(CONFIGS / "tiny.yaml", ["run.use_gpu=true", "optim.max_steps=1e3"])
    assert cfg.run.use_gpu == "true" and cfg.optim.max_steps == 1000
    assert load_config(CONFIGS / "tiny.yaml", ["run.use_gpu=no"]).run.use_gpu == "false"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.n_cluster=3", "unknown config key 'model.n_cluster'"),
        ("modle.tau=0.1", "unknown config section 'modle'"),
        ("model.n_clusters=abc", "model.n_clusters='abc' has the wrong type; expected an int"),
        ("optim.max_steps=2.5e0", "optim.max_steps='2.5e0' has the wrong type; expected an int"),
        ("model.n_clusters=1", "model.n_clusters=1 is out of range; allowed: >= 2"),
        ("model.tau=0", "model.tau=0.0 is out of range; allowed: > 0"),
        ("loss.w_rec=-1", "loss.w_rec=-1.0 is out of range; allowed: >= 0"),
        # NaN passed every range test: data.jitter=nan switched colour jitter off.
        ("data.jitter=nan", "data.jitter=nan is not allowed; give a finite number"),
        ("data.crop_min_scale=nan", "data.crop_min_scale=nan is not allowed"),
        ("optim.lr=.inf", "optim.lr=inf is not allowed; give a finite number"),
        ("model.name=stego", "model.name='stego' is not allowed; choose one of"),
        (
            "run.checkpoint_upload=later",
            "run.checkpoint_upload='later' is not allowed; choose one of ['auto', 'async', 'sync']",
        ),
        ("optim.compile=maybe", "optim.compile='maybe' has the wrong type; expected a bool"),
        ("data.image_size=100", "must be a multiple of model.vit_patch_size"),
        ("tau=0.1", "must look like section.key"),
        # MLflow finds a run by name in a quoted filter: a quote was a traceback there.
        ("run.name=bob's-run", 'run.name="bob\'s-run" must be non-empty, without /, quotes'),
        ("data.shard_cache=s3://b/cache", "data.shard_cache='s3://b/cache' must be a local"),
    ],
)
def test_bad_values_fail_with_one_line(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny.yaml", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("model: san\n", [], "config section 'model' must be a mapping, got 'san'"),
        ("model: san\n", ["model.tau=0.1"], "config section 'model' must be a mapping"),
        ("seed: 3\n", [], "unknown config section 'seed'"),
    ],
)
def test_sections_that_are_not_mappings(tmp_path, text, overrides, expected):
    """Were a ValueError or TypeError traceback from merging the overrides."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


def test_baselines_need_their_loss_term():
    with pytest.raises(ConfigError, match="loss.w_mi=0 leaves model.name='iic'"):
        load_config(None, ["model.name=iic", "loss.w_mi=0"])
    with pytest.raises(ConfigError, match="loss.w_mi=0 and loss.w_rec=0 leave model.name='kmeans'"):
        load_config(None, ["model.name=kmeans", "loss.w_rec=0", "loss.w_mi=0"])
    load_config(None, ["model.name=kmeans", "loss.w_rec=0"])  # L_mi alone still trains it


def test_flat_round_trip():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.tau=0.2"])
    from san.config import from_dict

    assert from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["model.tau"] == pytest.approx(0.2)
