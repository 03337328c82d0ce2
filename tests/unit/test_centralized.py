"""The centralized reference: one party trains on the pooled training splits; DP and CKKS are refused."""

import numpy as np
import pytest

from secure_fedvlp.build import build_federation
from secure_fedvlp.errors import ConfigError
from secure_fedvlp.methods.centralized import CentralizedStrategy, CentralizedTrainer, pooled_training_data
from tests.unit.test_methods_contract import run_method, tiny_cfg


def test_one_party_trains_on_every_training_sites_records(tmp_path):
    cfg = tiny_cfg(tmp_path, "centralized")
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    trained = [r for r in rec.rows if r["phase"] == "train" and r["status"] == "ok"]
    assert [r["site"] for r in trained] == ["site1"]  # the data centre: the first training site by name
    fed = build_federation(cfg)
    pooled = pooled_training_data(cfg)
    assert len(pooled) == sum(len(s.train) for s in fed.sites)  # the held-out site's records are not pooled
    assert trained[0]["num-examples"] == len(pooled)
    np.testing.assert_array_equal(pooled.images[len(fed.sites[0].train) :], fed.sites[1].train.images)
    evaluated = {r["site"] for r in rec.rows if r["phase"] == "evaluate" and r["status"] == "ok"}
    assert evaluated == {"site1", "site2", "heldout"}  # every site still evaluates the pooled model


@pytest.mark.parametrize("section", ["privacy", "encryption"])
def test_dp_and_encryption_are_refused_with_the_reason(tmp_path, section):
    extra = {"privacy": {"enabled": True}, "train": {"objective": "decomposable"}} if section == "privacy" else {}
    if section == "encryption":
        extra = {"encryption": {"enabled": True}}
    cfg = tiny_cfg(tmp_path, "centralized", **extra)
    for build in (lambda: CentralizedStrategy(cfg), lambda: CentralizedTrainer(cfg, "cpu")):
        with pytest.raises(ConfigError, match=f"{section}.enabled = true protects a federation"):
            build()
