"""Evaluation is a release no DP mechanism covers: a site evaluates only the current round's global model, once,
and `eval.release` says whether its metrics leave the site at all; the report names what a clear evaluation releases.

Real ClientApp and strategies on the in-process transport (tests/loopback.py), tiny config.
"""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from secure_fedvlp.build import build_model
from secure_fedvlp.config import config_to_dict, dump_toml
from secure_fedvlp.evaluation.report import RunRecorder, write_report
from secure_fedvlp.flower.client_app import GENERIC_ERROR_REASON
from secure_fedvlp.flower.eval_guard import model_hash
from secure_fedvlp.layout import RunLayout
from secure_fedvlp.models.state import federated_state
from secure_fedvlp.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, numpy_to_arrays
from tests.unit.test_methods_contract import run_method, tiny_cfg


def _run(tmp_path, **extra):
    cfg = tiny_cfg(tmp_path, "fedavg", **extra)
    strategy, result, rec, grid, init = run_method(cfg, tmp_path, rounds=cfg.federation.num_rounds)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(cfg)))
    recorder = RunRecorder(run_dir)
    for row in rec.rows:
        recorder.record(row)
    write_report(run_dir)
    return cfg, strategy, result, rec, grid, run_dir


@pytest.fixture(scope="module")
def clear_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("eval-clear"))


def _evaluate(grid, node, server_round, state):
    msg = Message(
        RecordDict({ARRAYS_KEY: numpy_to_arrays(state), CONFIG_KEY: ConfigRecord({"server-round": server_round})}),
        dst_node_id=node,
        message_type=MessageType.EVALUATE,
    )
    return grid.send_and_receive([msg])[0]


def _refused(reply):
    return reply.has_error() and reply.error.reason == GENERIC_ERROR_REASON


def _last_evaluate(grid, node):
    return [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE and m.metadata.dst_node_id == node][
        -1
    ]


def test_a_second_evaluation_in_the_same_round_is_refused(clear_run):
    """The round-1 global model again, for round 1: every site, held-out included, refuses it generically."""
    cfg, strategy, result, rec, grid, run_dir = clear_run
    for node in strategy.sites:
        again = _last_evaluate(grid, node)
        state = {k: v.numpy() for k, v in again.content[ARRAYS_KEY].items()}
        assert int(again.content[CONFIG_KEY]["server-round"]) == cfg.federation.num_rounds
        assert _refused(_evaluate(grid, node, cfg.federation.num_rounds, state))


def test_an_evaluation_for_a_stale_or_future_round_is_refused(clear_run):
    """Round 0 after round 1 (the public initial model, even), or a round past the run's last, is refused."""
    cfg, strategy, result, rec, grid, run_dir = clear_run
    init = federated_state(build_model(cfg))
    for node in strategy.sites:
        assert _refused(_evaluate(grid, node, 0, init))
        assert _refused(_evaluate(grid, node, cfg.federation.num_rounds + 1, init))


def _fresh_site(tmp_path, **extra):
    from secure_fedvlp.build import expected_num_nodes
    from secure_fedvlp.flower.client_app import make_client_app
    from secure_fedvlp.flower.runtime import RunSetup
    from tests.loopback import LoopbackGrid

    cfg = tiny_cfg(tmp_path, "fedavg", **extra)
    setup = RunSetup(cfg, tmp_path / "run")
    return cfg, LoopbackGrid(make_client_app(lambda ctx: setup), expected_num_nodes(cfg))


def test_the_evaluated_model_must_be_the_global_model(tmp_path):
    """Round 0 is the seeded initial model every party builds; any other model for round 0 is refused. A later
    round's evaluated model must be the model the site then receives to train the next round: a train message
    that carries another model is refused before anything is trained."""
    cfg, grid = _fresh_site(tmp_path, federation={"num_rounds": 2})
    init = federated_state(build_model(cfg))
    crafted = {k: v + np.float32(0.01) for k, v in init.items()}
    assert _refused(_evaluate(grid, 1, 0, crafted))  # node 1 serves site1, a training site
    assert not _refused(_evaluate(grid, 2, 0, init))  # the real initial model is evaluated
    train = Message(
        RecordDict(
            {
                ARRAYS_KEY: numpy_to_arrays(crafted),
                CONFIG_KEY: ConfigRecord({"server-round": 1, "stage": "full", "local-steps": 1}),
            }
        ),
        dst_node_id=2,
        message_type=MessageType.TRAIN,
    )
    assert _refused(grid.send_and_receive([train])[0])  # not the model site2 evaluated as round 0
    train.content[ARRAYS_KEY] = numpy_to_arrays(init)
    assert not _refused(grid.send_and_receive([train])[0])


