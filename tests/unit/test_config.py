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
    import secure_fedvlp.methods  # noqa: F401  (the CLI registers the built-in methods before it reads a config)

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
    data = apply_overrides({}, ["federation.num_rounds=7", "run.name=abc", "eval.recall_ks=[1, 2]", "train.lr=1e-4"])
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


def _named(problems, key, value):
    """The one problem that names ``key`` and ends with the value found."""
    hits = [p for p in problems if f"'{key}'" in p and p.endswith(f"Found {value!r}.")]
    assert len(hits) == 1, (key, value, problems)
    return hits[0]


def test_every_range_problem_is_reported_at_once():
    """Several bad values in one section and in several sections: one error names every key and value."""
    bad = {
        "train": {"local_steps": 0, "batch_size": 1, "lr": -1.0, "grad_clip": -0.5},
        "federation": {"num_rounds": 0, "fraction_train": 1.5},
        "privacy": {"delta": 2.0, "clip_norm": 0.0, "grad_sample_mode": "ghost", "clipping": "per_layer"},
        "audit": {"canaries": 1},
    }
    with pytest.raises(ConfigError) as e:
        parse_config(bad)
    expected = [
        ("train.local_steps", 0),
        ("train.batch_size", 1),
        ("train.lr", -1.0),
        ("train.grad_clip", -0.5),
        ("federation.num_rounds", 0),
        ("federation.fraction_train", 1.5),
        ("privacy.delta", 2.0),
        ("privacy.clip_norm", 0.0),
        ("privacy.grad_sample_mode", "ghost"),
        ("audit.canaries", 1),
    ]
    assert len(e.value.problems) == len(expected), e.value.problems
    text = str(e.value)
    assert f"({len(expected)} problems)" in text
    for key, value in expected:
        assert _named(e.value.problems, key, value) in text


def test_a_section_built_directly_names_all_its_problems():
    from secure_fedvlp.config import TrainConfig

    with pytest.raises(ValueError) as e:
        TrainConfig(lr=0.0, weight_decay=-1.0)
    assert "'train.lr' must be > 0. Found 0.0." in str(e.value)
    assert "'train.weight_decay' must be >= 0. Found -1.0." in str(e.value)


def test_problems_across_sections_are_reported_together():
    with pytest.raises(ConfigError) as e:
        parse_config(
            {"federation": {"method": "fedsgd"}, "privacy": {"enabled": True}, "train": {"objective": "infonce"}}
        )
    assert len(e.value.problems) == 2, e.value.problems
    assert "fedavg" in _named(e.value.problems, "federation.method", "fedsgd")
    assert "privacy.enabled" in _named(e.value.problems, "train.objective", "infonce")
    with pytest.raises(ConfigError) as e:
        parse_config(
            {
                "federation": {"method": "fedsgd"},
                "train": {"objective": "decomposable"},
                "data": {"synthetic": {"public_size": 0}},
            }
        )
    assert len(e.value.problems) == 2, e.value.problems
    assert "decomposable" in _named(e.value.problems, "data.synthetic.public_size", 0)
