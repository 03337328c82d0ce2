"""FedSM: SoftPull from the sum, the contributors a site drop leaves, threshold 1.0, the selector's one step, CKKS.

Real ClientApp, real FedSM strategy and trainer, real MONAI decoders and (for CKKS) real TenSEAL ciphertexts;
only the transport is in-process (tests/loopback.py).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import MessageType

from secure_fedvlp.build import build_federation
from secure_fedvlp.methods.fedsm import CONTRIBUTORS, IN_SUM, PERSONAL_FILE, softpull, softpull_from_sum
from secure_fedvlp.models.state import load_federated_state
from secure_fedvlp.wire import arrays_to_numpy
from tests.unit.test_methods_contract import run_method, tiny_cfg


def test_softpull_from_the_sum_equals_nvflares_formula():
    rng = np.random.default_rng(0)
    v = {s: rng.normal(size=(5, 4)) * 10 for s in ("a", "b", "c")}
    lam = 0.7
    reference = softpull(v, lam)
    total = sum(v.values())
    for s in v:
        others = sum(v[j] for j in v if j != s)
        nvflare = v[s] * lam + others * (1 - lam) / (len(v) - 1)  # the aggregator's loop, written out
        np.testing.assert_allclose(reference[s], nvflare, rtol=0, atol=1e-12)
        np.testing.assert_allclose(softpull_from_sum(v[s], total, 3, lam), nvflare, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 contributors.*N = 1"):
        softpull_from_sum(v["a"], v["a"], 1, lam)
    with pytest.raises(ValueError, match="at least 2 contributors.*N = 1"):
        softpull({"a": v["a"]}, lam)


def _fedsm_cfg(tmp_path, **extra):
    cfg = tiny_cfg(
        tmp_path,
        "fedsm",
        train={"local_steps": 2, "batch_size": 6},
        fedsm={"decoder_width": 4, **extra.pop("fedsm", {})},
        **extra,
    )
    return cfg


@pytest.fixture(scope="module")
def dropped_run(tmp_path_factory):
    """Two rounds with three training sites, the third failing every train message."""
    tmp = tmp_path_factory.mktemp("fedsm-drop")
    synthetic = {"num_sites": 3, "heldout_site": True, "train_per_site": 20, "val_per_site": 4, "test_per_site": 12}
    synthetic.update({"public_size": 8, "image_size": 32, "seed": 3})
    cfg = _fedsm_cfg(tmp, data={"cache_dir": str(tmp / "cache"), "synthetic": synthetic}, federation={"num_rounds": 2})
    strategy, result, rec, grid, init = run_method(cfg, tmp, rounds=2, fail_nodes=[3])
    return SimpleNamespace(cfg=cfg, tmp=tmp, strategy=strategy, result=result, rec=rec, grid=grid, init=init)


def _pairs(grid, stage, rnd=None):
    """``(sent, reply)`` of the train messages of ``stage`` (the loopback transport answers in order, one each)."""
    return [
        (m, r)
        for m, r in zip(grid.sent, grid.replies, strict=True)
        if m.metadata.message_type == MessageType.TRAIN
        and m.content["config"]["stage"] == stage
        and (rnd is None or m.content["config"]["server-round"] == rnd)
    ]


def _person_messages(grid, rnd):
    return [
        m
        for m in grid.sent
        if m.metadata.message_type == MessageType.TRAIN
        and m.content["config"]["stage"] == "person"
        and m.content["config"]["server-round"] == rnd
    ]


def test_n_is_the_number_of_actual_contributors_when_a_site_drops(dropped_run):
    site_of = {nid: s.site for nid, s in dropped_run.strategy.sites.items()}
    first = _person_messages(dropped_run.grid, 1)
    assert {int(m.content["config"][CONTRIBUTORS]) for m in first} == {0}  # round 1: no sum yet
    second = _person_messages(dropped_run.grid, 2)
    cfgs = {site_of[m.metadata.dst_node_id]: m.content["config"] for m in second}
    assert {s: int(c[CONTRIBUTORS]) for s, c in cfgs.items()} == {"site1": 2, "site2": 2, "site3": 2}
    assert {s: int(c[IN_SUM]) for s, c in cfgs.items()} == {"site1": 1, "site2": 1, "site3": 0}
    # the round-2 person message carries the mean of exactly the two round-1 contributions (S / N with N = 2)
    person_r1 = [r for _, r in _pairs(dropped_run.grid, "person", 1) if not r.has_error()]
    assert len(person_r1) == 2
    sent = arrays_to_numpy(second[0].content["arrays"])
    for name in (k for k in sent if k.startswith("person_decoder.")):
        mean = np.mean([arrays_to_numpy(r.content["arrays"])[name].astype(np.float64) for r in person_r1], axis=0)
        np.testing.assert_allclose(sent[name], mean, rtol=1e-6, atol=1e-7)
    rows = [r for r in dropped_run.rec.rows if r["phase"] == "fedsm"]
    assert [r["person_contributors"] for r in rows] == [["site1", "site2"], ["site1", "site2"]]


def test_sites_keep_their_personalised_model_and_softpull_from_the_sum(dropped_run, tmp_path):
    """Site1's round-2 personalised start u_1 is SoftPull over the two contributors of round 1."""
    from secure_fedvlp.methods.fedsm import FedSMTrainer
    from secure_fedvlp.methods.trainer import TrainTask
    from secure_fedvlp.wrappers.compose import method_model

    cfg = dropped_run.cfg
    for site in ("site1", "site2"):
        assert (dropped_run.tmp / "run" / "clients" / site / PERSONAL_FILE).exists()
    assert not (dropped_run.tmp / "run" / "clients" / "site3" / PERSONAL_FILE).exists()
    # re-run SoftPull as a site would, against a stored v_1 and a received mean of two
    trainer = FedSMTrainer(cfg, "cpu")
    trainer.site_dir = tmp_path
    model = method_model(cfg)
    rng = np.random.default_rng(1)
    v1 = {n: rng.normal(size=p.shape).astype(np.float32) for n, p in model.person_decoder.named_parameters()}
    v2 = {n: rng.normal(size=p.shape).astype(np.float32) for n, p in model.person_decoder.named_parameters()}
    np.savez(tmp_path / PERSONAL_FILE, **v1)
    state = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    for n in v1:
        state[f"person_decoder.{n}"] = (v1[n] + v2[n]) / 2
    load_federated_state(model, state)
    how = trainer._softpull(model, TrainTask(2, "person", 1, {CONTRIBUTORS: 2.0, IN_SUM: 1.0}))
    assert how == "softpull"
    for n, p in model.person_decoder.named_parameters():
        want = 0.7 * v1[n] + 0.3 * v2[n]  # N = 2: u_1 = lam v_1 + (1 - lam) v_2
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    assert trainer._softpull(model, TrainTask(2, "person", 1, {CONTRIBUTORS: 2.0, IN_SUM: 0.0})) == "kept"


