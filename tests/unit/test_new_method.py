"""A new method is one module plus a config: the shared bases, the wrappers and the calibration do the rest.

The module below (written to a temporary directory, as a user's own package would hold it) is a whole
method: a warm-up stage on the alignment layers before the full stage, declared in its release plan.
Without touching the package it trains through the real ClientApp, is validated by the config, and under
DP is calibrated for, and recorded as, the stages it declares.
"""

import importlib
import sys
import textwrap

import pytest

from secure_fedvlp import config as config_module
from secure_fedvlp.config import load_config
from secure_fedvlp.methods import registry
from secure_fedvlp.privacy import replay
from tests.unit.test_methods_contract import run_method

METHOD_MODULE = textwrap.dedent('''
    """FedAvg with a warm-up: the alignment layers and heads first, then every federated parameter."""

    from secure_fedvlp.methods import LocalTrainer, VLPStrategy, register_method
    from secure_fedvlp.privacy.plan import ReleasePlan, StagePlan


    class WarmupStrategy(VLPStrategy):
        method_name = "{name}"

        @classmethod
        def release_plan(cls, cfg):
            return ReleasePlan(stages=(StagePlan("align", 1), StagePlan("full", cfg.train.local_steps)))


    register_method("{name}", WarmupStrategy, LocalTrainer, "FedAvg with an alignment warm-up stage.")
''')

CONFIG = textwrap.dedent("""
    [run]
    seed = 0
    device = "cpu"

    [data]
    cache_dir = "{cache}"

    [data.synthetic]
    num_sites = 2
    train_per_site = 20
    val_per_site = 4
    test_per_site = 12
    public_size = 8
    image_size = 32
    seed = 3

    [model]
    name = "tiny"

    [train]
    local_steps = 2
    batch_size = 6
    objective = "decomposable"

    [federation]
    method = "{name}"
    num_rounds = 1

    [privacy]
    enabled = {dp}
    target_epsilon = 8.0
""")


@pytest.fixture
def warmup_method(tmp_path, monkeypatch):
    name = "warmup_test"
    (tmp_path / "my_methods").mkdir()
    (tmp_path / "my_methods" / "warmup.py").write_text(METHOD_MODULE.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path / "my_methods"))
    importlib.import_module("warmup")
    yield name
    registry._REGISTRY.pop(name, None)
    config_module._DECLARED_METHODS.discard(name)
    sys.modules.pop("warmup", None)


def test_an_unknown_method_is_refused_until_its_module_registers_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(cache=tmp_path / "cache", name="warmup_test", dp="false"))
    with pytest.raises(Exception, match="federation.method"):
        load_config(path)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_one_module_and_a_config_make_a_method(warmup_method, dp, tmp_path):
    path = tmp_path / "warmup.toml"
    path.write_text(CONFIG.format(cache=tmp_path / "cache", name=warmup_method, dp=str(dp).lower()))
    cfg = load_config(path)
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    trained = [r for r in rec.rows if r["phase"] == "train" and r["status"] == "ok"]
    assert sorted({(r["stage"], r["site"]) for r in trained}) == [
        ("align", "site1"),
        ("align", "site2"),
        ("full", "site1"),
        ("full", "site2"),
    ]
    if dp:
        for site in ("site1", "site2"):
            events = replay(tmp_path / "run" / "clients" / site / "privacy_ledger.jsonl").history
            assert [(e.stage, e.steps) for e in events] == [("align", 1), ("full", 2)]
