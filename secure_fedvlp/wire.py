"""What travels between the server and the sites: record keys and array conversion.

Every Flower message of a run is a ``RecordDict`` with at most these records:

* ``arrays`` (:data:`ARRAYS_KEY`): the federated parameters (an ``ArrayRecord``), or a ciphertext
  when encryption is on;
* ``config`` (:data:`CONFIG_KEY`): what the server asks (``server-round``, ``stage``, ``local-steps``,
  ``query``, ``reference``) or, in a refusal, the reason;
* ``metrics`` (:data:`METRICS_KEY`): what a site reports (``num-examples``, ...);
* ``info`` (:data:`INFO_KEY`): which site answered and its role;
* ``ledger`` (:data:`LEDGER_KEY`): under DP, the head of the answering site's privacy ledger after
  the releases the reply answers (:data:`LEDGER_HEAD`, :data:`LEDGER_SEQ`), which the server logs as
  the external reference the audit checks the ledger against.

Only the *federated* parameters travel: those with ``requires_grad`` in the model (frozen
pretrained layers and the seeded frozen initialisation are identical at every party).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "METRICS_KEY",
    "INFO_KEY",
    "LEDGER_KEY",
    "LEDGER_HEAD",
    "LEDGER_SEQ",
    "NUM_EXAMPLES",
    "BUDGET_EXHAUSTED",
    "EPSILON",
    "EPSILON_BUDGET",
    "SERVER_ROUND",
    "STAGE",
    "LOCAL_STEPS",
    "QUERY",
    "SITE_INFO_QUERY",
    "REFERENCE",
    "UNTRAINED_REFERENCE",
    "arrays_to_numpy",
    "numpy_to_arrays",
]

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
INFO_KEY = "info"
#: Reply record (a ConfigRecord) of a DP site: its ledger's head after the releases the reply answers.
LEDGER_KEY = "ledger"
#: The SHA-256 (hex) of the ledger's last entry (the genesis hash of an empty ledger).
LEDGER_HEAD = "ledger-head"
#: The sequence number of that entry (``-1`` for an empty ledger).
LEDGER_SEQ = "ledger-seq"

#: Metric: the aggregation weight a site reports (its training-record count).
NUM_EXAMPLES = "num-examples"
#: Metric: 1.0 when a site refused a release because its privacy budget is spent.
BUDGET_EXHAUSTED = "budget-exhausted"
#: Metric: the privacy a site has spent so far (a function of public parameters).
EPSILON = "epsilon"
#: Metric: the site's epsilon budget.
EPSILON_BUDGET = "epsilon-budget"

#: Config keys of a server request.
SERVER_ROUND = "server-round"
STAGE = "stage"
LOCAL_STEPS = "local-steps"
QUERY = "query"
#: The ``query`` kind that asks a node which site it serves.
SITE_INFO_QUERY = "site-info"
#: Config key of an evaluate request for a reference model the site builds itself (no arrays travel).
REFERENCE = "reference"
#: The reference evaluated besides round 0 when the round-0 model is a public start: the seeded, untrained model.
UNTRAINED_REFERENCE = "untrained"


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ordered dict of numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Ordered dict of numpy arrays -> ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
