"""A method trains only the sites holding what it learns from; the others are still evaluated.

FedAvg's objective needs image-report pairs: in a federation with an image-only and a text-only site
(the CreamFL setting), FedAvg asks only the paired sites to train, and every site is evaluated.
Real strategy, real ClientApp, in-process transport (tests/loopback.py).
"""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from secure_fedvlp.config import parse_config
from secure_fedvlp.methods.strategy import SiteInfo, VLPStrategy
from secure_fedvlp.wire import CONFIG_KEY, INFO_KEY, arrays_to_numpy
from tests.unit.test_methods_contract import run_method, tiny_cfg

MODS = ["paired", "paired", "image", "text"]


def _cfg(tmp_path, method):
    return tiny_cfg(
        tmp_path,
        method,
        data={
            "cache_dir": str(tmp_path / "cache"),
            "synthetic": {
                "num_sites": 4,
                "heldout_site": True,
                "train_per_site": 20,
                "val_per_site": 4,
                "test_per_site": 12,
                "public_size": 8,
                "image_size": 32,
                "seed": 3,
                "site_modalities": MODS,
            },
        },
    )


def test_fedavg_trains_the_paired_sites_only_and_evaluates_every_site(tmp_path):
    cfg = _cfg(tmp_path, "fedavg")
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    site_of = {nid: s.site for nid, s in strategy.sites.items()}
    asked = sorted(site_of[m.metadata.dst_node_id] for m in grid.sent if m.metadata.message_type == MessageType.TRAIN)
    assert asked == ["site1", "site2"]  # site3 (images only) and site4 (reports only) are never asked
    trained = sorted(r["site"] for r in rec.rows if r["phase"] == "train" and r["status"] == "ok")
    assert trained == ["site1", "site2"]
    assert not [r for r in rec.rows if r.get("status") in ("dropped", "error")]
    final, start = arrays_to_numpy(result.arrays), arrays_to_numpy(init)
    assert any(not np.array_equal(final[k], start[k]) for k in start)
    evaluated = {r["site"] for r in rec.rows if r["phase"] == "evaluate" and r["round"] == 1 and r["status"] == "ok"}
    assert evaluated == {"site1", "site2", "site3", "site4", "heldout"}


def test_a_federation_without_a_paired_site_is_refused_by_a_paired_method():
    """Discovery refuses a federation that holds nothing FedAvg can learn from, naming what the sites hold."""
    replies = []
    for nid, site, mod in ((1, "a", "image"), (2, "b", "text")):
        out = Message(RecordDict({CONFIG_KEY: ConfigRecord({})}), dst_node_id=nid, message_type=MessageType.QUERY)
        info = ConfigRecord({"site": site, "role": "train", "num-train": 5, "modality": mod})
        replies.append(Message(RecordDict({INFO_KEY: info}), reply_to=out))

    class _Grid:
        def get_node_ids(self):
            return [1, 2]

        def send_and_receive(self, msgs, timeout=None):
            return replies

    s = VLPStrategy(parse_config({}))
    with pytest.raises(RuntimeError, match=r"learns from \(paired\); the sites hold \['image', 'text'\]"):
        s.discover(_Grid(), 2, 1.0)
    s.sites = {1: SiteInfo(1, "a", "train", 5, "image"), 2: SiteInfo(2, "b", "train", 5, "text")}
    assert s.train_nodes() == []
