"""Server aggregation: FedAvg equals the example-weighted mean; a bad reply is dropped, not the round."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from secure_fedvlp.config import parse_config
from secure_fedvlp.methods.strategy import SiteInfo, VLPStrategy
from secure_fedvlp.wire import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, numpy_to_arrays


class _Rec:
    def __init__(self):
        self.rows = []

    def record(self, r):
        self.rows.append(r)

    def progress(self, m):
        pass


def _reply(node_id, arrays, n, **extra_metrics):
    out = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            ARRAYS_KEY: numpy_to_arrays({k: np.asarray(v, np.float32) for k, v in arrays.items()}),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: float(n), **extra_metrics}),
        }
    )
    return Message(content, reply_to=out)


def _strategy():
    s = VLPStrategy(parse_config({}), _Rec())
    return s


def test_fedavg_is_example_weighted_mean():
    rng = np.random.default_rng(0)
    ref = {"a": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float32)}
    updates = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in ref.items()} for _ in range(3)]
    counts = [10, 30, 60]
    s = _strategy()
    replies = [_reply(i + 1, u, n) for i, (u, n) in enumerate(zip(updates, counts, strict=True))]
    s.sites = {
        r.metadata.src_node_id: SiteInfo(r.metadata.src_node_id, f"s{i}", "train", 1) for i, r in enumerate(replies)
    }
    agg, metrics = s.aggregate_train(1, replies, reference=numpy_to_arrays(ref))
    w = np.array(counts, float) / sum(counts)
    for k in ref:
        expected = sum(wi * u[k] for wi, u in zip(w, updates, strict=True))
        np.testing.assert_allclose(agg[k].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert metrics[NUM_EXAMPLES] == 100.0


@pytest.mark.parametrize("bad", ["shape", "nan", "missing", "weight"])
def test_malformed_reply_dropped_round_continues(bad):
    ref = {"a": np.zeros(3, np.float32)}
    good = _reply(1, {"a": np.ones(3)}, 5)
    if bad == "shape":
        b = _reply(2, {"a": np.ones(4)}, 5)
    elif bad == "nan":
        b = _reply(2, {"a": np.array([1.0, np.nan, 0.0])}, 5)
    elif bad == "missing":
        b = _reply(2, {"z": np.ones(3)}, 5)
    else:
        b = _reply(2, {"a": np.ones(3)}, 0)
    s = _strategy()
    s.sites = {1: SiteInfo(1, "good", "train", 5), 2: SiteInfo(2, "bad", "train", 5)}
    agg, _ = s.aggregate_train(1, [good, b], reference=numpy_to_arrays(ref))
    np.testing.assert_allclose(agg["a"].numpy(), np.ones(3))
    dropped = [r for r in s.recorder.rows if r["status"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["site"] == "bad" and dropped[0]["reason"]


def test_all_replies_bad_keeps_global_model():
    ref = {"a": np.zeros(3, np.float32)}
    s = _strategy()
    s.sites = {2: SiteInfo(2, "bad", "train", 5)}
    agg, metrics = s.aggregate_train(1, [_reply(2, {"a": np.ones(4)}, 5)], reference=numpy_to_arrays(ref))
    assert agg is None and metrics is None
