"""CreamFL end to end through the real ClientApp: heterogeneous sites, two client architectures, DP, pinning.

Real strategies, real trainers, real Opacus (tiny models); only the transport is in-process
(tests/loopback.py).
"""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from secure_fedvlp.data.types import VLPDataset
from secure_fedvlp.methods.creamfl import GLOBAL_REPS_KEY, PUBLIC_FP, REPS_KEY, CreamFLTrainer
from secure_fedvlp.methods.trainer import TrainTask
from secure_fedvlp.privacy import replay
from secure_fedvlp.privacy.accountant import epsilon_from_events
from secure_fedvlp.wire import arrays_to_numpy
from tests.unit.test_methods_contract import run_method, tiny_cfg

MODS = {"site1": "paired", "site2": "image", "site3": "text"}


def hetero_cfg(tmp_path, **extra):
    base = {
        "data": {
            "synthetic": {
                "num_sites": 3,
                "heldout_site": True,
                "train_per_site": 20,
                "val_per_site": 4,
                "test_per_site": 12,
                "public_size": 12,
                "image_size": 32,
                "seed": 3,
                "site_modalities": ["paired", "image", "text"],
            }
        },
        # the server model is "tiny"; site1 and site3 train "tiny_client", site2 "tiny": two architectures
        "creamfl": {
            "client_model": "tiny_client",
            "client_models": {"site2": "tiny"},
            "server_steps": 2,
            "public_batch_size": 6,
        },
        "train": {"local_steps": 2, "batch_size": 6, "objective": "decomposable"},
        "federation": {"method": "creamfl", "num_rounds": 2},
        "eval": {"every_round": False},  # round 0 and the last round only
    }
    for k, v in extra.items():
        base.setdefault(k, {}).update(v)
    return tiny_cfg(tmp_path, "creamfl", **base)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("creamfl-plain")
    cfg = hetero_cfg(tmp_path)
    strategy, result, rec, grid, init = run_method(cfg, tmp_path, rounds=2)
    return strategy, result, rec, grid, init, tmp_path


def test_heterogeneous_sites_teach_the_server_model(plain_run):
    strategy, result, rec, grid, init, tmp_path = plain_run
    assert {s.site: s.modality for s in strategy.sites.values() if s.role == "train"} == MODS
    trained = [(r["round"], r["site"]) for r in rec.rows if r["phase"] == "train" and r["status"] == "ok"]
    assert sorted(trained) == [(r, s) for r in (1, 2) for s in ("site1", "site2", "site3")]
    rounds = [r for r in rec.rows if r["phase"] == "creamfl"]
    assert [r["contributors_image"] for r in rounds] == [["site1", "site2"]] * 2
    assert [r["contributors_text"] for r in rounds] == [["site1", "site3"]] * 2
    assert all(np.isfinite(r["distill_loss"]) for r in rounds)
    # every round adopted the server model with all three sites' contributions: the run is OK, not FAILED
    from secure_fedvlp.evaluation.report import run_status

    done = [r for r in rec.rows if r["phase"] == "round"]
    assert [(r["adopted"], r["sampled"], r["accepted"], r["degraded"]) for r in done] == [(True, 3, 3, False)] * 2
    assert run_status(rec.rows) == ("OK", None, [])
    final, start = arrays_to_numpy(result.arrays), arrays_to_numpy(init)
    assert final.keys() == start.keys() and any(not np.array_equal(final[k], start[k]) for k in start)
    # the image-only site is evaluated on zero-shot AUROC only; the text-only site holds no image to score
    ev = {r["site"]: r for r in rec.rows if r["phase"] == "evaluate" and r["round"] == 2 and r["status"] == "ok"}
    assert set(ev) == {"site1", "site2", "site3", "heldout"}
    assert "zs_auroc_macro" in ev["site2"] and "mean_R@5" not in ev["site2"]
    assert "zs_auroc_macro" not in ev["site3"] and "mean_R@5" in ev["site1"] and "zs_auroc_macro" in ev["heldout"]


