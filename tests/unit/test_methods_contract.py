"""One contract suite, run over every registered method: a round runs, aggregates, reports metrics.

Real ClientApp, real strategies, real models (tiny config); only the transport is in-process
(tests/loopback.py).  A failing client must not take the round down.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import MessageType

from secure_fedvlp.build import expected_num_nodes
from secure_fedvlp.config import parse_config
from secure_fedvlp.flower.client_app import make_client_app
from secure_fedvlp.flower.runtime import RunSetup
from secure_fedvlp.methods import list_methods
from secure_fedvlp.methods.strategy import RoundRecorder
from secure_fedvlp.models.state import federated_state
from secure_fedvlp.wire import arrays_to_numpy, numpy_to_arrays
from secure_fedvlp.wrappers.compose import method_model, strategy_class
from tests.loopback import LoopbackGrid, private_methods


class ListRecorder(RoundRecorder):
    def __init__(self):
        self.rows = []

    def record(self, r):
        self.rows.append(r)


def tiny_cfg(tmp_path, method, **extra):
    data = {
        "run": {"seed": 0, "device": "cpu"},
        "data": {
            "cache_dir": str(tmp_path / "cache"),
            "synthetic": {
                "num_sites": 2,
                "heldout_site": True,
                "train_per_site": 20,
                "val_per_site": 4,
                "test_per_site": 12,
                "public_size": 8,
                "image_size": 32,
                "seed": 3,
            },
        },
        "model": {"name": "tiny"},
        "train": {"local_steps": 2, "batch_size": 6},
        "federation": {"method": method, "num_rounds": 1},
        # A DRO slice of 8 of each site's 20 records: the smallest a noised DRO report accepts with the default
        # privacy.report_noise_multiplier (4 x 2.0; see PrivacyConfig.min_report_count).
        "feddra": {"stage1_steps": 1, "stage2_steps": 2, "holdout_fraction": 0.4},
    }
    for k, v in extra.items():
        data.setdefault(k, {}).update(v)
    return parse_config(data)


def run_method(cfg, tmp_path, rounds=1, fail_nodes=()):
    setup = RunSetup(cfg, tmp_path / "run")
    client_app = make_client_app(lambda ctx: setup)
    grid = LoopbackGrid(client_app, expected_num_nodes(cfg), fail_nodes=fail_nodes)
    rec = ListRecorder()
    strategy = strategy_class(cfg)(cfg, rec)
    init = numpy_to_arrays(federated_state(method_model(cfg)))
    result = strategy.start(grid, init, num_rounds=rounds, timeout=60, expected_nodes=expected_num_nodes(cfg))
    return strategy, result, rec, grid, init


@pytest.mark.parametrize("method", list_methods())
def test_round_runs_aggregates_and_reports(method, tmp_path):
    cfg = tiny_cfg(tmp_path, method)
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    # aggregated arrays: same names/shapes as the initial model, changed by training
    final, start = arrays_to_numpy(result.arrays), arrays_to_numpy(init)
    assert final.keys() == start.keys()
    assert all(final[k].shape == start[k].shape for k in start)
    assert any(not np.array_equal(final[k], start[k]) for k in start)
    # every site evaluated at round 0 and round 1; only training sites trained
    evals = {(r["round"], r["site"]) for r in rec.rows if r["phase"] == "evaluate" and r["status"] == "ok"}
    assert {rnd for rnd, _ in evals} == {0, 1} and len({s for _, s in evals}) == 3
    trained = {r["site"] for r in rec.rows if r["phase"] == "train" and r["status"] == "ok"}
    # the training sites the method sends train messages to (all of them, or the centralized reference's one party)
    assert trained == {strategy.sites[n].site for n in strategy.sample_train_nodes(1)}
    assert trained <= {s.site for s in strategy.sites.values() if s.role == "train"}
    final_metrics = result.evaluate_metrics_clientapp[1]
    assert "zs_auroc_macro" in final_metrics or "dice" in final_metrics  # VLP methods, or segmentation (FedSM)


@pytest.mark.parametrize("method", list_methods())
def test_failing_client_does_not_take_the_round_down(method, tmp_path):
    cfg = tiny_cfg(tmp_path, method)
    strategy, result, rec, grid, init = run_method(cfg, tmp_path, fail_nodes=[1])
    dropped = [r for r in rec.rows if r.get("status") == "dropped"]
    assert dropped and all("simulated node failure" in r["reason"] for r in dropped)
    assert result.arrays is not None
    ok_train = [r for r in rec.rows if r["phase"] == "train" and r["status"] == "ok"]
    if len(strategy.sample_train_nodes(1)) > 1:  # the centralized reference has one party: it is the one failing
        assert ok_train, "the other training site must still have trained"


@pytest.fixture(scope="module", params=private_methods())
def dp_run(request, tmp_path_factory):
    """One DP-SGD round of each method through the real ClientApp (shared by the DP tests below)."""
    method = request.param
    tmp_path = tmp_path_factory.mktemp(f"dp-{method}")
    cfg = tiny_cfg(
        tmp_path, method, privacy={"enabled": True, "target_epsilon": 8.0}, train={"objective": "decomposable"}
    )
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    return SimpleNamespace(
        method=method, cfg=cfg, tmp_path=tmp_path, strategy=strategy, result=result, rec=rec, grid=grid, init=init
    )


def test_every_method_trains_under_dp_sgd_with_a_ledger(dp_run):
    from secure_fedvlp.privacy import replay

    method, result, rec, init = dp_run.method, dp_run.result, dp_run.rec, dp_run.init
    final, start = arrays_to_numpy(result.arrays), arrays_to_numpy(init)
    assert any(not np.array_equal(final[k], start[k]) for k in start)
    ok_train = [r for r in rec.rows if r["phase"] == "train" and r["status"] == "ok"]
    assert ok_train and all(0 < r["epsilon"] <= 8.0 for r in ok_train)
    for site in ("site1", "site2"):
        acc = replay(dp_run.tmp_path / "run" / "clients" / site / "privacy_ledger.jsonl")
        stages = [e.stage for e in acc.history if type(e).__name__ == "DPSGDEvent"]
        from secure_fedvlp.methods import get_method

        assert stages == [st.stage for st in get_method(method).plan(dp_run.cfg).stages]


def test_each_ledger_records_exactly_the_methods_release_plan(dp_run):
    """What the real client recorded in round 1 is what the method's plan declares (and calibration consumed)."""
    from secure_fedvlp.privacy import replay
    from secure_fedvlp.wrappers.compose import release_plan

    plan = release_plan(dp_run.cfg)
    for site in ("site1", "site2"):
        events = replay(dp_run.tmp_path / "run" / "clients" / site / "privacy_ledger.jsonl").history
        dpsgd = [(e.stage, e.steps) for e in events if type(e).__name__ == "DPSGDEvent"]
        assert dpsgd == [(s.stage, s.steps) for s in plan.stages]
        gaussians = [e for e in events if type(e).__name__ == "GaussianEvent"]
        assert len(gaussians) == len(plan.reports) + len(plan.releases)


