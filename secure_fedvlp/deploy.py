"""The Deployment Engine: TLS material, node keys and the commands that start each party.

Flower 1.41's SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port
(``--host``/``--port``); TLS comes from ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` and node
authentication from ``--enable-supernode-auth`` (TLS required), after which only SuperNodes whose
ECDSA public key was registered (``flwr supernode register <pubkey> <connection> --name <site>``)
may connect.  Each SuperNode needs the CA (``--root-certificates``), its private key in OpenSSH
format (``--auth-supernode-private-key``), its own ``--port`` and ``--node-config "site='...'"``.
Offline machines add ``--disable-runtime-dependency-installation`` to the SuperLink (a SuperNode installs
nothing unless given ``--allow-runtime-dependency-installation``).  The ``flwr`` CLI reads its
connection from ``$FLWR_HOME/config.toml`` (``[superlink.<name>] address`` and an absolute
``root-certificates``).

This module makes the material (:func:`make_pki`, :func:`make_node_key`), writes the CLI
connection (:func:`write_flwr_connection`) and builds each command line (:func:`superlink_command`,
:func:`supernode_command`, :func:`register_command`, :func:`run_command`); :func:`write_deployment`
(``secure-fedvlp deploy init``) writes them all with one start script per party, and the README's
"Deployment Engine" section walks through them.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "PKI",
    "make_pki",
    "make_node_key",
    "write_flwr_connection",
    "superlink_command",
    "supernode_command",
    "register_command",
    "run_command",
    "flower_bin",
    "flower_env",
]


@dataclass(frozen=True)
class PKI:
    """The files of a deployment's TLS material (the CA's key stays with whoever signs certificates)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(out: str | os.PathLike, hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 30) -> PKI:
    """A CA and a SuperLink certificate for ``hosts`` (DNS names or IP addresses) in ``out`` (0700).

    Private keys are written 0600; certificates 0644.
    """
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    now = _dt.datetime.now(_dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("secure-fedvlp deployment CA"))
        .issuer_name(_name("secure-fedvlp deployment CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    pki = PKI(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key")
    _write(pki.ca_cert, ca.public_bytes(pem), 0o644)
    _write(pki.ca_key, ca_key.private_bytes(pem, pkcs8, none), 0o600)
    _write(pki.server_cert, srv.public_bytes(pem), 0o644)
    _write(pki.server_key, srv_key.private_bytes(pem, pkcs8, none), 0o600)
    return pki


def make_node_key(out: str | os.PathLike, site: str) -> tuple[Path, Path]:
    """A SuperNode's ECDSA P-384 key pair in OpenSSH format: ``(<site>.key (0600), <site>.pub)`` in ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / f"{site}.key", d / f"{site}.pub"
    _write(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        0o600,
    )
    _write(
        pub,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
        0o644,
    )
    return priv, pub


def write_flwr_connection(flwr_home: str | os.PathLike, name: str, address: str, ca_cert: str | os.PathLike) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (TLS, absolute CA path)."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    ca = Path(ca_cert).resolve()
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n',
        encoding="utf-8",
    )
    return path


def flower_bin(name: str) -> str:
    """The path of a Flower executable: beside this interpreter (a virtual environment), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def flower_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with this interpreter's ``bin`` directory first on
    ``PATH``: the SuperLink and SuperNodes start ``flower-superexec``, ``flwr-serverapp`` and
    ``flwr-clientapp`` by name."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def superlink_command(pki: PKI, port: int, *, host: str = "127.0.0.1", database: str | None = None) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication on ``host:port``."""
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port)]
    cmd += ["--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert)]
    cmd += ["--ssl-keyfile", str(pki.server_key), "--enable-supernode-auth"]
    cmd += ["--disable-runtime-dependency-installation"]
    if database:
        cmd += ["--database", database]
    return cmd


def supernode_command(
    superlink: str, ca_cert: str | os.PathLike | None, node_key: str | os.PathLike | None, site: str, port: int
) -> list[str]:
    """``flower-supernode`` for ``site``: TLS against ``ca_cert``, authenticated by ``node_key``, on its own port.

    ``ca_cert`` or ``node_key`` None leaves that option out (the negative cases of the tests).
    """
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port), "--host", "127.0.0.1"]
    if ca_cert is not None:
        cmd += ["--root-certificates", str(ca_cert)]
    if node_key is not None:
        cmd += ["--auth-supernode-private-key", str(node_key)]
    cmd += ["--node-config", f"site='{site}'"]  # a SuperNode installs no dependencies unless --allow-... is given
    cmd += ["--max-retries", "3", "--max-wait-time", "60"]
    return cmd


def register_command(public_key: str | os.PathLike, connection: str, site: str) -> list[str]:
    """``flwr supernode register`` of a site's node key (JSON output: the node id)."""
    return [
        flower_bin("flwr"),
        "supernode",
        "register",
        str(public_key),
        connection,
        "--name",
        site,
        "--format",
        "json",
    ]


