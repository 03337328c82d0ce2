"""Noised global anchor features: clipping, noise, accounting before broadcast, CKKS.

Real ClientApp, real strategies, real Opacus ledgers and real TenSEAL ciphertexts on tiny
models; only the transport is in-process (tests/loopback.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from secure_fedvlp.config import parse_config
from secure_fedvlp.data.types import FINDINGS
from secure_fedvlp.encryption import AggregateCiphertext, decrypt_aggregate, load_client_context
from secure_fedvlp.errors import ConfigError, KeyMaterialError
from secure_fedvlp.layout import RunLayout
from secure_fedvlp.privacy import replay
from secure_fedvlp.privacy.anchors import (
    ANCHORS_KEY,
    SUM_KEY,
    anchor_dim,
    anchor_event,
    decode_anchors,
    guidance_targets,
    record_contributions,
    server_noise,
    share_sigma,
    total_sigma,
)
from secure_fedvlp.wrappers.anchors import site_contribution
from secure_fedvlp.wrappers.encryption import CIPHERTEXT_KEY, encryption_settings, is_encrypted
from tests.unit.test_encryption_flower import TamperingGrid, _keys
from tests.unit.test_encryption_flower import run as run_fed
from tests.unit.test_methods_contract import tiny_cfg

#: False-alarm rate of every statistical test in this file (two-sided).
ALPHA = 1e-6


def anchor_cfg(tmp_path, method="fedavg", encrypted=False, privacy=True, **anchors):
    # without encryption, server-added noise is the trusted-aggregator mode: these tests opt in explicitly
    anchors.setdefault("trust_server", not encrypted and anchors.get("noise", "server") == "server")
    extra = {
        "anchors": {"enabled": True, "clip": 0.5, "noise_multiplier": 2.0, **anchors},
        "federation": {"method": method, "num_rounds": 2},
    }
    if privacy:
        extra["privacy"] = {"enabled": True, "target_epsilon": 50.0}
        extra["train"] = {"objective": "decomposable"}
    if encrypted:
        extra["encryption"] = {"enabled": True, "min_contributors": 1}
    return tiny_cfg(tmp_path, method, **extra)


def variance_pvalue(samples: np.ndarray, sigma: float) -> float:
    """Two-sided chi-square test of ``Var = sigma^2`` for zero-mean Gaussian samples."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    stat = float(np.sum(x**2) / sigma**2)  # ~ chi2(n) under the null
    n = x.size
    return 2 * min(stats.chi2.cdf(stat, n), stats.chi2.sf(stat, n))