def test_clear_evaluation_is_named_in_the_report_with_what_it_releases(clear_run):
    """eval.release = 'clear' (default): metrics reach the server, and the report's not_covered names what they
    release (per-finding AUROC, which findings occur, the test count) and, without DP, the training losses."""
    cfg, strategy, result, rec, grid, run_dir = clear_run
    assert cfg.eval.release == "clear"
    evals = [r for r in rec.rows if r["phase"] == "evaluate" and r["status"] == "ok"]
    assert evals and all("zs_auroc_macro" in r for r in evals)
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["evaluation"]["release"] == "clear"
    text = " ".join(rep["not_covered"])
    for phrase in ("per-finding zero-shot AUROC", "which findings occur", "test-record count", "training losses"):
        assert phrase in text, (phrase, rep["not_covered"])
    assert "also under CKKS" in text
    assert "Not covered by DP" in (run_dir / "report.md").read_text()


def test_local_release_keeps_the_metrics_at_the_site(tmp_path):
    """eval.release = 'local': evaluate replies carry no metrics, the server's records hold none, and each site's
    own directory holds its metrics for every round; the report says where they are."""
    cfg, strategy, result, rec, grid, run_dir = _run(tmp_path, eval={"release": "local"})
    replies = [m for m in grid.replies if m.metadata.message_type == MessageType.EVALUATE]
    assert replies and all(not m.has_error() and METRICS_KEY not in m.content.metric_records for m in replies)
    server_evals = [r for r in rec.rows if r["phase"] == "evaluate"]
    assert server_evals and all(not any(k.startswith(("zs_", "i2t", "t2i", "mean_R")) for k in r) for r in server_evals)
    assert all("num-examples" not in r for r in server_evals)
    assert not result.evaluate_metrics_clientapp
    server_text = (run_dir / "metrics.jsonl").read_text()
    assert "zs_auroc" not in server_text
    layout = RunLayout(run_dir)
    for s in strategy.sites.values():
        rows = [json.loads(x) for x in layout.local_eval_metrics(s.site).read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1] and all("zs_auroc_macro" in r for r in rows)
        assert layout.local_eval_metrics(s.site).stat().st_mode & 0o777 == 0o600  # the site's own, like its ledger
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["evaluation"]["release"] == "local" and rep["sites"] == {}
    assert not any("AUROC" in s for s in rep["not_covered"])
    assert "eval.release = 'local'" in (run_dir / "report.md").read_text()


def test_round_0_must_be_the_public_start_when_the_run_has_one(tmp_path):
    """With model.init_checkpoint (a public start) every party builds the seeded model with the checkpoint loaded
    over it, and a site's round-0 evaluation must carry exactly that model: the seeded initial model without the
    checkpoint, or any other model, is refused. The untrained model is evaluated once as a reference (the site
    builds it itself; no model travels), and not again, nor after round 1."""
    from secure_fedvlp.models.checkpoint import save_checkpoint
    from secure_fedvlp.wire import REFERENCE, UNTRAINED_REFERENCE

    seeded = tiny_cfg(tmp_path, "fedavg")
    public = build_model(seeded, untrained=True)
    for p in public.parameters():  # a stand-in public start: the seeded model moved
        p.data.add_(0.01)
    ckpt = tmp_path / "public_start.npz"
    save_checkpoint(public, ckpt)
    cfg, grid = _fresh_site(tmp_path, model={"init_checkpoint": str(ckpt)}, federation={"num_rounds": 2})
    start = federated_state(build_model(cfg))
    untrained = federated_state(build_model(cfg, untrained=True))
    assert model_hash(start) != model_hash(untrained)
    assert _refused(_evaluate(grid, 1, 0, untrained))  # the seeded model is not this run's round-0 model
    assert _refused(_evaluate(grid, 1, 0, {k: v + np.float32(0.01) for k, v in start.items()}))
    assert not _refused(_evaluate(grid, 1, 0, start))  # the public start is

    def reference(node):
        msg = Message(
            RecordDict({CONFIG_KEY: ConfigRecord({"server-round": 0, REFERENCE: UNTRAINED_REFERENCE})}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        return grid.send_and_receive([msg])[0]

    ok = reference(2)
    assert not _refused(ok) and "zs_auroc_macro" in ok.content[METRICS_KEY]
    assert _refused(reference(2))  # once
    train = Message(
        RecordDict(
            {
                ARRAYS_KEY: numpy_to_arrays(start),
                CONFIG_KEY: ConfigRecord({"server-round": 1, "stage": "full", "local-steps": 1}),
            }
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    assert not _refused(grid.send_and_receive([train])[0])  # site1 trains round 1 from the public start ...
    assert _refused(reference(1))  # ... and may no longer evaluate the reference
