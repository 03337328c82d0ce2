"""The neighbouring relation every DP claim of the package is made under, and what keeps releases consistent with it.

**Relation.** Two datasets of a site are neighbours when one is the other with one record added or
removed (:data:`NEIGHBOURING_RELATION`).  Under that relation a site's exact record count is
itself private (it changes by one), so under DP nothing a site releases is computed from it:

* **declared sizes.** Each site has a declared public size, fixed by the configuration
  (``privacy.declared_sizes`` / ``privacy.declared_size``; for the synthetic source
  ``data.synthetic.train_per_site``) and never counted from the data.  The DP-SGD sample rate is
  ``batch_size / declared``, the noisy mean's normaliser is the expected batch ``q * declared``, and
  every count a site releases (``num-examples``, aggregation weights, the anchor reply's count, the
  denominator of a noised mean report) is a declared size.  The actual size stays in the site's log.
* **keyed selections.** Anything that splits a site's records (FedDRA's DRO slice) decides for each
  record alone, by a keyed hash of the record's stable id (:func:`keyed_fraction_mask`): adding or
  removing a record never moves another.  Under DP the key is a per-site secret kept in the site's
  own directory (:func:`load_or_create_site_key`) and never sent: without it nobody can tell which
  records a slice holds.  Runs without DP, and DP runs with ``privacy.seeded_randomness = true``
  (reproducible, and making no claim against whoever knows the seed), use :func:`seeded_site_key`,
  derived from ``run.seed`` and the site's name, so that they stay reproducible.

The relation is stated in every ledger's head file (:mod:`~secure_fedvlp.privacy.ledger`), the run
report and ``secure-fedvlp audit``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from secure_fedvlp.errors import KeyMaterialError

__all__ = [
    "NEIGHBOURING_RELATION",
    "SITE_KEY_BYTES",
    "load_or_create_site_key",
    "seeded_site_key",
    "keyed_unit",
    "keyed_fraction_mask",
]

#: The neighbouring relation of every DP claim, as stated in ledgers, reports and the audit.
NEIGHBOURING_RELATION = "add/remove-one record; released counts are declared public sizes"

#: Length of a site's secret selection key.
SITE_KEY_BYTES = 32


def load_or_create_site_key(path: str | os.PathLike[str]) -> bytes:
    """The site's secret selection key at ``path``, created (mode 0600) on first use.

    Creation is atomic (a temporary file hard-linked into place), so processes that start at once
    agree on one key.  A file of the wrong length is a :class:`~secure_fedvlp.errors.KeyMaterialError`.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(SITE_KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created the key first: then its key is the key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != SITE_KEY_BYTES:
        raise KeyMaterialError(f"site key {path} holds {len(key)} bytes; expected {SITE_KEY_BYTES}.")
    return key


def seeded_site_key(seed: int, site: str) -> bytes:
    """A reproducible selection key derived from ``run.seed`` and the site's name: public to whoever knows the seed."""
    return hashlib.sha256(f"secure_fedvlp/site-key/{int(seed)}/{site}".encode()).digest()


def keyed_unit(key: bytes, record_id: str, purpose: str) -> float:
    """``HMAC-SHA256(key, purpose \\0 record_id)`` mapped to ``[0, 1)`` (its first 8 bytes over ``2**64``)."""
    mac = hmac.new(key, purpose.encode("utf-8") + b"\x00" + str(record_id).encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big") / 2.0**64


def keyed_fraction_mask(key: bytes, record_ids: Iterable[str], fraction: float, purpose: str) -> np.ndarray:
    """Which records fall in a keyed ``fraction`` of a site's records: ``keyed_unit(key, id) < fraction``.

    Each record's membership depends on its own id and the key only, so adding or removing a record
    changes no other record's membership.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1]; found {fraction!r}.")
    if len(key) < 16:
        raise ValueError(f"a selection key needs at least 16 bytes; found {len(key)}.")
    return np.array([keyed_unit(key, rid, purpose) < fraction for rid in record_ids], dtype=bool)
