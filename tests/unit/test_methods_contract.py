"""One contract suite, run over every registered method: a round runs, aggregates, reports metrics.

Real ClientApp, real strategies, real models (tiny config); only the transport is in-process
(tests/loopback.py).  A failing client must not take the round down.
"""

import numpy as np
import pytest

from secure_fedvlp.config import parse_config
from secure_fedvlp.flower.client_app import make_client_app
from secure_fedvlp.flower.runtime import RunSetup, build_model, expected_num_nodes
from secure_fedvlp.methods import get_method, list_methods
from secure_fedvlp.methods.base import RoundRecorder, arrays_to_numpy, federated_state, numpy_to_arrays
from tests.loopback import LoopbackGrid


class ListRecorder(RoundRecorder):
    def __init__(self):
        self.rows = []

    def record(self, r):
        self.rows.append(r)


def tiny_cfg(tmp_path, method, **extra):
    data = {
        "run": {"seed": 0, "device": "cpu"},
        "data": {"cache_dir": str(tmp_path / "cache"),
                 "synthetic": {"num_sites": 2, "heldout_site": True, "train_per_site": 20, "val_per_site": 4,
                               "test_per_site": 12, "public_size": 8, "image_size": 32, "seed": 3}},
        "model": {"name": "tiny"},
        "train": {"local_steps": 2, "batch_size": 6},
        "federation": {"method": method, "num_rounds": 1},
        "feddra": {"stage1_steps": 1, "stage2_steps": 2},
    }
    for k, v in extra.items():
        data.setdefault(k, {}).update(v)
    return parse_config(data)


def run_method(cfg, tmp_path, rounds=1, fail_nodes=()):
    setup = RunSetup(cfg, tmp_path / "run")
    client_app = make_client_app(lambda ctx: setup)
    grid = LoopbackGrid(client_app, expected_num_nodes(cfg), fail_nodes=fail_nodes)
    rec = ListRecorder()
    strategy = get_method(cfg.federation.method).strategy(cfg, rec)
    init = numpy_to_arrays(federated_state(build_model(cfg)))
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
    assert trained == {s.site for s in strategy.sites.values() if s.role == "train"}
    assert 1 in result.evaluate_metrics_clientapp and "zs_auroc_macro" in result.evaluate_metrics_clientapp[1]


@pytest.mark.parametrize("method", list_methods())
def test_failing_client_does_not_take_the_round_down(method, tmp_path):
    cfg = tiny_cfg(tmp_path, method)
    strategy, result, rec, grid, init = run_method(cfg, tmp_path, fail_nodes=[1])
    dropped = [r for r in rec.rows if r.get("status") == "dropped"]
    assert dropped and all("simulated node failure" in r["reason"] for r in dropped)
    assert result.arrays is not None
    ok_train = [r for r in rec.rows if r["phase"] == "train" and r["status"] == "ok"]
    assert ok_train, "the other training site must still have trained"


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_under_dp_sgd_with_a_ledger(method, tmp_path):
    from secure_fedvlp.privacy import replay

    cfg = tiny_cfg(tmp_path, method, privacy={"enabled": True, "target_epsilon": 8.0},
                   train={"objective": "decomposable"})
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    final, start = arrays_to_numpy(result.arrays), arrays_to_numpy(init)
    assert any(not np.array_equal(final[k], start[k]) for k in start)
    ok_train = [r for r in rec.rows if r["phase"] == "train" and r["status"] == "ok"]
    assert ok_train and all(0 < r["epsilon"] <= 8.0 for r in ok_train)
    for site in ("site1", "site2"):
        acc = replay(tmp_path / "run" / "clients" / site / "privacy_ledger.jsonl")
        stages = [e.stage for e in acc.history if type(e).__name__ == "DPSGDEvent"]
        assert stages == (["align", "full"] if method == "feddra" else ["full"])


@pytest.mark.parametrize("method", list_methods())
def test_clients_send_only_parameters_scalar_metrics_and_site_info(method, tmp_path):
    """No image, report or label ever leaves a client: replies hold federated parameters,
    scalar metrics and the site's name/role/size, nothing else."""
    cfg = tiny_cfg(tmp_path, method)
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    federated = set(arrays_to_numpy(init))
    assert grid.replies
    for reply in grid.replies:
        content = reply.content
        assert set(content.array_records) <= {"arrays"}
        for rec_ in content.array_records.values():
            assert set(rec_.keys()) == federated  # model parameters only, by name and count
        for m in content.metric_records.values():
            assert all(isinstance(v, (int, float)) for v in m.values())
        for c in content.config_records.values():
            assert set(c.keys()) <= {"site", "role", "num-train", "reason"}
