"""Sweeps: every cell validated up front; finished cells are not redone; summary over seeds."""

import json
from pathlib import Path

import pytest

from secure_fedvlp import sweep as sweep_mod
from secure_fedvlp.errors import ConfigError
from secure_fedvlp.sweep import cell_id, load_sweep, run_sweep

CONFIGS = Path(__file__).parents[2] / "configs"


def _sweep_file(tmp_path, grid='"federation.method" = ["fedavg", "fedprox"]\n"run.seed" = [0, 1]'):
    (tmp_path / "base.toml").write_text((CONFIGS / "tiny.toml").read_text())
    p = tmp_path / "s.toml"
    p.write_text(f'[sweep]\nname = "t"\nbase = "base.toml"\noutput_dir = "{tmp_path / "out"}"\n'
                 f'group_by = "federation.method"\n\n[sweep.grid]\n{grid}\n')
    return p


def _fake_report(cell_dir, auroc):
    cell_dir.mkdir(parents=True, exist_ok=True)
    rep = {"summary_train_sites": {"zs_auroc_macro": {"mean_final": auroc, "worst_final": auroc - 0.1,
                                                      "mean_untrained": 0.5}},
           "heldout": {}, "sites": {}}
    (cell_dir / "report.json").write_text(json.dumps(rep))


def test_every_cell_is_validated_before_anything_runs(tmp_path):
    p = _sweep_file(tmp_path, grid='"federation.method" = ["fedavg", "nope"]')
    with pytest.raises(ConfigError, match="nope"):
        load_sweep(p)


def test_resume_skips_finished_cells_and_summarises(tmp_path, monkeypatch):
    spec = load_sweep(_sweep_file(tmp_path))
    cells = spec.cells()
    assert len(cells) == 4
    done = cells[0]
    _fake_report(spec.root / "cells" / cell_id(done), 0.7)
    ran = []

    def fake_call(cmd, stdout=None, stderr=None):
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        ran.append(run_dir.name)
        _fake_report(run_dir, 0.6)
        return 0

    monkeypatch.setattr(sweep_mod.subprocess, "call", fake_call)
    run_sweep(spec)
    assert cell_id(done) not in ran and len(ran) == 3  # the finished cell was not redone
    ran.clear()
    run_sweep(spec)  # everything finished: nothing runs again
    assert ran == []
    summary = json.loads((spec.root / "summary.json").read_text())
    fedavg = summary["groups"]["fedavg"]["mean/zs_auroc_macro"]
    assert summary["groups"]["fedavg"]["n"] == 2
    assert fedavg["mean"] == pytest.approx(0.65) and fedavg["std"] == pytest.approx(0.0707, abs=1e-3)
    assert (spec.root / "summary.png").exists() and "fedprox" in (spec.root / "summary.md").read_text()


def test_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    spec = load_sweep(_sweep_file(tmp_path))
    calls = []

    def fake_call(cmd, stdout=None, stderr=None):
        calls.append(cmd)
        if len(calls) == 1:
            return 3  # the first cell fails
        _fake_report(Path(cmd[cmd.index("--run-dir") + 1]), 0.6)
        return 0

    monkeypatch.setattr(sweep_mod.subprocess, "call", fake_call)
    run_sweep(spec)
    state = json.loads((spec.root / "sweep_state.json").read_text())
    assert sorted(v["returncode"] for v in state.values()) == [0, 0, 0, 3]
    assert len(json.loads((spec.root / "summary.json").read_text())["missing_cells"]) == 1