def test_replies_carry_representations_of_the_sites_modality_and_no_parameters(plain_run):
    strategy, result, rec, grid, init, tmp_path = plain_run
    site_of = {nid: s.site for nid, s in strategy.sites.items()}
    train = [m for m in grid.replies if m.metadata.message_type == MessageType.TRAIN]
    assert len(train) == 6
    for reply in train:
        content = reply.content
        assert set(content.array_records) == {REPS_KEY}  # no "arrays": no parameters
        want = {"paired": {"image", "text"}, "image": {"image"}, "text": {"text"}}[
            MODS[site_of[reply.metadata.src_node_id]]
        ]
        assert set(content[REPS_KEY].keys()) == want
        for a in content[REPS_KEY].values():
            assert a.numpy().shape == (12, 32)
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert all(GLOBAL_REPS_KEY in m.content.array_records for m in sent)


def test_each_site_keeps_its_own_architecture(plain_run):
    strategy, result, rec, grid, init, tmp_path = plain_run
    states = {s: torch.load(tmp_path / "run" / "clients" / s / "creamfl_local_model.pt") for s in MODS}
    shapes = {s: {k: tuple(v.shape) for k, v in st.items()} for s, st in states.items()}
    assert shapes["site1"] == shapes["site3"] != shapes["site2"]  # tiny_client twice, tiny once
    server = {k: tuple(v.shape) for k, v in arrays_to_numpy(init).items()}
    assert any(server.get(k) != v for k, v in shapes["site1"].items())  # the server's differs from tiny_client


def _trainer_and_task(tmp_path, fingerprint=None):
    cfg = hetero_cfg(tmp_path)
    from secure_fedvlp.build import build_federation

    fed = build_federation(cfg)
    trainer = CreamFLTrainer(cfg, torch.device("cpu"), fed.public)
    trainer.bind_site(fed.sites[0], tmp_path / "site1")
    bank = {m: np.zeros((len(fed.public), 32), np.float32) for m in ("image", "text")}
    fp = fed.public.fingerprint() if fingerprint is None else fingerprint
    task = TrainTask(1, "full", 1, records={GLOBAL_REPS_KEY: bank}, strings={PUBLIC_FP: fp})
    return cfg, fed, trainer, task


def test_a_site_refuses_a_round_on_another_public_set(tmp_path):
    """A server that substitutes another public set (well-formed message, plausible fingerprint) is refused."""
    from secure_fedvlp.errors import ProtocolError

    cfg, fed, trainer, task = _trainer_and_task(tmp_path)
    trainer.global_bank(task)  # the genuine set is accepted (and pinned)
    other = dataclasses.replace(task, strings={PUBLIC_FP: "ab" * 32})
    with pytest.raises(ProtocolError, match="not the pinned one"):
        trainer.global_bank(other)
    # the pin holds even if the site's own public set later changes
    trainer._public_fp = "cd" * 32
    with pytest.raises(ProtocolError, match="its public set"):
        trainer.global_bank(task)


def test_a_configured_pin_refuses_a_different_public_set(tmp_path):
    from secure_fedvlp.errors import ConfigError, ProtocolError
    from secure_fedvlp.methods.creamfl import CreamFLStrategy

    cfg = hetero_cfg(tmp_path, creamfl={"public_fingerprint": "0" * 64})
    with pytest.raises(ConfigError, match="public_fingerprint"):
        CreamFLStrategy(cfg)
    _, fed, _, task = _trainer_and_task(tmp_path)
    trainer = CreamFLTrainer(cfg, torch.device("cpu"), fed.public)
    trainer.bind_site(fed.sites[0], tmp_path / "pinned")
    with pytest.raises(ProtocolError, match="its public set"):
        trainer.global_bank(task)


def _smuggled(public, private):
    """``public`` with one record's image and report replaced by a private record's: same ids, size and shapes."""
    return VLPDataset(
        public.site,
        np.concatenate([private.images[:1], public.images[1:]]),
        [private.reports[0], *public.reports[1:]],
        np.concatenate([private.labels[:1], public.labels[1:]]),
        record_ids=public.record_ids,
        has_image=public.has_image,
        has_text=public.has_text,
    )


