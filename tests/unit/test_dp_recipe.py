"""The DP fine-tuning recipe's parts: locked, cached towers and the current-model public bank."""

import numpy as np
import pytest
import torch

from secure_fedvlp.config import parse_config
from secure_fedvlp.errors import ConfigError
from secure_fedvlp.methods.trainer import CurrentBank, LocalTrainer
from secure_fedvlp.models import create_model


def _heads_only(name: str = "tiny"):
    torch.manual_seed(0)
    m = create_model(name)
    m.restrict_trainable("heads")
    return m


def test_a_locked_image_tower_is_cached_and_equals_the_uncached_forward():
    m = _heads_only()
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        direct = m.image_encoder(x)
    cached = m.image_features(x)
    torch.testing.assert_close(cached, direct)
    assert len(m._image_cache) == 5
    # a second call with a repeated and a new image computes only the new one
    y = torch.cat([x[:2], torch.rand(1, 1, 32, 32)])
    torch.testing.assert_close(m.image_features(y)[:2], direct[:2])
    assert len(m._image_cache) == 6
    # the heads still receive gradients; the tower output carries none
    m.encode_image(x).sum().backward()
    assert m.image_head.weight.grad is not None
    assert all(p.grad is None for p in m.image_encoder.parameters())


def test_the_image_cache_is_bypassed_while_the_tower_trains_and_cleared_on_load():
    m = create_model("tiny")
    x = torch.rand(3, 1, 32, 32)
    m.image_features(x)
    assert not m._image_cache  # trainable tower: no cache
    m.restrict_trainable("heads")
    before = m.image_features(x).clone()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for k in state:
        if k.startswith("image_encoder.stem.0"):
            state[k] = state[k] * 2.0
    m.load_state_dict(state)
    assert not m._image_cache  # new tower weights: nothing stale survives
    with torch.no_grad():
        assert not torch.allclose(m.image_features(x), before)


def test_a_wholly_locked_text_tower_caches_the_pooled_output_exactly():
    m = _heads_only("tiny")
    m.eval()
    tok = m.tokenize(["no acute findings", "small right pleural effusion with a long tail of words"])
    assert m.text_encoder.frozen_layers == len(m._text_layers())
    cached = m.text_features(tok["input_ids"], tok["attention_mask"])
    with torch.no_grad():
        enc = m.text_encoder.encoder
        full = enc(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).float()
        ref = (full * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(cached, ref, atol=1e-5, rtol=1e-5)
    assert len(m.text_encoder._pooled) == 2 and not m.text_encoder._cache  # pooled vectors only
    # padding to a longer batch does not change a record's cached output
    tok2 = m.tokenize(["no acute findings", "x " * 30])
    torch.testing.assert_close(m.text_features(tok2["input_ids"], tok2["attention_mask"])[0], cached[0])


class _Public:
    def __init__(self, n: int, size: int = 32, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.random((n, size, size), dtype=np.float32)
        self.reports = [f"report {i} with finding {i % 3}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)


def test_the_current_bank_follows_the_model_and_needs_no_tower_pass_per_step():
    m = _heads_only()
    public = _Public(12)
    bank = CurrentBank(m, public, batch_size=5, device=torch.device("cpu"))
    img, txt = bank.embed(m)
    assert img.shape == txt.shape == (12, m.spec.embed_dim)
    torch.testing.assert_close(img, m.encode_image(torch.from_numpy(public.images).unsqueeze(1)).detach())
    with torch.no_grad():
        m.image_head.weight.mul_(-1.0)  # the heads move: the bank moves with them
    img2, _ = bank.embed(m)
    assert not torch.allclose(img2, img)
    assert not img2.requires_grad


def test_the_current_bank_objective_is_per_sample_decomposable():
    """Record 0's loss does not change when the other records of its batch change."""
    cfg = parse_config(
        {"model": {"name": "tiny", "trainable": "heads"}, "train": {"objective": "decomposable", "bank": "current"}}
    )
    m = _heads_only()
    trainer = LocalTrainer(cfg, torch.device("cpu"), public=_Public(16, seed=1))
    state = trainer.begin(m, _task(), {}, dataset=None)
    assert "bank" in state and "pos_image" not in state

    def per_record(images, texts):
        tok = m.tokenize(texts)
        batch = {"images": images, "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
        return trainer.compute_loss(m, batch, state, reduction="none")["loss"]

    x = torch.rand(4, 1, 32, 32)
    texts = ["a", "b c", "d e f", "g"]
    base = per_record(x, texts)
    x2 = x.clone()
    x2[1:] = torch.rand(3, 1, 32, 32)
    other = per_record(x2, ["a", "zz", "yy yy", "xx"])
    torch.testing.assert_close(other[0], base[0])
    assert not torch.allclose(other[1:], base[1:])


def _task():
    from secure_fedvlp.methods.trainer import TrainTask

    return TrainTask(server_round=1, stage="full", steps=1)


def test_config_refuses_a_current_bank_without_the_decomposable_objective():
    with pytest.raises(ConfigError, match="train.bank"):
        parse_config({"train": {"objective": "infonce", "bank": "current"}})


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_on_the_heads_with_the_current_bank_trains_only_the_heads(tmp_path, mode):
    """Through the real Opacus engine: only head coordinates move, the ledger records the job first."""
    from secure_fedvlp.build import build_federation, build_model
    from secure_fedvlp.methods.trainer import TrainTask
    from secure_fedvlp.models.state import federated_state
    from secure_fedvlp.wrappers.compose import release_plan
    from secure_fedvlp.wrappers.dpsgd import DPTrainer, client_noise_multiplier
    from tests.unit.test_methods_contract import tiny_cfg

    cfg = tiny_cfg(
        tmp_path,
        "fedavg",
        privacy={"enabled": True, "noise_multiplier": 2.0, "grad_sample_mode": mode},
        train={"objective": "decomposable", "bank": "current", "batch_size": 8},
        model={"name": "tiny", "trainable": "heads"},
    )
    fed = build_federation(cfg)
    model = build_model(cfg)
    assert model.towers_locked()
    inner = LocalTrainer(cfg, torch.device("cpu"), fed.public)
    declared = cfg.require_declared_size("site1")
    z, q = client_noise_multiplier(cfg, release_plan(cfg), inner.declared_training_size(declared))
    dp = DPTrainer(inner, tmp_path / "ledger.jsonl", "site1", z, q, cfg.privacy, declared_size=declared)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = federated_state(model)
    assert set(before) == {n for n in before if n.startswith(("image_head.", "text_head.", "logit_scale."))}
    dp.fit(model, fed.sites[0].train, TrainTask(1, "full", 3), torch.Generator().manual_seed(0), before)
    after = federated_state(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert len(dp.ledger.events()) == 1 and dp.ledger.events()[0].steps == 3
