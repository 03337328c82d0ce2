"""Pure numeric DP helpers with explicit randomness.

Nothing here touches global RNG state: noise comes from a caller-supplied
``torch.Generator`` or, with ``secure=True``, from a fresh generator seeded from the operating
system's CSPRNG (:func:`secrets.randbits`) on every call.

On ``secure=True``: the *seed* is unpredictable, but the stream is still torch's CPU
Mersenne-Twister (or the device's Philox) and the Gaussian is sampled in floating point.
That defeats seed guessing and cross-call correlation, not an adversary who can observe many
raw outputs of one call, and it does not address the floating-point attack on textbook
Gaussian/Laplace samplers (Mironov, CCS 2012).  Both are documented non-goals.

Each helper that releases something returns the matching
:class:`~secure_fedvlp.privacy.events.GaussianEvent`; :func:`sum_release_event` and
:func:`mean_release_event` build the same event *without* touching data, so a caller can
``ledger.record(event)`` first and release afterwards.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Literal

import torch

from secure_fedvlp.privacy.events import GaussianEvent, InvalidPrivacyParameter

__all__ = [
    "clip_per_sample",
    "gaussian_noise_like",
    "noised_clipped_sum",
    "noised_clipped_mean",
    "sum_release_event",
    "mean_release_event",
]

logger = logging.getLogger(__name__)

Bounds = Literal["symmetric", "nonnegative"]


def _positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise InvalidPrivacyParameter(f"{name} must be finite and > 0. Found {value!r}.")
    return float(value)


def _nonnegative_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise InvalidPrivacyParameter(f"{name} must be finite and >= 0. Found {value!r}.")
    return float(value)


def _check_values(values: torch.Tensor) -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"Values must be a torch.Tensor. Found {type(values).__name__}.")
    if not values.is_floating_point():
        raise InvalidPrivacyParameter(f"Values must be a floating-point tensor. Found dtype {values.dtype}.")
    if values.dim() < 1:
        raise InvalidPrivacyParameter(f"Values must have a leading batch dimension. Found shape {tuple(values.shape)}.")
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = torch.nonzero(bad.reshape(values.shape[0], -1).any(dim=1)).flatten().tolist()
        raise InvalidPrivacyParameter(
            f"Values must be finite (a non-finite value breaks the sensitivity bound). "
            f"Found non-finite entries in samples {rows[:10]}{'...' if len(rows) > 10 else ''}."
        )


def clip_per_sample(values: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each sample (row of ``values``) to L2 norm at most ``max_norm``.

    The factor is exactly 1 for samples already inside the ball (zero vectors included; no
    division by zero, no NaN, also in the backward pass) and ``max_norm / norm`` otherwise.  After
    clipping each norm is ``<= max_norm`` up to one floating-point rounding.

    Parameters
    ----------
    values
        Tensor ``[B, ...]``; the norm of sample ``b`` is over ``values[b]`` flattened.
    max_norm
        Clipping bound, finite and > 0.

    Returns
    -------
    (clipped, norms)
        ``clipped`` has the shape and dtype of ``values``; ``norms`` (shape ``[B]``) are the
        norms *before* clipping.
    """
    c = _positive_finite("Clip norm", max_norm)
    _check_values(values)
    flat = values.reshape(values.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, ord=2, dim=1)
    # ``denom >= c > 0`` everywhere, so no division by zero and no NaN in either branch (nor in
    # the backward pass of ``where``); samples inside the ball get exactly 1 (``scalar / tensor``
    # is computed through a reciprocal in torch and can be off by an ulp).
    denom = torch.clamp(norms, min=c)
    factor = torch.where(norms > c, torch.full_like(denom, c) / denom, torch.ones_like(denom))
    clipped = values * factor.reshape((-1,) + (1,) * (values.dim() - 1)).to(values.dtype)
    return clipped, norms


def _generator_for(t: torch.Tensor, generator: torch.Generator | None, secure: bool) -> torch.Generator:
    if secure:
        if generator is not None:
            raise InvalidPrivacyParameter("Pass either a generator or secure=True, not both.")
        gen = torch.Generator(device=t.device)
        gen.manual_seed(secrets.randbits(63))
        return gen
    if generator is None:
        raise InvalidPrivacyParameter(
            "Noise needs explicit randomness: pass a torch.Generator, or secure=True for an OS-seeded one."
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"Generator must be a torch.Generator. Found {type(generator).__name__}.")
    return generator


def gaussian_noise_like(
    t: torch.Tensor,
    std: float,
    generator: torch.Generator | None = None,
    *,
    secure: bool = False,
) -> torch.Tensor:
    """Gaussian noise ``N(0, std^2)`` with the shape, dtype and device of ``t``.

    Parameters
    ----------
    t
        Floating-point template tensor (its values are not used).
    std
        Standard deviation, finite and >= 0.
    generator
        Source of randomness (required unless ``secure``); never the global RNG.
    secure
        Draw from a new generator seeded from ``secrets`` on every call (see module notes).
    """
    s = _nonnegative_finite("Noise standard deviation", std)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise InvalidPrivacyParameter("Noise template must be a floating-point torch.Tensor.")
    gen = _generator_for(t, generator, secure)
    # Sample in at least float32 so that low-precision templates do not get coarse noise.
    dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    noise = torch.randn(t.shape, generator=gen, dtype=dtype, device=t.device) * s
    return noise.to(t.dtype)


