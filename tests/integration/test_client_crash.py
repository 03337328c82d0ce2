"""One crashed simulated client does not take the others down.

Flower's Simulation Engine with the CLI's backend settings (:func:`secure_fedvlp.cli.simulation_backend_config`):
a pool of Ray actors smaller than the federation (two CPUs, four sites), any actor running any site's
message.  Site1's ClientApp kills its own process (``os._exit``, as a segfault or the OOM killer would) on
every training message.  Without actor restarts the dead actor went back into the pool and every later
message it was given, of whichever site, failed too; with restarts alone, the messages given to the actor
while it restarted failed.  Here the other sites' replies arrive, the round adopts their aggregate and the
report flags it degraded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from secure_fedvlp.build import build_federation, expected_num_nodes
from secure_fedvlp.cli import simulation_backend_config
from secure_fedvlp.config import load_config
from secure_fedvlp.flower.client_app import make_client_app
from secure_fedvlp.flower.runtime import RunSetup
from secure_fedvlp.flower.server_app import make_server_app
from secure_fedvlp.layout import RunLayout, read_metrics

REPO = Path(__file__).resolve().parents[2]


def crashing_client_app(provider, partition: int) -> ClientApp:
    """The project's ClientApp, except that node ``partition``'s process dies on every training message."""
    inner = make_client_app(provider)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == partition:
            os._exit(17)  # no reply, no exception: the actor's process is gone
        return inner(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


@pytest.mark.slow
def test_a_crashed_client_process_leaves_the_other_sites_running(tmp_path):
    cfg = load_config(
        REPO / "configs" / "tiny.toml",
        [
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.synthetic.num_sites=3",
            "federation.num_rounds=1",
            "run.num_cpus=2",  # two actors for four sites: sites share actors
        ],
    )
    fed = build_federation(cfg)
    assert expected_num_nodes(cfg) == 4 and [s.name for s in fed.sites] == ["site1", "site2", "site3"]
    setup = RunSetup(cfg, tmp_path / "run")

    def provider(_context):
        return setup

    run_simulation(
        server_app=make_server_app(provider),
        client_app=crashing_client_app(provider, partition=0),  # partition 0 serves site1
        num_supernodes=expected_num_nodes(cfg),
        backend_config=simulation_backend_config(cfg),
    )
    layout = RunLayout(tmp_path / "run")
    rows = read_metrics(layout.metrics)
    train = {r["site"]: r.get("status") for r in rows if r.get("phase") == "train" and r["round"] == 1}
    assert train.get("site2") == "ok" and train.get("site3") == "ok" and train.get("site1") != "ok", train
    evaluated = {r["site"] for r in rows if r.get("phase") == "evaluate" and r["round"] == 1 and r["status"] == "ok"}
    assert {"site2", "site3", fed.heldout.name} <= evaluated, evaluated  # after the crash, in the same actors
    report = json.loads(layout.report_json.read_text())
    assert report["status"] == "OK" and report["degraded_rounds"] == [1]
    rnd = next(r for r in rows if r.get("phase") == "round" and r["round"] == 1)
    assert rnd["adopted"] and rnd["sampled"] == 3 and rnd["accepted"] == 2
