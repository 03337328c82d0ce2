"""Failures that do not lie and lose nothing: the real ServerApp over an in-process grid.

A run in which no round adopted an aggregate is FAILED (report and exit status); a round with fewer
contributions than sites asked is flagged; two nodes claiming one site are refused at discovery; a run
interrupted after a round continues from its checkpoint to the same model as an uninterrupted run.
"""

import json

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict

from secure_fedvlp.build import expected_num_nodes
from secure_fedvlp.errors import ProtocolError
from secure_fedvlp.flower.client_app import make_client_app
from secure_fedvlp.flower.runtime import RunSetup
from secure_fedvlp.flower.server_app import load_checkpoint, make_server_app
from secure_fedvlp.layout import RunLayout, read_metrics
from secure_fedvlp.wire import CONFIG_KEY, SERVER_ROUND
from tests.loopback import LoopbackGrid
from tests.unit.test_methods_contract import tiny_cfg


def _serve(cfg, run_dir, grid=None, resume=False, fail_nodes=()):
    setup = RunSetup(cfg, run_dir, resume=resume)
    grid = grid or LoopbackGrid(make_client_app(lambda ctx: setup), expected_num_nodes(cfg), fail_nodes=fail_nodes)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    make_server_app(lambda _ctx: setup)(grid, ctx)
    return grid


def _report(run_dir):
    return json.loads(RunLayout(run_dir).report_json.read_text())


def test_no_round_adopting_an_aggregate_is_failed(tmp_path):
    """Every training site fails: the model is the untrained one, and the report says FAILED, not done."""
    cfg = tiny_cfg(tmp_path, "fedavg")
    _serve(cfg, tmp_path / "run", fail_nodes=[1, 2])
    rep = _report(tmp_path / "run")
    assert rep["status"] == "FAILED" and "no round adopted an aggregate" in rep["status_reason"]
    assert "**Status: FAILED**" in RunLayout(tmp_path / "run").report_md.read_text()


def test_cli_turns_a_failed_report_into_one_line_and_a_nonzero_exit(tmp_path, capsys):
    from secure_fedvlp.cli import _raise_if_failed
    from secure_fedvlp.errors import SecureFedVLPError

    cfg = tiny_cfg(tmp_path, "fedavg")
    _serve(cfg, tmp_path / "run", fail_nodes=[1, 2])
    with pytest.raises(SecureFedVLPError, match=r"^FAILED: no round adopted an aggregate") as err:
        _raise_if_failed(RunLayout(tmp_path / "run"))
    assert "\n" not in str(err.value)


def test_degraded_round_is_flagged_and_the_run_is_ok(tmp_path):
    cfg = tiny_cfg(tmp_path, "fedavg")
    _serve(cfg, tmp_path / "run", fail_nodes=[1])
    rep = _report(tmp_path / "run")
    assert rep["status"] == "OK" and rep["degraded_rounds"] == [1]
    rounds = [r for r in read_metrics(RunLayout(tmp_path / "run").metrics) if r["phase"] == "round"]
    assert rounds[0]["adopted"] and rounds[0]["sampled"] == 2 and rounds[0]["accepted"] == 1
    assert "Degraded rounds" in RunLayout(tmp_path / "run").report_md.read_text()


def test_two_nodes_claiming_one_site_are_refused_at_discovery(tmp_path):
    """A third node says it is site1: the run does not start, and the report and metrics say why."""
    cfg = tiny_cfg(tmp_path, "fedavg")
    setup = RunSetup(cfg, tmp_path / "run")
    grid = LoopbackGrid(make_client_app(lambda ctx: setup), expected_num_nodes(cfg))
    site1 = grid.contexts[1]
    nc = dict(site1.node_config)
    grid.contexts[3] = Context(run_id=1, node_id=3, node_config=nc, state=RecordDict(), run_config={})
    with pytest.raises(ProtocolError, match=r"more than one node claims the same site \(site 'site1' by nodes 1, 3\)"):
        _serve(cfg, tmp_path / "run", grid=grid)
    rep = _report(tmp_path / "run")
    assert rep["status"] == "FAILED" and "site 'site1' by nodes 1, 3" in rep["status_reason"]
    assert not [r for r in read_metrics(RunLayout(tmp_path / "run").metrics) if r["phase"] == "train"]


class _LinkLostAtRound(LoopbackGrid):
    """The connection to the nodes is lost when round ``at`` starts training (the server process dies)."""

    def __init__(self, *args, at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at = at

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == MessageType.TRAIN and int(m.content[CONFIG_KEY][SERVER_ROUND]) == self.at:
                raise ConnectionError("link lost")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("method", ["fedavg", "feddra"])
def test_interrupted_run_resumes_to_the_uninterrupted_model(method, tmp_path):
    cfg = tiny_cfg(tmp_path, method, federation={"method": method, "num_rounds": 2})
    _serve(cfg, tmp_path / "straight")  # the reference: two rounds without interruption

    run = tmp_path / "resumed"
    setup = RunSetup(cfg, run)
    grid = _LinkLostAtRound(make_client_app(lambda ctx: setup), expected_num_nodes(cfg), at=2)
    with pytest.raises(ConnectionError):
        _serve(cfg, run, grid=grid)
    layout = RunLayout(run)
    assert load_checkpoint(layout)[0] == 1 and not layout.report_json.exists()
    before = read_metrics(layout.metrics)

    _serve(cfg, run, resume=True)
    after = read_metrics(layout.metrics)
    assert after[: len(before)] == before  # nothing measured before the interruption is lost or rewritten
    new = after[len(before) :]
    phases = [r["phase"] for r in new]
    assert phases.count("resume") == 1 and phases.index("resume") < phases.index("train")
    assert next(r for r in new if r["phase"] == "resume")["first_round"] == 2
    assert not [r for r in new if r["phase"] == "evaluate" and r["round"] == 0]  # no second reference
    assert {r["round"] for r in new if r["phase"] == "train"} == {2}
    assert _report(run)["final_round"] == 2 and _report(run)["status"] == "OK"
    with np.load(layout.model_params) as a, np.load(RunLayout(tmp_path / "straight").model_params) as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_damaged_checkpoint_is_refused(tmp_path):
    from secure_fedvlp.errors import DataError

    cfg = tiny_cfg(tmp_path, "fedavg")
    _serve(cfg, tmp_path / "run")
    layout = RunLayout(tmp_path / "run")
    data = bytearray(layout.checkpoint_arrays.read_bytes())
    data[-100] ^= 1
    layout.checkpoint_arrays.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match the digest"):
        load_checkpoint(layout)
