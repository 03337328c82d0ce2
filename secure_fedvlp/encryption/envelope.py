"""The wire format of one encrypted contribution, and the server's key-less checks.

An :class:`EncryptedUpdate` carries public metadata (context fingerprint, round id, stage, opaque
client id, number of model values, layout hash, codec id, the client's weight) and a list of
serialised TenSEAL CKKS vectors, one ciphertext each.  The TenSEAL context is *not* included: it
travels once per run (:mod:`secure_fedvlp.encryption.keys`).

Weight in the clear (default).  In plaintext FedAvg the server sees ``num_examples`` anyway, and
knowing the weights lets it compute the total weight of exactly the updates it accepted (dropouts
and rejections included) and check each weight against the packing's ``max_weight``.  Where the
weight itself is sensitive (e.g. DRO mixture weights that reveal losses), ``encrypt_weight=True``
puts the weight into one extra CKKS vector (slot 0) instead; the clear field is then ``None`` and
the clients decrypt the total weight together with the aggregate.

Signed contributions (the Flower path): the header also carries the server's ``nonce`` for this
site, round and stage and the site's Ed25519 ``signature`` over the header fields and the digest of
the ciphertext bytes (:mod:`secure_fedvlp.encryption.auth`); :func:`validate` checks them when it
is given the run's public keys.  The weight then also travels *inside* the ciphertexts (codec
suffix ``/ws``: the last slot of every vector), so the clients can compare the decrypted total
weight with the sum of the signed weights.

Framing (``to_bytes``): ``b"SFVLPENC" | u16 version | u8 kind | u32 header length | JSON header |
u32 count | count x (u64 length | ciphertext bytes) | sha256 of everything before``.  The trailing
sha256 detects truncation and transport corruption; it is **not** authentication (anyone can
recompute it).  The signature is.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from secure_fedvlp.encryption.auth import ReplayGuard, SignedHeader, ciphertext_digest, verify_statement
from secure_fedvlp.encryption.keys import EncryptionContext
from secure_fedvlp.encryption.packing import QuantizedPacking, num_vectors, weight_quantum
from secure_fedvlp.errors import CiphertextError

__all__ = ["EncryptedUpdate", "validate", "max_ciphertext_bytes", "load_vector", "encode_chain", "decode_chain"]

_MAGIC = b"SFVLPENC"
_VERSION = 2
KIND_UPDATE = 1
KIND_AGGREGATE = 2
KIND_CHAIN = 3
_KIND_NAMES = {KIND_UPDATE: "encrypted update", KIND_AGGREGATE: "encrypted aggregate", KIND_CHAIN: "encrypted model"}


def _frame(kind: int, header: dict[str, Any], blobs: Sequence[bytes]) -> bytes:
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    parts = [_MAGIC, struct.pack(">HBI", _VERSION, kind, len(hb)), hb, struct.pack(">I", len(blobs))]
    for b in blobs:
        parts.append(struct.pack(">Q", len(b)))
        parts.append(bytes(b))
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def _unframe(data: bytes, kind: int) -> tuple[dict[str, Any], list[bytes]]:
    """Parse a frame; every failure is a :class:`CiphertextError` naming what is wrong."""
    what = _KIND_NAMES[kind]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CiphertextError(f"{what}: expected bytes, got {type(data).__name__}.")
    data = bytes(data)
    fixed = len(_MAGIC) + 7
    if len(data) < fixed + 4 + 32:
        raise CiphertextError(f"{what} truncated: {len(data)} bytes is shorter than the smallest valid frame.")
    if data[: len(_MAGIC)] != _MAGIC:
        raise CiphertextError(f"{what}: bad magic bytes (not a secure_fedvlp envelope).")
    version, got_kind, hlen = struct.unpack(">HBI", data[len(_MAGIC) : fixed])
    if version != _VERSION:
        raise CiphertextError(f"{what}: unsupported envelope version {version}; expected {_VERSION}.")
    if got_kind != kind:
        raise CiphertextError(f"{what}: frame holds a {_KIND_NAMES.get(got_kind, f'kind {got_kind}')}.")
    body, digest = data[:-32], data[-32:]
    pos = fixed
    if pos + hlen + 4 > len(body):
        raise CiphertextError(
            f"{what} truncated: header claims {hlen} bytes but only {max(0, len(body) - pos - 4)} remain."
        )
    try:
        header = json.loads(body[pos : pos + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CiphertextError(f"{what}: corrupt header ({e}).") from e
    if not isinstance(header, dict):
        raise CiphertextError(f"{what}: header is not a JSON object.")
    pos += hlen
    (count,) = struct.unpack(">I", body[pos : pos + 4])
    pos += 4
    blobs: list[bytes] = []
    for i in range(count):
        if pos + 8 > len(body):
            raise CiphertextError(f"{what} truncated: ciphertext {i} of {count} is missing its length field.")
        (blen,) = struct.unpack(">Q", body[pos : pos + 8])
        pos += 8
        if pos + blen > len(body):
            raise CiphertextError(
                f"{what} truncated: ciphertext {i} of {count} claims {blen} bytes, {len(body) - pos} remain."
            )
        blobs.append(body[pos : pos + blen])
        pos += blen
    if pos != len(body):
        raise CiphertextError(f"{what}: {len(body) - pos} unexpected trailing bytes after {count} ciphertexts.")
    if hashlib.sha256(body).digest() != digest:
        raise CiphertextError(f"{what} corrupted: sha256 digest mismatch.")
    return header, blobs


def encode_chain(base_version: int, aggregates: Sequence[bytes]) -> bytes:
    """An encrypted global model of the delta protocol: the aggregates of versions ``base_version`` on.

    The global model of version ``v`` is the seeded initial model (public) plus the decrypted mean
    delta of each of the aggregates ``0 .. v - 1``; a site holding version ``base_version`` applies
    the ones it lacks.  Same framing as the other envelopes (kind 3).
    """
    if not isinstance(base_version, int) or base_version < 0:
        raise ValueError(f"base_version must be an integer >= 0. Found {base_version!r}.")
    return _frame(KIND_CHAIN, {"base_version": base_version, "count": len(aggregates)}, list(aggregates))


def decode_chain(data: bytes) -> tuple[int, list[bytes]]:
    """``(base_version, serialised aggregates)`` of :func:`encode_chain` output.

    Raises :class:`CiphertextError` if malformed.
    """
    header, blobs = _unframe(data, KIND_CHAIN)
    base = _field(header, "base_version", (int,), "encrypted model")
    if base < 0 or _field(header, "count", (int,), "encrypted model") != len(blobs):
        raise CiphertextError("encrypted model: its header does not match the aggregates it holds.")
    return base, blobs


def is_chain(data: bytes) -> bool:
    """Whether ``data`` is an :func:`encode_chain` frame (by its magic and kind bytes)."""
    return len(data) > len(_MAGIC) + 3 and data[: len(_MAGIC)] == _MAGIC and data[len(_MAGIC) + 2] == KIND_CHAIN


def _field(header: dict[str, Any], name: str, types: tuple[type, ...], what: str, nullable: bool = False) -> Any:
    if name not in header:
        raise CiphertextError(f"{what}: header lacks field {name!r}.")
    v = header[name]
    if v is None and nullable:
        return None
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        raise CiphertextError(f"{what}: field {name!r} has type {type(v).__name__}; expected {types[0].__name__}.")
    return v


@dataclass(frozen=True)
class EncryptedUpdate:
    """One client's encrypted, weighted update for one round (and stage).

    Attributes
    ----------
    fingerprint
        Fingerprint of the run context it was encrypted under.
    round_id
        Server round the update answers.
    stage
        Sub-round stage (e.g. FedDRA's ``"align"`` / ``"full"``); ``"update"`` by default.
    client_id
        Opaque sender label.
    num_values
        Number of model values encoded.
    layout_hash
        :meth:`UpdateLayout.layout_hash` of the update (``""`` if not tracked).
    codec
        :func:`codec_id` of the encoding.
    weight
        The client's weight in the clear, or ``None`` when encrypted.
    ciphertexts
        Serialised TenSEAL CKKS vectors, one ciphertext each.
    weight_ciphertext
        Serialised CKKS vector with the weight in slot 0, when ``encrypt_weight`` was used.
    nonce
        The server's nonce for this site, round and stage (``""`` when unsigned).
    signature
        The site's Ed25519 signature (hex) over :meth:`signed_header` (``""`` when unsigned).
    """

    fingerprint: str
    round_id: int
    stage: str
    client_id: str
    num_values: int
    layout_hash: str
    codec: str
    weight: float | None
    ciphertexts: tuple[bytes, ...] = field(repr=False)
    weight_ciphertext: bytes | None = field(default=None, repr=False)
    nonce: str = ""
    signature: str = field(default="", repr=False)

    def digest(self) -> str:
        """sha256 over the ciphertext bytes (:func:`~secure_fedvlp.encryption.auth.ciphertext_digest`), once."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            blobs = list(self.ciphertexts) + ([self.weight_ciphertext] if self.weight_ciphertext is not None else [])
            cached = ciphertext_digest(blobs)
            object.__setattr__(self, "_digest", cached)  # frozen: the ciphertexts cannot change after this
        return cached

    def signed_header(self) -> SignedHeader:
        """What the site signs: the header fields, the ciphertext digest and the nonce."""
        return SignedHeader(
            fingerprint=self.fingerprint,
            round_id=int(self.round_id),
            stage=self.stage,
            site=self.client_id,
            num_values=int(self.num_values),
            layout_hash=self.layout_hash,
            codec=self.codec,
            weight=float(self.weight) if self.weight is not None else float("nan"),
            digest=self.digest(),
            nonce=self.nonce,
            signature=self.signature,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of ciphertext carried (not counting the small header)."""
        return sum(len(c) for c in self.ciphertexts) + len(self.weight_ciphertext or b"")

    def to_bytes(self) -> bytes:
        """Serialise (see the module docstring for the framing)."""
        header = {
            "fingerprint": self.fingerprint,
            "round_id": int(self.round_id),
            "stage": self.stage,
            "client_id": self.client_id,
            "num_values": int(self.num_values),
            "layout_hash": self.layout_hash,
            "codec": self.codec,
            "weight": self.weight,
            "has_weight_ciphertext": self.weight_ciphertext is not None,
            "nonce": self.nonce,
            "signature": self.signature,
        }
        blobs = list(self.ciphertexts) + ([self.weight_ciphertext] if self.weight_ciphertext is not None else [])
        return _frame(KIND_UPDATE, header, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedUpdate:
        """Parse :meth:`to_bytes` output.

        Raises
        ------
        CiphertextError
            On truncation, corruption, bad magic/version or malformed header fields, naming which.
        """
        what = "encrypted update"
        header, blobs = _unframe(data, KIND_UPDATE)
        fp = _field(header, "fingerprint", (str,), what)
        rid = _field(header, "round_id", (int,), what)
        stage = _field(header, "stage", (str,), what)
        cid = _field(header, "client_id", (str,), what)
        nv = _field(header, "num_values", (int,), what)
        lh = _field(header, "layout_hash", (str,), what)
        codec = _field(header, "codec", (str,), what)
        w = _field(header, "weight", (float, int), what, nullable=True)
        has_w = _field(header, "has_weight_ciphertext", (bool,), what)
        nonce = _field(header, "nonce", (str,), what)
        sig = _field(header, "signature", (str,), what)
        wct = None
        if has_w:
            if not blobs:
                raise CiphertextError(f"{what}: header announces a weight ciphertext but the frame holds none.")
            wct = blobs.pop()
        return cls(fp, rid, stage, cid, nv, lh, codec, None if w is None else float(w), tuple(blobs), wct, nonce, sig)


def max_ciphertext_bytes(ctx: EncryptionContext) -> int:
    """Upper bound on one serialised single-ciphertext CKKS vector (size check before parsing)."""
    p = ctx.params
    return 2 * p.poly_modulus_degree * len(p.coeff_mod_bit_sizes[:-1]) * 8 + 64 * 1024


def load_vector(ctx: EncryptionContext, blob: bytes, what: str) -> ts.CKKSVector:
    """Deserialise one CKKS vector against ``ctx``; :class:`CiphertextError` naming ``what`` on failure."""
    if len(blob) > max_ciphertext_bytes(ctx):
        raise CiphertextError(
            f"{what} is {len(blob)} bytes, more than one ciphertext can be ({max_ciphertext_bytes(ctx)})."
        )
    try:
        vec = ts.ckks_vector_from(ctx.context, bytes(blob))
        size = vec.size()
    except Exception as e:  # TenSEAL/SEAL raise ValueError or RuntimeError for malformed input
        raise CiphertextError(f"{what} does not deserialise against the run context: {e}.") from e
    if size != ctx.slots:
        raise CiphertextError(f"{what} holds {size} slots; expected {ctx.slots}.")
    if len(vec.ciphertext()) != 1:
        raise CiphertextError(f"{what} holds {len(vec.ciphertext())} ciphertexts; expected 1.")
    return vec


def validate(
    update: EncryptedUpdate,
    server_ctx: EncryptionContext,
    *,
    expected_round: int,
    expected_num_values: int,
    expected_fingerprint: str | None = None,
    expected_stage: str | None = None,
    expected_layout_hash: str | None = None,
    packing: QuantizedPacking | None = None,
    expected_codec: str | None = None,
    encrypted_weight: bool = False,
    weight_slot: bool = False,
    fixed_point_bits: int | None = None,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    sender: str | None = None,
    expected_nonce: str | None = None,
    replay: ReplayGuard | None = None,
) -> tuple[list[ts.CKKSVector], ts.CKKSVector | None]:
    """Check what the server can check without keys, and load the ciphertexts.

    Metadata problems are collected and reported together; then every ciphertext must deserialise
    against the server context, hold exactly one ciphertext and ``slots`` slots.

    Parameters
    ----------
    update
        The contribution.
    server_ctx
        The server's (key-less) context.
    expected_round
        The current round; an earlier round id is reported as a replay.
    expected_num_values
        Model size.
    expected_fingerprint
        Defaults to ``server_ctx.fingerprint``.
    expected_stage, expected_layout_hash, expected_codec
        Checked when given.
    packing
        The packing in use (sets the expected number of vectors and the weight range).
    encrypted_weight
        Whether contributions must carry an encrypted weight instead of a clear one.
    weight_slot, fixed_point_bits
        The weight travels in the last slot of every vector; the clear (signed) weight must then lie
        on the weight grid (:func:`~secure_fedvlp.encryption.packing.weight_quantum`).
    public_keys, sender
        When given, the contribution must carry a valid Ed25519 signature by ``sender``'s key
        (``sender``: the site the transport authenticated) and name ``sender`` as its site.
    expected_nonce
        The nonce the server issued to ``sender`` for this round and stage.
    replay
        Ciphertext digests already received in the run; a repeated digest is refused.

    Returns
    -------
    (list of CKKSVector, CKKSVector or None)
        The loaded update vectors and the loaded weight vector.

    Raises
    ------
    CiphertextError
        With every problem found, in one message.
    """
    problems: list[str] = []
    fp = expected_fingerprint or server_ctx.fingerprint
    if update.fingerprint != fp:
        problems.append(
            f"context fingerprint {update.fingerprint!r} differs from this run's {fp!r} "
            "(encrypted under another context)"
        )
    if update.round_id < expected_round:
        problems.append(f"round {update.round_id} is earlier than the current round {expected_round} (replay)")
    elif update.round_id > expected_round:
        problems.append(f"round {update.round_id} is later than the current round {expected_round}")
    if expected_stage is not None and update.stage != expected_stage:
        problems.append(f"stage {update.stage!r} differs from the expected {expected_stage!r}")
    if update.num_values != expected_num_values:
        problems.append(f"num_values {update.num_values} differs from the model's {expected_num_values}")
    if expected_layout_hash is not None and update.layout_hash != expected_layout_hash:
        problems.append(f"layout hash {update.layout_hash!r} differs from the expected {expected_layout_hash!r}")
    if expected_codec is not None and update.codec != expected_codec:
        problems.append(f"codec {update.codec!r} differs from the expected {expected_codec!r}")
    n_expected = num_vectors(expected_num_values, server_ctx.slots, packing)
    if len(update.ciphertexts) != n_expected:
        problems.append(f"{len(update.ciphertexts)} ciphertexts where {n_expected} are expected")
    if encrypted_weight:
        if update.weight_ciphertext is None:
            problems.append("no encrypted weight, but this aggregation expects one")
        if update.weight is not None:
            problems.append("a clear weight was sent although weights are to be encrypted")
    else:
        if update.weight_ciphertext is not None:
            problems.append("an encrypted weight was sent, but this aggregation expects clear weights")
        w = update.weight
        if w is None or not math.isfinite(w) or w <= 0:
            problems.append(f"weight {w!r} is not a finite number > 0")
        elif packing is not None and w > packing.max_weight * (1 + 1e-12):
            problems.append(f"weight {w!r} exceeds the packing's max_weight {packing.max_weight!r}")
        elif weight_slot and (q := weight_quantum(packing, fixed_point_bits)) is not None and (w / q) != round(w / q):
            problems.append(f"weight {w!r} is not on the weight grid {q!r}")
    if expected_nonce is not None and update.nonce != expected_nonce:
        problems.append("nonce differs from the one the server issued for this site, round and stage")
    if public_keys is not None:
        if sender is None:
            raise ValueError("validate: public_keys needs the authenticated sender.")
        try:
            verify_statement(update.signed_header(), public_keys, sender)
        except CiphertextError as exc:
            problems.append(str(exc))
    if replay is not None:
        try:
            replay.check(update.digest())
        except CiphertextError as exc:
            problems.append(str(exc))
    if problems:
        raise CiphertextError(f"Update from {update.client_id!r} rejected: " + "; ".join(problems) + ".")
    vectors = [
        load_vector(server_ctx, blob, f"Update from {update.client_id!r}: ciphertext {i}")
        for i, blob in enumerate(update.ciphertexts)
    ]
    wvec = None
    if update.weight_ciphertext is not None:
        wvec = load_vector(server_ctx, update.weight_ciphertext, f"Update from {update.client_id!r}: weight ciphertext")
    return vectors, wvec
