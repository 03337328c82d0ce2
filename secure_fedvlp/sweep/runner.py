"""Running a sweep's cells: one process per cell, resumable, a failing cell recorded and skipped."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from secure_fedvlp.sweep.spec import SweepSpec, cell_id, cell_overrides
from secure_fedvlp.sweep.summary import summarise_sweep

logger = logging.getLogger(__name__)
progress = logging.getLogger("secure_fedvlp.progress")

__all__ = ["run_sweep"]


def _write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically (an interrupted write leaves the previous state)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


#: Seconds an interrupted cell gets to stop its simulation and shut Ray down before it is terminated.
CELL_STOP_GRACE_S = 120.0


def set_aside(spec: SweepSpec, cid: str) -> Path | None:
    """Move an unfinished cell's run directory (with its default key directory and its log) under ``interrupted/``.

    Nothing of an interrupted cell is deleted: a DP cell's ledgers record what its sites released.
    Returns where it went (None: the cell had not started).
    """
    run = spec.layout.cell(cid)
    if not run.root.exists():
        return None
    dest_dir = spec.root / "interrupted"
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / f"{cid}-{time.strftime('%Y%m%d-%H%M%S')}"
    i = 1
    while dest.exists() or dest.with_name(dest.name + ".keys").exists():
        i += 1
        dest = dest_dir / f"{cid}-{time.strftime('%Y%m%d-%H%M%S')}-{i}"
    run.root.rename(dest)
    if run.default_key_dir.exists():
        run.default_key_dir.rename(dest.with_name(dest.name + ".keys"))
    if spec.layout.cell_log(cid).exists():
        spec.layout.cell_log(cid).rename(dest.with_name(dest.name + ".log"))
    return dest


def _run_cell(cmd: list[str], log_path: Path) -> int:
    """Run one cell's process; on Ctrl-C pass it on (one SIGINT: the cell stops and shuts Ray down), wait
    for it, and raise KeyboardInterrupt.

    The cell runs in a session of its own, so a terminal's Ctrl-C reaches it only through here, once.
    """
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            progress.warning("interrupted: stopping the running cell (its simulation and Ray)...")
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=CELL_STOP_GRACE_S)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                logger.error("the cell did not stop within %.0fs; terminating its process group", CELL_STOP_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            raise


def run_sweep(spec: SweepSpec, *, verbose: bool = False, python: str = sys.executable) -> Path:
    """Run every unfinished cell (each in its own process), then write the summary.

    A cell whose run directory holds a report is finished and is not run again; a cell interrupted
    before its report is moved aside (:func:`set_aside`: its ledgers are kept) and run again from
    scratch.  Every cell's exit status and duration go to the sweep's state file; a failing cell is
    logged and the sweep goes on.  Ctrl-C stops the running cell (which shuts its Ray down), records
    it as interrupted and raises KeyboardInterrupt: rerunning the sweep resumes it.
    """
    layout = spec.layout
    layout.cells.mkdir(parents=True, exist_ok=True)
    cells = spec.cells()
    state = json.loads(layout.state.read_text()) if layout.state.exists() else {}
    t0 = time.perf_counter()
    for i, cell in enumerate(cells, 1):
        cid = cell_id(cell)
        run = layout.cell(cid)
        if run.report_json.exists():
            progress.info("[%d/%d] %s: done already, skipped", i, len(cells), cid)
            continue
        progress.info("[%d/%d] %s: running (%.0fs elapsed)", i, len(cells), cid, time.perf_counter() - t0)
        aside = set_aside(spec, cid)  # an interrupted cell starts again from scratch; nothing is deleted
        if aside is not None:
            progress.warning("%s: an unfinished earlier attempt was moved to %s (kept, ledgers and all)", cid, aside)
        cmd = [python, "-m", "secure_fedvlp.cli", "run", str(spec.base), "--run-dir", str(run.root)]
        for o in cell_overrides(spec, cell):
            cmd += ["--set", o]
        t = time.perf_counter()
        try:
            rc = _run_cell(cmd, layout.cell_log(cid))
        except KeyboardInterrupt:
            state[cid] = {"cell": cell, "interrupted": True, "seconds": round(time.perf_counter() - t, 1)}
            _write_state(layout.state, state)
            raise
        state[cid] = {"cell": cell, "returncode": rc, "seconds": round(time.perf_counter() - t, 1)}
        _write_state(layout.state, state)
        if rc != 0:
            logger.error("cell %s failed (exit %d); see %s", cid, rc, layout.cell_log(cid))
    summarise_sweep(spec)
    return spec.root
