"""Model factory, towers, parameter groups, and the locked/cached text prefix."""

import pytest
import torch
from torch import nn

from secure_fedvlp.errors import ModelConfigError
from secure_fedvlp.models import create_model, get_model_spec, list_models


def test_registry_and_errors():
    assert {"demo", "tiny"} <= set(list_models())
    with pytest.raises(ModelConfigError, match="registered models"):
        get_model_spec("nope")
    with pytest.raises(ModelConfigError, match="no such key"):
        get_model_spec("tiny", {"image.bogus": 1})
    assert get_model_spec("tiny", {"embed_dim": 16}).embed_dim == 16


def test_shapes_normalised_and_groupnorm_only():
    torch.manual_seed(0)
    m = create_model("tiny")
    tok = m.tokenize(["no acute findings", "small right pleural effusion"])
    out = m(torch.rand(2, 1, 32, 32), tok["input_ids"], tok["attention_mask"])
    assert out["image_emb"].shape == out["text_emb"].shape == (2, m.spec.embed_dim)
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(2))
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    assert any(isinstance(mod, nn.GroupNorm) for mod in m.image_encoder.modules())


def test_parameter_groups_partition_and_alignment_contents():
    m = create_model("tiny")
    g = m.parameter_groups()
    names = [n for n, _ in m.named_parameters()]
    assert sorted(g["alignment"] + g["backbone"]) == sorted(names)
    assert not set(g["alignment"]) & set(g["backbone"])
    assert any(n.startswith("image_head.") for n in g["alignment"])
    assert "logit_scale.scale" in g["alignment"]
    assert any(n.startswith("image_encoder.stem") for n in g["backbone"])


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return create_model("demo")  # the real all-MiniLM-L6-v2 weights, loaded offline


def test_demo_loads_real_minilm_offline_with_locked_lower_layers(demo):
    enc = demo.text_encoder.encoder
    assert enc.config.num_hidden_layers == 6 and enc.config.hidden_size == 384
    frozen = demo.spec.text.frozen_layers
    assert all(not p.requires_grad for p in enc.embeddings.parameters())
    assert all(not p.requires_grad for layer in enc.encoder.layer[:frozen] for p in layer.parameters())
    assert all(p.requires_grad for layer in enc.encoder.layer[frozen:] for p in layer.parameters())
    assert demo.training  # from_pretrained returns eval mode; the factory must not


def test_cached_prefix_equals_the_full_forward_and_is_padding_invariant(demo):
    demo.eval()
    try:
        texts = [
            "no acute findings",
            "small left effusion. no pneumothorax",
            "the heart is enlarged with a large right pleural effusion and no pneumothorax",
        ]
        tok = demo.tokenize(texts)
        cached = demo.encode_text(tok["input_ids"], tok["attention_mask"])  # fills the cache
        again = demo.encode_text(tok["input_ids"], tok["attention_mask"])  # served from it
        hidden = demo.text_encoder.encoder(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
        ).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).float()
        full = nn.functional.normalize(demo.text_head((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again, cached)
        one = demo.tokenize(texts[:1])
        torch.testing.assert_close(
            demo.encode_text(one["input_ids"], one["attention_mask"])[0], cached[0], rtol=1e-5, atol=1e-6
        )
    finally:
        demo.train()


@pytest.mark.parametrize("whole", [False, True], ids=["locked-prefix", "wholly-locked"])
def test_locked_pass_runs_each_distinct_text_once_in_length_chunks_and_matches_one_padded_batch(whole):
    torch.manual_seed(0)
    m = create_model("demo")
    if whole:
        m.restrict_trainable("heads")
    tower = m.text_encoder
    tower.locked_chunk = 2
    texts = [
        "the heart is enlarged with a large right pleural effusion and no pneumothorax",
        "no acute findings",
        "small left effusion. no pneumothorax",
        "no acute findings",  # a duplicate in the same batch
        "cardiomegaly",
        "small left effusion. no pneumothorax",
    ]
    tok = m.tokenize(texts)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    calls = []
    run = tower._locked_states

    def counted(i, a):
        calls.append((i.shape[0], i.shape[1], int(a.sum(1).max())))
        return run(i, a)

    tower._locked_states = counted
    m.eval()
    with torch.no_grad():
        got = m.encode_text(ids, mask)
        # reference: one padded batch through the whole encoder, no cache
        hidden = tower.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).float()
        ref = nn.functional.normalize(m.text_head((hidden * w).sum(1) / w.sum(1)), dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert sum(n for n, _, _ in calls) == 4  # four distinct texts, each run once
    assert all(width == longest for _, width, longest in calls)  # each chunk cut to its longest text
    assert [width for _, width, _ in calls] == sorted(width for _, width, _ in calls)  # shortest first
    assert max(width for _, width, _ in calls) == ids.shape[1] and min(w for _, w, _ in calls) < ids.shape[1]


def test_semantic_sanity_of_pretrained_text_tower(demo):
    # Mean-pooled MiniLM states put a paraphrase nearer than an unrelated finding (before any training).
    demo.eval()
    try:
        tok = demo.tokenize(["the heart is enlarged", "cardiomegaly with enlarged heart", "right pneumothorax"])
        ids, mask = tok["input_ids"], tok["attention_mask"]
        h = demo.text_encoder(ids, mask)
        h = nn.functional.normalize(h, dim=-1)
        assert float(h[0] @ h[1]) > float(h[0] @ h[2])
    finally:
        demo.train()


@pytest.mark.parametrize("kind", ["alignment", "heads", "image_head"])
def test_restrict_trainable_freezes_the_rest_and_locks_text_layers(kind):
    torch.manual_seed(0)
    m = create_model("tiny")
    layers = len(m.text_encoder.encoder.encoder.layer)
    tok = m.tokenize(["no acute findings", "small right pleural effusion"])
    x = torch.rand(2, 1, 32, 32)
    m.eval()
    before = m(x, tok["input_ids"], tok["attention_mask"])
    m.restrict_trainable(kind)
    trained = set(m.trainable_parameter_names())
    if kind == "heads":
        assert trained and all(n.startswith(("image_head.", "text_head.", "logit_scale.")) for n in trained)
        assert m.text_encoder.frozen_layers == layers  # the whole tower is locked and cached
    elif kind == "image_head":
        assert trained == {n for n, _ in m.named_parameters() if n.startswith(("image_head.", "logit_scale."))}
        assert not any(p.requires_grad for p in m.text_head.parameters())
        assert m.text_encoder.frozen_layers == layers
    else:
        assert trained == set(m.parameter_groups()["alignment"])
        assert 0 < m.text_encoder.frozen_layers < layers
    after = m(x, tok["input_ids"], tok["attention_mask"])  # same function, fewer trainable parts
    torch.testing.assert_close(after["text_emb"], before["text_emb"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after["image_emb"], before["image_emb"])
    with pytest.raises(ValueError, match="trainable"):
        m.restrict_trainable("backbone")
