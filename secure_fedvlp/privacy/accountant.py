"""Privacy accountants: a history of immutable events and a pure epsilon query.

Every accountant here follows one contract (``dp_accounting``'s
``PrivacyAccountant`` and Opacus' ``IAccountant``):

* :meth:`PrivacyAccountant.compose` appends one event to :attr:`~PrivacyAccountant.history`
  (a tuple; events are frozen) and updates a cache;
* :meth:`PrivacyAccountant.get_epsilon` is pure: it never mutates the accountant, so calling
  it twice returns the same value and leaves the history unchanged (Opacus bug pytorch/opacus#535 was a
  query that mutated state);
* :meth:`PrivacyAccountant.state_dict` / :meth:`PrivacyAccountant.load_state_dict` round-trip
  through JSON-ready dicts of events.

Neighbouring relation: add/remove one record (the project's privacy unit).  Implementations:

``"rdp"`` (:class:`RDPAccountant`)
    Opacus' RDP analysis of the sampled Gaussian mechanism
    (``opacus.accountants.analysis.rdp``), conversion by Balle et al. 2020 (Opacus'
    ``get_privacy_spent``).  A Gaussian release is a sampled Gaussian with ``q = 1``,
    composed ``count`` times.  Default orders: Opacus' ``RDPAccountant.DEFAULT_ALPHAS``
    (1.1 ... 10.9, 12 ... 63) extended with 64, 80, 96, 128, 256, 512, 1024 so that small
    epsilons are not floored at ~0.1 by the largest order.  The extension does not change
    the pinned Opacus golden value (optimal order 3.9).
Every accountant treats a noise multiplier below :data:`NEGLIGIBLE_NOISE_MULTIPLIER` (1e-6;
PLD: below its ``min_noise_multiplier``, default 0.1) as no noise: epsilon is infinite.

``"dp_accounting_rdp"`` (:class:`DPAccountingRDPAccountant`)
    Google's independent ``dp_accounting.rdp.RdpAccountant`` on the same orders.
``"pld"`` (:class:`PLDAccountant`)
    ``dp_accounting.pld.PLDAccountant`` (pessimistic discretisation, so the result is an
    upper bound; tighter than RDP for the same events).  ``value_discretization_interval``
    trades accuracy for speed; coarser intervals give larger (still valid) epsilons.
"""

from __future__ import annotations

import abc
import copy
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from secure_fedvlp.privacy.events import (
    DPSGDEvent,
    GaussianEvent,
    InvalidPrivacyParameter,
    PostProcessingEvent,
    PrivacyEvent,
    check_event,
    event_from_dict,
)

__all__ = [
    "DEFAULT_RDP_ORDERS",
    "PrivacyAccountant",
    "RDPAccountant",
    "DPAccountingRDPAccountant",
    "PLDAccountant",
    "ACCOUNTANTS",
    "register_accountant",
    "make_accountant",
    "epsilon_from_events",
    "epsilon_curve",
    "check_delta",
    "NEGLIGIBLE_NOISE_MULTIPLIER",
]

logger = logging.getLogger(__name__)

#: Opacus ``RDPAccountant.DEFAULT_ALPHAS`` plus large orders for small epsilons.
OPACUS_DEFAULT_ALPHAS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)
DEFAULT_RDP_ORDERS: tuple[float, ...] = OPACUS_DEFAULT_ALPHAS + (64.0, 80.0, 96.0, 128.0, 256.0, 512.0, 1024.0)

#: Noise multipliers below this are accounted as non-private (epsilon infinite) by every
#: accountant here.  At z = 1e-6 one release already costs epsilon ~ 1e11.
NEGLIGIBLE_NOISE_MULTIPLIER = 1e-6

_A = TypeVar("_A", bound="PrivacyAccountant")


