"""Running a sweep's cells: one process per cell, resumable, a failing cell recorded and skipped."""

from __future__ import annotations

import json
import logging
import os
import shutil
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


def run_sweep(spec: SweepSpec, *, verbose: bool = False, python: str = sys.executable) -> Path:
    """Run every unfinished cell (each in its own process), then write the summary.

    A cell whose run directory holds a report is finished and is not run again; a cell interrupted
    before its report is started again from scratch.  Every cell's exit status and duration go to
    the sweep's state file; a failing cell is logged and the sweep goes on.
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
        if run.root.exists():  # an interrupted cell: start it again from scratch
            shutil.rmtree(run.root)
        cmd = [python, "-m", "secure_fedvlp.cli", "run", str(spec.base), "--run-dir", str(run.root)]
        for o in cell_overrides(spec, cell):
            cmd += ["--set", o]
        t = time.perf_counter()
        with open(layout.cell_log(cid), "w", encoding="utf-8") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        state[cid] = {"cell": cell, "returncode": rc, "seconds": round(time.perf_counter() - t, 1)}
        _write_state(layout.state, state)
        if rc != 0:
            logger.error("cell %s failed (exit %d); see %s", cid, rc, layout.cell_log(cid))
    summarise_sweep(spec)
    return spec.root