def test_dp_replies_carry_no_unnoised_loss(dp_run):
    """Under DP a reply carries only covered or public values: no training loss computed on private
    records without noise (by name, and by value against what the client kept locally); the only
    loss that leaves is the noised DRO report, and each one is in the ledger."""
    from secure_fedvlp.privacy import replay
    from secure_fedvlp.wrappers.dpsgd import RELEASED_TRAIN_METRICS

    site_of = {nid: s.site for nid, s in dp_run.strategy.sites.items()}
    local: dict[str, list[float]] = {}
    for site in ("site1", "site2"):
        path = dp_run.tmp_path / "run" / "clients" / site / "local_train_metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        # The losses exist, at the client, for every job that drew a record (Poisson sampling may leave all
        # of a short job's batches empty: such a job has no loss to keep, and its reply still carries none).
        assert any("train_loss" in r for r in rows)
        assert all("train_loss" in r for r in rows if r["train_records_seen"] > 0)
        local[site] = [v for r in rows for k, v in r.items() if "loss" in k]
    train_replies = [m for m in dp_run.grid.replies if m.metadata.message_type == MessageType.TRAIN]
    assert train_replies
    for reply in train_replies:
        site = site_of[reply.metadata.src_node_id]
        metrics = dict(reply.content["metrics"])
        assert set(metrics) <= RELEASED_TRAIN_METRICS, (
            f"{site} released {sorted(set(metrics) - RELEASED_TRAIN_METRICS)}"
        )
        assert not any("loss" in k for k in metrics)
        for v in metrics.values():
            assert not any(math.isclose(v, x, rel_tol=1e-9, abs_tol=0.0) for x in local[site])
    reports = [
        m
        for m in dp_run.grid.replies
        if m.metadata.message_type == MessageType.QUERY and "metrics" in m.content.metric_records
    ]
    for site in ("site1", "site2"):
        sent = [m for m in reports if site_of[m.metadata.src_node_id] == site]
        for m in sent:
            assert set(m.content["metrics"]) <= {"dro-loss", "num-examples", "epsilon"}
        events = replay(dp_run.tmp_path / "run" / "clients" / site / "privacy_ledger.jsonl").history
        noised = [e for e in events if type(e).__name__ == "GaussianEvent"]
        assert len(noised) == len(sent)  # every released loss went through the Gaussian mechanism
        if dp_run.method in ("feddra", "fedaid"):
            assert sent