def check_delta(delta: Any) -> float:
    """Return ``delta`` as a float if it lies in (0, 1), else raise.

    Raises
    ------
    InvalidPrivacyParameter
        If ``delta`` is not a real number in the open interval (0, 1).
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.floating)):
        raise InvalidPrivacyParameter(f"Delta must be a real number in (0, 1). Found {delta!r}.")
    d = float(delta)
    if not (0.0 < d < 1.0):
        raise InvalidPrivacyParameter(f"Delta must be in (0, 1). Found {d}.")
    return d


class PrivacyAccountant(abc.ABC):
    """A cumulative (epsilon, delta) accountant over immutable privacy events.

    Subclasses implement :meth:`_reset`, :meth:`_compose_one` (update the cache for one
    event, without touching the history) and :meth:`_epsilon` (pure).

    Parameters
    ----------
    events
        Events to compose at construction, in order.
    """

    mechanism: ClassVar[str] = ""

    def __init__(self, events: Iterable[PrivacyEvent] = ()) -> None:
        self._history: list[PrivacyEvent] = []
        self._reset()
        for e in events:
            self.compose(e)

    # ------------------------------------------------------------------ contract

    @property
    def history(self) -> tuple[PrivacyEvent, ...]:
        """Every composed event, in order (a tuple; events are immutable)."""
        return tuple(self._history)

    def __len__(self) -> int:
        return len(self._history)

    def compose(self: _A, event: PrivacyEvent) -> _A:
        """Account for one more release and return ``self`` (so calls chain).

        The cache is updated before the event is appended, so an event that cannot be
        accounted leaves the accountant unchanged.
        """
        check_event(event)
        self._compose_one(event)
        self._history.append(event)
        return self

    def compose_all(self: _A, events: Iterable[PrivacyEvent]) -> _A:
        """Compose several events in order and return ``self``."""
        for e in events:
            self.compose(e)
        return self

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``; pure (never mutates the accountant).

        Returns 0.0 for an empty (or all-free) history and ``inf`` when a release had no
        noise.
        """
        d = check_delta(delta)
        if all(e.is_free for e in self._history):
            return 0.0
        eps = float(self._epsilon(d))
        if math.isnan(eps):
            logger.warning("%s accountant returned NaN epsilon; reporting inf (conservative).", self.mechanism)
            return math.inf
        return max(eps, 0.0)

    def projected_epsilon(self, delta: float, extra: Iterable[PrivacyEvent]) -> float:
        """Epsilon after composing ``extra`` on top of the history, without mutating ``self``."""
        return self.copy().compose_all(extra).get_epsilon(delta)

    def copy(self: _A) -> _A:
        """An independent accountant with the same options, history and cache."""
        return copy.deepcopy(self)

    def options(self) -> dict[str, Any]:
        """Constructor keyword options (JSON-ready), recorded in :meth:`state_dict`."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state: mechanism name, options and the event history."""
        return {
            "mechanism": self.mechanism,
            "options": self.options(),
            "history": [e.to_dict() for e in self._history],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the history with the one in ``state_dict`` (validated) and rebuild the cache.

        Raises
        ------
        InvalidPrivacyParameter
            If the dict is malformed, of another mechanism, or holds an invalid event.
        """
        if not isinstance(state_dict, Mapping) or not state_dict:
            raise InvalidPrivacyParameter("Accountant state dict must be a non-empty mapping.")
        problems = [f"State dict is missing key {k!r}." for k in ("mechanism", "history") if k not in state_dict]
        if problems:
            raise InvalidPrivacyParameter(problems, what="accountant state dict")
        if state_dict["mechanism"] != self.mechanism:
            raise InvalidPrivacyParameter(
                f"State dict of mechanism {state_dict['mechanism']!r} cannot be loaded into a "
                f"{self.mechanism!r} accountant."
            )
        opts = state_dict.get("options", {})
        if opts and dict(opts) != self.options():
            logger.warning(
                "Loading %s state saved with options %s into an accountant with options %s; "
                "epsilon is recomputed with the current options.",
                self.mechanism,
                dict(opts),
                self.options(),
            )
        events = [event_from_dict(d) for d in state_dict["history"]]
        self._history = []
        self._reset()
        self.compose_all(events)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(events={len(self._history)}, options={self.options()})"

    # ------------------------------------------------------------------ implementation hooks

    @abc.abstractmethod
    def _reset(self) -> None:
        """Clear the cache (the history is cleared by the caller)."""

    @abc.abstractmethod
    def _compose_one(self, event: PrivacyEvent) -> None:
        """Update the cache for ``event``; raise without side effects if unsupported."""

    @abc.abstractmethod
    def _epsilon(self, delta: float) -> float:
        """Epsilon of the cached composition at ``delta`` (pure)."""


# --------------------------------------------------------------------------- Opacus RDP


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(q: float, z: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one sampled-Gaussian step at every order (Opacus' analysis), cached."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    out = np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(orders)), dtype=float)
    out.setflags(write=False)
    return out


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(float(o) for o in orders)
    except (TypeError, ValueError) as exc:
        raise InvalidPrivacyParameter(f"RDP orders must be real numbers. Found {orders!r}.") from exc
    bad = [o for o in out if not (o > 1.0 and math.isfinite(o))]
    if not out or bad:
        raise InvalidPrivacyParameter(f"RDP orders must be a non-empty list of finite numbers > 1. Found {bad or out}.")
    return out


class RDPAccountant(PrivacyAccountant):
    """RDP accountant on Opacus' sampled-Gaussian analysis.

    Parameters
    ----------
    events
        Events to compose at construction.
    orders
        RDP orders; default :data:`DEFAULT_RDP_ORDERS`.
    """

    mechanism = "rdp"

    def __init__(self, events: Iterable[PrivacyEvent] = (), *, orders: Sequence[float] | None = None) -> None:
        self._orders = _check_orders(DEFAULT_RDP_ORDERS if orders is None else orders)
        super().__init__(events)

    def options(self) -> dict[str, Any]:
        return {"orders": list(self._orders)}

    @property
    def orders(self) -> tuple[float, ...]:
        """The RDP orders used."""
        return self._orders

    def _reset(self) -> None:
        self._rdp = np.zeros(len(self._orders), dtype=float)

    @staticmethod
    def _q_z_k(event: PrivacyEvent) -> tuple[float, float, int] | None:
        if isinstance(event, DPSGDEvent):
            return event.sample_rate, event.noise_multiplier, event.steps
        if isinstance(event, GaussianEvent):
            return 1.0, event.noise_multiplier, event.count
        return None

    def event_rdp(self, event: PrivacyEvent) -> np.ndarray:
        """RDP curve (one value per order) of a single event."""
        qzk = self._q_z_k(check_event(event))
        if qzk is None:
            return np.zeros(len(self._orders))
        q, z, k = qzk
        if q == 0.0:
            return np.zeros(len(self._orders))
        if z < NEGLIGIBLE_NOISE_MULTIPLIER:
            # No noise, or so little that it buys nothing (and Opacus' series stops
            # converging once 1/z^2 overflows): account as non-private.
            return np.full(len(self._orders), np.inf)
        return _rdp_one_step(q, z, self._orders) * k

    def _compose_one(self, event: PrivacyEvent) -> None:
        self._rdp = self._rdp + self.event_rdp(event)

    def _epsilon_from_rdp(self, rdp: np.ndarray, delta: float) -> float:
        from opacus.accountants.analysis import rdp as opacus_rdp

        if np.all(np.isinf(rdp)):
            return math.inf
        with warnings.catch_warnings():
            # Opacus warns when the optimum is the first/last order; log it instead.
            warnings.simplefilter("ignore")
            eps, order = opacus_rdp.get_privacy_spent(orders=list(self._orders), rdp=rdp, delta=delta)
        if order in (self._orders[0], self._orders[-1]):
            logger.debug("RDP optimum at the extreme order %s; epsilon %s is valid but may be loose.", order, eps)
        return float(eps)

    def _epsilon(self, delta: float) -> float:
        return self._epsilon_from_rdp(self._rdp, delta)

    def projected_epsilon(self, delta: float, extra: Iterable[PrivacyEvent]) -> float:
        d = check_delta(delta)
        extra = [check_event(e) for e in extra]
        if all(e.is_free for e in list(self._history) + extra):
            return 0.0
        rdp = self._rdp + sum((self.event_rdp(e) for e in extra), np.zeros(len(self._orders)))
        eps = self._epsilon_from_rdp(rdp, d)
        return math.inf if math.isnan(eps) else max(eps, 0.0)


# --------------------------------------------------------------------------- dp_accounting


def to_dp_event(event: PrivacyEvent, min_noise_multiplier: float = 0.0) -> Any:
    """Translate a project event into a ``dp_accounting.DpEvent`` (add/remove adjacency).

    A noise multiplier below ``min_noise_multiplier`` becomes a ``NonPrivateDpEvent``
    (epsilon infinite): conservative, and it keeps PLD from building a gigantic distribution.
    """
    import dp_accounting as dpa

    check_event(event)
    z_min = max(min_noise_multiplier, NEGLIGIBLE_NOISE_MULTIPLIER)
    if isinstance(event, PostProcessingEvent):
        return dpa.NoOpDpEvent()
    if isinstance(event, GaussianEvent):
        z = event.noise_multiplier
        inner = dpa.NonPrivateDpEvent() if z < z_min else dpa.GaussianDpEvent(z)
        return inner if event.count == 1 else dpa.SelfComposedDpEvent(inner, event.count)
    q, z = event.sample_rate, event.noise_multiplier
    if q == 0.0:
        return dpa.NoOpDpEvent()
    if z < z_min:  # no noise, or too little to account: no privacy
        step: Any = dpa.NonPrivateDpEvent()
    elif q == 1.0:
        step = dpa.GaussianDpEvent(z)
    else:
        step = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    return step if event.steps == 1 else dpa.SelfComposedDpEvent(step, event.steps)


class _DPAccountingBase(PrivacyAccountant):
    """Wraps one ``dp_accounting`` accountant, composed incrementally."""

    def _new_inner(self) -> Any:  # pragma: no cover - abstract in effect
        raise NotImplementedError

    def _reset(self) -> None:
        self._inner = self._new_inner()

    _min_noise_multiplier: float = 0.0

    def _compose_one(self, event: PrivacyEvent) -> None:
        self._inner.compose(to_dp_event(event, self._min_noise_multiplier))

    def _epsilon(self, delta: float) -> float:
        return float(self._inner.get_epsilon(delta))


class DPAccountingRDPAccountant(_DPAccountingBase):
    """RDP accountant on Google's ``dp_accounting`` (an implementation independent of Opacus).

    Parameters
    ----------
    events
        Events to compose at construction.
    orders
        RDP orders; default :data:`DEFAULT_RDP_ORDERS` (the same as :class:`RDPAccountant`).
    """

    mechanism = "dp_accounting_rdp"

    def __init__(self, events: Iterable[PrivacyEvent] = (), *, orders: Sequence[float] | None = None) -> None:
        self._orders = _check_orders(DEFAULT_RDP_ORDERS if orders is None else orders)
        super().__init__(events)

    def options(self) -> dict[str, Any]:
        return {"orders": list(self._orders)}

    def _new_inner(self) -> Any:
        from dp_accounting.rdp import rdp_privacy_accountant

        return rdp_privacy_accountant.RdpAccountant(orders=list(self._orders))


class PLDAccountant(_DPAccountingBase):
    """Privacy-loss-distribution accountant (``dp_accounting.pld``, pessimistic estimate).

    Parameters
    ----------
    events
        Events to compose at construction.
    value_discretization_interval
        Discretisation of the privacy loss; default 1e-3.  Finer is tighter and slower;
        the pessimistic estimate stays an upper bound at any interval.
    min_noise_multiplier
        Releases with a smaller noise multiplier are accounted as non-private (epsilon
        infinite), default 0.1.  The PLD's size grows like ``1 / (z^2 * interval)``: at
        ``z = 0.05`` and interval 1e-4 it exhausts memory, and at ``z < 0.1`` a single release
        already costs epsilon > 90, so nothing useful is lost.
    """

    mechanism = "pld"

    def __init__(
        self,
        events: Iterable[PrivacyEvent] = (),
        *,
        value_discretization_interval: float = 1e-3,
        min_noise_multiplier: float = 0.1,
    ) -> None:
        v = value_discretization_interval
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < float(v) < 1.0):
            raise InvalidPrivacyParameter(f"PLD value discretization interval must be in (0, 1). Found {v!r}.")
        m = min_noise_multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (0.0 <= float(m) < math.inf):
            raise InvalidPrivacyParameter(f"PLD minimum noise multiplier must be finite and >= 0. Found {m!r}.")
        self._vdi = float(v)
        self._min_noise_multiplier = float(m)
        super().__init__(events)

    def options(self) -> dict[str, Any]:
        return {"value_discretization_interval": self._vdi, "min_noise_multiplier": self._min_noise_multiplier}

    def _new_inner(self) -> Any:
        from dp_accounting.pld import pld_privacy_accountant

        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=self._vdi)


# --------------------------------------------------------------------------- registry

ACCOUNTANTS: dict[str, Callable[..., PrivacyAccountant]] = {}


def register_accountant(name: str, factory: Callable[..., PrivacyAccountant]) -> None:
    """Register an accountant factory under ``name`` (used by :func:`make_accountant`)."""
    if not isinstance(name, str) or not name:
        raise InvalidPrivacyParameter(f"Accountant name must be a non-empty string. Found {name!r}.")
    ACCOUNTANTS[name] = factory


for _cls in (RDPAccountant, PLDAccountant, DPAccountingRDPAccountant):
    register_accountant(_cls.mechanism, _cls)


def make_accountant(name: str = "rdp", events: Iterable[PrivacyEvent] = (), **options: Any) -> PrivacyAccountant:
    """Create a registered accountant (``"rdp"``, ``"pld"`` or ``"dp_accounting_rdp"``).

    Raises
    ------
    InvalidPrivacyParameter
        If ``name`` is not registered.
    """
    factory = ACCOUNTANTS.get(name) if isinstance(name, str) else None
    if factory is None:
        raise InvalidPrivacyParameter(f"Accountant must be one of {sorted(ACCOUNTANTS)}. Found {name!r}.")
    return factory(events, **options)


def _resolve(accountant: str | PrivacyAccountant, options: Mapping[str, Any] | None) -> PrivacyAccountant:
    """A fresh, empty accountant of the given name (or of the given instance's kind and options)."""
    if isinstance(accountant, PrivacyAccountant):
        fresh = accountant.copy()
        fresh._history = []
        fresh._reset()
        return fresh
    return make_accountant(accountant, **dict(options or {}))


def epsilon_from_events(
    events: Iterable[PrivacyEvent],
    delta: float,
    accountant: str = "rdp",
    **options: Any,
) -> float:
    """Epsilon of a sequence of events at ``delta`` under the named accountant."""
    return make_accountant(accountant, events, **options).get_epsilon(delta)


def epsilon_curve(
    events: Iterable[PrivacyEvent],
    delta: float,
    accountant: str = "rdp",
    **options: Any,
) -> list[tuple[int, float]]:
    """Cumulative epsilon after each round: ``[(round, epsilon of all events with round <= it)]``.

    Rounds are sorted ascending; composition is commutative, so events need not be in
    round order.  Useful for the privacy report's epsilon-by-round plot.
    """
    evs = [check_event(e) for e in events]
    d = check_delta(delta)
    acc = make_accountant(accountant, **options)
    out: list[tuple[int, float]] = []
    for r in sorted({e.round for e in evs}):
        acc.compose_all(e for e in evs if e.round == r)
        out.append((r, acc.get_epsilon(d)))
    return out
