"""Noise calibration by bisection that never overshoots the target epsilon.

Both calibrators search for the smallest noise (up to ``epsilon_tolerance``) whose cumulative
epsilon, on top of ``prior_events``, is <= ``target_epsilon``.  The bracket's upper end is only
ever replaced by a value whose epsilon was computed and found <= target, and the returned value
is re-checked before returning (Opacus' ``test_get_noise_multiplier_overshoot`` is the
counterexample this guards against).  The search does not assume that epsilon is exactly
monotone in the noise (PLD discretisation is not), only that it is eventually below the target.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from secure_fedvlp.config import PrivacyConfig
from secure_fedvlp.errors import PrivacyBudgetExhausted, PrivacyError
from secure_fedvlp.privacy.accountant import PrivacyAccountant, _resolve, check_delta
from secure_fedvlp.privacy.events import (
    DPSGDEvent,
    GaussianEvent,
    InvalidPrivacyParameter,
    PrivacyEvent,
    check_event,
)
from secure_fedvlp.privacy.plan import ReleasePlan

__all__ = ["calibrate_noise_multiplier", "calibrate_gaussian_sigma", "calibrate_plan"]

logger = logging.getLogger(__name__)

_MAX_ITERS = 200


def _check_target(target_epsilon: Any, epsilon_tolerance: Any) -> tuple[float, float]:
    problems: list[str] = []
    for name, v in (("Target epsilon", target_epsilon), ("Epsilon tolerance", epsilon_tolerance)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            problems.append(f"{name} must be finite and > 0. Found {v!r}.")
    if problems:
        raise InvalidPrivacyParameter(problems, what="calibration request")
    return float(target_epsilon), float(epsilon_tolerance)


def _bisect_noise(
    eps_of: Callable[[float], float],
    target: float,
    tol: float,
    max_noise: float,
    describe: str,
) -> float:
    """Smallest-ish noise ``z`` with ``eps_of(z) <= target`` and ``target - eps_of(z) <= tol``."""
    lo, hi = 0.0, 1.0  # invariant: eps_of(hi) <= target; lo is infeasible (0 = no noise)
    eps_hi = eps_of(hi)
    if eps_hi <= target:
        # Feasible at 1: halve while still feasible so the bracket is tight.
        while hi > 1e-6:
            cand = hi / 2.0
            eps_c = eps_of(cand)
            if not eps_c <= target:
                lo = cand
                break
            hi, eps_hi = cand, eps_c
    else:
        # Infeasible at 1: double until feasible.
        while not eps_hi <= target:
            lo = hi
            if hi >= max_noise:
                raise PrivacyError(
                    f"Target epsilon {target:g} is unattainable for {describe}: even noise {max_noise:g} "
                    f"gives epsilon {eps_hi:.6g}. Raise the target, lower the sampling rate or steps, "
                    "or spend less before this release."
                )
            hi = min(2.0 * hi, max_noise)
            eps_hi = eps_of(hi)
    for _ in range(_MAX_ITERS):
        if target - eps_hi <= tol or hi - lo <= 1e-12 * max(hi, 1.0):
            break
        mid = 0.5 * (lo + hi)
        eps_mid = eps_of(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    final = eps_of(hi)
    if not final <= target:  # pragma: no cover - defended invariant
        raise PrivacyError(f"Calibration overshot for {describe}: epsilon {final} > target {target}.")
    logger.debug("Calibrated %s: noise %.6g -> epsilon %.6g (target %g).", describe, hi, final, target)
    return hi


def _prior_accountant(
    accountant: str | PrivacyAccountant,
    prior_events: Iterable[PrivacyEvent],
    options: Mapping[str, Any] | None,
) -> PrivacyAccountant:
    base = _resolve(accountant, options)
    if isinstance(accountant, PrivacyAccountant):
        base.compose_all(accountant.history)
    return base.compose_all(check_event(e) for e in prior_events)


def _check_prior(base: PrivacyAccountant, target: float, delta: float) -> None:
    spent = base.get_epsilon(delta)
    if not spent < target:
        raise PrivacyBudgetExhausted(
            f"Prior releases already spend epsilon {spent:.6g} at delta {delta:g}, which is not below "
            f"the target epsilon {target:g}; no further release can be calibrated."
        )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str | PrivacyAccountant = "rdp",
    prior_events: Iterable[PrivacyEvent] = (),
    epsilon_tolerance: float = 0.01,
    *,
    max_noise_multiplier: float = 1e4,
    accountant_options: Mapping[str, Any] | None = None,
) -> float:
    """Smallest DP-SGD noise multiplier (within tolerance) keeping cumulative epsilon <= target.

    Parameters
    ----------
    target_epsilon
        Cumulative epsilon allowed after the new DP-SGD steps (prior events included).
    delta
        Delta in (0, 1).
    sample_rate
        Poisson sampling rate in (0, 1].
    steps
        Number of DP-SGD steps, >= 1.
    accountant
        Accountant name or instance (an instance's history counts as prior events; it is not
        mutated).
    prior_events
        Releases already made by this client.
    epsilon_tolerance
        Absolute slack: the returned multiplier gives ``target - tol <= eps <= target``
        (unless the search hits its resolution limit first).
    max_noise_multiplier
        Upper end of the search.
    accountant_options
        Options for a named accountant (e.g. PLD ``value_discretization_interval``).

    Returns
    -------
    float
        The noise multiplier; its epsilon was computed and is <= ``target_epsilon``.

    Raises
    ------
    PrivacyBudgetExhausted
        If the prior events alone already reach the target.
    PrivacyError
        If the target is unattainable within ``max_noise_multiplier``.
    InvalidPrivacyParameter
        On out-of-range arguments.
    """
    target, tol = _check_target(target_epsilon, epsilon_tolerance)
    d = check_delta(delta)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0.0 < sample_rate <= 1.0:
        raise InvalidPrivacyParameter(
            f"Sampling rate must be in (0, 1] for calibration (rate 0 costs nothing). Found {sample_rate!r}."
        )
    DPSGDEvent(1.0, float(sample_rate), steps, 1.0, 0)  # validates steps
    base = _prior_accountant(accountant, prior_events, accountant_options)
    _check_prior(base, target, d)

    def eps_of(z: float) -> float:
        return base.projected_epsilon(d, [DPSGDEvent(z, float(sample_rate), steps, 1.0, 0)])

    return _bisect_noise(eps_of, target, tol, float(max_noise_multiplier), f"q={sample_rate:g}, steps={steps}")


def calibrate_gaussian_sigma(
    target_epsilon: float,
    delta: float,
    sensitivity: float,
    count: int = 1,
    accountant: str | PrivacyAccountant = "rdp",
    prior_events: Iterable[PrivacyEvent] = (),
    epsilon_tolerance: float = 0.01,
    *,
    max_noise_multiplier: float = 1e4,
    accountant_options: Mapping[str, Any] | None = None,
) -> float:
    """Smallest Gaussian noise std (within tolerance) keeping cumulative epsilon <= target.

    For ``count`` releases of a quantity with L2 sensitivity ``sensitivity``; see
    :func:`calibrate_noise_multiplier` for the other parameters.

    Returns
    -------
    float
        ``sigma`` (the standard deviation of the noise, in the units of the quantity).
    """
    target, tol = _check_target(target_epsilon, epsilon_tolerance)
    d = check_delta(delta)
    GaussianEvent(sensitivity, 1.0, "calibration", 0, count)  # validates sensitivity and count
    sens = float(sensitivity)
    base = _prior_accountant(accountant, prior_events, accountant_options)
    _check_prior(base, target, d)

    def eps_of(sigma: float) -> float:
        # The event carries sigma itself, so the value returned is exactly the value checked.
        return base.projected_epsilon(d, [GaussianEvent(sens, sigma, "calibration", 0, count)])

    return _bisect_noise(eps_of, target, tol, float(max_noise_multiplier) * sens, f"Gaussian release x{count}")


def calibrate_plan(privacy: PrivacyConfig, plan: ReleasePlan, num_rounds: int, sample_rate: float) -> float:
    """DP-SGD noise multiplier for a site that releases ``plan`` in each of ``num_rounds`` rounds.

    ``privacy.noise_multiplier > 0`` is returned as given.  Otherwise the smallest multiplier is
    calibrated (never overshooting) so that every planned release (every stage's DP-SGD steps,
    every noised report, every wrapper's release) fits ``(privacy.target_epsilon, privacy.delta)``.
    """
    if privacy.noise_multiplier > 0:
        return float(privacy.noise_multiplier)
    prior = plan.gaussian_events(
        num_rounds, report_clip=privacy.report_clip, report_noise_multiplier=privacy.report_noise_multiplier
    )
    return calibrate_noise_multiplier(
        privacy.target_epsilon,
        privacy.delta,
        sample_rate,
        plan.steps_per_round * int(num_rounds),
        accountant=privacy.accountant,
        prior_events=prior,
    )
