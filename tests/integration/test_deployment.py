"""The Deployment Engine on loopback: TLS, SuperNode authentication, sites bound to node keys, no secret at the server.

Real processes: ``flower-superlink`` (TLS, ``--enable-supernode-auth``), one ``flower-supernode`` per site,
``flwr supernode register`` and ``flwr run`` of this project, one round of the tiny config with DP-SGD and CKKS.
Negative cases in the same federation: a SuperNode whose key was never registered (claiming an honest site's
name) is refused by the SuperLink and never appears in the run; a SuperNode without the CA fails the TLS
handshake.  While the ServerApp runs, its process's memory is scanned for the secret key (``tests/memscan.py``,
another process); after its last round its memory is copied, and once a key holder exported the model, the
copy and the server's files are scanned for the key and for the plaintext model values.
Teardown kills every Flower process started, and checks by process id that none is alive.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secure_fedvlp.deploy import (
    flower_env,
    make_node_key,
    run_command,
    supernode_command,
    write_deployment,
)
from secure_fedvlp.layout import RunLayout

REPO = Path(__file__).resolve().parents[2]
SITES = ("site1", "site2")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(p.name))
    return kids


def _descendants(roots: list[int]) -> set[int]:
    kids, out, todo = _children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += kids.get(pid, [])
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else f"({path} missing)"


@pytest.mark.slow
def test_loopback_deployment_tls_node_auth_and_no_secrets_at_the_server(tmp_path):
    env = flower_env(dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    procs: dict[str, subprocess.Popen] = {}
    seen: set[int] = set()

    def start(name: str, cmd: list[str], home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        procs[name] = subprocess.Popen(cmd, cwd=home, env=dict(env, FLWR_HOME=str(home)), stdout=log, stderr=log)

    def cli(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "secure_fedvlp.cli", *args], env=env, capture_output=True, text=True, check=True
        ).stdout

    try:
        link_port, *node_ports = _free_ports(5)
        cache, run_dir = tmp_path / "cache", tmp_path / "run"
        # the scripted deployment (what `secure-fedvlp deploy init` writes): TLS, node keys, connection, scripts
        dep = write_deployment(
            tmp_path / "deploy",
            SITES,
            app_dir=REPO,
            config_path=str(REPO / "configs" / "tiny.toml"),
            run_dir=run_dir,
            port=link_port,
            node_ports=node_ports[:2],
            connection="loop",
        )
        pki, node_keys = dep.pki, {**dep.node_keys, "intruder": make_node_key(tmp_path / "nodes", "intruder")}
        key_dir = dep.key_dir  # the key authority's work, in its own processes
        cli("keys", "init", "--out", str(key_dir), "--clients", ",".join(SITES))
        cli("keys", "bind-nodes", "--out", str(key_dir), *[f"--node={s}={node_keys[s][1]}" for s in SITES])
        overrides = [
            f"data.cache_dir={cache}",
            "data.synthetic.heldout_site=false",
            "federation.num_rounds=1",
            "federation.discovery_timeout_s=120",
            "privacy.enabled=true",
            "train.objective=decomposable",
            "encryption.enabled=true",
            f"encryption.key_dir={key_dir}",
        ]
        from secure_fedvlp.build import build_federation
        from secure_fedvlp.config import load_config

        build_federation(load_config(REPO / "configs" / "tiny.toml", overrides))  # nodes only read the cache

        start("superlink", ["bash", str(dep.scripts["superlink"])], tmp_path / "link")
        try:
            _wait_port(link_port, 120)
        except TimeoutError:
            pytest.fail(f"the SuperLink did not start:\n{_tail(tmp_path / 'superlink.log')}")
        cli_env = dict(env, FLWR_HOME=str(dep.flwr_home))
        holder_key = str(key_dir / "client-site1.key")
        registered = subprocess.run(["bash", str(dep.scripts["register"])], env=env, capture_output=True, text=True)
        assert registered.returncode == 0, registered.stderr
        assert registered.stdout.count('"node-id"') == len(SITES)
        address = f"127.0.0.1:{link_port}"
        for s in SITES:
            start(s, ["bash", str(dep.scripts[f"supernode-{s}"])], tmp_path / f"sn-{s}")
        # an unregistered key claiming an honest site's name, and an honest key without the CA
        start(
            "intruder",
            supernode_command(address, pki.ca_cert, node_keys["intruder"][0], "site1", node_ports[2]),
            tmp_path / "sn-intruder",
        )
        start(
            "no-ca",
            supernode_command(address, None, node_keys["site2"][0], "site2", node_ports[3]),
            tmp_path / "sn-no-ca",
        )

        run_config = {
            "config-path": "configs/tiny.toml",  # relative, and flwr runs from elsewhere: resolved robustly
            "overrides": ";".join(overrides),
            "run-dir": str(run_dir),
            "node-binding": str(key_dir / "node_binding.json"),
        }
        subprocess.run(
            run_command(REPO, "loop", run_config),
            cwd=tmp_path,
            env=cli_env,
            check=True,
            timeout=300,
            capture_output=True,
        )

        scans, last_scan = [], 0.0
        copies: list[Path] = []  # the ServerApp's memory after its last round
        final_model = RunLayout(run_dir).encrypted_model
        deadline = time.monotonic() + 1500
        while not (run_dir / "report.json").exists():
            if time.monotonic() > deadline:
                pytest.fail(f"the deployed run did not finish:\n{_tail(tmp_path / 'superlink.log')}")
            pids = _descendants([p.pid for p in procs.values()])
            seen |= pids
            if final_model.exists() and not copies:
                # the last round is over: copy the ServerApp's memory (stopped for the few seconds the copy
                # takes); it is searched for the plaintext model once a key holder has exported it
                for pid in [p for p in pids if "flwr-serverapp" in _cmdline(p) and _alive(p)]:
                    os.kill(pid, signal.SIGSTOP)
                    copies.append(tmp_path / f"serverapp-{pid}.mem")
                    try:
                        dump = ["--dump-pid", str(pid), "--dump-out", str(copies[-1])]
                        subprocess.run(
                            [sys.executable, "-m", "tests.memscan", *dump],
                            cwd=REPO,
                            env=env,
                            capture_output=True,
                            check=True,
                        )
                    finally:
                        os.kill(pid, signal.SIGCONT)
                assert copies, "the ServerApp was gone before its final memory could be read"
            due = not scans or time.monotonic() - last_scan > 60  # a scan reads the whole process: not too often
            servers = [p for p in pids if due and "flwr-serverapp" in _cmdline(p) and _alive(p)]
            for pid in servers:
                scan = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "tests.memscan",
                        "--pid",
                        str(pid),
                        "--key",
                        holder_key,
                    ],
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if scan.returncode == 0:
                    scans.append(json.loads(scan.stdout))
                    last_scan = time.monotonic()
            time.sleep(5 if copies else 0.5)

        report = json.loads((run_dir / "report.json").read_text())
        assert report["status"] == "OK" and sorted(report["sites"]) == list(SITES)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert {r["site"] for r in rows if "site" in r} == set(SITES)
        assert not [r for r in rows if r.get("phase") == "discovery"]  # nobody even reached discovery to be refused
        trained = {r["site"] for r in rows if r.get("phase") == "train" and r.get("status") == "ok"}
        assert trained == set(SITES)

        # the intruder's key was refused by the SuperLink; the node without the CA failed the TLS handshake
        for name in ("intruder", "no-ca"):
            procs[name].wait(timeout=180)
            assert procs[name].returncode != 0
        assert "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "no-ca.log").read_text()

        # the ServerApp's process never held the secret key (scanned while it ran)
        assert scans, "the ServerApp process was never scanned"
        assert all(s["self_check"]["secret_key"] == 4 for s in scans)
        assert all(m["secret_key"] == 0 for s in scans for m in s["memory"].values())

        # a key holder releases the model into its own 0600 file; the server's files hold neither secret
        export = tmp_path / "site1-holder" / "model.npz"
        export.parent.mkdir(mode=0o700)
        cli("export", str(run_dir), "--key", holder_key, "--out", str(export))
        assert stat.S_IMODE(export.stat().st_mode) == 0o600
        cmd = [
            sys.executable,
            "-m",
            "tests.memscan",
            "--key",
            holder_key,
            "--model",
            str(export),
        ]
        cmd += ["--config", str(REPO / "configs" / "tiny.toml"), "--files", str(run_dir), "--skip", "clients"]
        cmd += [a for c in copies for a in ("--dump", str(c))]
        files = json.loads(subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout)
        assert files["needles"]["plaintext_model"] >= 4 and files["self_check"] == files["needles"]
        assert files["files"] == {"secret_key": [], "plaintext_model": []}
        # the ServerApp's memory after its last round: neither the secret key nor the plaintext model
        assert copies and all(files["memory"][str(c)] == {"secret_key": 0, "plaintext_model": 0} for c in copies)
    finally:
        seen |= _descendants([p.pid for p in procs.values()])
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in seen if pid != os.getpid()):
            for p in procs.values():
                p.poll()
            time.sleep(0.5)
        for pid in seen:
            if _alive(pid) and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
        for p in procs.values():
            p.wait(timeout=30)
        time.sleep(1)
        left = [(pid, _cmdline(pid)) for pid in seen if _alive(pid)]
        assert not left, f"Flower processes still alive after teardown: {left}"
