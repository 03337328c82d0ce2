"""No secret where it does not belong, in simulation: the process that ran the ServerApp never held the CKKS
secret key or the plaintext final model, and the server's side of the run directory holds neither.

The scan runs in another process (``tests/memscan.py``), which alone reads the key file and the key holder's
export to make its needles, so this process cannot taint itself; the scanner first proves it finds every
needle in its own memory.
"""

import json
import os
import stat
import subprocess
import sys

import pytest

from secure_fedvlp.cli import main


@pytest.mark.slow
def test_server_process_and_files_hold_no_secret_key_and_no_plaintext_model(tmp_path):
    run = tmp_path / "run"
    argv = ["run", "configs/tiny.toml", "--run-dir", str(run), "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    argv += ["--set", "encryption.enabled=true", "--set", "federation.num_rounds=1"]
    assert main(argv) == 0  # this process ran the ServerApp (Flower's Simulation Engine runs it in a thread)

    key_dir = tmp_path / "run.keys"
    export = run / "clients" / "site1" / "federated_params.npz"
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in key_dir.glob("client-*.key"))
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    assert not list(run.rglob("*.key")) and not (run / "model" / "federated_params.npz").exists()

    cmd = [sys.executable, "-m", "tests.memscan", "--pid", str(os.getpid()), "--key", str(key_dir / "client-site1.key")]
    cmd += ["--model", str(export), "--config", str(run / "config.toml"), "--files", str(run), "--skip", "clients"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert out["needles"]["secret_key"] == 4 and out["needles"]["plaintext_model"] >= 4
    assert out["self_check"] == out["needles"]  # the scanner finds what it looks for
    assert out["memory"][str(os.getpid())] == {"secret_key": 0, "plaintext_model": 0}
    assert out["files"] == {"secret_key": [], "plaintext_model": []}