def run_command(
    app_dir: str | os.PathLike, connection: str, run_config: dict[str, str], *, stream: bool = False
) -> list[str]:
    """``flwr run`` of the project at ``app_dir`` against ``connection`` with the given run config
    (``stream``: follow the run's log until it ends)."""
    cmd = [flower_bin("flwr"), "run", str(app_dir), connection] + (["--stream"] if stream else [])
    for k, v in run_config.items():
        cmd += ["--run-config", f'{k}="{v}"']
    return cmd


# --------------------------------------------------------------------------- the scripted plan


@dataclass(frozen=True)
class Deployment:
    """What :func:`write_deployment` made: the material, one start script per party, and the commands."""

    root: Path
    pki: PKI
    node_keys: dict[str, tuple[Path, Path]]
    key_dir: Path
    flwr_home: Path
    scripts: dict[str, Path]  # in the order to run them: superlink, register, supernode-<site>..., run


def _shell(cmd: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(str(c)) for c in cmd)


def _write_script(path: Path, lines: Sequence[str]) -> Path:
    text = (
        "#!/usr/bin/env bash\n# Written by `secure-fedvlp deploy init`.\nset -euo pipefail\n" + "\n".join(lines) + "\n"
    )
    _write(path, text.encode("utf-8"), 0o700)
    return path


def write_deployment(
    out: str | os.PathLike,
    sites: Sequence[str],
    *,
    app_dir: str | os.PathLike,
    config_path: str,
    run_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 9093,
    node_ports: Sequence[int] | None = None,
    connection: str = "deploy",
) -> Deployment:
    """Write a deployment of ``sites`` into ``out``: TLS material, node keys, the CLI connection and scripts.

    The CKKS keys and the node binding (``out/keys``) are the key authority's; the caller makes them
    (``secure-fedvlp deploy init`` runs ``keys init`` and ``keys bind-nodes`` in processes of their own).
    One script per party and step, to run in order: ``superlink.sh`` (TLS, node authentication, no
    runtime installs), ``register.sh`` (each site's node public key, with ``flwr supernode register``),
    ``supernode-<site>.sh`` (one per site, its own ``--port``, ``--node-config "site='<site>'"``) and
    ``run.sh`` (``flwr run`` of the project at ``app_dir`` with absolute paths in its run config).  Every
    party has its own ``FLWR_HOME`` under ``out``; the scripts put this interpreter's ``bin`` first on
    ``PATH`` (the SuperLink and SuperNodes start Flower's executables by name).  On one machine this is a
    loopback federation; across machines, copy each party's files (``pki/ca.crt`` and its own node key to a
    site, ``pki/server.*`` to the SuperLink) and replace ``host``.
    """
    root = Path(out).absolute()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    hosts = [host] + [h for h in ("localhost", "127.0.0.1") if h != host]
    pki = make_pki(root / "pki", hosts=hosts)
    node_keys = {s: make_node_key(root / "nodes", s) for s in sites}
    key_dir = root / "keys"
    cli_home = root / "flwr-cli"
    address = f"{host}:{port}"
    write_flwr_connection(cli_home, connection, address, pki.ca_cert)
    ports = list(node_ports) if node_ports is not None else [port + 1 + i for i in range(len(sites))]
    path_line = f'export PATH={_shell([str(Path(sys.executable).parent)])}:"$PATH"'

    def party(name: str, cmd: Sequence[str], home: Path) -> list[str]:
        return [
            path_line,
            f"mkdir -p {_shell([str(home)])} && cd {_shell([str(home)])}",
            f"FLWR_HOME={_shell([str(home)])} exec {_shell(cmd)}",
        ]

    scripts: dict[str, Path] = {}
    scripts["superlink"] = _write_script(
        root / "superlink.sh", party("superlink", superlink_command(pki, port, host=host), root / "superlink")
    )
    reg = [path_line, f"export FLWR_HOME={_shell([str(cli_home)])}"]
    reg += [_shell(register_command(node_keys[s][1], connection, s)) for s in sites]
    scripts["register"] = _write_script(root / "register.sh", reg)
    for s, p in zip(sites, ports, strict=True):
        cmd = supernode_command(address, pki.ca_cert, node_keys[s][0], s, p)
        scripts[f"supernode-{s}"] = _write_script(root / f"supernode-{s}.sh", party(s, cmd, root / f"supernode-{s}"))
    run_config = {
        "config-path": str(Path(config_path).absolute()),
        "overrides": ";".join([*overrides, "encryption.enabled=true", f"encryption.key_dir={key_dir}"]),
        "run-dir": str(Path(run_dir).absolute()),
        "node-binding": str(key_dir / "node_binding.json"),
    }
    run = [
        path_line,
        f"export FLWR_HOME={_shell([str(cli_home)])}",
        _shell(run_command(app_dir, connection, run_config, stream=True)),
    ]
    scripts["run"] = _write_script(root / "run.sh", run)
    return Deployment(root, pki, node_keys, key_dir, cli_home, scripts)
