"""CreamFL's numeric core against hand-computed values and the authors' reference formula.

The reference formula is ``MMFL.distill.aggregation`` of FLAIR-THU/CreamFL written out with numpy
(``log_prob = logits - log(sum(exp(logits)))``, diagonal, softmax over clients, weighted sum); the
regularisers against ``ClientTrainer.tra`` / ``MMClientTrainer.train_epoch`` (cross-entropies at
temperature 0.5, weight 0.5).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from secure_fedvlp.objectives.creamfl import (
    contrastive_scores,
    distillation_terms,
    ensemble,
    ensemble_weights,
    inter_modal_loss,
    intra_modal_loss,
    modality_type_counts,
    ratio_ensemble,
    regulariser_terms,
    shifted_weights,
)

G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # a global bank of two public items


def authors_aggregation(vecs, global_other):
    """The authors' con_w aggregation, line by line (numpy, float64)."""
    vecs = [np.asarray(v, np.float64) for v in vecs]
    g = np.asarray(global_other, np.float64)
    w = np.zeros((len(vecs), g.shape[0]))
    for c, v in enumerate(vecs):
        logits = v @ g.T
        log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        w[c] = np.diagonal(log_prob)
    w = np.exp(w) / np.exp(w).sum(axis=0, keepdims=True)
    return sum(v * w[c][:, None] for c, v in enumerate(vecs)), w


def test_scores_are_the_log_softmax_of_the_matching_pair_by_hand():
    reps = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s = contrastive_scores(reps, G)
    assert s[0].item() == pytest.approx(1 - math.log(1 + math.e))
    assert s[1].item() == pytest.approx(2 - math.log(1 + math.e**2))


