"""Empirical lower bounds on epsilon from one training run (Steinke, Nasr and Jagielski, 2023).

"Privacy Auditing with One (1) Training Run" (arXiv 2305.08846): ``m`` canaries are each
included in the training data independently with probability 1/2.  After training, an
auditor scores every canary, guesses "in" for the ``k_plus`` highest scores and "out" for the
``k_minus`` lowest, and abstains on the rest.  If the training algorithm is
``(epsilon, delta)``-DP, the number ``v`` of correct guesses among the ``r = k_plus + k_minus``
made is stochastically dominated by ``Binomial(r, e^eps / (1 + e^eps))`` (their Theorem 3.1,
``delta = 0``), up to an additive term for ``delta > 0`` (their Theorem 5.2, computed as in their
appendix algorithm):

    p(eps, delta) = P[Bin(r, q) >= v] + 2 m delta * max_{i=1..v} P[v - i <= Bin(r, q) < v] / i,
    q = e^eps / (1 + e^eps).

``p`` is the p-value of observing ``>= v`` correct guesses under the null hypothesis "the run
is (eps, delta)-DP".  The empirical lower bound at confidence ``1 - beta`` is the largest
epsilon whose null hypothesis is rejected, ``sup {eps >= 0 : p(eps, delta) < beta}`` (0 when
none is), found by bisection since ``p`` increases with ``eps``.

Choosing ``(k_plus, k_minus)`` after looking at the outcome would invalidate the test, so
:func:`audit_from_scores` tries a fixed, outcome-independent list of choices and runs each test at
``beta / len(choices)`` (Bonferroni): the best of them is then a valid lower bound at confidence
``1 - beta`` overall.

Everything here is a pure function of counts or scores; no training happens in this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "p_value",
    "epsilon_lower_bound",
    "guesses_from_scores",
    "audit_from_scores",
    "EmpiricalAudit",
    "default_guess_counts",
]

#: Bisection stops once the bracket on epsilon is this narrow (the result is its lower end,
#: so the bound is never overstated by the search).
EPS_TOL = 1e-6
#: No bound above this is searched for (p(eps) -> P[v >= v] = 1 long before for any r < 1e6).
EPS_MAX = 100.0


def _check_counts(m: int, r: int, v: int) -> None:
    if not (isinstance(m, (int, np.integer)) and isinstance(r, (int, np.integer)) and isinstance(v, (int, np.integer))):
        raise TypeError(f"m, r and v must be integers. Found m={m!r}, r={r!r}, v={v!r}.")
    if not 0 <= v <= r <= m:
        raise ValueError(
            f"Counts must satisfy 0 <= correct guesses v <= guesses r <= canaries m. Found m={m}, r={r}, v={v}."
        )


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """P-value of ``v`` or more correct guesses out of ``r`` under the null "(eps, delta)-DP".

    ``m`` is the number of canaries (each included with probability 1/2); it enters only through
    the ``delta`` term.
    """
    _check_counts(m, r, v)
    if not eps >= 0 or math.isnan(eps):
        raise ValueError(f"Epsilon must be >= 0. Found {eps}.")
    if not 0 <= delta <= 1:
        raise ValueError(f"Delta must be in [0, 1]. Found {delta}.")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0:
        return min(1.0, tail)
    # max over i of P[v - i <= Bin(r, q) < v] / i, for i = 1..v
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # pmf(v-1), pmf(v-2), ..., pmf(0)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, beta: float = 0.05, delta: float = 0.0) -> float:
    """Largest epsilon rejected at level ``beta``: ``sup {eps : p_value(m, r, v, eps, delta) < beta}``, or 0.

    The run is not ``(eps, delta)``-DP for any ``eps`` below the returned value, with confidence
    ``1 - beta`` over the canaries' coins.
    """
    if not 0 < beta < 1:
        raise ValueError(f"Beta (1 - confidence) must be in (0, 1). Found {beta}.")
    _check_counts(m, r, v)
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2.0 * hi
        if hi > EPS_MAX:
            return lo
    while hi - lo > EPS_TOL:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores: Sequence[float], k_plus: int, k_minus: int) -> np.ndarray:
    """Guesses per canary: +1 ("in") for the ``k_plus`` highest scores, -1 for the ``k_minus`` lowest, 0 otherwise.

    Ties are broken by canary index (a stable sort), which does not depend on membership.
    """
    s = np.asarray(scores, dtype=np.float64)
    m = s.size
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(
            f"Need k_plus, k_minus >= 0 and k_plus + k_minus <= m = {m}. Found k_plus={k_plus}, k_minus={k_minus}."
        )
    if not np.isfinite(s).all():
        raise ValueError("Membership scores must be finite.")
    order = np.argsort(-s, kind="stable")  # highest first
    g = np.zeros(m, dtype=np.int64)
    g[order[:k_plus]] = 1
    if k_minus:
        g[order[m - k_minus :]] = -1
    return g


def default_guess_counts(m: int) -> list[tuple[int, int]]:
    """A fixed, outcome-independent list of ``(k_plus, k_minus)`` to try for ``m`` canaries.

    Symmetric guesses on 10 %, 20 %, 30 % and 50 % of the canaries at each end, plus
    "in"-only guesses on 10 % and 20 % (in-only guesses cannot be wrong about records the model
    never saw looking unfamiliar, which suits weak attacks).  At least one guess each.
    """
    out: list[tuple[int, int]] = []
    for frac in (0.1, 0.2, 0.3, 0.5):
        k = max(1, int(round(frac * m / 2)))
        out.append((k, k))
    for frac in (0.1, 0.2):
        out.append((max(1, int(round(frac * m))), 0))
    seen: list[tuple[int, int]] = []
    for c in out:
        if c not in seen and c[0] + c[1] <= m:
            seen.append(c)
    return seen


@dataclass
class EmpiricalAudit:
    """The outcome of a one-run membership audit."""

    m: int  # canaries
    members: int  # how many of them were included
    beta: float  # 1 - confidence of the reported bound (after the Bonferroni correction)
    delta: float
    epsilon_lower_bound: float
    k_plus: int  # the choice that gave the bound
    k_minus: int
    guesses: int  # r
    correct: int  # v
    choices: list[dict[str, Any]] = field(default_factory=list)  # every (k+, k-) tried, at beta / len(choices)
    auc: float | None = None  # membership-score AUC (descriptive only, no guarantee attached)

    @property
    def confidence(self) -> float:
        return 1.0 - self.beta

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["confidence"] = self.confidence
        return d


def audit_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    beta: float = 0.05,
    delta: float = 0.0,
    choices: Sequence[tuple[int, int]] | None = None,
) -> EmpiricalAudit:
    """Empirical lower bound from membership scores (higher = "more likely a member") and the true coins.

    Every ``(k_plus, k_minus)`` in ``choices`` (default :func:`default_guess_counts`) is tested at
    ``beta / len(choices)``; the largest bound is valid at confidence ``1 - beta`` (union bound).
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise ValueError(f"scores and included must be 1-d of the same length. Found {s.shape} and {inc.shape}.")
    m = int(s.size)
    if m == 0:
        raise ValueError("At least one canary is needed for an audit. Found 0.")
    choices = list(choices) if choices is not None else default_guess_counts(m)
    if not choices:
        raise ValueError("At least one (k_plus, k_minus) choice is needed.")
    per_test_beta = beta / len(choices)
    truth = np.where(inc, 1, -1)
    tried = []
    best = None
    for kp, km in choices:
        g = guesses_from_scores(s, kp, km)
        r = int((g != 0).sum())
        v = int((g == truth).sum())
        eps = epsilon_lower_bound(m, r, v, per_test_beta, delta)
        row = {"k_plus": kp, "k_minus": km, "guesses": r, "correct": v, "epsilon_lower_bound": eps}
        tried.append(row)
        if best is None or eps > best["epsilon_lower_bound"]:
            best = row
    auc = None
    if 0 < inc.sum() < m:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(inc, s))
    return EmpiricalAudit(
        m=m,
        members=int(inc.sum()),
        beta=beta,
        delta=delta,
        epsilon_lower_bound=best["epsilon_lower_bound"],
        k_plus=best["k_plus"],
        k_minus=best["k_minus"],
        guesses=best["guesses"],
        correct=best["correct"],
        choices=tried,
        auc=auc,
    )
