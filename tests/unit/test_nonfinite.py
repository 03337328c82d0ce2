"""A non-finite value is not an oracle: crafted models cannot single out records, errors say nothing.

The attack: the server crafts the global model so that only records with a property it chooses overflow
(here: a word-piece embedding set near the float32 maximum, so every report containing "effusion" turns
into NaN inside the text tower).  Before, the site's reply then named the affected records in its error
message, or carried NaN parameters; both told the server which records have the property.
"""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from secure_fedvlp.build import build_federation, build_model, expected_num_nodes
from secure_fedvlp.flower.client_app import GENERIC_ERROR_REASON, make_client_app
from secure_fedvlp.flower.runtime import RunSetup
from secure_fedvlp.layout import RunLayout
from secure_fedvlp.methods.trainer import LocalTrainer, TrainTask
from secure_fedvlp.models.state import federated_state, load_federated_state
from secure_fedvlp.privacy import replay
from secure_fedvlp.wire import ARRAYS_KEY, CONFIG_KEY, numpy_to_arrays
from secure_fedvlp.wrappers.compose import release_plan
from secure_fedvlp.wrappers.dpsgd import DPTrainer, client_noise_multiplier
from tests.loopback import LoopbackGrid
from tests.unit.test_methods_contract import tiny_cfg

TARGET_WORD = "effusion"
EMBEDDINGS = "text_encoder.encoder.embeddings.word_embeddings.weight"


def crafted_state(model) -> dict[str, np.ndarray]:
    """The global model with the word pieces of TARGET_WORD's last piece blown up to near float32's maximum."""
    state = federated_state(model)
    piece = model.tokenize([TARGET_WORD])["input_ids"][0]
    piece = int(piece[piece.ne(0)][-2])  # the last word piece before [SEP]
    state[EMBEDDINGS] = state[EMBEDDINGS].copy()
    state[EMBEDDINGS][piece] = 3.0e38
    return state


def _dp_cfg(tmp_path, mode):
    return tiny_cfg(
        tmp_path,
        "fedavg",
        privacy={"enabled": True, "noise_multiplier": 1.0, "grad_sample_mode": mode, "target_epsilon": 100.0},
        train={"objective": "decomposable", "batch_size": 12},
    )


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_a_crafted_overflow_contributes_zero_and_the_reply_stays_finite(mode, tmp_path):
    cfg = _dp_cfg(tmp_path, mode)
    fed = build_federation(cfg)
    site = fed.sites[0]
    assert any(TARGET_WORD in r for r in site.train.reports) and not all(TARGET_WORD in r for r in site.train.reports)
    model = build_model(cfg)
    state = crafted_state(model)
    load_federated_state(model, state)
    inner = LocalTrainer(cfg, torch.device("cpu"), fed.public)
    with torch.no_grad():  # the attack bites: the crafted model overflows exactly the targeted records
        out = model(
            *(lambda b: (b["images"], b["input_ids"], b["attention_mask"]))(
                __import__("secure_fedvlp.models.state", fromlist=["make_collate"]).make_collate(model)(
                    [site.train[i] for i in range(len(site.train))]
                )
            )
        )
    finite = torch.isfinite(out["text_emb"]).all(dim=1).numpy()
    targeted = np.array([TARGET_WORD in r for r in site.train.reports])
    assert not finite[targeted].any() and finite[~targeted].all()

    declared = cfg.require_declared_size("site1")
    z, q = client_noise_multiplier(cfg, release_plan(cfg), inner.declared_training_size(declared))
    dp = DPTrainer(
        inner,
        tmp_path / "clients" / "site1" / "privacy_ledger.jsonl",
        "site1",
        z,
        q,
        cfg.privacy,
        declared_size=declared,
    )
    metrics = dp.fit(model, site.train, TrainTask(1, "full", 3), torch.Generator().manual_seed(0), state)
    after = federated_state(model)
    for name, value in after.items():
        if name != EMBEDDINGS:
            assert np.isfinite(value).all(), f"{name} is not finite after a DP job on a crafted model"
    assert np.isfinite(list(metrics.values())).all()
    local = [
        json.loads(x)
        for x in (tmp_path / "clients" / "site1" / "local_train_metrics.jsonl").read_text().split("\n")
        if x.strip()
    ]
    assert local[-1]["train_nonfinite_records"] > 0  # the targeted records were dropped (site-local count)
    assert "train_nonfinite_records" not in metrics  # and the count is not released


def _client(tmp_path, **privacy):
    cfg = tiny_cfg(
        tmp_path,
        "fedavg",
        privacy={"enabled": True, "noise_multiplier": 1.0, **privacy},
        train={"objective": "decomposable"},
    )
    setup = RunSetup(cfg, tmp_path / "run")
    grid = LoopbackGrid(make_client_app(lambda ctx: setup), expected_num_nodes(cfg))
    return cfg, grid


def _train_message(state, node=1, **config):
    cfg = {"server-round": 1, "stage": "full", "local-steps": 2, **config}
    return Message(
        RecordDict({ARRAYS_KEY: numpy_to_arrays(state), CONFIG_KEY: ConfigRecord(cfg)}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )


def test_a_model_with_a_nan_is_refused_before_any_record_is_used_and_the_error_is_generic(tmp_path):
    cfg, grid = _client(tmp_path)
    state = federated_state(build_model(cfg))
    name = sorted(state)[0]
    state[name] = state[name].copy()
    state[name].reshape(-1)[0] = np.nan
    reply = grid.send_and_receive([_train_message(state)])[0]
    assert reply.has_error() and reply.error.reason == GENERIC_ERROR_REASON
    ledger = RunLayout(tmp_path / "run").ledger("site1")
    assert not ledger.exists() or not replay(ledger).history  # nothing was trained, nothing released


@pytest.mark.parametrize("broken", ["missing-round", "unknown-query"])
def test_every_client_failure_sends_the_same_generic_reason(broken, tmp_path):
    cfg, grid = _client(tmp_path)
    state = federated_state(build_model(cfg))
    if broken == "missing-round":
        msg = Message(
            RecordDict({ARRAYS_KEY: numpy_to_arrays(state), CONFIG_KEY: ConfigRecord({"stage": "full"})}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
    else:
        msg = Message(
            RecordDict(
                {
                    ARRAYS_KEY: numpy_to_arrays(state),
                    CONFIG_KEY: ConfigRecord({"query": "records-with-effusion", "server-round": 1}),
                }
            ),
            dst_node_id=1,
            message_type=MessageType.QUERY,
        )
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error() and reply.error.reason == GENERIC_ERROR_REASON


def test_a_crafted_model_through_the_client_app_gets_a_finite_reply_without_error(tmp_path):
    cfg, grid = _client(tmp_path)
    model = build_model(cfg)
    reply = grid.send_and_receive([_train_message(crafted_state(model), **{"local-steps": 3})])[0]
    assert not reply.has_error()
    for name, arr in reply.content[ARRAYS_KEY].items():
        if name != EMBEDDINGS:
            assert np.isfinite(arr.numpy()).all(), name
    assert all(np.isfinite(float(v)) for v in reply.content["metrics"].values())