@pytest.mark.parametrize("pin", ["configured", "first-use"])
def test_a_foreign_public_set_with_the_genuine_header_is_refused(tmp_path, pin):
    """A site whose "public" set is not the pinned one (a private record smuggled in, same ids, size and shapes)
    refuses the round even though the server's message carries the genuine fingerprint: releasing
    representations of that set would not be post-processing of public data."""
    from secure_fedvlp.errors import ProtocolError

    _, fed, _, task = _trainer_and_task(tmp_path)
    genuine = fed.public.fingerprint()
    cfg = hetero_cfg(tmp_path, creamfl={"public_fingerprint": genuine} if pin == "configured" else {})
    site_dir = tmp_path / "site1"
    if pin == "first-use":  # an earlier job pinned the genuine set in the site's directory
        first = CreamFLTrainer(cfg, torch.device("cpu"), fed.public)
        first.bind_site(fed.sites[0], site_dir)
        first.global_bank(task)
    foreign = _smuggled(fed.public, fed.sites[0].train)
    assert len(foreign) == len(fed.public) and foreign.record_ids == fed.public.record_ids
    assert foreign.images.shape == fed.public.images.shape and foreign.fingerprint() != genuine
    assert task.strings[PUBLIC_FP] == genuine  # the header is the genuine one
    trainer = CreamFLTrainer(cfg, torch.device("cpu"), foreign)  # a later job, in a new process
    trainer.bind_site(fed.sites[0], site_dir)
    with pytest.raises(ProtocolError, match="its public set .* is not the pinned one"):
        trainer.global_bank(task)
    # the genuine set passes the same check
    honest = CreamFLTrainer(cfg, torch.device("cpu"), fed.public)
    honest.bind_site(fed.sites[0], site_dir)
    assert set(honest.global_bank(task)) == {"image", "text"}


# ------------------------------------------------------------------------------------------- DP
@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("creamfl-dp")
    cfg = hetero_cfg(tmp_path, privacy={"enabled": True, "target_epsilon": 8.0})
    spy = {}
    original = CreamFLTrainer.regularise

    getitem = VLPDataset.__getitem__
    reads = {"private": 0, "during_reg": 0, "in_reg": False}

    def counting_getitem(self, i):
        if self.site != "public":
            reads["private"] += 1
            reads["during_reg"] += int(reads["in_reg"])
        return getitem(self, i)

    def regularise(self, model, old, bank, generator):
        spy.setdefault("hooks", []).append(
            any(len(m._forward_hooks) or len(m._backward_hooks) for m in model.modules())
        )
        reads["in_reg"] = True
        try:
            return original(self, model, old, bank, generator)
        finally:
            reads["in_reg"] = False

    CreamFLTrainer.regularise = regularise
    VLPDataset.__getitem__ = counting_getitem
    try:
        out = run_method(cfg, tmp_path, rounds=2)
    finally:
        CreamFLTrainer.regularise = original
        VLPDataset.__getitem__ = getitem
    spy["reads"] = reads
    return (*out, tmp_path, cfg, spy)


@pytest.mark.slow  # a two-round DP run of four sites (~25 s)
def test_dp_ledger_holds_only_the_dp_sgd_events_and_logs_the_free_release(dp_run):
    strategy, result, rec, grid, init, tmp_path, cfg, spy = dp_run
    from secure_fedvlp.wrappers.compose import release_plan

    plan = release_plan(cfg)
    for site in MODS:
        acc = replay(tmp_path / "run" / "clients" / site / "privacy_ledger.jsonl")
        kinds = [type(e).__name__ for e in acc.history]
        assert kinds == ["DPSGDEvent", "PostProcessingEvent"] * 2  # the release is logged after its DP-SGD job
        dpsgd = [e for e in acc.history if type(e).__name__ == "DPSGDEvent"]
        assert [(e.stage, e.steps, e.round) for e in dpsgd] == [
            (s.stage, s.steps, r) for r in (1, 2) for s in plan.stages
        ]
        # the representations cost nothing: epsilon is that of the DP-SGD events alone
        assert acc.get_epsilon(cfg.privacy.delta) == pytest.approx(
            epsilon_from_events(dpsgd, cfg.privacy.delta, cfg.privacy.accountant), rel=1e-12
        )


