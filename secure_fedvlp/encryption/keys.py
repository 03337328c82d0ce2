"""CKKS key material: one fresh context per federation run, split by party.

``init_keys`` is the key authority's setup step.  It writes

* one file per client (``client-<id>.key``), created with ``os.open(..., 0o600)``, holding the full
  TenSEAL context *with* the secret key (and, for public-key mode, the public key);
* one server file (``server.ctx``) holding ``serialize(save_secret_key=False,
  save_galois_keys=False, save_relin_keys=False)``: sums need neither Galois nor relinearisation
  keys, so they are dropped (for the symmetric presets the server file then holds only the
  parameters, a few dozen bytes);
* ``manifest.json``: run id, parameters, fingerprint, file names and each site's Ed25519
  *signing public key* (``signing_public_keys``).  Not secret, but it is the trust anchor for
  signatures: every party must read it from the key authority, not from the server.

Each client file also names its site (header) and holds that site's own Ed25519 *signing key*
(the last 32 bytes of its sha256-checked body, never in the header, which key-directory checks
read; the file is mode 0600).  The CKKS secret key is shared by every site; the signing keys are
not: a signature shows which site made a contribution (:mod:`secure_fedvlp.encryption.auth`).

Every file is a small container: ``MAGIC | u32 header length | JSON header | TenSEAL bytes``; the
header names the role, the run's ``context_id`` (a random 128-bit nonce), the parameters, the
fingerprint and the sha256 of the body, so a truncated or mixed-up file is reported as such.

Fingerprint: ``sha256("secure_fedvlp/ckks-context/v1" | context_id | public serialisation)``, hex,
first 32 characters.  The nonce matters: with symmetric encryption the public serialisation holds
only the parameters, so two runs with equal parameters would otherwise share a fingerprint.  The
fingerprint is a *label* the server can check without keys (it catches updates made under another
run's context); it is not authentication.  Authentication is the signature each site puts on its
contribution (:mod:`secure_fedvlp.encryption.auth`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secure_fedvlp.encryption.params import CKKSParams
from secure_fedvlp.errors import ConfigError, KeyMaterialError

__all__ = [
    "EncryptionContext",
    "KeyBundle",
    "init_keys",
    "load_client_context",
    "load_server_context",
    "load_manifest",
    "load_signing_public_keys",
    "context_fingerprint",
    "make_context",
]

log = logging.getLogger(__name__)

_MAGIC = b"SFVLPCTX"
_SIGNING_KEY_BYTES = 32  # raw Ed25519 private key at the end of a client file's body
_FORMAT = 1
_FP_DOMAIN = b"secure_fedvlp/ckks-context/v1"
_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MANIFEST_NAME = "manifest.json"
SERVER_FILE = "server.ctx"


def _public_bytes(ctx: ts.Context, symmetric: bool) -> bytes:
    """Serialisation of the non-secret part of a context (what the server holds)."""
    return ctx.serialize(
        save_public_key=not symmetric, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def context_fingerprint(ctx: ts.Context | EncryptionContext, context_id: str | None = None) -> str:
    """Fingerprint of a context: stable across serialise/deserialise, equal for client and server.

    Parameters
    ----------
    ctx
        A :class:`EncryptionContext` (its ``context_id`` is used) or a bare ``tenseal.Context``
        together with ``context_id``.
    context_id
        The run nonce from the key files / manifest; required for a bare context.

    Returns
    -------
    str
        32 hex characters (128 bits of sha256).
    """
    if isinstance(ctx, EncryptionContext):
        context_id = ctx.context_id
        symmetric = ctx.params.symmetric
        tctx = ctx.context
    else:
        if context_id is None:
            raise KeyMaterialError("context_fingerprint of a bare tenseal.Context needs the run's context_id.")
        tctx = ctx
        symmetric = _is_symmetric(tctx)
    h = hashlib.sha256()
    h.update(_FP_DOMAIN + b"\0" + context_id.encode("ascii") + b"\0")
    h.update(_public_bytes(tctx, symmetric))
    return h.hexdigest()[:32]


def _is_symmetric(ctx: ts.Context) -> bool:
    try:
        ctx.has_public_key()
    except ValueError:  # TenSEAL: "has_public_key is not supported for symmetric encryption"
        return True
    return False


@dataclass(frozen=True)
class EncryptionContext:
    """A TenSEAL context together with the run identity it belongs to.

    Attributes
    ----------
    context
        The TenSEAL context (client: with secret key; server: without).
    context_id
        Random run nonce written by :func:`init_keys`.
    params
        The CKKS parameters.
    role
        ``"client"`` or ``"server"``.
    fingerprint
        :func:`context_fingerprint` of this context.
    """

    context: ts.Context = field(repr=False)
    context_id: str
    params: CKKSParams
    role: str
    fingerprint: str
    site: str | None = None
    signing_key: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)

    @property
    def slots(self) -> int:
        """Real slots per ciphertext."""
        return self.params.slots

    @property
    def can_decrypt(self) -> bool:
        """Whether this context holds a secret key."""
        return bool(self.context.has_secret_key())


@dataclass(frozen=True)
class KeyBundle:
    """Paths written by :func:`init_keys`."""

    out_dir: Path
    manifest_path: Path
    server_path: Path
    client_paths: dict[str, Path]
    fingerprint: str
    context_id: str


def make_context(params: CKKSParams) -> ts.Context:
    """Create a fresh TenSEAL CKKS context (with a new secret key) for ``params``."""
    enc = ts.ENCRYPTION_TYPE.SYMMETRIC if params.symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=enc,
        n_threads=params.n_threads,
    )
    ctx.global_scale = float(2**params.global_scale_bits)
    return ctx


def _frame(header: dict[str, Any], body: bytes) -> bytes:
    header = dict(header, body_sha256=hashlib.sha256(body).hexdigest(), body_len=len(body), format=_FORMAT)
    hb = json.dumps(header, sort_keys=True).encode("utf-8")
    return _MAGIC + struct.pack(">I", len(hb)) + hb + body


def _unframe(data: bytes, path: Path) -> tuple[dict[str, Any], bytes]:
    if len(data) < len(_MAGIC) + 4 or data[: len(_MAGIC)] != _MAGIC:
        raise KeyMaterialError(f"{path} is not a secure_fedvlp key/context file (bad magic or too short).")
    (hlen,) = struct.unpack(">I", data[len(_MAGIC) : len(_MAGIC) + 4])
    start = len(_MAGIC) + 4
    if start + hlen > len(data):
        raise KeyMaterialError(f"{path} is truncated: header claims {hlen} bytes, {len(data) - start} remain.")
    try:
        header = json.loads(data[start : start + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KeyMaterialError(f"{path} has a corrupt header: {e}.") from e
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise KeyMaterialError(f"{path} has an unsupported format {header.get('format')!r}; expected {_FORMAT}.")
    body = data[start + hlen :]
    if len(body) != header.get("body_len"):
        raise KeyMaterialError(
            f"{path} is truncated or padded: body has {len(body)} bytes, header says {header.get('body_len')}."
        )
    if hashlib.sha256(body).hexdigest() != header.get("body_sha256"):
        raise KeyMaterialError(f"{path} is corrupt: body sha256 does not match its header.")
    return header, body


def _write_private(path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically when overwriting."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    target = path
    if overwrite:
        target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError as e:
        raise KeyMaterialError(
            f"Refusing to overwrite existing key file {path}; pass overwrite=True to replace it."
        ) from e
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
    if overwrite:
        os.replace(target, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _check_client_ids(client_ids: Iterable[str]) -> list[str]:
    ids = list(client_ids)
    problems = []
    if not ids:
        problems.append("client_ids must not be empty.")
    bad = [c for c in ids if not isinstance(c, str) or not _CLIENT_ID_RE.match(c)]
    if bad:
        problems.append(f"Client ids must match {_CLIENT_ID_RE.pattern} (they become file names). Found {bad!r}.")
    dup = sorted({c for c in ids if ids.count(c) > 1}, key=str)
    if dup:
        problems.append(f"Client ids must be unique. Duplicates: {dup!r}.")
    if problems:
        raise ConfigError(problems, source="init_keys")
    return ids


def init_keys(
    out_dir: str | os.PathLike[str],
    client_ids: Iterable[str],
    params: CKKSParams,
    *,
    overwrite: bool = False,
) -> KeyBundle:
    """Create a fresh CKKS context for one federation run and write every party's file.

    Parameters
    ----------
    out_dir
        Directory to write into (created with mode 0700 if missing).
    client_ids
        Client identifiers; each becomes ``client-<id>.key``.
    params
        CKKS parameters.
    overwrite
        Replace existing files.  Without it, an existing client key, server file or manifest makes
        this refuse before anything is written.

    Returns
    -------
    KeyBundle
        The paths, fingerprint and run id.

    Raises
    ------
    KeyMaterialError
        If a file exists and ``overwrite`` is false.
    ConfigError
        For invalid client ids.
    """
    ids = _check_client_ids(client_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    client_paths = {cid: out / f"client-{cid}.key" for cid in ids}
    server_path = out / SERVER_FILE
    manifest_path = out / MANIFEST_NAME
    if not overwrite:
        existing = [p for p in [*client_paths.values(), server_path, manifest_path] if p.exists()]
        if existing:
            raise KeyMaterialError(
                f"Refusing to overwrite existing key material: {[str(p) for p in existing]}; "
                "pass overwrite=True to replace it (this starts a new run: old ciphertexts become undecryptable)."
            )

    ctx = make_context(params)
    context_id = secrets.token_hex(16)
    fingerprint = context_fingerprint(ctx, context_id)
    base = {"context_id": context_id, "params": params.to_dict(), "fingerprint": fingerprint}

    secret_body = ctx.serialize(
        save_public_key=not params.symmetric, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    signing_public: dict[str, str] = {}
    for cid, path in client_paths.items():
        sk = Ed25519PrivateKey.generate()  # one per site, from the OS CSPRNG
        signing_public[cid] = sk.public_key().public_bytes_raw().hex()
        # The signing key goes into the (hashed) body, after the TenSEAL bytes, never into the header: a
        # process that only checks a key directory reads headers, and must not learn a site's signing key.
        header = {**base, "role": "client", "site": cid, "signing_key_bytes": _SIGNING_KEY_BYTES}
        _write_private(path, _frame(header, secret_body + sk.private_bytes_raw()), overwrite)
    server_blob = _frame({**base, "role": "server"}, _public_bytes(ctx, params.symmetric))
    _write_public(server_path, server_blob)
    manifest = {
        **base,
        "format": _FORMAT,
        "security_bits": params.security_bits,
        "server_file": server_path.name,
        "client_files": {cid: p.name for cid, p in client_paths.items()},
        "signing_algorithm": "ed25519",
        "signing_public_keys": signing_public,
    }
    _write_public(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    log.info(
        "Created CKKS run context %s (fingerprint %s, N=%d, %d clients, %d-bit security).",
        context_id,
        fingerprint,
        params.poly_modulus_degree,
        len(ids),
        params.security_bits,
    )
    return KeyBundle(out, manifest_path, server_path, client_paths, fingerprint, context_id)


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``manifest.json`` (path to the file or to its directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        data = json.loads(p.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise KeyMaterialError(f"Cannot read key manifest {p}: {e}.") from e
    for k in ("context_id", "fingerprint", "params"):
        if k not in data:
            raise KeyMaterialError(f"Key manifest {p} lacks {k!r}.")
    return data


def load_signing_public_keys(path: str | os.PathLike[str], fingerprint: str) -> dict[str, Ed25519PublicKey]:
    """The sites' Ed25519 public keys from ``manifest.json``, for the run with ``fingerprint``.

    Raises
    ------
    KeyMaterialError
        The manifest belongs to another run (fingerprint), lists no signing keys (made before
        contributions were signed: run ``secure-fedvlp keys init`` again), or holds a malformed key.
    """
    manifest = load_manifest(path)
    where = Path(path) / MANIFEST_NAME if Path(path).is_dir() else Path(path)
    if manifest["fingerprint"] != fingerprint:
        raise KeyMaterialError(f"{where} is for context {manifest['fingerprint']!r}, not this run's {fingerprint!r}.")
    keys = manifest.get("signing_public_keys")
    if not isinstance(keys, dict) or not keys:
        raise KeyMaterialError(
            f"{where} lists no 'signing_public_keys'; create the run's keys again with `secure-fedvlp keys init`."
        )
    out: dict[str, Ed25519PublicKey] = {}
    for site, hexkey in keys.items():
        try:
            out[str(site)] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(hexkey)))
        except ValueError as e:
            raise KeyMaterialError(f"{where}: signing public key of site {site!r} is malformed: {e}.") from e
    return out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeyMaterialError(f"Cannot read key material {path}: {e}.") from e


def _wrap(
    header: dict[str, Any], ctx: ts.Context, role: str, path: Path, signing_raw: bytes | None = None
) -> EncryptionContext:
    try:
        params = CKKSParams.from_dict(header["params"])
        context_id = str(header["context_id"])
    except (KeyError, TypeError, ConfigError) as e:
        raise KeyMaterialError(f"{path} has invalid parameters in its header: {e}.") from e
    fp = context_fingerprint(ctx, context_id)
    if fp != header.get("fingerprint"):
        raise KeyMaterialError(
            f"{path}: recomputed fingerprint {fp} differs from the recorded {header.get('fingerprint')}."
        )
    signing_key = None
    if signing_raw is not None:
        try:
            signing_key = Ed25519PrivateKey.from_private_bytes(signing_raw)
        except ValueError as e:
            raise KeyMaterialError(f"{path}: its signing key is malformed: {e}.") from e
    site = header.get("site")
    return EncryptionContext(ctx, context_id, params, role, fp, None if site is None else str(site), signing_key)


def load_client_context(
    path: str | os.PathLike[str], *, n_threads: int | None = None, strict_permissions: bool = True
) -> EncryptionContext:
    """Load a client key file (context with secret key).

    Parameters
    ----------
    path
        The ``client-<id>.key`` file.
    n_threads
        Override the thread count stored in the parameters.
    strict_permissions
        Refuse (default) a key file readable or writable by group or others; with ``False`` only warn.

    Raises
    ------
    KeyMaterialError
        Wrong permissions (strict), not a client file, corrupt, or no secret key inside.
    """
    p = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(p).st_mode)
    except OSError as e:
        raise KeyMaterialError(f"Cannot stat client key file {p}: {e}.") from e
    if mode & 0o077:
        msg = f"Client key file {p} has mode {mode:04o}; it must not be accessible by group or others (0600)."
        if strict_permissions:
            raise KeyMaterialError(msg)
        warnings.warn(msg, stacklevel=2)
    header, body = _unframe(_read(p), p)
    if header.get("role") != "client":
        raise KeyMaterialError(f"{p} is a {header.get('role')!r} file, not a client key file.")
    signing_raw = None
    n_sk = header.get("signing_key_bytes")
    if n_sk is not None:
        if n_sk != _SIGNING_KEY_BYTES or len(body) <= n_sk:
            raise KeyMaterialError(f"{p}: its header announces a {n_sk!r}-byte signing key; expected 32.")
        body, signing_raw = body[:-n_sk], body[-n_sk:]
    threads = n_threads or int(header.get("params", {}).get("n_threads", 1) or 1)
    try:
        ctx = ts.context_from(body, threads)
    except Exception as e:  # TenSEAL raises ValueError/RuntimeError on malformed protobufs
        raise KeyMaterialError(f"{p} does not hold a valid TenSEAL context: {e}.") from e
    if not ctx.has_secret_key():
        raise KeyMaterialError(f"{p} holds no secret key; clients need one to decrypt.")
    return _wrap(header, ctx, "client", p, signing_raw)


def load_server_context(path: str | os.PathLike[str], *, n_threads: int | None = None) -> EncryptionContext:
    """Load the server's context and refuse it if it can decrypt.

    Raises
    ------
    KeyMaterialError
        If the file is a client key file, holds a secret key (``has_secret_key()`` or
        ``is_private()``), or is corrupt.
    """
    p = Path(path)
    header, body = _unframe(_read(p), p)
    if header.get("role") != "server":
        raise KeyMaterialError(
            f"{p} is a {header.get('role')!r} file; the server must only ever load the server context."
        )
    threads = n_threads or int(header.get("params", {}).get("n_threads", 1) or 1)
    try:
        ctx = ts.context_from(body, threads)
    except Exception as e:
        raise KeyMaterialError(f"{p} does not hold a valid TenSEAL context: {e}.") from e
    if ctx.has_secret_key() or ctx.is_private():
        raise KeyMaterialError(
            f"{p} contains a secret key; refusing to load it on the server (it could decrypt every update)."
        )
    return _wrap(header, ctx, "server", p)
