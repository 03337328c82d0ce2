"""Evaluation metrics against independent references."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from secure_fedvlp.evaluation.metrics import binary_auroc, recall_at_k


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-5, 5)), min_size=2, max_size=40))
def test_auroc_matches_sklearn_with_ties(pairs):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=float)
    ours = binary_auroc(labels, scores)
    if labels.all() or not labels.any():
        assert np.isnan(ours)
    else:
        assert ours == pytest.approx(roc_auc_score(labels, scores))


def test_recall_at_k_hand_example():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.1, 0.2, 0.3]])
    match = torch.eye(3, dtype=torch.bool)
    r = recall_at_k(sim, match, (1, 2, 3))
    assert r[1] == pytest.approx(2 / 3)  # query 1's best is candidate 0
    assert r[2] == pytest.approx(1.0)
    assert r[3] == pytest.approx(1.0)


def test_recall_counts_identical_texts_as_hits():
    sim = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    match = torch.ones(2, 2, dtype=torch.bool)  # both reports have the same text
    assert recall_at_k(sim, match, (1,))[1] == 1.0


def test_recall_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool), (1,))


def test_auroc_hand_computed_with_a_tie():
    # positives score 0.8 and 0.4, negatives 0.4 and 0.1: of the 4 (pos, neg) pairs 3 are ordered and 1 is
    # tied (counted half), so AUROC = 3.5 / 4.
    assert binary_auroc(np.array([1, 0, 1, 0]), np.array([0.8, 0.4, 0.4, 0.1])) == pytest.approx(0.875)
