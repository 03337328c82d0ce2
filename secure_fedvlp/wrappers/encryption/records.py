"""How a ciphertext travels in a Flower record, and the layouts both sides compute."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from secure_fedvlp.encryption import flatten_update
from secure_fedvlp.encryption.packing import UpdateLayout
from secure_fedvlp.errors import CiphertextError

__all__ = [
    "CHAIN_KEY",
    "CIPHERTEXT_KEY",
    "NONCE_KEY",
    "WEIGHT_KEY",
    "anchor_layout_hash",
    "blob_record",
    "canonical_state",
    "is_chain_record",
    "is_encrypted",
    "layout_of",
    "record_blob",
]

#: Key, inside an ``arrays`` ArrayRecord, of a serialised ciphertext (a uint8 array).
CIPHERTEXT_KEY = "encryption.ciphertext"
#: Key of an encrypted global model of the delta protocol (:func:`~secure_fedvlp.encryption.envelope.encode_chain`).
CHAIN_KEY = "encryption.chain"
#: Config key of the aggregation weight the server assigns to a node.
WEIGHT_KEY = "encryption-weight"
#: Config key of the fresh nonce the server issues to a node for one round and stage; the site signs over it.
NONCE_KEY = "encryption-nonce"


def is_encrypted(record: ArrayRecord) -> bool:
    """Whether an ``arrays`` record carries a ciphertext (or an encrypted model) instead of parameters."""
    return CIPHERTEXT_KEY in record or CHAIN_KEY in record


def is_chain_record(record: ArrayRecord) -> bool:
    """Whether a record carries an encrypted model of the delta protocol."""
    return CHAIN_KEY in record


def blob_record(blob: bytes, key: str = CIPHERTEXT_KEY) -> ArrayRecord:
    """A serialised ciphertext (or, with ``key=CHAIN_KEY``, an encrypted model) as the single array of a record."""
    return ArrayRecord({key: Array(np.frombuffer(blob, dtype=np.uint8).copy())})


def record_blob(record: ArrayRecord) -> bytes:
    """The serialised ciphertext or encrypted model a record carries; :class:`CiphertextError` if malformed."""
    key = CHAIN_KEY if CHAIN_KEY in record else CIPHERTEXT_KEY
    arr = record[key].numpy()
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise CiphertextError(f"'{key}' must be a 1-D uint8 array; found {arr.dtype} {arr.shape}.")
    return arr.tobytes()


def canonical_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 arrays with 0-d scalars as shape (1,), as Flower's ``Array`` carries them."""
    return {k: np.atleast_1d(np.asarray(v, dtype=np.float32)) for k, v in state.items()}


def layout_of(state: Mapping[str, np.ndarray]) -> UpdateLayout:
    """The packing layout of a model state (names, shapes, order)."""
    return flatten_update(canonical_state(state))[1]


def anchor_layout_hash(dim: int) -> str:
    """Layout hash of an anchor contribution of ``dim`` values (both sides compute it)."""
    from secure_fedvlp.privacy.anchors import SUM_KEY

    return flatten_update({SUM_KEY: np.zeros(int(dim))})[1].layout_hash()
