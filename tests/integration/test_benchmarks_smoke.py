"""The benchmarks still run: each one, on the tiny config with the fewest steps, exits 0 and prints its table.

Timings are not checked here (they live in the benchmarks' own output, as ratios from one run);
this only keeps the scripts from rotting when the trainer's or the aggregator's API changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"{script} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_bench_dp_runs_every_mode(tmp_path):
    text = _run(
        "bench_dp.py",
        "--config",
        "configs/tiny.toml",
        "--steps",
        "1",
        "--threads",
        "1",
        "--set",
        "train.objective=decomposable",
        "--set",
        f"data.cache_dir={tmp_path}",
    )
    for mode in ("non-private", "hooks", "functorch", "ghost"):
        assert any(line.startswith(mode + " ") for line in text.splitlines()), (mode, text)


def test_bench_training_runs(tmp_path):
    text = _run(
        "bench_training.py",
        "--config",
        "configs/tiny.toml",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--set",
        f"data.cache_dir={tmp_path}",
    )
    assert "step" in text and "MiB" in text, text


def test_bench_ckks_runs():
    text = _run("bench_ckks.py", "--values", "20000", "--clients", "2", "--threads", "1", "--value-bits", "10")
    assert "bytes" in text.lower(), text


@pytest.mark.slow
def test_bench_encrypted_round_runs(tmp_path):
    text = _run("bench_encrypted_round.py", "--config", "configs/tiny.toml", "--rounds", "1", timeout=1200)
    assert "encrypted" in text.lower(), text


def test_creamfl_heterogeneous_names_its_cells_and_summarises_without_runs(tmp_path):
    """The measurement script's cells and tables (the runs themselves are the measurement, minutes each)."""
    text = _run("creamfl_heterogeneous.py", "--summarise-only", "--out", str(tmp_path / "m"), "--seeds", "0", "1")
    assert "| CreamFL, no DP | n/a" in text and "| FedAvg, paired sites only, DP-SGD epsilon 8 | n/a" in text, text
    for cell in ("creamfl_nodp_seed0", "fedavg_dp8_seed1", "server-only_nodp_seed1"):
        assert f"| {cell} |" in text, text
    assert "server-only_dp" not in text  # no site trains: no DP variant
