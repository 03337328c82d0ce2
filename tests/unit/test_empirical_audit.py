"""The one-run empirical epsilon lower bound (Steinke, Nasr and Jagielski, 2023) against known answers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fedvlp.privacy.empirical import (
    audit_from_scores,
    default_guess_counts,
    epsilon_lower_bound,
    guesses_from_scores,
    p_value,
)


def _logit(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize("r,beta", [(1, 0.5), (10, 0.05), (50, 0.05), (200, 0.01), (1000, 0.05)])
def test_all_correct_matches_the_closed_form(r, beta):
    # delta = 0, v = r: p(eps) = q^r with q = e^eps/(1+e^eps), so the bound solves q^r = beta.
    expected = _logit(beta ** (1 / r))
    assert epsilon_lower_bound(r, r, r, beta) == pytest.approx(expected, abs=1e-5)


def test_pinned_binomial_tail_value():
    # P[Bin(10, 1/2) >= 8] = (45 + 10 + 1) / 1024 at eps = 0.
    assert p_value(10, 10, 8, 0.0) == pytest.approx(56 / 1024, rel=1e-12)
    # one guess, correct: p = q = e/(1+e) at eps = 1
    assert p_value(1, 1, 1, 1.0) == pytest.approx(math.e / (1 + math.e), rel=1e-12)


def test_bound_is_where_the_p_value_crosses_beta():
    m, r, v, beta = 100, 60, 50, 0.05
    eps = epsilon_lower_bound(m, r, v, beta)
    assert eps > 0
    assert p_value(m, r, v, eps) < beta <= p_value(m, r, v, eps + 1e-4)


@pytest.mark.parametrize("r", [2, 10, 100, 1000])
def test_half_accuracy_gives_zero(r):
    assert epsilon_lower_bound(r, r, r // 2, 0.05) == 0.0
    assert epsilon_lower_bound(r, r, 0, 0.05) == 0.0


def test_delta_term_matches_a_direct_loop_and_lowers_the_bound():
    m, r, v, eps, delta = 200, 40, 36, 1.5, 1e-4
    q = 1 / (1 + math.exp(-eps))
    from scipy.stats import binom

    alpha, acc = 0.0, 0.0
    for i in range(1, v + 1):  # the paper's appendix algorithm, written as a loop
        acc += binom.pmf(v - i, r, q)
        alpha = max(alpha, acc / i)
    direct = binom.sf(v - 1, r, q) + 2 * m * delta * alpha
    assert p_value(m, r, v, eps, delta) == pytest.approx(min(1.0, direct), rel=1e-10)
    assert epsilon_lower_bound(m, r, v, 0.05, delta) < epsilon_lower_bound(m, r, v, 0.05, 0.0)
    # the bound falls as delta grows, and a large enough delta leaves nothing to reject
    bounds = [epsilon_lower_bound(m, r, v, 0.05, d) for d in (0.0, 1e-4, 1e-3, 1 / (2 * m), 1e-2)]
    assert all(a >= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1] == 0.0


@settings(max_examples=60, deadline=None)
@given(
    r=st.integers(1, 300),
    data=st.data(),
    beta=st.sampled_from([0.01, 0.05, 0.1]),
    delta=st.sampled_from([0.0, 1e-6, 1e-4]),
)
def test_monotone_in_correct_guesses(r, data, beta, delta):
    v = data.draw(st.integers(0, r - 1))
    m = data.draw(st.integers(r, 2 * r))
    assert epsilon_lower_bound(m, r, v, beta, delta) <= epsilon_lower_bound(m, r, v + 1, beta, delta) + 1e-6


@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 300), data=st.data())
def test_p_value_increases_with_epsilon_and_bound_with_confidence(r, data):
    v = data.draw(st.integers(0, r))
    e1, e2 = sorted(data.draw(st.lists(st.floats(0, 20), min_size=2, max_size=2)))
    assert p_value(r, r, v, e1) <= p_value(r, r, v, e2) + 1e-12
    # asking for more confidence (smaller beta) never gives a larger bound
    assert epsilon_lower_bound(r, r, v, 0.01) <= epsilon_lower_bound(r, r, v, 0.1) + 1e-6


def test_bound_is_valid_on_randomized_response():
    # Guesses from eps0-DP randomized response are correct w.p. e^eps0/(1+e^eps0): the bound at
    # beta = 0.05 may exceed eps0 in at most ~5 % of trials (here: checked on 400 trials).
    rng = np.random.default_rng(0)
    eps0, r, beta = 1.0, 100, 0.05
    q = 1 / (1 + math.exp(-eps0))
    vs = rng.binomial(r, q, size=400)
    exceed = np.mean([epsilon_lower_bound(r, r, int(v), beta) > eps0 for v in vs])
    assert exceed <= beta + 0.03
    # ... and it is informative: the median bound is well above 0
    assert np.median([epsilon_lower_bound(r, r, int(v), beta) for v in vs]) > 0.3


def test_guesses_from_scores_picks_the_ends():
    g = guesses_from_scores([0.1, 0.9, 0.5, 0.7, 0.2], k_plus=2, k_minus=1)
    assert g.tolist() == [-1, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="k_plus"):
        guesses_from_scores([0.1, 0.2], 2, 1)


def test_audit_from_scores_perfect_separation_and_bonferroni():
    included = np.array([True, False] * 50)
    scores = np.where(included, 1.0, 0.0) + np.linspace(0, 0.01, 100)
    audit = audit_from_scores(scores, included, beta=0.05)
    n_choices = len(default_guess_counts(100))
    assert audit.correct == audit.guesses  # every guess right
    assert audit.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(100, audit.guesses, audit.guesses, 0.05 / n_choices), abs=1e-9
    )
    assert audit.auc == pytest.approx(1.0)
    # uninformative scores: the bound stays at or near 0
    rng = np.random.default_rng(1)
    rand = audit_from_scores(rng.normal(size=100), included, beta=0.05)
    assert rand.epsilon_lower_bound < 0.5


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="0 <= correct guesses"):
        p_value(5, 6, 1, 1.0)
    with pytest.raises(ValueError, match="Beta"):
        epsilon_lower_bound(5, 5, 5, beta=0.0)
    with pytest.raises(ValueError, match="Delta"):
        p_value(5, 5, 5, 1.0, delta=2.0)