@pytest.mark.slow  # a two-round DP run of four sites (~25 s)
def test_dp_regulariser_runs_outside_the_dp_optimizer(dp_run):
    *_, spy = dp_run
    assert spy["hooks"] and not any(spy["hooks"])  # no Opacus hook on the model during the public pass
    assert spy["reads"]["private"] > 0  # private records were read (by the DP-SGD steps) ...
    assert spy["reads"]["during_reg"] == 0  # ... but none during the regulariser pass


@pytest.mark.slow  # a two-round DP run of four sites (~25 s)
def test_dp_replies_carry_no_parameters_and_only_public_metrics(dp_run):
    strategy, result, rec, grid, init, tmp_path, cfg, spy = dp_run
    from secure_fedvlp.wrappers.dpsgd import RELEASED_TRAIN_METRICS

    train = [m for m in grid.replies if m.metadata.message_type == MessageType.TRAIN]
    assert train
    for reply in train:
        assert set(reply.content.array_records) == {REPS_KEY}
        assert set(reply.content["metrics"]) <= RELEASED_TRAIN_METRICS


def test_batch_norm_is_refused_under_dp(tmp_path, monkeypatch):
    cfg = hetero_cfg(tmp_path, privacy={"enabled": True, "target_epsilon": 8.0})
    original = CreamFLTrainer.build_local_model

    def with_bn(self):
        model = original(self)
        model.image_encoder.stem[1] = torch.nn.BatchNorm2d(model.image_encoder.stem[1].num_channels)
        return model

    monkeypatch.setattr(CreamFLTrainer, "build_local_model", with_bn)
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    dropped = {r["site"] for r in rec.rows if r.get("status") == "dropped"}
    assert {"site1", "site2"} <= dropped  # both sites that train an image tower refuse
    from secure_fedvlp.evaluation.report import run_status

    assert run_status(rec.rows)[2] == [1]  # the round went on without them, and is marked degraded
    log = "\n".join(str(r) for r in rec.rows)
    assert "dropped" in log


def test_private_gradient_refuses_batch_norm():
    from secure_fedvlp.wrappers.dpsgd import PrivateGradient

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="BatchNorm"):
        PrivateGradient(
            model, opt, mode="hooks", clipping="flat", clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4
        )


def test_the_server_drops_a_reply_with_parameters_or_a_modality_the_site_does_not_hold(tmp_path):
    """Well-formed replies from a site that sends more than representations of what it holds are dropped."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from secure_fedvlp.methods.creamfl import CreamFLStrategy
    from secure_fedvlp.methods.strategy import SiteInfo
    from secure_fedvlp.wire import ARRAYS_KEY, numpy_to_arrays

    cfg = hetero_cfg(tmp_path)
    s = CreamFLStrategy(cfg)
    s.sites = {1: SiteInfo(1, "site1", "train", 20, "paired"), 2: SiteInfo(2, "site2", "train", 20, "image")}
    rep = np.zeros((len(s.public), s.embed_dim), np.float32)

    def reply(nid, reps, params=False):
        out = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=nid, message_type=MessageType.TRAIN)
        content = RecordDict({REPS_KEY: numpy_to_arrays(reps)})
        if params:
            content[ARRAYS_KEY] = numpy_to_arrays({"w": np.ones(3, np.float32)})
        return Message(content, reply_to=out)

    assert s.validate_representations(reply(1, {"image": rep, "text": rep})) is None
    assert s.validate_representations(reply(2, {"image": rep})) is None
    assert "model parameters" in s.validate_representations(reply(1, {"image": rep, "text": rep}, params=True))
    assert "the site holds ['image']" in s.validate_representations(reply(2, {"image": rep, "text": rep}))
    assert "shape" in s.validate_representations(reply(2, {"image": rep[:-1]}))
