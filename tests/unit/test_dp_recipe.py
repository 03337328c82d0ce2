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


@pytest.mark.parametrize(
    ("mode", "report_negatives", "trainable"),
    [
        ("hooks", 0, "heads"),
        ("ghost", 0, "heads"),
        ("hooks", 3, "heads"),
        ("ghost", 3, "heads"),
        ("ghost", 0, "image_head"),
    ],
)
def test_dp_sgd_on_the_heads_with_the_current_bank_trains_only_the_heads(tmp_path, mode, report_negatives, trainable):
    """Through the real Opacus engine: only head coordinates move (with ``image_head``, only the image head's and
    the temperature's: the text head stays the public start's), the ledger records the job first."""
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
        train={"objective": "decomposable", "bank": "current", "batch_size": 8, "report_negatives": report_negatives},
        model={"name": "tiny", "trainable": trainable},
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
    moving = ("image_head.", "logit_scale.") + (("text_head.",) if trainable == "heads" else ())
    assert before and set(before) == {n for n in before if n.startswith(moving)}
    dp.fit(model, fed.sites[0].train, TrainTask(1, "full", 3), torch.Generator().manual_seed(0), before)
    after = federated_state(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert len(dp.ledger.events()) == 1 and dp.ledger.events()[0].steps == 3


# --------------------------------------------------------------------------- negatives from the record's own report


def test_report_variants_leave_out_one_sentence_each():
    from secure_fedvlp.objectives import report_variants, split_sentences

    r = "Frontal view of the chest. There is left lung nodule. No pleural effusion."
    assert split_sentences(r) == ["Frontal view of the chest.", "There is left lung nodule.", "No pleural effusion."]
    assert report_variants(r, 3) == [
        "There is left lung nodule. No pleural effusion.",
        "Frontal view of the chest. No pleural effusion.",
        "Frontal view of the chest. There is left lung nodule.",
    ]
    two = report_variants("Cardiomegaly. No effusion", 3)  # repeated in turn to make k
    assert two == ["No effusion", "Cardiomegaly.", "No effusion"]
    assert report_variants("Nodular opacity in the left lung", 2) == ["", ""]
    assert report_variants("", 1) == [""]
    assert report_variants("a. b; c\nd", 5)[:4] == ["b; c d", "a. c d", "a. b; d", "a. b; c"]
    with pytest.raises(ValueError, match="k must be"):
        report_variants(r, 0)


class _Site:
    def __init__(self, reports, size: int = 32, seed: int = 2) -> None:
        rng = np.random.default_rng(seed)
        self.reports = list(reports)
        self.images = rng.random((len(reports), size, size), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.reports)


def test_own_report_negatives_keep_the_objective_per_sample_decomposable_and_change_it():
    """Record 0's loss depends on its own report's variants, not on the other records of the batch; and
    with the variants the loss is not the public-negative loss."""
    cfg = parse_config(
        {
            "model": {"name": "tiny", "trainable": "heads"},
            "train": {"objective": "decomposable", "bank": "current", "report_negatives": 2},
        }
    )
    plain_cfg = parse_config(
        {"model": {"name": "tiny", "trainable": "heads"}, "train": {"objective": "decomposable", "bank": "current"}}
    )
    m = _heads_only()
    site = _Site(["Cardiomegaly. No effusion.", "Left nodule. Right effusion. Normal heart.", "Clear lungs.", "x. y."])
    trainer = LocalTrainer(cfg, torch.device("cpu"), public=_Public(16, seed=1))
    state = trainer.begin(m, _task(), {}, dataset=site)
    assert state["own_negatives"].features.shape[:2] == (4, 2)
    x = torch.from_numpy(site.images).unsqueeze(1)

    def per_record(tr, st, images, texts, index):
        tok = m.tokenize(texts)
        batch = {"images": images, "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
        batch["index"] = torch.tensor(index)
        return tr.compute_loss(m, batch, st, reduction="none")["loss"]

    base = per_record(trainer, state, x, site.reports, [0, 1, 2, 3])
    # record 0 with other batch-mates (other images, other reports, other positions): the same loss
    other = per_record(
        trainer, state, torch.cat([x[:1], torch.rand(2, 1, 32, 32)]), [site.reports[0], "q", "r"], [0, 3, 2]
    )
    torch.testing.assert_close(other[0], base[0])
    # its gradient is also the same: one record's influence is its own per-sample gradient
    grads = []
    for images, texts, index in ((x[:2], site.reports[:2], [0, 1]), (x[[0, 3]], [site.reports[0], "z"], [0, 3])):
        m.zero_grad()
        per_record(trainer, state, images, texts, index)[0].backward()
        grads.append(m.image_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    # the variants are what record 0 is contrasted with: a different own report, a different loss
    plain = LocalTrainer(plain_cfg, torch.device("cpu"), public=_Public(16, seed=1))
    plain_state = plain.begin(m, _task(), {}, dataset=site)
    assert not torch.allclose(per_record(plain, plain_state, x, site.reports, [0, 1, 2, 3]), base)
    other_site = _Site(["Cardiomegaly. Left effusion.", *site.reports[1:]])
    state2 = trainer.begin(m, _task(), {}, dataset=other_site)
    assert not torch.allclose(per_record(trainer, state2, x, site.reports, [0, 1, 2, 3])[0], base[0])


def test_own_report_negatives_are_refused_where_they_do_not_apply():
    with pytest.raises(ConfigError, match="train.report_negatives"):
        parse_config({"model": {"trainable": "heads"}, "train": {"objective": "decomposable", "report_negatives": 2}})
    with pytest.raises(ConfigError, match="model.trainable = 'heads'"):
        parse_config({"train": {"objective": "decomposable", "bank": "current", "report_negatives": 2}})
    with pytest.raises(ConfigError, match="train.report_negatives"):
        parse_config({"train": {"report_negatives": -1}})


# --------------------------------------------------------------------------- the report-variants objective


def _variants_setup(k: int = 2):
    cfg = parse_config(
        {
            "model": {"name": "tiny", "trainable": "heads"},
            "train": {"objective": "report_variants", "report_negatives": k},
        }
    )
    m = _heads_only()
    site = _Site(["Cardiomegaly. No effusion.", "Left nodule. Right effusion. Normal heart.", "Clear lungs.", "x. y."])
    trainer = LocalTrainer(cfg, torch.device("cpu"), public=None)  # no public set: the objective needs none
    state = trainer.begin(m, _task(), {}, dataset=site)
    return m, site, trainer, state


def _batch(m, images, texts, index):
    tok = m.tokenize(texts)
    return {
        "images": images,
        "input_ids": tok["input_ids"],
        "attention_mask": tok["attention_mask"],
        "index": torch.tensor(index),
    }


def test_the_report_variants_objective_is_the_record_against_its_own_variants_with_gradient_through_them():
    """Record i's loss is -log softmax over <v_i, report_i> and <v_i, variant_ij>, every text embedded by the
    current text head with gradient (checked against a reference written out by hand); it depends on no other
    record of the batch, in value or gradient."""
    from secure_fedvlp.objectives import report_variants

    m, site, trainer, state = _variants_setup(k=2)
    assert state["own_negatives"].features.shape[:2] == (4, 2)
    x = torch.from_numpy(site.images).unsqueeze(1)
    m.zero_grad()
    per = trainer.compute_loss(m, _batch(m, x, site.reports, [0, 1, 2, 3]), state, reduction="none")["loss"]
    assert per.shape == (4,)
    per[1].backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    m.zero_grad()
    texts = [site.reports[1], *report_variants(site.reports[1], 2)]
    tok = m.tokenize(texts)
    t = m.encode_text(tok["input_ids"], tok["attention_mask"])  # report and its variants, with gradient
    v = m.encode_image(x[1:2])
    ref = -torch.log_softmax(m.logit_scale(v @ t.T), dim=-1)[0, 0]
    torch.testing.assert_close(per[1], ref)
    ref.backward()
    for n, g in got.items():
        torch.testing.assert_close(g, m.get_parameter(n).grad, msg=lambda s, n=n: f"{n}: {s}")
    # the variants carry gradient into the text head: without their path the text head's gradient differs
    m.zero_grad()
    t_report = m.encode_text(tok["input_ids"][:1], tok["attention_mask"][:1])
    v = m.encode_image(x[1:2])
    logits = m.logit_scale(torch.cat([v @ t_report.T, v @ t[1:].detach().T], dim=1))
    (-torch.log_softmax(logits, dim=-1)[0, 0]).backward()
    assert not torch.allclose(m.text_head.weight.grad, got["text_head.weight"])

    # record 0 with other batch-mates (other images, reports, positions): the same loss and gradient
    def grad0(images, texts, index):
        m.zero_grad()
        out = trainer.compute_loss(m, _batch(m, images, texts, index), state, reduction="none")["loss"]
        out[0].backward()
        return out[0].detach(), m.text_head.weight.grad.clone()

    a = grad0(x[:2], site.reports[:2], [0, 1])
    b = grad0(torch.cat([x[:1], torch.rand(2, 1, 32, 32)]), [site.reports[0], "q", "r"], [0, 3, 2])
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def assert_opacus_clips_each_records_true_gradient(m, trainer, state, batch, mode, after_each=None):
    """The norms Opacus computes (ghost mode) equal the norms of each record's gradient taken alone by autograd, and
    the clipped sum (either mode) equals the sum of those gradients clipped by hand at their median norm.
    ``after_each()`` runs after each record's own backward (extra checks on its gradients)."""
    from tests.unit.test_dpsgd import _private_grad

    n_records = len(batch["index"])
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    per_record = []
    for i in range(n_records):
        m.zero_grad()
        trainer.compute_loss(m, batch, state, reduction="none")["loss"][i].backward()
        per_record.append({n: m.get_parameter(n).grad.clone() for n in names})
        if after_each is not None:
            after_each()
    true_norms = torch.stack([torch.sqrt(sum((g[n] ** 2).sum() for n in names)) for g in per_record])
    clip = float(true_norms.median())
    assert float(true_norms.min()) < clip < float(true_norms.max())
    expected = {n: sum(g[n] * min(1.0, clip / float(true_norms[i])) for i, g in enumerate(per_record)) for n in names}

    def loss_fn(module):
        return trainer.compute_loss(module, batch, state, reduction="none")["loss"]

    grads, norms = _private_grad(m, loss_fn, mode, clip, n_records)
    if mode == "ghost":
        torch.testing.assert_close(norms, true_norms, rtol=1e-4, atol=1e-6)
    assert set(grads) == set(names)
    for n in names:
        # PrivateGradient leaves the clipped sum divided by the expected batch size
        torch.testing.assert_close(
            grads[n] * n_records, expected[n], rtol=1e-4, atol=1e-6, msg=lambda s, n=n: f"{n}: {s}"
        )


@pytest.mark.parametrize("whitened", [False, True])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_report_variants_per_sample_norms_are_each_records_true_gradient_norm(mode, whitened):
    """What DP-SGD clips must be each record's whole gradient.  The text head runs on the report and on its
    variants; were it called once for each, ghost clipping would keep only the last call's norm (Opacus
    overwrites it) and under-clip.  Here the norms Opacus computes equal the norms of each record's gradient
    taken alone by autograd, and the clipped sum equals the sum of those gradients clipped by hand.  With
    ``model.image_whitening`` the image head runs on the whitened features: the same holds."""
    m, site, trainer, state = _variants_setup(k=2)
    if whitened:
        g = torch.Generator().manual_seed(5)
        d = m.image_head.in_features
        m.whiten_image_head(torch.randn(64, d, generator=g) @ torch.randn(d, d, generator=g) + 1.0)
        assert not torch.allclose(m.image_whitening.matrix, torch.eye(d))
    x = torch.from_numpy(site.images).unsqueeze(1)
    batch = _batch(m, x, site.reports, [0, 1, 2, 3])
    assert_opacus_clips_each_records_true_gradient(m, trainer, state, batch, mode)


def test_the_report_variants_objective_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="train.report_negatives"):
        parse_config({"model": {"trainable": "heads"}, "train": {"objective": "report_variants"}})
    with pytest.raises(ConfigError, match="model.trainable"):
        parse_config({"train": {"objective": "report_variants", "report_negatives": 3}})
    cfg = parse_config(
        {
            "model": {"trainable": "heads"},
            "train": {"objective": "report_variants", "report_negatives": 3},
            "privacy": {"enabled": True},
        }
    )
    assert cfg.train.objective == "report_variants"
    with pytest.raises(ValueError, match="training records"):
        LocalTrainer(cfg, torch.device("cpu"), public=None).begin(_heads_only(), _task(), {}, dataset=None)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_image_head_only_per_sample_norms_are_each_records_true_gradient_norm(mode):
    """With ``model.trainable = "image_head"`` the text head runs (on the report, the public bank and the report's
    variants) but trains nothing.  What DP-SGD clips is still each record's whole gradient: the norms Opacus computes
    equal the norms of each record's gradient taken alone by autograd, the clipped sum equals the sum of those
    gradients clipped by hand, and no text-head coordinate receives any gradient."""
    cfg = parse_config(
        {
            "model": {"name": "tiny", "trainable": "image_head"},
            "train": {"objective": "decomposable", "bank": "current", "report_negatives": 2},
        }
    )
    torch.manual_seed(0)
    m = create_model("tiny")
    m.restrict_trainable("image_head")
    g = torch.Generator().manual_seed(5)
    d = m.image_head.in_features
    m.whiten_image_head(torch.randn(64, d, generator=g) @ torch.randn(d, d, generator=g) + 1.0)
    site = _Site(["Cardiomegaly. No effusion.", "Left nodule. Right effusion. Normal heart.", "Clear lungs.", "x. y."])
    trainer = LocalTrainer(cfg, torch.device("cpu"), public=_Public(16, seed=1))
    state = trainer.begin(m, _task(), {}, dataset=site)
    batch = _batch(m, torch.from_numpy(site.images).unsqueeze(1), site.reports, [0, 1, 2, 3])
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("image_head.", "logit_scale.")) for n in names)

    def no_text_head_gradient():
        assert all(p.grad is None for p in m.text_head.parameters())

    assert_opacus_clips_each_records_true_gradient(m, trainer, state, batch, mode, after_each=no_text_head_gradient)
