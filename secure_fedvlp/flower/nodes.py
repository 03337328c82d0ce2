"""Which authenticated node serves which site: the node binding of a deployment.

With the Deployment Engine, the SuperLink authenticates every SuperNode by its ECDSA key
(``flower-superlink --enable-supernode-auth``; each site's public key is registered with
``flwr supernode register``).  A site's *name*, however, is only what its node says at discovery.
The key authority therefore writes a node binding (:func:`write_node_binding`), a public JSON file
that maps the fingerprint of each site's node key to the site's name; the ServerApp reads it
(run config ``node-binding``) and, at discovery, refuses every node whose key is bound to no site
or to another site than the one it claims (:class:`NodeBinding`).  Duplicate claims are refused in
every run, simulation included (:func:`~secure_fedvlp.methods.strategy.refuse_duplicate_sites`).

Fingerprint: ``sha256`` of the key's DER ``SubjectPublicKeyInfo``, hex (the SuperLink hands the
ServerApp each node's key as PEM of that structure).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_fedvlp.errors import KeyMaterialError

logger = logging.getLogger(__name__)

__all__ = [
    "NODE_BINDING_FILE",
    "NodeBinding",
    "bind_sites",
    "load_node_binding",
    "node_key_fingerprint",
    "write_node_binding",
]

#: The node binding's file name in a key directory.
NODE_BINDING_FILE = "node_binding.json"
_FORMAT = 1


def node_key_fingerprint(key: ec.EllipticCurvePublicKey | bytes) -> str:
    """Fingerprint of a node's public key (an EC key, or the PEM bytes the SuperLink stores)."""
    if isinstance(key, bytes):
        try:
            key = serialization.load_pem_public_key(key)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyMaterialError(f"a node's public key is not a PEM public key: {exc}.") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _load_openssh_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as exc:
        raise KeyMaterialError(f"cannot read node public key {path}: {exc.strerror}.") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"{path} is not an OpenSSH public key: {exc}.") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyMaterialError(f"{path} is a {type(key).__name__}; SuperNode keys are ECDSA (NIST curve) keys.")
    return key


def write_node_binding(path: str | os.PathLike, sites: Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """Bind each site to its node's OpenSSH public key file; write the binding (JSON, public) to ``path``.

    Returns fingerprint -> site.  Raises :class:`~secure_fedvlp.errors.KeyMaterialError` for an
    unreadable or non-ECDSA key, or one key bound to two sites.
    """
    binding: dict[str, str] = {}
    for site, pub in sorted(sites.items()):
        fp = node_key_fingerprint(_load_openssh_public_key(Path(pub)))
        if fp in binding:
            raise KeyMaterialError(f"the node key {pub} is bound to both {binding[fp]!r} and {site!r}.")
        binding[fp] = site
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"format": _FORMAT, "nodes": binding}, indent=2, sort_keys=True) + "\n", "utf-8")
    os.replace(tmp, out)
    return binding


def load_node_binding(path: str | os.PathLike) -> dict[str, str]:
    """fingerprint -> site of a node binding file; a one-line :class:`KeyMaterialError` when it is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text("utf-8"))
    except OSError as exc:
        raise KeyMaterialError(f"cannot read the node binding {p}: {exc.strerror}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyMaterialError(f"{p} is not a node binding (JSON): {exc}.") from None
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if data.get("format") != _FORMAT or not isinstance(nodes, dict) or not nodes:
        raise KeyMaterialError(f"{p} is not a node binding: expected format {_FORMAT} and a non-empty 'nodes' table.")
    sites = list(nodes.values())
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise KeyMaterialError(f"{p} binds more than one node key to the site(s) {dup}.")
    return {str(k): str(v) for k, v in nodes.items()}


class NodeBinding:
    """Checks a node's claim to a site against the binding and the key the SuperLink authenticated.

    ``grid.get_nodes()`` is asked at each check, so nodes that connect late are checked too.
    """

    def __init__(self, sites_by_key: Mapping[str, str], grid) -> None:  # noqa: ANN001 - Flower Grid
        self.sites_by_key = dict(sites_by_key)
        self.grid = grid

    def __call__(self, node_id: int, site: str) -> str | None:
        keys = {int(n.node_id): bytes(n.public_key) for n in self.grid.get_nodes()}
        pk = keys.get(int(node_id), b"")
        if not pk:
            return (
                f"node {node_id} (claiming site {site!r}) has no authenticated key: start the SuperLink with "
                "--enable-supernode-auth and register each site's key"
            )
        fp = node_key_fingerprint(pk)
        bound = self.sites_by_key.get(fp)
        if bound is None:
            return f"node {node_id} claims site {site!r} but its key {fp[:16]}... is bound to no site"
        if bound != site:
            return f"node {node_id} claims site {site!r} but its key is bound to site {bound!r}"
        return None


def bind_sites(strategy, binding_path: str | os.PathLike, grid) -> None:  # noqa: ANN001 - strategy, Grid
    """Make ``strategy`` refuse, at discovery, every node that the binding at ``binding_path`` does not
    bind to the site it claims."""
    sites = load_node_binding(binding_path)
    strategy.site_binding = NodeBinding(sites, grid)
    logger.info("Sites bound to node keys (%s): %s", binding_path, ", ".join(sorted(sites.values())))
