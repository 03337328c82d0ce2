"""The neighbouring relation (add/remove one record) matches what a DP site releases in clear.

Under DP a site releases only declared public sizes: its fit reply's ``num-examples`` (the aggregation
weight), its site information, its anchor reply's count and the denominator of its noised DRO report,
and its DP-SGD sample rate, are the same whether it holds n or n + 1 records.  The configuration
refuses a delta above 1/(10 n) and a DRO slice too small for its noise.
"""

import dataclasses

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from secure_fedvlp.build import build_federation, build_model
from secure_fedvlp.config import parse_config
from secure_fedvlp.errors import ConfigError
from secure_fedvlp.flower.client_app import ClientRuntime
from secure_fedvlp.flower.runtime import RunSetup
from secure_fedvlp.methods.strategy import VLPStrategy
from secure_fedvlp.methods.trainer import LocalTrainer
from secure_fedvlp.models.state import federated_state
from secure_fedvlp.privacy import replay
from secure_fedvlp.wire import numpy_to_arrays
from secure_fedvlp.wrappers import dpsgd
from secure_fedvlp.wrappers.compose import client_parts
from tests.unit.test_methods_contract import tiny_cfg

CPU = torch.device("cpu")


def _runtime(cfg, run_dir, site, public):
    model = build_model(cfg)
    parts = client_parts(cfg, run_dir, site, federated_state(model), CPU, public)
    return ClientRuntime(RunSetup(cfg, run_dir), site, model, parts.trainer, CPU, parts.encryption, parts.extensions)


def _message(cfg_values, arrays, kind):
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(cfg_values)}), dst_node_id=1, message_type=kind)


def test_released_counts_and_sample_rate_do_not_depend_on_one_record(tmp_path, monkeypatch):
    """Two client instances of one site, holding n = 20 and n - 1 = 19 records: the same site information,
    fit-reply num-examples (hence aggregation weight), anchor count, DRO-report denominator, DP-SGD sample
    rate and expected batch size; all of them the declared sizes."""
    cfg = tiny_cfg(
        tmp_path,
        "fedaid",
        privacy={"enabled": True, "noise_multiplier": 1.0},
        train={"objective": "decomposable"},
        anchors={"enabled": True, "trust_server": True},
    )
    fed = build_federation(cfg)
    site = fed.sites[0]
    sites = {"n": site, "n-1": dataclasses.replace(site, train=site.train.subset(range(len(site.train) - 1)))}
    assert len(sites["n"].train) == 20 and len(sites["n-1"].train) == 19
    denominators, batches = [], []
    real_mean = dpsgd.noised_clipped_mean

    def spy_mean(*args, **kwargs):
        denominators.append(kwargs["public_count"])
        return real_mean(*args, **kwargs)

    real_gradient = dpsgd.PrivateGradient

    class SpyGradient(real_gradient):
        def __init__(self, *args, **kwargs):
            batches.append(kwargs["expected_batch_size"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(dpsgd, "noised_clipped_mean", spy_mean)
    monkeypatch.setattr(dpsgd, "PrivateGradient", SpyGradient)
    out, replies = {}, {}
    for name, data in sites.items():
        rt = _runtime(cfg, tmp_path / name, data, fed.public)
        arrays = numpy_to_arrays(federated_state(rt.model))
        info = rt.query(_message({"query": "site-info"}, arrays, MessageType.QUERY))["info"]
        anchors = rt.query(_message({"query": "anchors", "server-round": 1}, arrays, MessageType.QUERY))["metrics"]
        fit_reply = rt.train(
            _message({"server-round": 1, "stage": "full", "local-steps": 1}, arrays, MessageType.TRAIN)
        )
        replies[name] = [Message(fit_reply, dst_node_id=0, message_type=MessageType.TRAIN)]
        fit = fit_reply["metrics"]
        dro = rt.query(_message({"query": "dro-loss", "server-round": 1}, arrays, MessageType.QUERY))["metrics"]
        events = replay(tmp_path / name / "clients" / site.name / "privacy_ledger.jsonl").history
        rate = [e.sample_rate for e in events if type(e).__name__ == "DPSGDEvent"]
        out[name] = (int(info["num-train"]), anchors["num-examples"], fit["num-examples"], dro["num-examples"], rate)
        out[name] += (fit["dp_sample_rate"],)
    assert out["n"] == out["n-1"]
    # the declared sizes: 20 declared, a declared DRO slice of 8, 12 declared training records, q = 6 / 12
    assert out["n"] == (20, 12.0, 12.0, 8.0, [0.5], 0.5)
    assert denominators == [8, 8] and batches == [6, 6]
    # without DP a site states its exact size (no DP claim is made)
    plain = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False))
    exact = [int(_runtime(plain, tmp_path / f"plain-{k}", d, fed.public).info()["num-train"]) for k, d in sites.items()]
    assert exact == [20, 19]
    # the server weights each reply by its num-examples: the same weight whichever dataset the site holds
    strategy = VLPStrategy(cfg)
    assert strategy.aggregation_weights(1, "full", replies["n"]) == strategy.aggregation_weights(
        1, "full", replies["n-1"]
    )


