"""secure_fedvlp.privacy: the pure privacy core (events, accountants, budgets, ledger, mechanisms).

No model and no Flower here.  Events are immutable records of releases
(:mod:`~secure_fedvlp.privacy.events`); accountants compose them and answer epsilon queries
without mutating (:mod:`~secure_fedvlp.privacy.accountant`); budgets are checked before a
release (:mod:`~secure_fedvlp.privacy.budget`); the per-client ledger makes the history
durable, hash-chained and auditable (:mod:`~secure_fedvlp.privacy.ledger`); noise is calibrated
without overshooting (:mod:`~secure_fedvlp.privacy.calibration`); and the numeric mechanisms
take explicit randomness (:mod:`~secure_fedvlp.privacy.mechanisms`).
"""

from secure_fedvlp.privacy.accountant import (
    ACCOUNTANTS,
    DEFAULT_RDP_ORDERS,
    DPAccountingRDPAccountant,
    PLDAccountant,
    PrivacyAccountant,
    RDPAccountant,
    check_delta,
    epsilon_curve,
    epsilon_from_events,
    make_accountant,
    register_accountant,
)
from secure_fedvlp.privacy.budget import Budget, check_release
from secure_fedvlp.privacy.calibration import calibrate_gaussian_sigma, calibrate_noise_multiplier
from secure_fedvlp.privacy.events import (
    EVENT_TYPES,
    DPSGDEvent,
    GaussianEvent,
    InvalidPrivacyParameter,
    PostProcessingEvent,
    PrivacyEvent,
    event_from_dict,
)
from secure_fedvlp.privacy.ledger import (
    LedgerEntry,
    LedgerHead,
    PrivacyLedger,
    genesis_hash,
    head_path,
    ledger_relation,
    read_ledger,
    replay,
    verify_ledger,
)
from secure_fedvlp.privacy.mechanisms import (
    clip_per_sample,
    gaussian_noise_like,
    mean_release_event,
    noised_clipped_mean,
    noised_clipped_sum,
    sum_release_event,
)
from secure_fedvlp.privacy.relation import NEIGHBOURING_RELATION

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_RDP_ORDERS",
    "DPAccountingRDPAccountant",
    "PLDAccountant",
    "PrivacyAccountant",
    "RDPAccountant",
    "check_delta",
    "epsilon_curve",
    "epsilon_from_events",
    "make_accountant",
    "register_accountant",
    "Budget",
    "check_release",
    "calibrate_gaussian_sigma",
    "calibrate_noise_multiplier",
    "EVENT_TYPES",
    "DPSGDEvent",
    "GaussianEvent",
    "InvalidPrivacyParameter",
    "PostProcessingEvent",
    "PrivacyEvent",
    "event_from_dict",
    "LedgerEntry",
    "LedgerHead",
    "PrivacyLedger",
    "ledger_relation",
    "genesis_hash",
    "head_path",
    "read_ledger",
    "replay",
    "verify_ledger",
    "clip_per_sample",
    "gaussian_noise_like",
    "mean_release_event",
    "noised_clipped_mean",
    "noised_clipped_sum",
    "sum_release_event",
    "NEIGHBOURING_RELATION",
]
