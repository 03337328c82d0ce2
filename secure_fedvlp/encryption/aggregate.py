"""Encrypted weighted aggregation: clients encrypt, the server adds, clients decrypt and divide.

Order (security order): the client clips and noises its update (DP, elsewhere), *then* multiplies
by its weight in plaintext, *then* encrypts (:func:`encrypt_update`).  The server only adds
ciphertexts -- and plaintext noise vectors (:func:`add_plaintext_noise`) -- so no multiplicative
depth, no relinearisation or Galois keys, and no secret key are needed on the server
(:func:`aggregate_encrypted`).  Clients decrypt the weighted sum and divide by the total weight
(:func:`decrypt_aggregate`).

IND-CPA-D and exporting decrypted values
---------------------------------------
CKKS decryption returns ``m + e``: the error ``e`` depends on the secret key and the encryption
randomness, and Li and Micciancio ("On the Security of Homomorphic Encryption on Approximate
Numbers", EUROCRYPT 2021) showed that an adversary who sees decrypted results can recover the
secret key from ``e``: CKKS is not IND-CPA-D secure.  Inside this protocol only key holders (the
clients) see decryptions.  Any decrypted value that leaves them -- the exported final model -- must
be noise-flooded first (:func:`noise_flood_for_export`) or be an exact function of the plaintexts.

* Packed aggregates (:class:`QuantizedPacking`) decode to *exact* integers (the error is rounded
  away with probability ``1 - 2**-75`` per slot), so their decrypted output carries no ``e``.
* Exact-mode aggregates do carry ``e``.  Flooding with Gaussian noise of std ``sigma`` makes the
  released vector statistically close to one computed without ``e``: the statistical distance is at
  most ``||e||_2 / (2 sigma)`` (Pinsker on ``KL = ||e||^2 / (2 sigma^2)``), so
  ``sigma = ||e||_2 * 2**(kappa - 1)`` gives ``2**-kappa`` per release (:func:`flooding_sigma`;
  use ``kappa >= 40`` for the statistical security parameter and multiply by the number of
  releases).  With the default preset the per-coordinate error is ~2e-7, so ``||e||_2 ~ 2e-4`` over
  1M values and ``kappa = 40`` needs ``sigma ~ 1e8``: statistical flooding destroys model weights.
  The practical options are (i) export a model aggregated with the packed codec, (ii) export a model
  that the key holders re-quantise to a grid much coarser than ``e`` *and* flood with ``kappa``
  chosen accordingly, or (iii) accept a smaller ``kappa`` -- OpenFHE's ``NOISE_FLOODING_DECRYPT``
  mode makes the same trade-off. The function takes ``sigma`` explicitly; pick it with
  :func:`flooding_sigma` and write the choice down.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from secure_fedvlp.encryption.auth import ReplayGuard, SignedHeader, sign_statement, verify_statement
from secure_fedvlp.encryption.envelope import (
    KIND_AGGREGATE,
    EncryptedUpdate,
    _field,
    _frame,
    _unframe,
    load_vector,
    validate,
)
from secure_fedvlp.encryption.keys import EncryptionContext
from secure_fedvlp.encryption.packing import (
    PACKED_WEIGHT_BITS,
    QuantizedPacking,
    codec_id,
    decode_sums,
    encode_chunks,
    exact_capacity,
    grid_residual,
    num_vectors,
    packed_digit_sums,
    quantize_weight,
    split_weight_slots,
)
from secure_fedvlp.errors import CiphertextError, KeyMaterialError

__all__ = [
    "AggregateCiphertext",
    "AggregationResult",
    "encrypt_update",
    "aggregate_encrypted",
    "add_plaintext_noise",
    "decrypt_aggregate",
    "check_and_decrypt",
    "MAX_GRID_RESIDUAL",
    "noise_flood_for_export",
    "flooding_sigma",
]

log = logging.getLogger(__name__)

#: Largest distance (in grid steps) of a decrypted slot from its grid that a client accepts.  An honest
#: sum lands within ~0.08 of a step (the CKKS error; the grid is sized so that 10 doubled-model standard
#: deviations fit in half a step); a ciphertext under another key or an overflow of the modulus lands
#: anywhere, ~0.5 at worst over a vector.
MAX_GRID_RESIDUAL = 0.25


def _encrypt(ctx: EncryptionContext, chunk: np.ndarray, scale_bits: int) -> ts.CKKSVector:
    return ts.ckks_vector(ctx.context, chunk.tolist(), float(2**scale_bits))


def encrypt_update(
    client_ctx: EncryptionContext,
    vector: np.ndarray,
    weight: float,
    round_id: int,
    *,
    client_id: str = "",
    stage: str = "update",
    layout_hash: str = "",
    packing: QuantizedPacking | None = None,
    rng: np.random.Generator | None = None,
    encrypt_weight: bool = False,
    max_clients: int | None = None,
    fixed_point_bits: int | None = None,
    weight_slot: bool = False,
    nonce: str | None = None,
) -> EncryptedUpdate:
    """Weight a (clipped, noised) flat update in plaintext and encrypt it.

    Parameters
    ----------
    client_ctx
        A client context (for the symmetric presets it must hold the secret key).
    vector
        The flat update (see :func:`flatten_update`).
    weight
        The client's aggregation weight (> 0; e.g. ``num_examples`` or a mixture weight ``q_k``;
        at most ``packing.max_weight`` when packed).
    round_id
        The server round being answered.
    client_id, stage, layout_hash
        Public metadata (opaque to this module).
    packing
        Quantised packing, or ``None`` for exact one-value-per-slot CKKS.
    rng
        Packed mode: generator for unbiased stochastic rounding (``None``: round to nearest).
    encrypt_weight
        Send the weight in an extra ciphertext instead of the clear header field.
    max_clients
        Exact mode: refuse weighted values that ``max_clients`` contributions could overflow.
    fixed_point_bits
        Exact mode: encode on the ``2**-f`` grid (:func:`~secure_fedvlp.encryption.packing.fixed_point_bits_for`),
        so that decryption is exact.
    weight_slot
        Also encrypt the weight (rounded to the weight grid) in the last slot of every vector; the
        clear weight is then that rounded weight.
    nonce
        The server's nonce for this site, round and stage.  When given, the update is signed with the
        context's signing key (the site's own, from its key file) and ``client_id`` defaults to the
        context's site.

    Returns
    -------
    EncryptedUpdate
    """
    if client_ctx.params.symmetric and not client_ctx.can_decrypt:
        raise KeyMaterialError("Symmetric CKKS encryption needs the secret key; this context has none.")
    if not isinstance(round_id, int) or isinstance(round_id, bool) or round_id < 0:
        raise ValueError(f"round_id must be an integer >= 0. Found {round_id!r}.")
    if nonce is not None:
        if client_ctx.signing_key is None or client_ctx.site is None:
            raise KeyMaterialError(
                "This key file holds no signing key; create the run's keys again with `secure-fedvlp keys init`."
            )
        client_id = client_id or client_ctx.site
        if client_id != client_ctx.site:
            raise KeyMaterialError(f"This key file belongs to site {client_ctx.site!r}, not {client_id!r}.")
    if weight_slot:
        if encrypt_weight:
            raise ValueError("weight_slot and encrypt_weight are alternatives; choose one.")
        weight = quantize_weight(weight, packing, fixed_point_bits)
    vec = np.asarray(vector, dtype=np.float64).reshape(-1)
    chunks = encode_chunks(
        vec,
        float(weight),
        client_ctx.slots,
        packing,
        rng,
        params=client_ctx.params,
        max_clients=max_clients,
        fixed_point_bits=fixed_point_bits,
        weight_slot=weight_slot,
    )
    scale_bits = packing.scale_bits if packing is not None else client_ctx.params.global_scale_bits
    blobs = tuple(_encrypt(client_ctx, c, scale_bits).serialize() for c in chunks)
    wblob = None
    if encrypt_weight:
        wchunk = np.zeros(client_ctx.slots)
        wchunk[0] = float(weight)
        wblob = _encrypt(client_ctx, wchunk, client_ctx.params.global_scale_bits).serialize()
    log.debug("Encrypted update for round %d stage %s into %d ciphertexts.", round_id, stage, len(blobs))
    upd = EncryptedUpdate(
        fingerprint=client_ctx.fingerprint,
        round_id=round_id,
        stage=stage,
        client_id=client_id,
        num_values=int(vec.size),
        layout_hash=layout_hash,
        codec=codec_id(client_ctx.params, packing, fixed_point_bits, weight_slot),
        weight=None if encrypt_weight else float(weight),
        ciphertexts=blobs,
        weight_ciphertext=wblob,
        nonce=nonce or "",
    )
    if nonce is None:
        return upd
    assert client_ctx.signing_key is not None
    return replace(upd, signature=sign_statement(upd.signed_header(), client_ctx.signing_key).signature)


@dataclass
class AggregateCiphertext:
    """The encrypted weighted sum of the accepted contributions of one round (and stage).

    Attributes
    ----------
    fingerprint, round_id, stage, num_values, layout_hash, codec
        As in :class:`EncryptedUpdate`.
    contributors
        Ids of the summed contributions, in summation order.
    total_weight
        Sum of their clear weights, or ``None`` when weights were encrypted.
    vectors
        CKKS vectors of the weighted sum.
    weight_vector
        Encrypted total weight (slot 0) when weights were encrypted.
    noised
        Whether server-side plaintext noise was added.
    contributions
        The signed header of every summed contribution (empty when contributions are unsigned), so
        that each site can verify the signatures and the total weight itself.
    """

    fingerprint: str
    round_id: int
    stage: str
    num_values: int
    layout_hash: str
    codec: str
    contributors: tuple[str, ...]
    total_weight: float | None
    vectors: list[ts.CKKSVector] = field(repr=False)
    weight_vector: ts.CKKSVector | None = field(default=None, repr=False)
    noised: bool = False
    contributions: tuple[SignedHeader, ...] = field(default=(), repr=False)

    def to_bytes(self) -> bytes:
        """Serialise (same framing as :meth:`EncryptedUpdate.to_bytes`), e.g. to keep it on the server
        or send it to the clients."""
        header = {
            "fingerprint": self.fingerprint,
            "round_id": int(self.round_id),
            "stage": self.stage,
            "num_values": int(self.num_values),
            "layout_hash": self.layout_hash,
            "codec": self.codec,
            "contributors": list(self.contributors),
            "total_weight": self.total_weight,
            "has_weight_ciphertext": self.weight_vector is not None,
            "noised": self.noised,
            "contributions": [h.to_dict() for h in self.contributions],
        }
        blobs = [v.serialize() for v in self.vectors]
        if self.weight_vector is not None:
            blobs.append(self.weight_vector.serialize())
        return _frame(KIND_AGGREGATE, header, blobs)

    @classmethod
    def from_bytes(cls, data: bytes, ctx: EncryptionContext) -> AggregateCiphertext:
        """Parse and load against ``ctx`` (client or server); the fingerprint must match ``ctx``."""
        what = "encrypted aggregate"
        header, blobs = _unframe(data, KIND_AGGREGATE)
        fp = _field(header, "fingerprint", (str,), what)
        if fp != ctx.fingerprint:
            raise CiphertextError(f"{what}: fingerprint {fp!r} differs from this context's {ctx.fingerprint!r}.")
        contributors = _field(header, "contributors", (list,), what)
        tw = _field(header, "total_weight", (float, int), what, nullable=True)
        has_w = _field(header, "has_weight_ciphertext", (bool,), what)
        wvec = None
        if has_w:
            if not blobs:
                raise CiphertextError(f"{what}: header announces a weight ciphertext but the frame holds none.")
            wvec = load_vector(ctx, blobs.pop(), f"{what}: weight ciphertext")
        vectors = [load_vector(ctx, b, f"{what}: ciphertext {i}") for i, b in enumerate(blobs)]
        signed = header.get("contributions", [])
        if not isinstance(signed, list):
            raise CiphertextError(f"{what}: field 'contributions' is not a list.")
        return cls(
            fp,
            _field(header, "round_id", (int,), what),
            _field(header, "stage", (str,), what),
            _field(header, "num_values", (int,), what),
            _field(header, "layout_hash", (str,), what),
            _field(header, "codec", (str,), what),
            tuple(str(c) for c in contributors),
            None if tw is None else float(tw),
            vectors,
            wvec,
            bool(header.get("noised", False)),
            tuple(SignedHeader.from_dict(h, what) for h in signed),
        )


class AggregationResult(NamedTuple):
    """``(aggregate, accepted, rejected)``; ``aggregate`` is ``None`` when nothing was accepted."""

    aggregate: AggregateCiphertext | None
    accepted: list[str]
    rejected: dict[str, str]


def aggregate_encrypted(
    server_ctx: EncryptionContext,
    updates: Mapping[str, EncryptedUpdate | bytes],
    *,
    round_id: int,
    num_values: int,
    stage: str | None = None,
    layout_hash: str | None = None,
    packing: QuantizedPacking | None = None,
    encrypted_weight: bool = False,
    fixed_point_bits: int | None = None,
    weight_slot: bool = False,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    nonces: Mapping[str, str] | None = None,
    replay: ReplayGuard | None = None,
) -> AggregationResult:
    """Sum the valid contributions; drop each malformed one with its reason, never the round.

    Parameters
    ----------
    server_ctx
        The server's key-less context (a client context works too, but is not needed).
    updates
        Sender -> :class:`EncryptedUpdate` or its bytes.  The sender is the site the *transport*
        authenticated (a Flower node mapped to its site), never the name inside the update.
    round_id
        The current round (earlier round ids are rejected as replays).
    num_values
        Model size.
    stage, layout_hash
        Checked when given.
    packing
        The run's packing (``None``: exact encoding).  At most ``packing.max_clients``
        contributions are summed; surplus ones are rejected with that reason.
    encrypted_weight
        Whether weights travel encrypted (in a separate vector).
    fixed_point_bits
        The run's fixed-point grid (exact mode), part of the expected codec.
    weight_slot
        Weights travel inside every vector (codec ``/ws``) as well as in the signed header.
    public_keys
        The sites' Ed25519 public keys (``manifest.json``).  When given, every contribution must be
        signed by its sender's key over its header, the ciphertext digest and ``nonces[sender]``.
    nonces
        The nonce the server issued to each sender for this round and stage (required with
        ``public_keys``; a sender without one is refused).
    replay
        Ciphertext digests accepted earlier in the run; a repeat is refused, and the digests of
        this round's accepted contributions are added to it.  Two senders submitting the same
        ciphertext in one round are both refused (which of them made it cannot be told).

    Returns
    -------
    AggregationResult
        The aggregate (``None`` if nothing was accepted), accepted ids in summation order (sorted),
        and ``{id: reason}`` for every rejected contribution.
    """
    expected_codec = codec_id(server_ctx.params, packing, fixed_point_bits, weight_slot)
    accepted: list[str] = []
    rejected: dict[str, str] = {}
    sums: list[ts.CKKSVector] | None = None
    wsum: ts.CKKSVector | None = None
    total_weight = 0.0
    signed: list[SignedHeader] = []
    digests: list[str] = []
    parsed: dict[str, EncryptedUpdate] = {}
    for sender in sorted(updates, key=str):
        item = updates[sender]
        try:
            parsed[str(sender)] = item if isinstance(item, EncryptedUpdate) else EncryptedUpdate.from_bytes(item)
        except CiphertextError as e:
            rejected[str(sender)] = str(e)
            log.warning("Round %d: dropped contribution from %r: %s", round_id, sender, e)
    valid: dict[str, tuple[EncryptedUpdate, list[ts.CKKSVector], ts.CKKSVector | None]] = {}
    for sender, upd in parsed.items():
        try:
            if upd.client_id and upd.client_id != sender:
                raise CiphertextError(f"Update claims client id {upd.client_id!r} but arrived from {sender!r}.")
            if public_keys is not None and (nonces is None or sender not in nonces):
                raise CiphertextError(f"Update from {sender!r}: the server issued no nonce to this sender.")
            vectors, wvec = validate(
                upd,
                server_ctx,
                expected_round=round_id,
                expected_num_values=num_values,
                expected_stage=stage,
                expected_layout_hash=layout_hash,
                packing=packing,
                expected_codec=expected_codec,
                encrypted_weight=encrypted_weight,
                weight_slot=weight_slot,
                fixed_point_bits=fixed_point_bits,
                public_keys=public_keys,
                sender=sender,
                expected_nonce=None if nonces is None else nonces.get(sender),
                replay=replay,
            )
        except CiphertextError as e:
            rejected[sender] = str(e)
            log.warning("Round %d: dropped contribution from %r: %s", round_id, sender, e)
            continue
        valid[sender] = (upd, vectors, wvec)
    # A ciphertext that two senders submitted, each validly (e.g. one re-signed a copy of the other's):
    # which of them made it cannot be told, so no copy is summed.
    by_digest: dict[str, list[str]] = {}
    for sender, (upd, _, _) in valid.items():
        by_digest.setdefault(upd.digest(), []).append(sender)
    for sender, (upd, vectors, wvec) in valid.items():
        try:
            twins = by_digest[upd.digest()]
            if len(twins) > 1:
                raise CiphertextError(
                    f"Update from {sender!r} carries the same ciphertext as {sorted(set(twins) - {sender})}; "
                    "which of them made it cannot be told, so every copy is refused."
                )
            if packing is not None and len(accepted) >= packing.max_clients:
                raise CiphertextError(
                    f"Packing capacity reached: at most max_clients={packing.max_clients} contributions can be summed."
                )
            # Add into new objects so that a failing addition (e.g. scale or level mismatch) leaves the
            # running sum untouched.
            new_sums = vectors if sums is None else [a + v for a, v in zip(sums, vectors, strict=True)]
            new_w = wvec if wsum is None or wvec is None else wsum + wvec
        except CiphertextError as e:
            rejected[sender] = str(e)
            log.warning("Round %d: dropped contribution from %r: %s", round_id, sender, e)
            continue
        except Exception as e:  # TenSEAL raises ValueError/RuntimeError on incompatible ciphertexts
            rejected[sender] = f"Update from {sender!r} could not be added: {type(e).__name__}: {e}."
            log.warning("Round %d: dropped contribution from %r: %s", round_id, sender, rejected[sender])
            continue
        sums, wsum = new_sums, new_w
        accepted.append(sender)
        digests.append(upd.digest())
        if public_keys is not None:
            signed.append(upd.signed_header())
        if upd.weight is not None:
            total_weight += upd.weight
    if replay is not None:
        replay.add(digests)
    if sums is None:
        log.warning("Round %d: no valid contribution (%d rejected).", round_id, len(rejected))
        return AggregationResult(None, accepted, rejected)
    log.info("Round %d: summed %d contributions, rejected %d.", round_id, len(accepted), len(rejected))
    aggregate = AggregateCiphertext(
        fingerprint=server_ctx.fingerprint,
        round_id=round_id,
        stage=stage or "update",
        num_values=num_values,
        layout_hash=layout_hash or "",
        codec=expected_codec,
        contributors=tuple(accepted),
        total_weight=None if encrypted_weight else total_weight,
        vectors=sums,
        weight_vector=wsum,
        contributions=tuple(signed),
    )
    return AggregationResult(aggregate, accepted, rejected)


def add_plaintext_noise(aggregate: AggregateCiphertext, noise_vector: np.ndarray) -> AggregateCiphertext:
    """Add a plaintext vector (e.g. server-side Gaussian noise) to an exact-mode aggregate.

    Ciphertext + plaintext: only encoding is needed, no key.  The noise is added to the *weighted
    sum*; the decrypted mean therefore carries ``noise_vector / total_weight``.

    Raises
    ------
    ValueError
        Wrong length or non-finite noise.
    CiphertextError
        For a packed aggregate (real-valued noise cannot be added to packed integer digits).
    """
    if aggregate.codec.startswith("packed/"):
        raise CiphertextError(
            "Plaintext noise cannot be added to a packed aggregate; use exact encoding (packing=None) "
            "when the server adds noise."
        )
    noise = np.asarray(noise_vector, dtype=np.float64).reshape(-1)
    if noise.size != aggregate.num_values:
        raise ValueError(f"Noise vector has {noise.size} values; the aggregate has {aggregate.num_values}.")
    if not np.all(np.isfinite(noise)):
        raise ValueError("Noise vector contains NaN or infinite values.")
    f = _fixed_point_bits(aggregate.codec)
    if f is not None:  # keep the sum on the grid: noise rounded to 2**-f (post-processing of the Gaussian)
        noise = np.ldexp(np.rint(np.ldexp(noise, f)), -f)
    slots = aggregate.vectors[0].size()
    per = slots - int(_has_weight_slot(aggregate.codec))  # the weight slot gets no noise
    padded = np.zeros((len(aggregate.vectors), slots))
    body = np.zeros(len(aggregate.vectors) * per)
    body[: noise.size] = noise
    padded[:, :per] = body.reshape(-1, per)
    new_vectors = [v + chunk.tolist() for v, chunk in zip(aggregate.vectors, padded, strict=True)]
    return replace(aggregate, vectors=new_vectors, noised=True)


def decrypt_aggregate(
    client_ctx: EncryptionContext,
    aggregate: AggregateCiphertext,
    total_weight: float | None = None,
    *,
    packing: QuantizedPacking | None = None,
    fixed_point_bits: int | None = None,
) -> np.ndarray:
    """Decrypt the weighted sum and divide by the total weight.

    Parameters
    ----------
    client_ctx
        A context holding the secret key.
    aggregate
        The encrypted aggregate.
    total_weight
        Divide by this; default: the aggregate's clear total weight, or the decrypted encrypted one.
    packing
        The packing the updates used (must match the aggregate's codec).
    fixed_point_bits
        The fixed-point grid the updates used (must match the aggregate's codec); the decrypted
        sums are rounded to it, which makes the result an exact function of the plaintexts.

    Returns
    -------
    numpy.ndarray
        The weighted mean, length ``aggregate.num_values``.
    """
    if not client_ctx.can_decrypt:
        raise KeyMaterialError("This context holds no secret key and cannot decrypt.")
    if aggregate.fingerprint != client_ctx.fingerprint:
        raise CiphertextError(
            f"Aggregate fingerprint {aggregate.fingerprint!r} differs from this context's {client_ctx.fingerprint!r}."
        )
    ws = _has_weight_slot(aggregate.codec)
    expected = codec_id(client_ctx.params, packing, fixed_point_bits, ws)
    if aggregate.codec != expected:
        raise CiphertextError(f"Aggregate codec {aggregate.codec!r} differs from the given packing's {expected!r}.")
    n_vec = num_vectors(aggregate.num_values, client_ctx.slots, packing, ws)
    if len(aggregate.vectors) != n_vec:
        raise CiphertextError(f"Aggregate holds {len(aggregate.vectors)} vectors; expected {n_vec}.")
    sk = client_ctx.context.secret_key()
    if total_weight is None:
        if aggregate.total_weight is not None:
            total_weight = aggregate.total_weight
        elif aggregate.weight_vector is not None:
            total_weight = float(aggregate.weight_vector.decrypt(sk)[0])
        else:
            raise ValueError("The aggregate records no total weight; pass total_weight.")
    sums = np.concatenate([np.asarray(v.decrypt(sk), dtype=np.float64) for v in aggregate.vectors])
    if ws:
        sums, _ = split_weight_slots(sums, client_ctx.slots)
    return decode_sums(sums, aggregate.num_values, float(total_weight), packing, fixed_point_bits)


def check_and_decrypt(
    client_ctx: EncryptionContext,
    aggregate: AggregateCiphertext,
    public_keys: Mapping[str, Ed25519PublicKey],
    *,
    min_contributors: int,
    fixed_point_bits: int | None = None,
    packing: QuantizedPacking | None = None,
    value_bound: float | None = None,
    plain_sum: bool = False,
) -> np.ndarray:
    """A client's checks on an aggregate before it uses it, then the decrypted (weighted mean or sum).

    Checks, in order (any failure raises :class:`CiphertextError` with the reason):

    1. the aggregate carries one signed header per contributor, each by a distinct site of the
       manifest, each signature valid, each header naming this aggregate's run, round, stage,
       layout, codec and size; at least ``min_contributors`` of them;
    2. the clear total weight equals the sum of the signed weights;
    3. after decryption, every slot lies within :data:`MAX_GRID_RESIDUAL` of its grid (the
       fixed-point grid ``2**-f``, or the integers for the packed codec): a ciphertext under another
       key or an overflow of the modulus does not;
    4. the weight slot of every vector equals the sum of the signed weights (a contribution whose
       encrypted weight differs from its signed weight, or a vector multiplied by a plaintext, fails);
    5. magnitude: every weighted sum is below the exact-mode capacity and, with ``value_bound``,
       below ``value_bound`` times the total weight (the public clip every honest site applies).

    Parameters
    ----------
    client_ctx
        A context holding the secret key.
    aggregate
        The aggregate as received (codec with a weight slot: ``/ws``).
    public_keys
        The sites' public signing keys from the manifest.
    min_contributors
        Fewest contributions an aggregate may hold.
    fixed_point_bits, packing
        The run's encoding.
    value_bound
        Public bound on the absolute value of each (unweighted) value.
    plain_sum
        Return the decrypted sum instead of the weighted mean (anchors: a plain sum of weight-1
        contributions plus the server's noise).

    Returns
    -------
    numpy.ndarray
        The weighted mean (or the sum with ``plain_sum``), length ``aggregate.num_values``.
    """
    what = f"aggregate of round {aggregate.round_id} ({aggregate.stage})"
    if not client_ctx.can_decrypt:
        raise KeyMaterialError("This context holds no secret key and cannot decrypt.")
    if not _has_weight_slot(aggregate.codec):
        raise CiphertextError(f"{what}: codec {aggregate.codec!r} carries no weight slot; refused.")
    heads = aggregate.contributions
    sites = [h.site for h in heads]
    if len(set(sites)) != len(sites):
        raise CiphertextError(f"{what}: a site appears twice among the contributors {sites}.")
    if list(aggregate.contributors) != sites:
        raise CiphertextError(f"{what}: contributors {list(aggregate.contributors)} differ from the signed {sites}.")
    if len(heads) < min_contributors:
        raise CiphertextError(
            f"{what}: {len(heads)} signed contribution(s), fewer than min_contributors = {min_contributors}."
        )
    for h in heads:
        verify_statement(h, public_keys, h.site)
        got = (h.fingerprint, h.round_id, h.stage, h.num_values, h.layout_hash, h.codec)
        want = (
            aggregate.fingerprint,
            aggregate.round_id,
            aggregate.stage,
            aggregate.num_values,
            aggregate.layout_hash,
            aggregate.codec,
        )
        if got != want:
            raise CiphertextError(f"{what}: the signed header of {h.site!r} is for another aggregate ({got}).")
    signed_total = float(sum(h.weight for h in heads))
    if aggregate.total_weight is None or aggregate.total_weight != signed_total:
        raise CiphertextError(
            f"{what}: clear total weight {aggregate.total_weight!r} differs from the signed weights' sum "
            f"{signed_total!r}."
        )
    ws_bits = PACKED_WEIGHT_BITS if packing is not None else fixed_point_bits
    if ws_bits is None:
        raise ValueError("check_and_decrypt needs a fixed-point grid or a packing (exact decryption).")
    expected = codec_id(client_ctx.params, packing, fixed_point_bits, True)
    if aggregate.codec != expected:
        raise CiphertextError(f"{what}: codec {aggregate.codec!r} differs from this run's {expected!r}.")
    n_vec = num_vectors(aggregate.num_values, client_ctx.slots, packing, True)
    if len(aggregate.vectors) != n_vec:
        raise CiphertextError(f"{what}: holds {len(aggregate.vectors)} vectors; expected {n_vec}.")
    sk = client_ctx.context.secret_key()
    raw = np.concatenate([np.asarray(v.decrypt(sk), dtype=np.float64) for v in aggregate.vectors])
    data, wslots = split_weight_slots(raw, client_ctx.slots)
    data_bits = 0 if packing is not None else int(fixed_point_bits)  # type: ignore[arg-type]
    residual = max(grid_residual(data, data_bits), grid_residual(wslots, 0 if packing is not None else data_bits))
    if residual > MAX_GRID_RESIDUAL:
        raise CiphertextError(
            f"{what}: decrypted values lie {residual:.3f} of a grid step off their grid (an honest sum stays "
            f"within {MAX_GRID_RESIDUAL}): a ciphertext under another key, an overflow of the modulus or tampering."
        )
    if packing is not None:
        w_units = np.rint(wslots)
        want_units = float(sum(round(h.weight * 2**PACKED_WEIGHT_BITS) for h in heads))
    else:
        w_units = np.rint(np.ldexp(wslots, data_bits))
        want_units = float(sum(round(math.ldexp(h.weight, data_bits)) for h in heads))
    if not np.all(w_units == want_units):
        bad = float(w_units[np.argmax(w_units != want_units)])
        raise CiphertextError(
            f"{what}: the decrypted total weight ({bad} grid units) differs from the sum of the signed weights "
            f"({want_units}): a contribution encrypted another weight than it signed, or a vector was scaled."
        )
    if packing is None:
        sums = np.ldexp(np.rint(np.ldexp(data[: aggregate.num_values], data_bits)), -data_bits)
        peak = float(np.max(np.abs(sums))) if sums.size else 0.0
        limit = exact_capacity(client_ctx.params)
        if value_bound is not None:
            limit = min(limit, float(value_bound) * signed_total * (1 + 1e-9) + len(heads) * 2.0**-data_bits)
        if peak > limit:
            raise CiphertextError(
                f"{what}: a decrypted weighted sum has magnitude {peak:.4g}, above the bound {limit:.4g} "
                "(public clip times total weight): not a sum of clipped contributions."
            )
    else:  # each honest digit is round(w_k * u) <= w_k * L + 1/2: the digit sums are bounded by the signed weights
        digit_sums = packed_digit_sums(data, aggregate.num_values, packing)
        limit = signed_total * packing.levels + 0.5 * len(heads)
        peak = int(np.max(digit_sums)) if digit_sums.size else 0
        if peak > limit:
            raise CiphertextError(
                f"{what}: a decoded digit sum is {peak}, above {limit:.1f} (the signed weights times "
                f"{packing.levels} levels): not a sum of contributions clipped to the packing's bound."
            )
    if plain_sum:
        return decode_sums(data, aggregate.num_values, 1.0, packing, fixed_point_bits)
    return decode_sums(data, aggregate.num_values, signed_total, packing, fixed_point_bits)


def _has_weight_slot(codec: str) -> bool:
    return codec.endswith("/ws")


def _fixed_point_bits(codec: str) -> int | None:
    for part in codec.split("/"):
        if part.startswith("f") and part[1:].isdigit():
            return int(part[1:])
    return None


def flooding_sigma(error_l2: float, statistical_security_bits: int = 40, num_releases: int = 1) -> float:
    """Gaussian flooding std that hides a decryption error of L2 norm ``error_l2``.

    ``sigma = num_releases * error_l2 * 2**(kappa - 1)``, so that the statistical distance between
    the flooded release and a release without the CKKS error is at most ``2**-kappa`` in total
    (Pinsker: ``SD <= ||e||_2 / (2 sigma)`` per release, union over releases).  For exact-mode
    aggregates bound ``error_l2`` by ``sqrt(num_values) * exact_error_bound(...)``.
    """
    if not (math.isfinite(error_l2) and error_l2 >= 0):
        raise ValueError(f"error_l2 must be a finite number >= 0. Found {error_l2!r}.")
    if statistical_security_bits < 1 or num_releases < 1:
        raise ValueError("statistical_security_bits and num_releases must be >= 1.")
    return num_releases * error_l2 * 2.0 ** (statistical_security_bits - 1)


def noise_flood_for_export(values: np.ndarray, sigma_flood: float, generator: np.random.Generator) -> np.ndarray:
    """Add i.i.d. Gaussian noise before a decrypted value leaves the key holders (IND-CPA-D).

    See the module docstring for why and :func:`flooding_sigma` for choosing ``sigma_flood``.
    Randomness is explicit: pass a generator (for deployment, seed it from ``secrets``).

    Returns
    -------
    numpy.ndarray
        ``values + N(0, sigma_flood**2)`` (a new array, same shape, float64).
    """
    if not (math.isfinite(sigma_flood) and sigma_flood > 0):
        raise ValueError(f"sigma_flood must be a finite number > 0. Found {sigma_flood!r}.")
    if not isinstance(generator, np.random.Generator):
        raise TypeError("generator must be a numpy.random.Generator (explicit randomness).")
    vals = np.asarray(values, dtype=np.float64)
    return vals + generator.normal(0.0, sigma_flood, size=vals.shape)