def test_delta_above_one_over_ten_n_is_refused_naming_site_and_bound(tmp_path):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(tmp_path, "fedavg", privacy={"enabled": True, "delta": 0.01}, train={"objective": "decomposable"})
    text = str(e.value)
    assert "privacy.delta" in text and "site1" in text and "site2" in text and "0.005" in text and "n = 20" in text
    # a per-site declared size is checked for that site only
    with pytest.raises(ConfigError, match=r"site2 \(declared size n = 2000\)"):
        tiny_cfg(
            tmp_path,
            "fedavg",
            privacy={"enabled": True, "delta": 1e-4, "declared_sizes": {"site2": 2000}},
            train={"objective": "decomposable"},
        )
    # real data: the declared size applies to every site
    manifest = {"source": "manifest", "manifest_path": "m.csv"}
    with pytest.raises(ConfigError, match=r"every site \(declared size n = 50000\)"):
        parse_config(
            {
                "data": manifest,
                "train": {"objective": "decomposable"},
                "privacy": {"enabled": True, "delta": 1e-5, "declared_size": 50000},
            }
        )
    ok = tiny_cfg(tmp_path, "fedavg", privacy={"enabled": True, "delta": 0.005}, train={"objective": "decomposable"})
    assert ok.privacy.delta == 0.005


def test_dp_on_real_data_needs_a_declared_size(tmp_path):
    manifest = {"source": "manifest", "manifest_path": "m.csv"}
    with pytest.raises(ConfigError, match=r"privacy.declared_size.*data.source = 'manifest'"):
        parse_config({"data": manifest, "train": {"objective": "decomposable"}, "privacy": {"enabled": True}})
    cfg = parse_config(
        {
            "data": manifest,
            "train": {"objective": "decomposable"},
            "privacy": {"enabled": True, "declared_sizes": {"hospital_a": 3000}},
        }
    )
    assert cfg.require_declared_size("hospital_a") == 3000
    with pytest.raises(ConfigError, match=r"privacy.declared_sizes.hospital_b"):
        cfg.require_declared_size("hospital_b")  # a site the manifest holds but the configuration does not size
    with pytest.raises(ConfigError, match=r"privacy.declared_sizes.site9"):  # synthetic: a site that does not exist
        tiny_cfg(tmp_path, "fedavg", privacy={"enabled": True, "declared_sizes": {"site9": 30}})


def test_dro_slice_too_small_for_its_noise_is_refused_at_configuration(tmp_path):
    """A declared slice of 2 records (10 % of 20) with report noise multiplier 2: the noised mean's std would be
    10 x 2 / 2 = 10, the whole clip range.  The configuration needs at least 4 x 2 = 8 records."""
    with pytest.raises(ConfigError) as e:
        tiny_cfg(
            tmp_path,
            "feddra",
            privacy={"enabled": True},
            train={"objective": "decomposable"},
            feddra={"holdout_fraction": 0.1},
        )
    text = str(e.value)
    assert "feddra.holdout_fraction" in text and "DRO slice of 2 records" in text and "at least 8" in text
    # the same fraction passes with a noise multiplier that allows 2 records, or a declared size that gives 8
    tiny_cfg(
        tmp_path,
        "feddra",
        privacy={"enabled": True, "report_noise_multiplier": 0.5},
        train={"objective": "decomposable"},
        feddra={"holdout_fraction": 0.1},
    )
    # without DP nothing is noised and nothing is refused
    tiny_cfg(tmp_path, "feddra", feddra={"holdout_fraction": 0.1})


class _TinyReportTrainer(LocalTrainer):
    """A method whose scalar report divides by a declared count of 3 records."""

    def report_values(self, kind, model, site, config):
        return torch.ones(3) if kind == "tiny" else None

    def declared_report_count(self, kind, declared):
        return 3 if kind == "tiny" else None


def test_report_with_too_few_records_is_refused_before_release(tmp_path):
    """At report time (any method): a declared denominator below 4 x report_noise_multiplier is refused with
    the minimum named, and nothing is recorded or released."""
    cfg = tiny_cfg(tmp_path, "fedavg", privacy={"enabled": True}, train={"objective": "decomposable"})
    fed = build_federation(cfg)
    dp = dpsgd.DPTrainer(
        _TinyReportTrainer(cfg, CPU, fed.public),
        tmp_path / "ledger.jsonl",
        "site1",
        1.0,
        0.3,
        cfg.privacy,
        declared_size=20,
    )
    with pytest.raises(ValueError, match=r"declared count of 3 records, below the minimum 8"):
        dp.answer_query("tiny", build_model(cfg), fed.sites[0], {"server-round": 1})
    assert len(dp.ledger.events()) == 0
