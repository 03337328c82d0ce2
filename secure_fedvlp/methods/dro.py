"""Distributionally robust client weights (FedDRA / FedAID): chi-square ball, mirror ascent.

The uncertainty set is the set of mixtures of client distributions with weights in a
chi-square ball around a centre ``c`` (uniform or data-size weights)::

    Q = { q in simplex : chi2(q || c) = 1/2 * sum_k (q_k - c_k)^2 / c_k <= rho }

For a uniform centre this is Namkoong and Duchi's ball ``(n/2) ||q - 1/n||^2 <= rho``
(``project_onto_chi_square_ball`` in their code and in the FedDRA release).  Each round
the server takes a mirror-ascent step on the per-client losses and projects back::

    q <- Proj_Q( q * exp(eta * L) / Z )

Projection is Euclidean.  Its KKT conditions give, for multipliers ``lam >= 0`` (ball)
and ``nu`` (simplex), ``p_k = max(0, (w_k + lam + nu) / (1 + lam / c_k))``; ``nu`` is
found by bisection so that ``sum p = 1`` and ``lam`` by bisection so that the ball
constraint is tight (or ``lam = 0`` when the simplex projection is already inside).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["chi2_divergence", "project_simplex", "project_chi2_ball", "mirror_ascent_step", "centre_weights"]


def chi2_divergence(q: np.ndarray, centre: np.ndarray) -> float:
    """``1/2 * sum (q - c)^2 / c``."""
    q, c = np.asarray(q, np.float64), np.asarray(centre, np.float64)
    return float(0.5 * np.sum((q - c) ** 2 / c))


def _validate(w: np.ndarray, centre: np.ndarray, rho: float) -> None:
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty vector; found shape {w.shape}.")
    if centre.shape != w.shape:
        raise ValueError(f"centre shape {centre.shape} differs from weights shape {w.shape}.")
    if not np.all(centre > 0) or not np.isclose(centre.sum(), 1.0, atol=1e-9):
        raise ValueError(f"centre must be a strictly positive probability vector; found {centre}.")
    if not rho > 0 or not np.isfinite(rho):
        raise ValueError(f"radius rho must be a positive finite number; found {rho}.")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite; found {w}.")


def _p_of(w: np.ndarray, c: np.ndarray, lam: float, tol: float) -> np.ndarray:
    """Minimiser of the Lagrangian for fixed ``lam``: bisection on the simplex multiplier."""
    denom = 1.0 + lam / c

    def total(nu: float) -> float:
        return float(np.maximum(0.0, (w + lam + nu) / denom).sum())

    # total(nu) is non-decreasing; bracket the root of total(nu) = 1.
    lo = -(w.max() + lam) - 1.0
    hi = float(np.max(denom)) - (w.min() + lam) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total(mid) < 1.0:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    p = np.maximum(0.0, (w + lam + 0.5 * (lo + hi)) / denom)
    return p / p.sum()


def project_simplex(w: Sequence[float]) -> np.ndarray:
    """Euclidean projection onto the probability simplex (Duchi et al., 2008)."""
    w = np.asarray(w, np.float64)
    u = np.sort(w)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.nonzero(u * np.arange(1, w.size + 1) > css)[0][-1]
    return np.maximum(w - css[k] / (k + 1.0), 0.0)


def project_chi2_ball(
    w: Sequence[float], rho: float, centre: Sequence[float] | None = None, tol: float = 1e-12
) -> np.ndarray:
    """Euclidean projection of ``w`` onto ``{q in simplex: chi2(q || centre) <= rho}``.

    A point already in the set is returned unchanged (up to float rounding).
    """
    w = np.asarray(w, np.float64)
    c = np.full(w.size, 1.0 / w.size) if centre is None else np.asarray(centre, np.float64)
    _validate(w, c, float(rho))
    if np.all(w >= 0) and np.isclose(w.sum(), 1.0, atol=1e-12) and chi2_divergence(w, c) <= rho:
        return w.copy()
    p = project_simplex(w)
    if chi2_divergence(p, c) <= rho:
        return p
    # Bisection on lam: divergence of p(lam) decreases in lam; p(inf) -> c (divergence 0).
    lo, hi = 0.0, 1.0
    while chi2_divergence(_p_of(w, c, hi, tol), c) > rho:
        hi *= 2.0
        if hi > 1e12:
            break
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if chi2_divergence(_p_of(w, c, mid, tol), c) > rho:
            lo = mid
        else:
            hi = mid
        if hi - lo <= tol * max(1.0, hi):
            break
    return _p_of(w, c, hi, tol)


def mirror_ascent_step(
    q: Sequence[float], losses: Sequence[float], eta: float, rho: float, centre: Sequence[float] | None = None
) -> np.ndarray:
    """One exponentiated-gradient ascent step on ``sum q_k L_k``, projected onto the ball."""
    q = np.asarray(q, np.float64)
    losses = np.asarray(losses, np.float64)
    if losses.shape != q.shape:
        raise ValueError(f"{losses.size} losses for {q.size} weights.")
    if not np.all(np.isfinite(losses)):
        raise ValueError(f"losses must be finite; found {losses}.")
    if eta < 0:
        raise ValueError(f"step size eta must be >= 0; found {eta}.")
    z = np.log(np.maximum(q, 1e-300)) + eta * (losses - losses.max())
    step = np.exp(z - z.max())
    step /= step.sum()
    return project_chi2_ball(step, rho, centre)


def centre_weights(kind: str, num_examples: Sequence[float]) -> np.ndarray:
    """Centre of the ball: ``uniform`` or ``data_size`` (proportional to example counts)."""
    n = np.asarray(num_examples, np.float64)
    if kind == "uniform":
        return np.full(n.size, 1.0 / n.size)
    if kind == "data_size":
        if not np.all(n > 0):
            raise ValueError(f"data-size centre needs positive example counts; found {n}.")
        return n / n.sum()
    raise ValueError(f"centre must be 'uniform' or 'data_size'; found {kind!r}.")