def sum_release_event(clip: float, noise_multiplier: float, *, what: str, round: int) -> GaussianEvent:
    """The event of releasing a per-sample-clipped sum with noise std ``noise_multiplier * clip``.

    Under add/remove-one adjacency the sum of samples clipped to L2 norm ``clip`` has
    sensitivity ``clip``.
    """
    c = _positive_finite("Clip norm", clip)
    z = _nonnegative_finite("Noise multiplier", noise_multiplier)
    return GaussianEvent(sensitivity=c, sigma=z * c, what=what, round=round)


def noised_clipped_sum(
    values: torch.Tensor,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    *,
    what: str = "clipped_sum",
    round: int = 0,
    secure: bool = False,
) -> tuple[torch.Tensor, GaussianEvent]:
    """Sum of per-sample-clipped rows plus ``N(0, (noise_multiplier * clip)^2)`` per coordinate.

    Used for anchor features: ``values`` is ``[B, D]``.  Returns ``(noised_sum [D], event)``;
    record the event (or :func:`sum_release_event`) before releasing the sum.
    """
    event = sum_release_event(clip, noise_multiplier, what=what, round=round)
    clipped, _ = clip_per_sample(values, clip)
    total = clipped.sum(dim=0)
    return total + gaussian_noise_like(total, event.sigma, generator, secure=secure), event


def mean_release_event(
    clip: float,
    noise_multiplier: float,
    *,
    public_count: int | None = None,
    what: str = "scalar_report",
    round: int = 0,
) -> GaussianEvent:
    """The event of :func:`noised_clipped_mean` with the same arguments.

    With ``public_count``: only the sum is private; sensitivity ``clip``, sigma
    ``noise_multiplier * clip``.  Without it: the pair ``(sum, clip * count)`` is released
    with one isotropic Gaussian; its L2 sensitivity under add/remove-one is
    ``sqrt(clip^2 + clip^2) = sqrt(2) * clip`` and sigma is ``noise_multiplier * sqrt(2) * clip``.
    """
    c = _positive_finite("Clip norm", clip)
    z = _nonnegative_finite("Noise multiplier", noise_multiplier)
    if public_count is not None:
        return GaussianEvent(sensitivity=c, sigma=z * c, what=what, round=round)
    sens = math.sqrt(2.0) * c
    return GaussianEvent(sensitivity=sens, sigma=z * sens, what=what, round=round)


def noised_clipped_mean(
    values: torch.Tensor,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    *,
    bounds: Bounds = "symmetric",
    public_count: int | None = None,
    what: str = "scalar_report",
    round: int = 0,
    secure: bool = False,
) -> tuple[torch.Tensor, GaussianEvent]:
    """DP mean of per-record scalars (e.g. a DRO loss report).

    Each record's value is clipped to ``[-clip, clip]`` (``bounds="symmetric"``) or
    ``[0, clip]`` (``"nonnegative"``), so adding or removing one record changes the sum by at
    most ``clip``.

    The count is private under add/remove-one adjacency (it changes by one), so it cannot be
    used as an exact denominator for free.  Two choices:

    * ``public_count=n`` (a number fixed independently of the data, e.g. the declared dataset
      size or an expected Poisson batch size): the estimate is ``(sum + N(0, (z C)^2)) / n``;
      only the sum is accounted (sensitivity ``C``).  The caller vouches that ``n`` is public.
    * ``public_count=None`` (default): sum and count are released together,
      ``(S, C N) + N(0, (z sqrt(2) C)^2 I_2)``, one Gaussian event of sensitivity
      ``sqrt(2) C``; the estimate is ``S~ / max(N~, 1)`` (post-processing).

    Parameters
    ----------
    values
        ``[B]`` (or ``[B, 1]``) per-record values.
    clip
        Clipping bound ``C``, finite and > 0.
    noise_multiplier
        ``z``: noise std in units of the sensitivity.
    generator, secure
        Randomness, as in :func:`gaussian_noise_like`.
    bounds, public_count, what, round
        See above; ``what``/``round`` label the returned event.

    Returns
    -------
    (estimate, event)
        A 0-dim tensor and the :class:`GaussianEvent` to record before releasing it.
    """
    if bounds not in ("symmetric", "nonnegative"):
        raise InvalidPrivacyParameter(f"Bounds must be 'symmetric' or 'nonnegative'. Found {bounds!r}.")
    if public_count is not None and (
        isinstance(public_count, bool) or not isinstance(public_count, int) or public_count < 1
    ):
        raise InvalidPrivacyParameter(f"Public count must be an integer >= 1 or None. Found {public_count!r}.")
    event = mean_release_event(clip, noise_multiplier, public_count=public_count, what=what, round=round)
    _check_values(values)
    if values.dim() > 2 or (values.dim() == 2 and values.shape[1] != 1):
        raise InvalidPrivacyParameter(f"Values must have shape [B] or [B, 1]. Found {tuple(values.shape)}.")
    c = float(clip)
    v = values.reshape(-1)
    lo = -c if bounds == "symmetric" else 0.0
    clipped = torch.clamp(v, min=lo, max=c)
    total = clipped.sum()
    if public_count is not None:
        noisy_sum = total + gaussian_noise_like(total, event.sigma, generator, secure=secure)
        return noisy_sum / public_count, event
    pair = torch.stack([total, torch.tensor(c * v.shape[0], dtype=total.dtype, device=total.device)])
    noisy = pair + gaussian_noise_like(pair, event.sigma, generator, secure=secure)
    noisy_count = torch.clamp(noisy[1] / c, min=1.0)
    return noisy[0] / noisy_count, event
