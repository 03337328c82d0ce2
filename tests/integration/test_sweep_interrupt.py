"""Ctrl-C in a sweep: a real ``secure-fedvlp sweep`` process gets SIGINT while a DP cell trains.

It says "interrupted, rerun to resume" and exits 130; the cell's simulation stops and its Ray processes are
gone (checked by process id: every process the sweep started); the interrupted cell's ledger is still
there, unchanged, and the sweep's state records the cell as interrupted.  (Moving such a cell aside on the
next run, never deleting it, is ``tests/unit/test_sweep.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_deployment import _alive, _cmdline, _descendants

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigint_stops_the_sweep_shuts_ray_down_and_keeps_the_dp_ledger(tmp_path):
    sweep = tmp_path / "s.toml"
    sweep.write_text(
        f'[sweep]\nname = "ctrlc"\nbase = "{REPO / "configs" / "tiny.toml"}"\noutput_dir = "{tmp_path / "out"}"\n'
        'group_by = "federation.method"\n\n[sweep.grid]\n"federation.method" = ["fedavg"]\n\n[sweep.set]\n'
        f'"federation.num_rounds" = 40\n"privacy.enabled" = true\n"train.objective" = "decomposable"\n'
        f'"data.cache_dir" = "{tmp_path / "cache"}"\n'
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "secure_fedvlp.cli", "sweep", str(sweep)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the test signals the sweep alone, as a terminal would signal its group
    )
    seen: set[int] = set()
    cells = tmp_path / "out" / "ctrlc" / "cells"
    try:
        deadline = time.monotonic() + 900
        ledger = None
        while ledger is None or ledger.read_bytes().count(b"\n") < 2:  # a few DP releases recorded
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no DP release was recorded in time"
            seen |= _descendants([proc.pid])
            ledger = next(iter(cells.glob("*/clients/site1/privacy_ledger.jsonl")), None)
            time.sleep(1)
        seen |= _descendants([proc.pid])
        assert any("raylet" in _cmdline(p) for p in seen), "the cell's Ray was never seen running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 130, err
        assert "interrupted, rerun to resume" in err and "Traceback" not in err

        deadline = time.monotonic() + 60  # Ray's processes go with the cell
        while any(_alive(p) for p in seen if p != proc.pid) and time.monotonic() < deadline:
            time.sleep(1)
        left = [(p, _cmdline(p)) for p in seen if p != proc.pid and _alive(p)]
        assert not left, f"processes of the sweep still alive: {left}"

        [cell] = [d for d in cells.iterdir() if d.is_dir()]
        assert ledger.exists() and ledger.read_bytes().count(b"\n") >= 2  # never deleted
        assert not (cell / "report.json").exists()  # not taken for finished
        state = json.loads((tmp_path / "out" / "ctrlc" / "sweep_state.json").read_text())
        assert state[cell.name]["interrupted"] is True
        log = (cells / f"{cell.name}.log").read_text()
        assert "interrupted after" in log and "Ray was shut down" in log
    finally:
        seen |= _descendants([proc.pid])
        for pid in seen:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