def test_the_selector_takes_one_step_per_round_with_averaged_moments(dropped_run):
    site_of = {nid: s.site for nid, s in dropped_run.strategy.sites.items()}
    pairs = [(m, r) for m, r in _pairs(dropped_run.grid, "select") if not r.has_error()]
    assert len(pairs) == 4  # two rounds x two live sites
    select_msgs = {id(r): m for m, r in pairs}
    replies = [r for _, r in pairs]
    for r in replies:
        metrics = r.content["metrics"]
        assert metrics["steps"] == 1.0 and metrics["select_steps"] == 1.0
        sent = arrays_to_numpy(select_msgs[id(r)].content["arrays"])
        got = arrays_to_numpy(r.content["arrays"])
        changed = {k.split(".")[0] for k in sent if not np.array_equal(sent[k], got[k])}
        assert changed == {"selector", "select_exp_avg", "select_exp_avg_sq"}, site_of[r.metadata.src_node_id]
    # round 2 starts from the moments averaged over the round-1 replies
    r1 = [r for m, r in pairs if m.content["config"]["server-round"] == 1]
    r2_sent = [m for m, _ in pairs if m.content["config"]["server-round"] == 2][0]
    sent = arrays_to_numpy(r2_sent.content["arrays"])
    for k in (k for k in sent if k.startswith("select_exp_avg")):
        mean = np.mean([arrays_to_numpy(r.content["arrays"])[k].astype(np.float64) for r in r1], axis=0)
        np.testing.assert_allclose(sent[k], mean, rtol=1e-6, atol=1e-9)


