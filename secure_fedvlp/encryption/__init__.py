"""CKKS-encrypted aggregation (TenSEAL CKKS vectors, sum-only server).

Parties: a key authority (:func:`init_keys`) creates one context per federation run; clients hold
the secret key (file mode 0600) and encrypt their weighted, already clipped and noised updates
(:func:`encrypt_update`); the server holds a key-less context, checks what it can without keys and
adds ciphertexts (:func:`aggregate_encrypted`, :func:`add_plaintext_noise`); clients decrypt and
divide by the total weight (:func:`decrypt_aggregate`).  In the Flower path each contribution is
signed by its site's own Ed25519 key over its header, the ciphertext digest and a server nonce
(:mod:`~secure_fedvlp.encryption.auth`), carries its weight inside every vector, and every site
checks an aggregate before using it (:func:`check_and_decrypt`).  Packing several quantised values per slot
(:class:`QuantizedPacking`) cuts the bytes per model value from ~32 to ~8-11.  Anything decrypted
that leaves the key holders is either exact on the fixed-point grid it was encoded on (it then carries
no CKKS error term) or noise-flooded first (:func:`noise_flood_for_export`).
"""

from secure_fedvlp.encryption.aggregate import (
    AggregateCiphertext,
    AggregationResult,
    add_plaintext_noise,
    aggregate_encrypted,
    check_and_decrypt,
    decrypt_aggregate,
    encrypt_update,
    flooding_sigma,
    noise_flood_for_export,
)
from secure_fedvlp.encryption.auth import ReplayGuard, SignedHeader, new_nonce
from secure_fedvlp.encryption.envelope import EncryptedUpdate, validate
from secure_fedvlp.encryption.keys import (
    EncryptionContext,
    KeyBundle,
    context_fingerprint,
    init_keys,
    load_client_context,
    load_manifest,
    load_server_context,
    load_signing_public_keys,
)
from secure_fedvlp.encryption.packing import (
    QuantizedPacking,
    UpdateLayout,
    codec_id,
    decode_sums,
    encode_chunks,
    exact_capacity,
    exact_error_bound,
    flatten_update,
    num_vectors,
    unflatten_update,
)
from secure_fedvlp.encryption.params import PRESETS, CKKSParams, preset, security_level

__all__ = [
    "AggregateCiphertext",
    "AggregationResult",
    "CKKSParams",
    "EncryptedUpdate",
    "KeyBundle",
    "PRESETS",
    "QuantizedPacking",
    "EncryptionContext",
    "UpdateLayout",
    "ReplayGuard",
    "SignedHeader",
    "add_plaintext_noise",
    "aggregate_encrypted",
    "check_and_decrypt",
    "codec_id",
    "context_fingerprint",
    "decode_sums",
    "decrypt_aggregate",
    "encode_chunks",
    "encrypt_update",
    "exact_capacity",
    "exact_error_bound",
    "flatten_update",
    "flooding_sigma",
    "init_keys",
    "load_client_context",
    "load_manifest",
    "load_server_context",
    "load_signing_public_keys",
    "new_nonce",
    "noise_flood_for_export",
    "num_vectors",
    "preset",
    "security_level",
    "unflatten_update",
    "validate",
]
