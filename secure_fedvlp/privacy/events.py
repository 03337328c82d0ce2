"""Immutable privacy events: what was released, by which mechanism, with which parameters.

An event is the unit of accounting (in the manner of ``dp_accounting/dp_event.py``): a frozen
record that an accountant composes and a ledger persists.  Every event validates itself at
construction and round-trips through JSON (:meth:`to_dict` / :func:`event_from_dict`), so the
file a client writes is exactly what an auditor replays.

The privacy unit is one image-report pair at one client (add/remove-one adjacency; see
``docs/design.md``, "The privacy unit").  Three kinds of release exist:

``DPSGDEvent``
    ``steps`` DP-SGD steps with Poisson sampling at ``sample_rate`` and Gaussian noise of
    standard deviation ``noise_multiplier * clip_norm`` on the sum of per-sample gradients
    clipped to ``clip_norm``; accounted as a sampled Gaussian mechanism, per step.
``GaussianEvent``
    ``count`` releases of a quantity of L2 sensitivity ``sensitivity`` with Gaussian noise of
    standard deviation ``sigma`` (anchor features, scalar reports); accounted as a Gaussian
    mechanism with noise multiplier ``sigma / sensitivity``, composed ``count`` times.
``PostProcessingEvent``
    A release computed only from already-accounted releases (for example public-data
    representations from the DP-trained model).  Free, but logged so the report can name it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from secure_fedvlp.errors import PrivacyError

__all__ = [
    "InvalidPrivacyParameter",
    "DPSGDEvent",
    "GaussianEvent",
    "PostProcessingEvent",
    "PrivacyEvent",
    "EVENT_TYPES",
    "event_from_dict",
    "check_event",
]


class InvalidPrivacyParameter(PrivacyError, ValueError):
    """A privacy parameter (event field, delta, clip norm, noise scale) is out of range.

    ``problems`` holds every problem found, so a caller can fix them in one pass.
    """

    def __init__(self, problems: str | list[str], what: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        prefix = f"Invalid {what}: " if what else ""
        if len(self.problems) == 1:
            msg = f"{prefix}{self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"{prefix}{len(self.problems)} problems:\n{lines}"
        super().__init__(msg)


# --------------------------------------------------------------------------- validation helpers


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_float(
    problems: list[str],
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
) -> None:
    """Append a sentence to ``problems`` unless ``value`` is a finite real in the range."""
    if not _is_real(value):
        problems.append(f"{name} must be a real number. Found {value!r} of type {type(value).__name__}.")
        return
    v = float(value)
    if not math.isfinite(v):
        problems.append(f"{name} must be finite. Found {v}.")
        return
    too_low = v <= low if low_open else v < low
    if too_low or v > high:
        lo = "(" if low_open else "["
        hi = "]" if math.isfinite(high) else ")"
        problems.append(f"{name} must be in {lo}{low:g}, {high:g}{hi}. Found {v}.")


def _check_int(problems: list[str], name: str, value: Any, *, low: int) -> None:
    if not _is_int(value):
        problems.append(f"{name} must be an integer. Found {value!r} of type {type(value).__name__}.")
    elif value < low:
        problems.append(f"{name} must be >= {low}. Found {value}.")


def _check_str(problems: list[str], name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{name} must be a non-empty string. Found {value!r}.")


class _EventBase:
    """Shared JSON behaviour of the frozen event dataclasses."""

    type_name: ClassVar[str]

    def _coerce_floats(self, *names: str) -> None:
        # Store ints given for float fields as floats, so equality and JSON are canonical.
        for n in names:
            v = getattr(self, n)
            if _is_real(v):
                object.__setattr__(self, n, float(v))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with a ``"type"`` discriminator and every field."""
        out: dict[str, Any] = {"type": self.type_name}
        for f in fields(self):  # type: ignore[arg-type]
            out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyEvent:
        """Build and validate an event from :meth:`to_dict` output.

        Raises
        ------
        InvalidPrivacyParameter
            On a wrong ``"type"``, unknown or missing keys, or out-of-range values (all
            problems are listed together).
        """
        if not isinstance(data, Mapping):
            raise InvalidPrivacyParameter(f"An event must be a JSON object. Found {type(data).__name__}.")
        problems: list[str] = []
        tname = data.get("type")
        if tname != cls.type_name:
            problems.append(f"Event type must be {cls.type_name!r}. Found {tname!r}.")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        required = [
            f.name
            for f in fields(cls)  # type: ignore[arg-type]
            if f.default is MISSING and f.default_factory is MISSING
        ]
        unknown = sorted(k for k in data if k != "type" and k not in names)
        if unknown:
            problems.append(f"Unknown key(s) {unknown} for event type {cls.type_name!r}; allowed: {names}.")
        missing = [n for n in required if n not in data]
        if missing:
            problems.append(f"Missing key(s) {missing} for event type {cls.type_name!r}.")
        if problems:
            raise InvalidPrivacyParameter(problems, what=f"{cls.type_name} event")
        kwargs = {n: data[n] for n in names if n in data}
        return cls(**kwargs)  # type: ignore[return-value]


