"""How a ciphertext travels in a Flower record, and the layouts both sides compute."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from secure_fedvlp.encryption import flatten_update
from secure_fedvlp.encryption.packing import UpdateLayout
from secure_fedvlp.errors import CiphertextError

__all__ = [
    "CIPHERTEXT_KEY",
    "NONCE_KEY",
    "WEIGHT_KEY",
    "anchor_layout_hash",
    "blob_record",
    "canonical_state",
    "is_encrypted",
    "layout_of",
    "record_blob",
]

#: Key, inside an ``arrays`` ArrayRecord, of a serialised ciphertext (a uint8 array).
CIPHERTEXT_KEY = "encryption.ciphertext"
#: Config key of the aggregation weight the server assigns to a node.
WEIGHT_KEY = "encryption-weight"
#: Config key of the fresh nonce the server issues to a node for one round and stage; the site signs over it.
NONCE_KEY = "encryption-nonce"


def is_encrypted(record: ArrayRecord) -> bool:
    """Whether an ``arrays`` record carries a ciphertext instead of parameters."""
    return CIPHERTEXT_KEY in record


def blob_record(blob: bytes) -> ArrayRecord:
    """A serialised ciphertext as the single array of a record."""
    return ArrayRecord({CIPHERTEXT_KEY: Array(np.frombuffer(blob, dtype=np.uint8).copy())})


def record_blob(record: ArrayRecord) -> bytes:
    """The serialised ciphertext a record carries; :class:`~secure_fedvlp.errors.CiphertextError` if malformed."""
    arr = record[CIPHERTEXT_KEY].numpy()
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise CiphertextError(f"'{CIPHERTEXT_KEY}' must be a 1-D uint8 array; found {arr.dtype} {arr.shape}.")
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
