"""Signed contributions: who made a ciphertext, for which round, stage, weight and server nonce.

CKKS ciphertexts are malleable and the CKKS secret key is shared by every site, so a ciphertext on
its own says nothing about its sender: any key holder (and, for additions and multiplications by
plaintexts, anyone with the key-less server context) can make or alter one.  What this module adds
is the *sender* binding.  The key authority (:func:`~secure_fedvlp.encryption.init_keys`) gives
each site its own Ed25519 signing key and lists the public keys in ``manifest.json``.  A site signs

    ``"secure_fedvlp/ckks-contribution/v1" | 0x00 | canonical JSON of
    {fingerprint, round, stage, site, num_values, layout_hash, codec, weight, digest, nonce}``

where ``digest`` is the sha256 of the ciphertext bytes (:func:`ciphertext_digest`) and ``nonce`` is
a fresh random value the server chose for this site, round and stage (:func:`new_nonce`).  The
server (:func:`verify_contribution`) checks the signature under the public key of the site the
transport delivered the reply from, checks the nonce is the one it issued, and refuses a
ciphertext digest it has already seen in the run (:class:`ReplayGuard`).  The aggregate carries
each summed contribution's signed header (:class:`SignedHeader`), so that every site can check
the signatures itself and compare the sum of the signed weights with the weight decrypted from the
aggregate (:func:`~secure_fedvlp.encryption.aggregate.check_aggregate`).

What a signature does **not** do: it does not stop the site that holds a signing key from signing
a harmful ciphertext (poisoning, a ciphertext under another CKKS key, an overflow: those are caught,
if at all, by the checks after decryption), and it does not change who can *decrypt*: every holder
of the shared CKKS secret key can decrypt every upload it sees.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secure_fedvlp.errors import CiphertextError

__all__ = [
    "SIGNATURE_DOMAIN",
    "ReplayGuard",
    "SignedHeader",
    "ciphertext_digest",
    "new_nonce",
    "sign_statement",
    "statement",
    "verify_statement",
]

SIGNATURE_DOMAIN = b"secure_fedvlp/ckks-contribution/v1"


def new_nonce() -> str:
    """A fresh 128-bit nonce (hex) from the OS CSPRNG; the server issues one per site, round and stage."""
    return secrets.token_hex(16)


def ciphertext_digest(blobs: Sequence[bytes]) -> str:
    """sha256 (hex) over the ciphertexts, each prefixed with its length (so boundaries are bound too)."""
    h = hashlib.sha256()
    h.update(len(blobs).to_bytes(4, "big"))
    for b in blobs:
        h.update(len(b).to_bytes(8, "big"))
        h.update(bytes(b))
    return h.hexdigest()


@dataclass(frozen=True)
class SignedHeader:
    """The part of a contribution a site signs (and that the aggregate carries for every contributor)."""

    fingerprint: str
    round_id: int
    stage: str
    site: str
    num_values: int
    layout_hash: str
    codec: str
    weight: float
    digest: str
    nonce: str
    signature: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (round-trips through :meth:`from_dict`)."""
        return {
            "fingerprint": self.fingerprint,
            "round_id": int(self.round_id),
            "stage": self.stage,
            "site": self.site,
            "num_values": int(self.num_values),
            "layout_hash": self.layout_hash,
            "codec": self.codec,
            "weight": float(self.weight),
            "digest": self.digest,
            "nonce": self.nonce,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], what: str) -> SignedHeader:
        """Parse; :class:`CiphertextError` naming the field on a malformed entry."""
        types = {
            "fingerprint": str,
            "round_id": int,
            "stage": str,
            "site": str,
            "num_values": int,
            "layout_hash": str,
            "codec": str,
            "weight": (int, float),
            "digest": str,
            "nonce": str,
            "signature": str,
        }
        if not isinstance(data, Mapping):
            raise CiphertextError(f"{what}: a signed header is not a JSON object.")
        for name, t in types.items():
            v = data.get(name)
            if v is None or isinstance(v, bool) or not isinstance(v, t):
                raise CiphertextError(f"{what}: signed header field {name!r} is missing or malformed ({v!r}).")
        return cls(**{k: (float(data[k]) if k == "weight" else data[k]) for k in types})


def statement(h: SignedHeader) -> bytes:
    """The exact bytes a site signs for ``h`` (every field but the signature)."""
    if not (isinstance(h.weight, float) and math.isfinite(h.weight)):
        raise CiphertextError(f"weight {h.weight!r} is not a finite number; nothing to sign.")
    body = {k: v for k, v in h.to_dict().items() if k != "signature"}
    body["weight"] = float(h.weight).hex()  # exact, no decimal rounding
    return SIGNATURE_DOMAIN + b"\0" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_statement(h: SignedHeader, key: Ed25519PrivateKey) -> SignedHeader:
    """``h`` with its Ed25519 signature (hex) filled in."""
    from dataclasses import replace

    return replace(h, signature=key.sign(statement(h)).hex())


def verify_statement(h: SignedHeader, public_keys: Mapping[str, Ed25519PublicKey], site: str) -> None:
    """Check that ``h`` names ``site`` and carries a valid signature by ``site``'s key.

    Raises
    ------
    CiphertextError
        The header names another site, ``site`` has no key in the manifest, or the signature does
        not verify (made with another key, or over other header values).
    """
    if h.site != site:
        raise CiphertextError(f"the signed header names site {h.site!r}, but it came from {site!r}")
    key = public_keys.get(site)
    if key is None:
        raise CiphertextError(f"site {site!r} has no signing public key in the run's manifest")
    try:
        sig = bytes.fromhex(h.signature)
    except ValueError:
        sig = b""
    if len(sig) != 64:
        raise CiphertextError(f"the contribution of {site!r} carries no well-formed Ed25519 signature")
    try:
        key.verify(sig, statement(h))
    except InvalidSignature:
        raise CiphertextError(
            f"the signature does not verify under {site!r}'s key for this header (round, stage, site, weight, "
            "layout, codec, nonce or ciphertext digest differ from what that site signed)"
        ) from None


class ReplayGuard:
    """The ciphertext digests a server has accepted in the run: a digest seen before is a replay."""

    def __init__(self, seen: Iterable[str] = ()) -> None:
        self.seen: set[str] = set(seen)

    def check(self, digest: str) -> None:
        """Raise :class:`CiphertextError` if ``digest`` was accepted before."""
        if digest in self.seen:
            raise CiphertextError(f"ciphertext digest {digest[:16]}... was already received in this run (replay)")

    def add(self, digests: Iterable[str]) -> None:
        """Record accepted digests."""
        self.seen.update(digests)
