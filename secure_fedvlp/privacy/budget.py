"""Per-client (epsilon, delta) budgets, enforced *before* a release.

:func:`check_release` is the one place that decides whether a release fits: it projects the
epsilon of ``history + [event]`` without mutating anything and raises
:class:`~secure_fedvlp.errors.PrivacyBudgetExhausted` when the projection exceeds the budget.
:class:`~secure_fedvlp.privacy.ledger.PrivacyLedger` calls it before it writes a record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from secure_fedvlp.errors import ConfigError, PrivacyBudgetExhausted
from secure_fedvlp.privacy.accountant import PrivacyAccountant, make_accountant
from secure_fedvlp.privacy.events import PrivacyEvent, check_event

__all__ = ["Budget", "check_release"]


@dataclass(frozen=True)
class Budget:
    """A client's total privacy budget.

    Parameters
    ----------
    epsilon
        Total epsilon, finite and > 0.
    delta
        Total delta, in (0, 1).

    Raises
    ------
    ConfigError
        Listing every out-of-range value (a budget normally comes from a config file).
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        problems: list[str] = []
        e, d = self.epsilon, self.delta
        if isinstance(e, bool) or not isinstance(e, (int, float)):
            problems.append(f"Budget epsilon must be a real number. Found {e!r}.")
        elif not (math.isfinite(e) and e > 0):
            problems.append(f"Budget epsilon must be finite and > 0. Found {e}.")
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            problems.append(f"Budget delta must be a real number. Found {d!r}.")
        elif not (0.0 < d < 1.0):
            problems.append(f"Budget delta must be in (0, 1). Found {d}.")
        if problems:
            raise ConfigError(problems, source="privacy budget")
        object.__setattr__(self, "epsilon", float(e))
        object.__setattr__(self, "delta", float(d))

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return {"epsilon": self.epsilon, "delta": self.delta}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        """Inverse of :meth:`to_dict`; rejects unknown or missing keys."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"A budget must be a mapping. Found {type(data).__name__}.", source="privacy budget")
        unknown = sorted(set(data) - {"epsilon", "delta"})
        missing = sorted({"epsilon", "delta"} - set(data))
        problems = [f"Unknown budget key {k!r}." for k in unknown] + [f"Missing budget key {k!r}." for k in missing]
        if problems:
            raise ConfigError(problems, source="privacy budget")
        return cls(epsilon=data["epsilon"], delta=data["delta"])


def check_release(
    history: Iterable[PrivacyEvent] | PrivacyAccountant,
    event: PrivacyEvent,
    budget: Budget,
    accountant: str = "rdp",
    *,
    client_id: str | None = None,
    **options: Any,
) -> float:
    """Projected epsilon of ``history + [event]`` at ``budget.delta``; raise if over budget.

    Parameters
    ----------
    history
        Events already released, or an accountant holding them (used as is, not mutated;
        ``accountant`` and ``options`` are then ignored).
    event
        The release about to happen.
    budget
        The client's budget.
    accountant
        Accountant name for a plain history (see :func:`~secure_fedvlp.privacy.make_accountant`).
    client_id
        Named in the error message.

    Returns
    -------
    float
        The epsilon the client would have spent after the release (<= ``budget.epsilon``).

    Raises
    ------
    PrivacyBudgetExhausted
        If the projected epsilon exceeds ``budget.epsilon``.  Nothing is mutated.
    """
    check_event(event)
    acc = history if isinstance(history, PrivacyAccountant) else make_accountant(accountant, history, **options)
    if event.is_free:
        # Post-processing (or a zero-rate event) costs nothing; it is always allowed.
        return acc.get_epsilon(budget.delta)
    projected = acc.projected_epsilon(budget.delta, [event])
    if not projected <= budget.epsilon:  # also catches inf / nan
        who = f"Client {client_id!r}" if client_id is not None else "The client"
        raise PrivacyBudgetExhausted(
            f"{who} would reach epsilon {projected:.6g} at delta {budget.delta:g} with this "
            f"{event.type_name} release (round {event.round}), exceeding the budget "
            f"epsilon {budget.epsilon:g}; the release was refused and nothing was recorded."
        )
    return projected