def test_threshold_one_reproduces_the_global_model_exactly(dropped_run):
    from secure_fedvlp.methods.fedsm import FedSMTrainer
    from secure_fedvlp.wrappers.compose import method_model

    cfg = dropped_run.cfg
    model = method_model(cfg)
    load_federated_state(model, arrays_to_numpy(dropped_run.result.arrays))
    fed = build_federation(cfg)
    out = {}
    for thr in (1.0, 0.0):
        c = copy.deepcopy(cfg)
        object.__setattr__(c.fedsm, "threshold", thr)
        trainer = FedSMTrainer(c, "cpu")
        trainer.site_dir = dropped_run.tmp / "run" / "clients" / "site1"
        out[thr] = trainer.evaluate_model(model, fed.site("site1").test, cfg.eval, "cpu")
    one = out[1.0]
    assert one["dice"] == one["dice_global"] and one["route_global"] == 1.0 and one["route_own"] == 0.0
    zero = out[0.0]  # every image is routed by the selector's argmax: to this site's model or (fallback) global
    assert zero["route_global"] == 0.0 and zero["route_own"] + zero["route_other_fallback"] == pytest.approx(1.0)
    assert "dice_person" in zero and zero["dice_global"] == one["dice_global"]
    held = FedSMTrainer(cfg, "cpu").evaluate_model(model, fed.site("heldout").test, cfg.eval, "cpu")
    assert held["dice"] == held["dice_global"] and held["route_own"] == 0.0 and "dice_person" not in held


def test_under_ckks_the_server_never_holds_a_personalised_model_in_clear(tmp_path):
    """Every person-stage reply the server receives is one ciphertext, and so is the sum it keeps and sends; a
    site's stored v_i appears nowhere in the server's messages."""
    from secure_fedvlp.wrappers.encryption import is_encrypted
    from tests.unit.test_encryption_flower import _keys, enc_cfg, run

    cfg = enc_cfg(
        tmp_path,
        "fedsm",
        train={"local_steps": 2, "batch_size": 6},
        fedsm={"decoder_width": 4},
        federation={"num_rounds": 2},
    )
    _keys(cfg, tmp_path / "enc")
    strategy, result, rec, grid = run(cfg, tmp_path / "enc", encrypted=True, rounds=2)
    pairs = _pairs(grid, "person")
    assert len(pairs) == 4 and all(not r.has_error() and is_encrypted(r.content["arrays"]) for _, r in pairs)
    # the sum the server keeps and sends back for SoftPull is a ciphertext too
    assert all(is_encrypted(m.content["arrays"]) for m, _ in pairs if m.content["config"]["server-round"] == 2)
    assert is_encrypted(result.arrays)
    for site in ("site1", "site2"):
        with np.load(tmp_path / "enc" / "clients" / site / PERSONAL_FILE) as z:
            v = {k: z[k] for k in z.files}
        needle = np.ascontiguousarray(v[sorted(v)[0]], np.float32).tobytes()[:64]
        for m in list(grid.sent) + list(grid.replies):
            if m.has_error() or "arrays" not in m.content.array_records:
                continue
            for arr in m.content["arrays"].values():
                assert needle not in arr.data
    ok = [r for r in rec.rows if r.get("phase") == "fedsm"]
    assert [r["person_contributors"] for r in ok] == [["site1", "site2"], ["site1", "site2"]]