# -- the mechanism ------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), d=st.integers(1, 16), clip=st.floats(0.01, 10.0), seed=st.integers(0, 10_000))
def test_each_record_contribution_is_clipped_to_c_a(n, d, clip, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    labels = (torch.rand(n, len(FINDINGS), generator=g) < 0.4).float()
    c = record_contributions(v, t, labels, clip)
    assert c.shape == (n, anchor_dim(len(FINDINGS), d))
    assert bool((c.norm(dim=1) <= clip * (1 + 1e-5)).all())
    # a record with no finding contributes nothing; the count column carries the (scaled) finding count
    assert bool((c[labels.sum(1) == 0] == 0).all())


def test_anchor_noise_std_matches_sigma_times_clip():
    """Server noise: sample std equals z * C_a (chi-square test at ALPHA); a 5 % error would be caught."""
    cfg = parse_config({"anchors": {"enabled": True, "trust_server": True, "clip": 0.7, "noise_multiplier": 1.3}})
    sigma = total_sigma(cfg)
    assert sigma == pytest.approx(0.7 * 1.3)
    x = server_noise(cfg, 20_000, np.random.default_rng(1))
    assert variance_pvalue(x, sigma) > ALPHA
    assert abs(x.mean()) < 6 * sigma / np.sqrt(x.size)
    assert variance_pvalue(x, 1.05 * sigma) < ALPHA and variance_pvalue(x, sigma / 1.05) < ALPHA  # the test has power


def test_distributed_shares_sum_to_the_full_noise_without_any_one_share():
    cfg = parse_config(
        {
            "anchors": {
                "enabled": True,
                "clip": 1.0,
                "noise_multiplier": 2.0,
                "noise": "distributed",
                "min_contributors": 3,
            }
        }
    )
    assert share_sigma(cfg) == pytest.approx(2.0 / np.sqrt(2))
    # any t - 1 = 2 shares give the full variance
    g = np.random.default_rng(0)
    x = g.normal(0, share_sigma(cfg), size=(2, 20_000)).sum(0)
    assert variance_pvalue(x, total_sigma(cfg)) > ALPHA
    # without CKKS the server sees one site's share only: that smaller sigma is what is accounted
    assert anchor_event(cfg, 1).sigma == pytest.approx(share_sigma(cfg))
    # with CKKS too: every site holds the key and none can count an aggregate's contributions
    enc = parse_config({"anchors": cfg.anchors.__dict__, "encryption": {"enabled": True}})
    assert anchor_event(enc, 1).sigma == pytest.approx(share_sigma(cfg))


def test_distributed_noise_needs_two_contributors():
    with pytest.raises(ConfigError, match="anchors.min_contributors"):
        parse_config({"anchors": {"enabled": True, "noise": "distributed", "min_contributors": 1}})


def test_adding_or_removing_one_record_moves_a_site_sum_by_at_most_c_a(tmp_path):
    from secure_fedvlp.build import build_federation, build_model

    cfg = anchor_cfg(tmp_path, privacy=False)
    site = build_federation(cfg).sites[0].train
    model = build_model(cfg)
    full = site_contribution(model, site, cfg, torch.device("cpu"))
    drop_one = site_contribution(model, site.subset(np.arange(1, len(site))), cfg, torch.device("cpu"))
    assert 0 < np.linalg.norm(full - drop_one) <= cfg.anchors.clip * (1 + 1e-5)


def test_decoded_anchors_and_guidance_targets_are_per_record():
    cfg = parse_config({"anchors": {"enabled": True, "trust_server": True, "clip": 1.0, "noise_multiplier": 0.1}})
    d, nf = 4, len(FINDINGS)
    m = np.zeros((nf, 2 * d + 1))
    m[1, :d], m[1, d : 2 * d], m[1, -1] = [3, 0, 0, 0], [0, 3, 0, 0], 10.0  # finding 1: well populated
    m[2, -1] = 0.2  # finding 2: count within the noise, dropped
    bank = decode_anchors(m.reshape(-1), nf, d, cfg)
    assert bank.findings.tolist() == [1]
    assert torch.allclose(bank.image[0], torch.tensor([1.0, 0, 0, 0]))
    labels = torch.zeros(3, nf)
    labels[0, 1] = labels[1, 2] = 1  # record 0 has finding 1; record 1 only the dropped one; record 2 none
    img, txt, has = guidance_targets(labels, bank)
    assert has.tolist() == [True, False, False]
    # record 0's target does not depend on the other records
    img2, _, _ = guidance_targets(labels[:1], bank)
    assert torch.equal(img[0], img2[0])
    with pytest.raises(ValueError, match="anchor bank has"):
        decode_anchors(np.zeros(5), nf, d, cfg)


# -- in a federated run -------------------------------------------------------------------
class LedgerCheckingGrid(TamperingGrid):
    """Reads each site's ledger from disk the moment its anchor contribution reaches the server."""

    def __init__(self, *args, cfg=None, run_dir=None, sites=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cfg, self.run_dir, self.sites_by_node = cfg, run_dir, sites
        self.seen_before_release: list[tuple[str, int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        for msg, reply in zip(messages, replies, strict=True):
            cfgrec = msg.content.config_records.get("config")
            if msg.metadata.message_type != MessageType.QUERY or cfgrec is None or cfgrec.get("query") != "anchors":
                continue
            site = str(reply.content["info"]["site"])
            if reply.content.metric_records.get("metrics", {}).get("budget-exhausted"):
                continue
            rnd = int(cfgrec["server-round"])
            lines = [json.loads(x) for x in RunLayout(self.run_dir).ledger(site).read_text().splitlines() if x.strip()]
            events = [
                e for e in lines if e.get("event", {}).get("what") == "anchors" and e["event"].get("round") == rnd
            ]
            assert events, f"{site}: anchor contribution of round {rnd} sent before its ledger entry"
            self.seen_before_release.append((site, rnd))
        return replies


def _run_with_ledger_check(cfg, run_dir, rounds=2, encrypted=False):
    from secure_fedvlp.build import build_model, expected_num_nodes
    from secure_fedvlp.flower.client_app import make_client_app
    from secure_fedvlp.flower.runtime import RunSetup
    from secure_fedvlp.models.state import federated_state
    from secure_fedvlp.wire import numpy_to_arrays
    from secure_fedvlp.wrappers.compose import strategy_class
    from secure_fedvlp.wrappers.encryption import encryption_settings, load_server_encryption
    from tests.unit.test_methods_contract import ListRecorder

    setup = RunSetup(cfg, run_dir)
    grid = LedgerCheckingGrid(make_client_app(lambda ctx: setup), expected_num_nodes(cfg), cfg=cfg, run_dir=run_dir)
    rec = ListRecorder()
    assert cfg.encryption.enabled == encrypted
    init = federated_state(build_model(cfg))
    strategy = strategy_class(cfg)(cfg, rec)
    if encrypted:
        settings = encryption_settings(cfg, run_dir)
        strategy.setup_encryption(settings, load_server_encryption(settings), init)
    result = strategy.start(
        grid, numpy_to_arrays(init), num_rounds=rounds, timeout=60, expected_nodes=expected_num_nodes(cfg)
    )
    return strategy, result, rec, grid


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext", "ckks"])
def test_anchor_release_is_in_the_ledger_before_broadcast(encrypted, tmp_path):
    """Every contributing site's ledger holds the round's anchor release before the server gets the sum."""
    cfg = anchor_cfg(tmp_path, "feddra", encrypted=encrypted)
    if encrypted:
        _keys(cfg, tmp_path / "run")
    strategy, result, rec, grid = _run_with_ledger_check(cfg, tmp_path / "run", rounds=2, encrypted=encrypted)
    assert sorted(grid.seen_before_release) == [("site1", 1), ("site1", 2), ("site2", 1), ("site2", 2)]
    released = [r for r in rec.rows if r.get("phase") == "anchors"]
    assert [r["status"] for r in released] == ["released", "released"]
    assert ("trusted aggregator" in released[0]["mode"]) != encrypted  # the plaintext mode is labelled
    # every train message of the round carried the bank; the ledger composes it with DP-SGD
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert train and all(ANCHORS_KEY in m.content.array_records for m in train)
    for site in ("site1", "site2"):
        acc = replay(RunLayout(tmp_path / "run").ledger(site))
        lines = [json.loads(x) for x in RunLayout(tmp_path / "run").ledger(site).read_text().splitlines()]
        whats = [ln["event"].get("what") for ln in lines if "event" in ln]
        assert whats.count("anchors") == 2, whats
        assert acc.get_epsilon(cfg.privacy.delta) > 0


def test_budget_that_cannot_afford_the_anchors_sends_nothing(tmp_path):
    # sigma = 0.05 * C_a: one release costs far more than the budget of 50
    cfg = tiny_cfg(
        tmp_path,
        "fedavg",
        anchors={"enabled": True, "clip": 1.0, "noise_multiplier": 0.05, "trust_server": True},
        privacy={"enabled": True, "target_epsilon": 50.0, "noise_multiplier": 1.0},
        train={"objective": "decomposable"},
    )
    strategy, result, rec, grid = _run_with_ledger_check(cfg, tmp_path / "run", rounds=1)
    stopped = [r for r in rec.rows if r.get("status") == "budget_exhausted"]
    assert {r["site"] for r in stopped} == {"site1", "site2"} and all(r["phase"] == "anchors" for r in stopped)
    assert grid.seen_before_release == []  # no contribution reached the server
    assert strategy.current_anchors is None
    for site in ("site1", "site2"):
        assert '"anchors"' not in RunLayout(tmp_path / "run").ledger(site).read_text()


def _as_dict(cfg):
    from secure_fedvlp.config import config_to_dict

    return config_to_dict(cfg)


def test_server_never_holds_plaintext_anchors_under_ckks(tmp_path):
    """With CKKS on: contributions and the bank are ciphertexts in the server; only key holders see noised anchors."""
    from secure_fedvlp.build import build_federation, build_model
    from secure_fedvlp.models.state import federated_state, load_federated_state

    cfg = anchor_cfg(tmp_path, "fedavg", encrypted=True, privacy=False, noise_multiplier=1.0)
    _keys(cfg, tmp_path / "run")
    strategy, result, rec, grid = run_fed(cfg, tmp_path / "run", encrypted=True)
    anchor_replies = [
        r
        for r in grid.replies
        if r.metadata.message_type == MessageType.QUERY and ANCHORS_KEY in r.content.array_records
    ]
    assert len(anchor_replies) == 2
    assert all(set(r.content[ANCHORS_KEY].keys()) == {CIPHERTEXT_KEY} for r in anchor_replies)
    bank_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert bank_msgs and all(is_encrypted(m.content[ANCHORS_KEY]) for m in bank_msgs)
    assert is_encrypted(strategy.current_anchors) and SUM_KEY not in strategy.current_anchors
    # no array of the anchor bank's size exists in clear anywhere in the strategy
    dim = strategy.anchor_dim
    for v in vars(strategy).values():
        assert not (isinstance(v, np.ndarray) and v.size == dim)
    # the server's context cannot decrypt the bank; a key holder can, and finds it noised
    bank = AggregateCiphertext.from_bytes(
        strategy.current_anchors[CIPHERTEXT_KEY].numpy().tobytes(), strategy.encryption_ctx
    )
    with pytest.raises(KeyMaterialError, match="cannot decrypt"):
        decrypt_aggregate(strategy.encryption_ctx, bank, total_weight=1.0)
    settings = encryption_settings(cfg, tmp_path / "run")
    key = load_client_context(settings.client_key("site1"))
    noised = decrypt_aggregate(key, bank, total_weight=1.0, fixed_point_bits=settings.fixed_point_bits)
    # the un-noised sum, recomputed as the sites did with the round's global model
    fed = build_federation(cfg)
    model = build_model(cfg)
    load_federated_state(model, federated_state(build_model(cfg)))
    from secure_fedvlp.methods import get_method

    trainer = get_method("fedavg").trainer(cfg, torch.device("cpu"), fed.public)
    clean = sum(
        site_contribution(
            model,
            trainer.training_subset(s.train),
            cfg,
            torch.device("cpu"),
            fixed_point_bits=settings.fixed_point_bits,
        )
        for s in fed.sites
    )
    noise = noised - clean
    assert variance_pvalue(noise, total_sigma(cfg)) > ALPHA


def test_anchors_are_used_as_negatives_and_guidance(tmp_path):
    """FedDRA under DP with anchors: the bank reaches the trainer, extends the negatives, adds guidance."""
    from secure_fedvlp.build import build_federation, build_model
    from secure_fedvlp.methods.feddra import FedDRATrainer
    from secure_fedvlp.methods.trainer import TrainTask

    cfg = anchor_cfg(tmp_path, "feddra", privacy=False, noise_multiplier=0.01)
    cfg = parse_config({**_as_dict(cfg), "train": {"objective": "decomposable"}})
    fed = build_federation(cfg)
    model = build_model(cfg)
    trainer = FedDRATrainer(cfg, torch.device("cpu"), fed.public)
    vec = sum(site_contribution(model, s.train, cfg, torch.device("cpu")) for s in fed.sites)
    bank = decode_anchors(vec, len(FINDINGS), model.spec.embed_dim, cfg)
    assert len(bank) > 0
    plain = trainer.begin(model, TrainTask(1, "full", 1), {})
    with_bank = trainer.begin(model, TrainTask(1, "full", 1, anchors=bank), {})
    assert with_bank["neg_text"].shape[0] == plain["neg_text"].shape[0] + len(bank)
    from secure_fedvlp.models.state import make_collate

    batch = make_collate(model)([fed.sites[0].train[i] for i in range(4)])
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    terms = trainer.extra_terms(model, batch, out, with_bank)
    assert "anchor_bank" in terms and float(terms["anchor_bank"]) > 0
    assert "anchor_bank" not in trainer.extra_terms(model, batch, out, plain)


class FailAnchorQueries(LedgerCheckingGrid):
    """Node ``fail`` errors on anchor queries only (a site dropping out of the anchor round)."""

    def __init__(self, *args, fail=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail = fail

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        messages = list(messages)
        out, keep = [], []
        for m in messages:
            c = m.content.config_records.get("config")
            if m.metadata.dst_node_id == self.fail and c is not None and c.get("query") == "anchors":
                out.append(Message(Error(code=0, reason="simulated dropout"), reply_to=m))
            else:
                keep.append(m)
        return out + super().send_and_receive(keep, timeout=timeout)


@pytest.mark.parametrize("dropout", [False, True], ids=["all", "one-drops"])
def test_distributed_shares_and_the_effect_of_a_dropout(dropout, tmp_path):
    from secure_fedvlp.build import build_model, expected_num_nodes
    from secure_fedvlp.flower.client_app import make_client_app
    from secure_fedvlp.flower.runtime import RunSetup
    from secure_fedvlp.models.state import federated_state
    from secure_fedvlp.wire import numpy_to_arrays
    from secure_fedvlp.wrappers.compose import strategy_class
    from tests.unit.test_methods_contract import ListRecorder

    cfg = anchor_cfg(tmp_path, "fedavg", noise="distributed", min_contributors=2)
    setup = RunSetup(cfg, tmp_path / "run")
    grid = FailAnchorQueries(
        make_client_app(lambda ctx: setup),
        expected_num_nodes(cfg),
        cfg=cfg,
        run_dir=tmp_path / "run",
        fail=1 if dropout else None,
    )
    rec = ListRecorder()
    strategy = strategy_class(cfg)(cfg, rec)
    strategy.start(
        grid,
        numpy_to_arrays(federated_state(build_model(cfg))),
        num_rounds=1,
        timeout=60,
        expected_nodes=expected_num_nodes(cfg),
    )
    row = [r for r in rec.rows if r.get("phase") == "anchors" and r.get("status") in ("released", "withheld")][0]
    if dropout:  # one share left: fewer than min_contributors, so nothing is released
        assert row["status"] == "withheld" and "min_contributors = 2" in row["reason"]
        assert strategy.current_anchors is None
    else:  # two shares of sigma / sqrt(t - 1) each: total noise sqrt(2) * share >= sigma
        assert row["status"] == "released" and "distributed" in row["mode"]
        assert row["sigma_total"] == pytest.approx(share_sigma(cfg) * np.sqrt(2))
        assert row["sigma_total"] >= total_sigma(cfg)
        # without CKKS the server sees one site's share only: that is what each ledger records
        assert row["sigma_accounted"] == pytest.approx(share_sigma(cfg))


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext", "ckks"])
def test_distributed_noise_is_accounted_at_one_share_even_under_ckks(encrypted, tmp_path):
    """All sites share one CKKS key and no site can count an aggregate's contributions, so a server that
    forwards one site's ciphertext (or colludes with a site) sees that sum with its own share only: the
    ledger must account the share's sigma, not the total (t = 3: sigma / sqrt(2))."""
    cfg = parse_config(
        {
            "anchors": {
                "enabled": True,
                "clip": 1.0,
                "noise_multiplier": 2.0,
                "noise": "distributed",
                "min_contributors": 3,
            },
            "encryption": {"enabled": encrypted, "min_contributors": 2},
            "data": {"synthetic": {"num_sites": 3}},
        }
    )
    ev = anchor_event(cfg, 1)
    assert ev.sigma == pytest.approx(share_sigma(cfg)) and ev.sigma == pytest.approx(2.0 / np.sqrt(2))
    assert ev.sigma < total_sigma(cfg)


def test_rounded_neighbouring_sums_stay_within_the_anchor_clip():
    """A site's sum is rounded to the fixed-point grid before encryption; two neighbouring sums rounded in
    opposite directions must still be at most C_a apart (the sensitivity the ledger records).  The
    adversarial case: every coordinate of one sum sits just below a half step (rounds down) and of the
    other just above (rounds up), with the record's contribution as large as the clip allows."""
    from secure_fedvlp.privacy.anchors import effective_clip

    cfg = parse_config({"anchors": {"enabled": True, "trust_server": True, "clip": 1.0}})
    dim, bits = 390, 10
    g = 2.0**-bits
    clip = effective_clip(cfg, dim, bits)
    t = 1e-9
    m = np.floor((clip / np.sqrt(dim) - 2 * t) / g)  # the contribution per coordinate: m steps plus 2t
    s = np.full(dim, 0.5 * g - t)
    c = np.full(dim, m * g + 2 * t)
    assert np.linalg.norm(c) <= clip
    # choose the largest contribution along the diagonal that the clip allows, then round both sums
    rounded = lambda x: np.round(x / g) * g  # noqa: E731
    assert np.linalg.norm(rounded(s + c) - rounded(s)) <= cfg.anchors.clip + 1e-12
    # the adversarial pattern really does add a step per coordinate beyond the contribution itself
    assert np.linalg.norm(rounded(s + c) - rounded(s)) > np.linalg.norm(c) + 0.9 * np.sqrt(dim) * g


def test_trusted_aggregator_anchors_need_an_explicit_opt_in():
    """Server noise without encryption shows the server every site's un-noised sum: refused unless the user
    accepts a claim that holds only against the other parties, and every alternative is named."""
    with pytest.raises(ConfigError, match=r"anchors.trust_server.*un-noised anchor sum.*distributed") as exc:
        parse_config({"anchors": {"enabled": True}})
    assert "Found False" in str(exc.value)
    for ok in (
        {"anchors": {"enabled": True, "trust_server": True}},
        {"anchors": {"enabled": True}, "encryption": {"enabled": True}},
        {"anchors": {"enabled": True, "noise": "distributed", "min_contributors": 2}},
    ):
        parse_config(ok)
    from secure_fedvlp.privacy.anchors import claim_scope

    assert claim_scope(parse_config({"anchors": {"enabled": True, "trust_server": True}}))
    assert not claim_scope(parse_config({"anchors": {"enabled": True}, "encryption": {"enabled": True}}))
