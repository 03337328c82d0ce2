"""Chi-square-ball projection and mirror ascent (FedDRA/FedAID robust client weights)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from secure_fedvlp.methods.dro import (
    centre_weights,
    chi2_divergence,
    mirror_ascent_step,
    project_chi2_ball,
    project_simplex,
)

vectors = st.lists(st.floats(-3, 3, allow_nan=False, allow_infinity=False), min_size=2, max_size=7).map(np.array)
radii = st.floats(0.01, 3.0)


def _slow_reference(w, rho, c):
    """SLSQP on the same convex problem: an independent (slow) reference."""
    n = w.size
    cons = [
        {"type": "eq", "fun": lambda p: p.sum() - 1.0},
        {"type": "ineq", "fun": lambda p: rho - 0.5 * np.sum((p - c) ** 2 / c)},
    ]
    best = None
    for x0 in (c, np.clip(project_simplex(w), 1e-6, None)):
        r = minimize(
            lambda p: 0.5 * np.sum((p - w) ** 2),
            x0 / x0.sum(),
            jac=lambda p: p - w,
            bounds=[(0, 1)] * n,
            constraints=cons,
            method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 500},
        )
        if best is None or r.fun < best.fun:
            best = r
    return best.x


def _centre(n, seed):
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.5, 2.0, n)
    return c / c.sum()


@settings(max_examples=80, deadline=None)
@given(vectors, radii, st.booleans(), st.integers(0, 1000))
def test_projection_is_in_simplex_and_ball(w, rho, uniform, seed):
    c = None if uniform else _centre(w.size, seed)
    p = project_chi2_ball(w, rho, c)
    cc = np.full(w.size, 1 / w.size) if c is None else c
    assert np.all(p >= -1e-12)
    assert p.sum() == pytest.approx(1.0, abs=1e-9)
    assert chi2_divergence(p, cc) <= rho * (1 + 1e-6) + 1e-9


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7), radii, st.integers(0, 10_000))
def test_points_inside_are_unchanged(n, rho, seed):
    rng = np.random.default_rng(seed)
    c = np.full(n, 1 / n)
    q = c + rng.normal(scale=0.05, size=n)
    q = np.clip(q, 1e-3, None)
    q /= q.sum()
    if chi2_divergence(q, c) <= rho:
        np.testing.assert_allclose(project_chi2_ball(q, rho), q, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(vectors, radii, st.booleans(), st.integers(0, 1000))
def test_matches_slow_reference(w, rho, uniform, seed):
    c = np.full(w.size, 1 / w.size) if uniform else _centre(w.size, seed)
    ours = project_chi2_ball(w, rho, c)
    ref = _slow_reference(w, rho, c)
    # Compare objective values (the minimiser is unique; SLSQP is only accurate to ~1e-6).
    f = lambda p: 0.5 * np.sum((p - w) ** 2)  # noqa: E731
    assert f(ours) <= f(ref) + 1e-6
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_matches_namkoong_duchi_ball_for_uniform_centre():
    # (n/2)||q - 1/n||^2 is exactly our chi2 with a uniform centre.
    q = np.array([0.7, 0.2, 0.1])
    assert chi2_divergence(q, np.full(3, 1 / 3)) == pytest.approx(1.5 * np.sum((q - 1 / 3) ** 2))


def test_mirror_ascent_moves_weight_to_high_loss_clients():
    q = np.full(4, 0.25)
    losses = np.array([1.0, 2.0, 3.0, 4.0])
    q1 = mirror_ascent_step(q, losses, eta=0.5, rho=1.0)
    assert np.all(np.diff(q1) > 0)
    assert q1[-1] > 0.25 > q1[0]
    # Persisting q: a second step with the same losses moves further.
    q2 = mirror_ascent_step(q1, losses, eta=0.5, rho=1.0)
    assert q2[-1] >= q1[-1] - 1e-12


def test_radius_bounds_how_far_weights_move():
    q = np.full(4, 0.25)
    small = mirror_ascent_step(q, [0, 0, 0, 10.0], eta=5.0, rho=0.01)
    big = mirror_ascent_step(q, [0, 0, 0, 10.0], eta=5.0, rho=1.0)
    assert chi2_divergence(small, q) <= 0.01 + 1e-9
    assert big[-1] > small[-1]


def test_centres_and_errors():
    np.testing.assert_allclose(centre_weights("data_size", [1, 3]), [0.25, 0.75])
    with pytest.raises(ValueError, match="centre"):
        centre_weights("bogus", [1, 2])
    with pytest.raises(ValueError, match="rho"):
        project_chi2_ball([0.5, 0.5], 0.0)
    with pytest.raises(ValueError, match="losses"):
        mirror_ascent_step([0.5, 0.5], [1.0], 0.1, 1.0)