@pytest.mark.parametrize("method", list_methods())
def test_clients_send_only_parameters_scalar_metrics_and_site_info(method, tmp_path):
    """No image, report or label ever leaves a client: replies hold federated parameters (or, for a method
    whose replies are public-set representations, those and no parameters), scalar metrics and the
    site's name/role/size/modality, nothing else."""
    cfg = tiny_cfg(tmp_path, method)
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    federated = set(arrays_to_numpy(init))
    assert grid.replies
    payload = getattr(type(strategy), "reply_payload", "parameters")
    for reply in grid.replies:
        content = reply.content
        if payload == "representations":
            assert "arrays" not in content.array_records  # never parameters
            public = strategy.public
            for rec_ in content.array_records.values():
                assert set(rec_.keys()) <= {"image", "text"}
                assert all(a.numpy().shape == (len(public), strategy.embed_dim) for a in rec_.values())
        else:
            assert set(content.array_records) <= {"arrays"}
            for rec_ in content.array_records.values():
                assert set(rec_.keys()) == federated  # model parameters only, by name and count
        for m in content.metric_records.values():
            assert all(isinstance(v, (int, float)) for v in m.values())
        for c in content.config_records.values():
            assert set(c.keys()) <= {"site", "role", "num-train", "modality", "reason"}


def test_dp_replies_carry_the_ledger_head(dp_run):
    """Under DP every reply of a training site (train, scalar report, evaluate) carries its ledger's head: the
    hash and sequence number of its last entry, as the ledger file holds them, and nothing else; the held-out
    site, which keeps no ledger, sends none."""
    from secure_fedvlp.privacy.ledger import read_ledger
    from secure_fedvlp.wire import LEDGER_HEAD, LEDGER_KEY, LEDGER_SEQ

    site_of = {nid: s for nid, s in dp_run.strategy.sites.items()}
    kinds = set()
    for reply in dp_run.grid.replies:
        site = site_of.get(reply.metadata.src_node_id)
        if reply.has_error() or site is None or "info" not in reply.content.config_records:
            continue
        if reply.metadata.message_type == MessageType.QUERY and "metrics" not in reply.content.metric_records:
            continue  # discovery (site-info) releases nothing
        if site.role != "train":
            assert LEDGER_KEY not in reply.content.config_records
            continue
        head = reply.content[LEDGER_KEY]
        assert set(head.keys()) == {LEDGER_HEAD, LEDGER_SEQ}
        entries = read_ledger(dp_run.tmp_path / "run" / "clients" / site.site / "privacy_ledger.jsonl")
        seq = int(head[LEDGER_SEQ])
        assert 0 <= seq < len(entries) and entries[seq].hash == head[LEDGER_HEAD] or seq == -1
        kinds.add(reply.metadata.message_type)
    assert kinds >= {MessageType.TRAIN, MessageType.EVALUATE}


def test_site_files_are_owner_only(dp_run):
    """A site's own files (ledger, un-noised local training metrics, evaluation guard) are created 0600."""
    import stat

    from secure_fedvlp.layout import RunLayout

    layout = RunLayout(dp_run.tmp_path / "run")
    for site in ("site1", "site2"):
        files = [layout.ledger(site), layout.local_train_metrics(site), layout.evaluation_guard(site)]
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}