@dataclass(frozen=True)
class DPSGDEvent(_EventBase):
    """``steps`` DP-SGD steps: Poisson sampling, per-sample clipping, Gaussian noise.

    Parameters
    ----------
    noise_multiplier
        Ratio of the noise standard deviation to ``clip_norm``; >= 0 (0 means no privacy:
        epsilon is infinite).
    sample_rate
        Poisson sampling probability of each record per step, in [0, 1].
    steps
        Number of optimizer steps, >= 1.
    clip_norm
        Per-sample L2 clipping bound, > 0 (logged; it does not enter epsilon).
    round
        Federated round index, >= 0.
    stage
        Free-form stage name (e.g. ``"train"``, ``"align"`` for FedDRA's first stage).
    """

    type_name: ClassVar[str] = "dpsgd"

    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    round: int
    stage: str = "train"

    def __post_init__(self) -> None:
        p: list[str] = []
        _check_float(p, "Noise multiplier", self.noise_multiplier, low=0.0)
        _check_float(p, "Sampling rate", self.sample_rate, low=0.0, high=1.0)
        _check_int(p, "Number of steps", self.steps, low=1)
        _check_float(p, "Clip norm", self.clip_norm, low=0.0, low_open=True)
        _check_int(p, "Round", self.round, low=0)
        _check_str(p, "Stage", self.stage)
        if p:
            raise InvalidPrivacyParameter(p, what="DPSGDEvent")
        self._coerce_floats("noise_multiplier", "sample_rate", "clip_norm")

    @property
    def is_free(self) -> bool:
        """True when the event costs no privacy (sampling rate 0)."""
        return self.sample_rate == 0.0


@dataclass(frozen=True)
class GaussianEvent(_EventBase):
    """``count`` Gaussian releases of a quantity with L2 sensitivity ``sensitivity``.

    Parameters
    ----------
    sensitivity
        L2 sensitivity of the released quantity under add/remove-one of a record, > 0.
    sigma
        Standard deviation of the Gaussian noise added to each coordinate, >= 0.
    what
        What was released (``"anchor_features"``, ``"dro_loss"``, ...).
    round
        Federated round index, >= 0.
    count
        Number of identical releases this event stands for, >= 1.
    """

    type_name: ClassVar[str] = "gaussian"

    sensitivity: float
    sigma: float
    what: str
    round: int
    count: int = 1

    def __post_init__(self) -> None:
        p: list[str] = []
        _check_float(p, "Sensitivity", self.sensitivity, low=0.0, low_open=True)
        _check_float(p, "Noise standard deviation (sigma)", self.sigma, low=0.0)
        _check_str(p, "What", self.what)
        _check_int(p, "Round", self.round, low=0)
        _check_int(p, "Count", self.count, low=1)
        if p:
            raise InvalidPrivacyParameter(p, what="GaussianEvent")
        self._coerce_floats("sensitivity", "sigma")

    @property
    def noise_multiplier(self) -> float:
        """Noise standard deviation in units of the sensitivity: ``sigma / sensitivity``."""
        return self.sigma / self.sensitivity

    @property
    def is_free(self) -> bool:
        """Gaussian releases always cost privacy."""
        return False


@dataclass(frozen=True)
class PostProcessingEvent(_EventBase):
    """A release computed only from already-accounted releases: zero cost, logged.

    Parameters
    ----------
    what
        What was released (e.g. ``"public_representations"``).
    round
        Federated round index, >= 0.
    """

    type_name: ClassVar[str] = "post_processing"

    what: str
    round: int

    def __post_init__(self) -> None:
        p: list[str] = []
        _check_str(p, "What", self.what)
        _check_int(p, "Round", self.round, low=0)
        if p:
            raise InvalidPrivacyParameter(p, what="PostProcessingEvent")

    @property
    def is_free(self) -> bool:
        """Post-processing never costs privacy."""
        return True


PrivacyEvent = DPSGDEvent | GaussianEvent | PostProcessingEvent

EVENT_TYPES: dict[str, type] = {cls.type_name: cls for cls in (DPSGDEvent, GaussianEvent, PostProcessingEvent)}


def event_from_dict(data: Mapping[str, Any]) -> PrivacyEvent:
    """Rebuild any event from its :meth:`to_dict` form, dispatching on ``"type"``.

    Raises
    ------
    InvalidPrivacyParameter
        If the type is unknown or the fields are invalid.
    """
    if not isinstance(data, Mapping):
        raise InvalidPrivacyParameter(f"An event must be a JSON object. Found {type(data).__name__}.")
    tname = data.get("type")
    cls = EVENT_TYPES.get(tname) if isinstance(tname, str) else None
    if cls is None:
        raise InvalidPrivacyParameter(f"Event type must be one of {sorted(EVENT_TYPES)}. Found {tname!r}.")
    return cls.from_dict(data)  # type: ignore[attr-defined,no-any-return]


def check_event(event: Any) -> PrivacyEvent:
    """Return ``event`` if it is a privacy event, else raise ``TypeError`` naming its type."""
    if not isinstance(event, (DPSGDEvent, GaussianEvent, PostProcessingEvent)):
        raise TypeError(
            f"Event must be a DPSGDEvent, GaussianEvent or PostProcessingEvent. Found {type(event).__name__}."
        )
    return event
