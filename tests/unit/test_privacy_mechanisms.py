"""Numeric DP mechanisms: clipping, Gaussian noise with explicit randomness, noised sums and means."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from secure_fedvlp.privacy import (
    GaussianEvent,
    InvalidPrivacyParameter,
    clip_per_sample,
    gaussian_noise_like,
    mean_release_event,
    noised_clipped_mean,
    noised_clipped_sum,
    sum_release_event,
)

# Each statistical test below has a false-alarm probability of at most 1e-6 for a correct
# implementation (and the seeds are fixed, so the suite is deterministic anyway).
ALPHA = 1e-6


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- clipping


def test_clip_zero_vectors_are_safe():
    x = torch.zeros(4, 3, 5, requires_grad=True)
    clipped, norms = clip_per_sample(x, 1.0)
    assert torch.equal(clipped, torch.zeros(4, 3, 5)) and torch.equal(norms, torch.zeros(4))
    clipped.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_clip_inside_untouched_outside_scaled():
    x = torch.tensor([[0.3, 0.4], [3.0, 4.0], [0.0, 0.0], [0.6, 0.8]])
    clipped, norms = clip_per_sample(x, 1.0)
    assert torch.allclose(norms, torch.tensor([0.5, 5.0, 0.0, 1.0]))
    assert torch.equal(clipped[0], x[0]) and torch.equal(clipped[2], x[2]) and torch.equal(clipped[3], x[3])
    assert torch.allclose(clipped[1], torch.tensor([0.6, 0.8]))


@given(
    arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 7)), elements=st.floats(-1e6, 1e6)),
    st.floats(1e-3, 1e3),
)
@settings(max_examples=60, deadline=None)
def test_clip_bound_holds(values, c):
    x = torch.from_numpy(values)
    clipped, norms = clip_per_sample(x, c)
    after = torch.linalg.vector_norm(clipped, dim=1)
    assert torch.isfinite(clipped).all()
    assert (after <= c * (1 + 1e-12)).all()
    # Direction is preserved.
    inside = norms <= c
    assert torch.equal(clipped[inside], x[inside])


def test_clip_rejects_bad_input():
    with pytest.raises(InvalidPrivacyParameter, match="Clip norm must be finite and > 0. Found 0"):
        clip_per_sample(torch.ones(2, 2), 0)
    with pytest.raises(InvalidPrivacyParameter, match=r"non-finite entries in samples \[1\]"):
        clip_per_sample(torch.tensor([[1.0, 2.0], [math.nan, 0.0]]), 1.0)
    with pytest.raises(InvalidPrivacyParameter, match="floating-point"):
        clip_per_sample(torch.ones(2, 2, dtype=torch.int64), 1.0)


# --------------------------------------------------------------------------- noise


def test_noise_std_chi_square():
    """(n-1) s^2 / sigma^2 ~ chi2(n-1): two-sided interval at false-alarm rate 1e-6."""
    n, sigma = 20000, 2.5
    noise = gaussian_noise_like(torch.zeros(n, dtype=torch.float64), sigma, gen(1234)).numpy()
    stat = (n - 1) * noise.var(ddof=1) / sigma**2
    lo, hi = stats.chi2.ppf(ALPHA / 2, n - 1), stats.chi2.ppf(1 - ALPHA / 2, n - 1)
    assert lo <= stat <= hi
    z = abs(noise.mean()) / (sigma / math.sqrt(n))
    assert z <= stats.norm.ppf(1 - ALPHA / 2)
    # The test has power: a 5% error in the std is rejected.
    wrong = (n - 1) * noise.var(ddof=1) / (1.05 * sigma) ** 2
    assert not lo <= wrong <= hi


def test_noise_explicit_randomness_and_no_global_state():
    t = torch.zeros(3, 4)
    state = torch.get_rng_state()
    a = gaussian_noise_like(t, 1.0, gen(7))
    b = gaussian_noise_like(t, 1.0, gen(7))
    assert torch.equal(a, b) and a.shape == t.shape and a.dtype == t.dtype
    s1 = gaussian_noise_like(t, 1.0, secure=True)
    s2 = gaussian_noise_like(t, 1.0, secure=True)
    assert not torch.equal(s1, s2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(gaussian_noise_like(t, 0.0, gen(1)), t)
    with pytest.raises(InvalidPrivacyParameter, match="explicit randomness"):
        gaussian_noise_like(t, 1.0)
    with pytest.raises(InvalidPrivacyParameter, match="not both"):
        gaussian_noise_like(t, 1.0, gen(), secure=True)
    with pytest.raises(InvalidPrivacyParameter, match="Noise standard deviation"):
        gaussian_noise_like(t, -1.0, gen())
    half = gaussian_noise_like(torch.zeros(8, dtype=torch.float16), 1.0, gen())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


# --------------------------------------------------------------------------- sums and means


def test_noised_clipped_sum_and_event():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
    exact, ev = noised_clipped_sum(x, 1.0, 0.0, gen(), what="anchor_features", round=2)
    assert torch.allclose(exact, torch.tensor([0.9, 1.2]))
    assert ev == GaussianEvent(1.0, 0.0, "anchor_features", 2)
    noisy, ev2 = noised_clipped_sum(x, 2.0, 1.5, gen(3), what="anchor_features", round=2)
    assert ev2 == sum_release_event(2.0, 1.5, what="anchor_features", round=2)
    assert ev2.sensitivity == 2.0 and ev2.sigma == 3.0 and ev2.noise_multiplier == 1.5
    assert not torch.allclose(noisy, exact)


def test_noised_clipped_mean_public_count():
    v = torch.tensor([0.5, -3.0, 10.0, 0.0])
    est, ev = noised_clipped_mean(v, 2.0, 0.0, gen(), public_count=4, what="dro_loss", round=1)
    assert est.item() == pytest.approx((0.5 - 2.0 + 2.0 + 0.0) / 4)
    assert ev == mean_release_event(2.0, 0.0, public_count=4, what="dro_loss", round=1)
    assert ev.sensitivity == 2.0
    est_nn, _ = noised_clipped_mean(v, 2.0, 0.0, gen(), bounds="nonnegative", public_count=4)
    assert est_nn.item() == pytest.approx((0.5 + 0.0 + 2.0 + 0.0) / 4)


def test_noised_clipped_mean_private_count_accounts_both():
    v = torch.full((50,), 0.7)
    est, ev = noised_clipped_mean(v, 1.0, 0.0, gen())
    assert est.item() == pytest.approx(0.7)
    assert ev.sensitivity == pytest.approx(math.sqrt(2.0))
    _, ev2 = noised_clipped_mean(v, 1.0, 2.0, gen())
    assert ev2.noise_multiplier == pytest.approx(2.0) and ev2.sigma == pytest.approx(2.0 * math.sqrt(2.0))
    # Unbiased up to noise: the mean of many releases is close to 0.7.
    ests = [noised_clipped_mean(v, 1.0, 0.5, gen(s))[0].item() for s in range(200)]
    assert abs(np.mean(ests) - 0.7) < 0.05


def test_noised_clipped_mean_rejects_bad_input():
    with pytest.raises(InvalidPrivacyParameter, match="Public count"):
        noised_clipped_mean(torch.ones(3), 1.0, 1.0, gen(), public_count=0)
    with pytest.raises(InvalidPrivacyParameter, match="Bounds"):
        noised_clipped_mean(torch.ones(3), 1.0, 1.0, gen(), bounds="positive")  # type: ignore[arg-type]
    with pytest.raises(InvalidPrivacyParameter, match=r"shape \[B\] or \[B, 1\]"):
        noised_clipped_mean(torch.ones(3, 2), 1.0, 1.0, gen())
    with pytest.raises(InvalidPrivacyParameter, match="finite"):
        noised_clipped_mean(torch.tensor([1.0, math.inf]), 1.0, 1.0, gen())
