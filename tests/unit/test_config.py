"""Config parsing: unknown keys and wrong types are rejected with the dotted key named."""

from pathlib import Path

import pytest

from secure_fedvlp.config import (
    ExperimentConfig,
    apply_overrides,
    config_hash,
    config_to_dict,
    dump_toml,
    load_config,
    parse_config,
)
from secure_fedvlp.errors import ConfigError

ALL = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))
CONFIGS = [p for p in ALL if not p.read_text().lstrip().startswith(("[sweep]", "#")) or "[sweep]" not in p.read_text()]
SWEEPS = [p for p in ALL if p not in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_parses(path):
    from secure_fedvlp.sweep import load_sweep

    spec = load_sweep(path)
    assert spec.cells()


def test_defaults_parse_from_empty():
    cfg = parse_config({})
    assert cfg.federation.method == "fedavg"
    assert cfg.data.synthetic.num_sites >= 1


def test_unknown_key_named_with_valid_keys():
    with pytest.raises(ConfigError) as e:
        parse_config({"train": {"local_stepz": 3}})
    msg = str(e.value)
    assert "train.local_stepz" in msg and "local_steps" in msg


def test_all_problems_collected_in_one_error():
    with pytest.raises(ConfigError) as e:
        parse_config({"train": {"batch_size": "big", "lr": True}, "bogus": {}, "run": {"seed": 1.5}})
    assert len(e.value.problems) == 4
    text = str(e.value)
    for key in ("train.batch_size", "train.lr", "bogus", "run.seed"):
        assert key in text


def test_range_validation_names_key_and_value():
    with pytest.raises(ConfigError, match=r"federation.fraction_train.*1.5"):
        parse_config({"federation": {"fraction_train": 1.5}})


def test_literal_values_checked():
    with pytest.raises(ConfigError, match="run.device"):
        parse_config({"run": {"device": "tpu"}})


def test_nested_dataclass_errors_propagate():
    with pytest.raises(ConfigError, match="num_sites"):
        parse_config({"data": {"synthetic": {"num_sites": 0}}})


def test_overrides_parse_toml_values():
    data = apply_overrides({}, ["federation.num_rounds=7", "run.name=abc", "eval.recall_ks=[1, 2]",
                               "train.lr=1e-4"])
    cfg = parse_config(data)
    assert cfg.federation.num_rounds == 7 and cfg.run.name == "abc"
    assert cfg.eval.recall_ks == (1, 2) and cfg.train.lr == pytest.approx(1e-4)


def test_malformed_override_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["federation.num_rounds"])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(Path(__file__).parents[2] / "configs" / "demo.toml", ["federation.num_rounds=2"])
    p = tmp_path / "resolved.toml"
    p.write_text(dump_toml(config_to_dict(cfg)))
    again = load_config(p)
    assert again == cfg and config_hash(again) == config_hash(cfg)


def test_unknown_method_is_rejected_when_the_config_is_read():
    with pytest.raises(ConfigError, match=r"federation.method.*fedavg.*'fedsgd'"):
        parse_config({"federation": {"method": "fedsgd"}})