def test_ensemble_equals_the_reference_formula_and_weights_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    reps = F.normalize(torch.randn(3, 7, 4, generator=gen), dim=-1)
    bank = F.normalize(torch.randn(7, 4, generator=gen), dim=-1)
    ens, alpha = ensemble(reps, bank)
    ref, ref_w = authors_aggregation(list(reps.numpy()), bank.numpy())
    np.testing.assert_allclose(ens.numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(alpha.numpy(), ref_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(alpha.sum(0).numpy(), np.ones(7), rtol=0, atol=1e-12)


def test_two_clients_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # matches the bank
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swapped
    ens, alpha = ensemble(torch.stack([a, b]), G)
    s_good, s_bad = 1 - math.log(1 + math.e), 0 - math.log(1 + math.e)
    w_good = math.exp(s_good) / (math.exp(s_good) + math.exp(s_bad))  # = e / (1 + e)
    assert w_good == pytest.approx(math.e / (1 + math.e))
    np.testing.assert_allclose(alpha[:, 0].numpy(), [w_good, 1 - w_good], rtol=1e-12)
    np.testing.assert_allclose(ens[0].numpy(), [w_good, 1 - w_good], rtol=1e-12)


def test_log_sum_exp_is_stable_where_the_authors_formula_overflows():
    reps = torch.tensor([[[800.0, 0.0], [0.0, 900.0]], [[0.0, 700.0], [1000.0, 0.0]]], dtype=torch.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        ref, _ = authors_aggregation(list(reps.numpy()), G.numpy())
    assert not np.isfinite(ref).all()  # exp(800) overflows in the reference
    ens, alpha = ensemble(reps, G)
    assert torch.isfinite(ens).all() and torch.isfinite(alpha).all()
    # client 0 matches both items (scores ~ 0), client 1 neither (scores ~ -700, -1000): all weight on client 0
    np.testing.assert_allclose(alpha.numpy(), [[1.0, 1.0], [0.0, 0.0]], atol=1e-200)
    np.testing.assert_allclose(ens.numpy(), reps[0].numpy(), atol=1e-250)


def test_an_absent_modality_has_no_ensemble_and_an_uncovered_item_no_weight():
    assert ensemble(torch.zeros(0, 2, 2), G) == (None, None)
    scores = torch.tensor([[-0.1, -0.2], [-0.3, -0.4]])
    present = torch.tensor([[True, False], [True, False]])
    alpha = ensemble_weights(scores, present)
    assert alpha[:, 1].tolist() == [0.0, 0.0]
    assert alpha[:, 0].sum().item() == pytest.approx(1.0)
    present = torch.tensor([[True, False], [True, True]])
    assert ensemble_weights(scores, present)[:, 1].tolist() == [0.0, 1.0]


def test_the_ratio_of_two_sums_is_the_same_ensemble():
    gen = torch.Generator().manual_seed(1)
    reps = F.normalize(torch.randn(4, 9, 3, generator=gen), dim=-1).double()
    bank = F.normalize(torch.randn(9, 3, generator=gen), dim=-1)
    ens, _ = ensemble(reps, bank)
    w = shifted_weights(contrastive_scores(reps, bank), 9, floor=1e-6)  # [C, M]
    assert (w > 1e-6).all() and (w <= 9).all()
    got = ratio_ensemble((w[..., None] * reps).sum(0), w.sum(0))
    np.testing.assert_allclose(got.numpy(), ens.numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        ratio_ensemble(torch.zeros(2, 3), torch.tensor([1.0, 0.0]))


def test_the_inter_modal_term_by_hand():
    z = torch.tensor([[0.6, 0.8]])
    # logits <z, G_k> / 0.5 = [1.2, 1.6]; the positive is item 0
    assert inter_modal_loss(z, G, torch.tensor([0]), 0.5).item() == pytest.approx(math.log(1 + math.exp(0.4)))
    assert inter_modal_loss(z, G, torch.tensor([1]), 0.5).item() == pytest.approx(math.log(1 + math.exp(-0.4)))


def test_the_intra_modal_term_by_hand():
    z = torch.tensor([[0.6, 0.8]])
    g = torch.tensor([[1.0, 0.0]])  # positive: <z, g> = 0.6
    old = torch.tensor([[0.0, 1.0]])  # negative: <z, old> = 0.8
    expected = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6)))
    assert intra_modal_loss(z, g, old, 0.5).item() == pytest.approx(expected)


def test_the_paired_regulariser_matches_the_authors_concatenated_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    bank = {m: F.normalize(torch.randn(6, 4, generator=gen), dim=-1) for m in ("image", "text")}
    z = {m: F.normalize(torch.randn(3, 4, generator=gen), dim=-1) for m in ("image", "text")}
    old = {m: F.normalize(torch.randn(3, 4, generator=gen), dim=-1) for m in ("image", "text")}
    idx = torch.tensor([4, 0, 2])
    terms = regulariser_terms(z, old, bank, idx)
    # MMClientTrainer: intra = CE over both modalities' [pos, neg] logits concatenated; inter = CE_i + CE_t
    pos = [torch.sum(z[m] * bank[m][idx], -1) for m in ("image", "text")]
    neg = [torch.sum(z[m] * old[m], -1) for m in ("image", "text")]
    logits = torch.cat([torch.stack([p, n], 1) for p, n in zip(pos, neg, strict=True)]) / 0.5
    intra = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    inter = F.cross_entropy(z["image"] @ bank["text"].T / 0.5, idx) + F.cross_entropy(
        z["text"] @ bank["image"].T / 0.5, idx
    )
    assert terms["intra"].item() == pytest.approx(intra.item(), rel=1e-6)
    assert terms["inter"].item() == pytest.approx(inter.item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * (intra + inter).item(), rel=1e-6)
    single = regulariser_terms({"image": z["image"]}, old, bank, idx)  # an image-only client
    expected = 0.5 * (
        F.cross_entropy(z["image"] @ bank["text"].T / 0.5, idx)
        + F.cross_entropy(torch.stack([pos[0], neg[0]], 1) / 0.5, torch.zeros(3, dtype=torch.long))
    )
    assert single["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_distillation_weighs_each_modality_once_per_client_type():
    assert modality_type_counts(["image", "paired", "paired"]) == {"image": 2, "text": 1}
    assert modality_type_counts(["text"]) == {"image": 0, "text": 1}
    out = {"image": torch.tensor([[1.0, 0.0]]), "text": torch.tensor([[0.0, 0.0]])}
    tgt = {"image": torch.tensor([[0.0, 0.0]]), "text": None}  # no text ensemble this round
    terms = distillation_terms(out, tgt, {"image": 2, "text": 1})
    assert set(terms) == {"kd_image", "loss"}
    assert terms["loss"].item() == pytest.approx(0.3 * 2 * 0.5)  # MSE = mean((1, 0)^2) = 0.5
    with pytest.raises(ValueError, match="nothing to distil"):
        distillation_terms(out, {"image": None, "text": None}, {"image": 1, "text": 1})
