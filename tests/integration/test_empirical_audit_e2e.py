"""The empirical audit end to end, on the Flower Simulation Engine through the CLI (slow: ~4 min).

`configs/audit_canaries.toml` (no DP) must show clear leakage; `configs/audit_canaries_dp.toml`
(the same run under DP-SGD at epsilon = 2) must keep the lower bound below the claimed epsilon and
pass `secure-fedvlp audit --empirical`.
"""

import json

import pytest

from secure_fedvlp.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(config, tmp_path, cache):
    run_dir = tmp_path / "run"
    assert main(["run", config, "--run-dir", str(run_dir), "--set", f"data.cache_dir={cache}"]) == 0
    emp = json.loads((run_dir / "empirical_audit.json").read_text())
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["empirical_audit"]["epsilon_lower_bound"] == emp["epsilon_lower_bound"]
    return run_dir, emp


def test_without_dp_the_canaries_leak(tmp_path, cache, capsys):
    run_dir, emp = _run("configs/audit_canaries.toml", tmp_path, cache)
    assert emp["m"] == 128 and not emp["dp"] and emp["claimed_epsilon"] is None
    assert emp["epsilon_lower_bound"] > 1.0, emp  # clear leakage at 95 % confidence
    capsys.readouterr()
    assert main(["audit", str(run_dir), "--empirical", "--json"]) == 1  # no DP claim to audit
    out = json.loads(capsys.readouterr().out)
    assert out["empirical"]["epsilon_lower_bound"] == pytest.approx(emp["epsilon_lower_bound"])


def test_with_dp_the_bound_stays_below_the_claim(tmp_path, cache, capsys):
    run_dir, emp = _run("configs/audit_canaries_dp.toml", tmp_path, cache)
    assert emp["dp"] and 0 < emp["claimed_epsilon"] <= 2.0
    assert emp["epsilon_lower_bound"] < emp["claimed_epsilon"] and emp["verdict"] == "OK"
    # the audit could have caught a false claim: more is detectable than is claimed
    assert emp["max_detectable_epsilon"] > emp["claimed_epsilon"]
    capsys.readouterr()
    assert main(["audit", str(run_dir), "--empirical"]) == 0
    out = capsys.readouterr().out
    assert "epsilon lower bound" in out and "AUDIT PASSED" in out
