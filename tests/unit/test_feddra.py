"""FedDRA/FedAID specifics: stage 1 freezes backbones, anchor guidance, persisted robust weights."""

import numpy as np
import pytest
import torch

from secure_fedvlp.build import build_federation, build_model
from secure_fedvlp.data.types import FINDINGS, VLPDataset
from secure_fedvlp.methods.feddra import FedDRATrainer
from secure_fedvlp.methods.trainer import TrainTask
from secure_fedvlp.models.state import federated_state
from tests.unit.test_methods_contract import run_method, tiny_cfg


def test_stage1_leaves_every_backbone_parameter_bit_identical(tmp_path):
    cfg = tiny_cfg(tmp_path, "feddra")
    model = build_model(cfg)
    site = build_federation(cfg).sites[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = FedDRATrainer(cfg, torch.device("cpu"))
    trainer.fit(model, site.train, TrainTask(1, "align", 3), torch.Generator().manual_seed(0), federated_state(model))
    groups = model.parameter_groups()
    for n in groups["backbone"]:
        assert torch.equal(before[n], dict(model.named_parameters())[n]), n
    changed = [n for n in groups["alignment"] if not torch.equal(before[n], dict(model.named_parameters())[n])]
    assert changed, "stage 1 must train the alignment layers and heads"


def test_anchor_term_zero_at_global_and_pulls_towards_it(tmp_path):
    cfg = tiny_cfg(tmp_path, "feddra")
    model = build_model(cfg)
    site = build_federation(cfg).sites[0]
    trainer = FedDRATrainer(cfg, torch.device("cpu"))
    state = trainer.begin(model, TrainTask(1, "full", 1), federated_state(model))
    loader = trainer.make_loader(trainer.training_subset(site.train), model, torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    model.eval()  # no dropout: local == anchor exactly
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    assert float(trainer.extra_terms(model, batch, out, state)["anchor"]) == pytest.approx(0.0, abs=1e-10)
    # Move the local model away from the anchor: the term becomes positive, and one gradient
    # step on it alone moves the model back towards the anchor (the term decreases).
    with torch.no_grad():
        for p in model.image_head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    term = trainer.extra_terms(model, batch, out, state)["anchor"]
    assert float(term) > 0
    opt.zero_grad()
    term.backward()
    opt.step()
    out2 = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    assert float(trainer.extra_terms(model, batch, out2, state)["anchor"]) < float(term)


def _records(n, site="site1"):
    """``n`` paired records with stable ids (contents do not matter to the slice)."""
    return VLPDataset(
        site,
        np.zeros((n, 4, 4), np.float32),
        ["a report"] * n,
        np.zeros((n, len(FINDINGS)), np.float32),
        record_ids=[f"{site}/train/{i:06d}" for i in range(n)],
    )


def test_dro_slice_is_disjoint_from_training_records(tmp_path):
    cfg = tiny_cfg(tmp_path, "feddra", feddra={"holdout_fraction": 0.1})
    trainer = FedDRATrainer(cfg, torch.device("cpu"))
    data = _records(500)
    train, hold = trainer.training_subset(data), trainer.dro_subset(data)
    assert not set(train.record_ids) & set(hold.record_ids)
    assert set(train.record_ids) | set(hold.record_ids) == set(data.record_ids)
    assert 25 <= len(hold) <= 80  # about holdout_fraction x 500, chosen record by record


def test_dro_slice_membership_is_stable_under_add_remove_one(tmp_path):
    """Adding or removing one record moves no other record between the DRO slice and the training
    records (a seeded permutation of positions moved 69 + 69 of 1000 records when one was added)."""
    cfg = tiny_cfg(tmp_path, "feddra", feddra={"holdout_fraction": 0.1})
    trainer = FedDRATrainer(cfg, torch.device("cpu"))
    small, big = _records(1000), _records(1001)
    in_small = set(trainer.dro_subset(small).record_ids)
    in_big = set(trainer.dro_subset(big).record_ids)
    added = big.record_ids[-1]
    assert in_big - {added} == in_small  # adding record 1000 moved nobody else
    removed = big.record_ids[123]
    without = big.subset([i for i in range(1001) if i != 123])
    assert set(trainer.dro_subset(without).record_ids) == in_big - {removed}
    # training records likewise: the complement, record by record
    assert set(trainer.training_subset(without).record_ids) == set(trainer.training_subset(big).record_ids) - {removed}
    # the slice is a keyed choice: another site key chooses other records
    other = FedDRATrainer(cfg, torch.device("cpu"))
    other.set_site_key(bytes(range(1, 33)))
    assert set(other.dro_subset(small).record_ids) != in_small


def test_site_keys_are_per_site_secrets_that_no_message_carries(tmp_path):
    """Under DP each site's selection key is a random secret in its own directory (mode 0600), different
    at every site, and no message either way carries it (raw or hex), in any record."""
    from secure_fedvlp.layout import RunLayout

    cfg = tiny_cfg(tmp_path, "fedaid", privacy={"enabled": True}, train={"objective": "decomposable"})
    strategy, result, rec, grid, init = run_method(cfg, tmp_path)
    layout = RunLayout(tmp_path / "run")
    keys = {s: layout.site_key(s).read_bytes() for s in ("site1", "site2")}
    assert len(set(keys.values())) == 2 and all(len(k) == 32 for k in keys.values())
    assert all(layout.site_key(s).stat().st_mode & 0o777 == 0o600 for s in keys)
    for msg in grid.sent + grid.replies:
        if msg.has_error():
            continue
        content = msg.content
        blobs = [a.numpy().tobytes() for r in content.array_records.values() for a in r.values()]
        blobs += [repr(dict(r)).encode() for r in [*content.config_records.values(), *content.metric_records.values()]]
        for key in keys.values():
            assert not any(key in b or key.hex().encode() in b for b in blobs)


@pytest.mark.parametrize("method", ["feddra", "fedaid"])
def test_robust_weights_persist_and_weight_aggregation(method, tmp_path):
    cfg = tiny_cfg(tmp_path, method, feddra={"eta": 5.0, "rho": 0.5})
    strategy, result, rec, grid, init = run_method(cfg, tmp_path, rounds=2)
    dro = [r for r in rec.rows if r["phase"] == "dro"]
    assert [r["round"] for r in dro] == [0, 1, 2]
    q1, q2 = dro[1]["weights"], dro[2]["weights"]
    # persisted: round 2 starts from round 1's weights, so with eta > 0 they keep moving
    assert q1 != dro[0]["weights"] and q2 != q1
    # mirror ascent favours the client with the higher DRO loss
    losses = dro[1]["losses"]
    hi, lo = max(losses, key=losses.get), min(losses, key=losses.get)
    assert q1[hi] > q1[lo]
    assert strategy.q == q2
    # stage messages: FedDRA sends two train stages per round, FedAID one
    stages = [m.content["config"]["stage"] for m in grid.sent if m.metadata.message_type == "train"]
    per_round = 2 if method == "feddra" else 1
    assert len(stages) == 2 * 2 * per_round  # 2 rounds x 2 training sites x stages


def test_faithful_mode_resets_weights_each_round(tmp_path):
    cfg = tiny_cfg(tmp_path, "feddra", feddra={"mode": "faithful", "eta": 5.0})
    strategy, result, rec, grid, init = run_method(cfg, tmp_path, rounds=2)
    assert strategy.aggregation_weights(1, "full", [None, None]) == [1.0, 1.0]
    # loss scales sent in round 2 come from round-1 weights computed from the uniform centre
    scales = [m.content["config"]["loss-scale"] for m in grid.sent if m.metadata.message_type == "train"]
    assert scales[0] == pytest.approx(1.0)  # round 1: uniform
    assert np.std(scales[-2:]) > 0  # round 2: loss-scaled by K * q_k
