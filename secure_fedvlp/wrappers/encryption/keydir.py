"""Checking a key directory before a run starts, without reading any secret key.

The process that runs the ServerApp may check the key directory (in simulation the CLI does, before
the apps start) but must never hold a secret key, so only the *headers* of the key files are read
(:func:`read_key_header`: magic, length and the JSON header that names the role, the run's context
id, the parameters and the fingerprint); the TenSEAL bodies stay on disk.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from secure_fedvlp.encryption.keys import _MAGIC, MANIFEST_NAME
from secure_fedvlp.encryption.params import CKKSParams
from secure_fedvlp.errors import ConfigError, KeyMaterialError
from secure_fedvlp.wrappers.encryption.settings import EncryptionSettings

__all__ = ["check_key_dir", "read_key_header"]

#: CKKS parameters that must match the run's preset (the thread count may differ).
_PARAM_KEYS = ("poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits", "symmetric")


def read_key_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a key or context file, read without reading its body."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(len(_MAGIC) + 4)
            if len(head) < len(_MAGIC) + 4 or head[: len(_MAGIC)] != _MAGIC:
                raise KeyMaterialError(f"{p} is not a secure_fedvlp key/context file (bad magic or too short).")
            (hlen,) = struct.unpack(">I", head[len(_MAGIC) :])
            raw = fh.read(hlen)
    except OSError as exc:
        raise KeyMaterialError(f"cannot read key material {p}: {exc.strerror}.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyMaterialError(f"{p} has a corrupt header: {exc}.") from None
    if not isinstance(header, dict):
        raise KeyMaterialError(f"{p} has a corrupt header (not a JSON object).")
    return header


def _params_of(header: dict[str, Any]) -> dict[str, Any] | None:
    try:
        d = CKKSParams.from_dict(header["params"]).to_dict()
    except (KeyError, TypeError, ConfigError, ValueError):
        return None
    return {k: d.get(k) for k in _PARAM_KEYS}


def check_key_dir(settings: EncryptionSettings, sites: Iterable[str]) -> dict[str, Any]:
    """Refuse a key directory that cannot serve this run, naming every problem at once.

    Checked: the directory is accessible by its owner only (0700); ``manifest.json`` and the server
    context exist; the server file's role is ``server`` and each site's ``client-<site>.key`` has role
    ``client`` and mode 0600; every file carries the manifest's fingerprint and context id; the
    parameters are the configured preset's.  Returns the manifest.
    """
    sites = list(sites)
    kdir = settings.key_dir
    if not kdir.is_dir():
        raise KeyMaterialError(f"encryption.key_dir {str(kdir)!r} is not a directory.")
    problems: list[str] = []
    mode = stat.S_IMODE(kdir.stat().st_mode)
    if mode & 0o077:
        problems.append(f"{kdir} has mode {mode:04o}; a key directory must be private to its owner (0700)")
    man_path = kdir / MANIFEST_NAME
    try:
        manifest = json.loads(man_path.read_text("utf-8"))
        fingerprint, context_id = str(manifest["fingerprint"]), str(manifest["context_id"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise KeyMaterialError(f"{man_path} is missing or not a key manifest ({exc}).") from None
    want = {k: v for k, v in settings.params.to_dict().items() if k in _PARAM_KEYS}
    files = [(settings.server_context, "server")] + [(settings.client_key(s), "client") for s in sites]
    for path, role in files:
        if not path.exists():
            problems.append(f"{path} is missing")
            continue
        if role == "client":
            fmode = stat.S_IMODE(path.stat().st_mode)
            if fmode & 0o077:
                problems.append(f"{path} has mode {fmode:04o}; a secret-key file must be 0600")
        try:
            header = read_key_header(path)
        except KeyMaterialError as exc:
            problems.append(str(exc).rstrip("."))
            continue
        if header.get("role") != role:
            problems.append(f"{path} is a {header.get('role')!r} file, expected a {role} file")
        if header.get("fingerprint") != fingerprint or header.get("context_id") != context_id:
            problems.append(
                f"{path} belongs to another key set (fingerprint {header.get('fingerprint')}, "
                f"the manifest says {fingerprint})"
            )
        got = _params_of(header)
        if got != want:
            problems.append(f"{path} holds CKKS parameters {got}, not those of preset {settings.preset!r} {want}")
    if problems:
        hint = (
            f"; create a fresh key set with `secure-fedvlp keys init --out {kdir} --clients "
            f"{','.join(sites)} --preset {settings.preset} --overwrite`"
        )
        raise KeyMaterialError(f"key directory {kdir} refused: " + "; ".join(problems) + hint + ".")
    return manifest
