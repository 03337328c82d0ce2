"""`secure-fedvlp audit`: passes on a clean DP run; fails, with the reason, on each kind of problem."""

import json
import shutil

import pytest

from secure_fedvlp.cli import main
from secure_fedvlp.config import config_to_dict, dump_toml
from secure_fedvlp.evaluation.report import RunRecorder, write_report
from secure_fedvlp.privacy.audit import audit_run
from tests.unit.test_methods_contract import run_method, tiny_cfg


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    cfg = tiny_cfg(tmp, "fedaid", privacy={"enabled": True, "target_epsilon": 8.0},
                   train={"objective": "decomposable"}, federation={"num_rounds": 2})
    strategy, result, rec, grid, init = run_method(cfg, tmp, rounds=2)
    run_dir = tmp / "run"
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(cfg)))
    recorder = RunRecorder(run_dir)
    for row in rec.rows:
        recorder.record(row)
    write_report(run_dir)
    return run_dir


@pytest.fixture
def run(clean_run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(clean_run, dst)
    return dst


def test_clean_run_passes_and_accountants_agree(run, capsys):
    audit = audit_run(run)
    assert audit.ok, audit.to_dict()
    assert [c.client for c in audit.clients] == ["site1", "site2"]
    for c in audit.clients:
        assert c.events == 4  # 2 rounds x (DP-SGD + noised DRO report)
        assert abs(c.epsilon_rdp - c.epsilon_dp_accounting_rdp) <= 0.02 * c.epsilon_rdp
        assert c.epsilon_pld <= c.epsilon_rdp * 1.02
        assert c.reported == pytest.approx(c.epsilon_rdp)
    assert main(["audit", str(run)]) == 0
    assert "AUDIT PASSED" in capsys.readouterr().out
    assert main(["audit", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def _ledger(run, site="site1"):
    return run / "clients" / site / "privacy_ledger.jsonl"


def test_edited_ledger_fails_as_tampered(run, capsys):
    path = _ledger(run)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["event"]["noise_multiplier"] = entry["event"]["noise_multiplier"] * 10  # claim more noise
    lines[0] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    assert main(["audit", str(run)]) == 1
    assert "tampered" in capsys.readouterr().out


def test_truncated_ledger_fails(run):
    path = _ledger(run)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    audit = audit_run(run)
    assert not audit.ok and any("tampered" in p for c in audit.clients for p in c.problems)


def test_missing_ledger_fails(run):
    _ledger(run, "site2").unlink()
    audit = audit_run(run)
    assert not audit.ok
    assert any("has no ledger" in p for c in audit.clients if c.client == "site2" for p in c.problems)


def test_exceeded_budget_fails(run):
    cfg = (run / "config.toml").read_text().replace("target_epsilon = 8.0", "target_epsilon = 1.0")
    (run / "config.toml").write_text(cfg)
    audit = audit_run(run)
    assert not audit.ok and any("budget exceeded" in p for c in audit.clients for p in c.problems)


def test_mismatch_with_reported_epsilon_fails(run):
    rep = json.loads((run / "report.json").read_text())
    rep["privacy"]["clients"]["site1"]["epsilon"] *= 0.5  # the run under-reports
    (run / "report.json").write_text(json.dumps(rep))
    audit = audit_run(run)
    assert not audit.ok and any("mismatch" in p for c in audit.clients if c.client == "site1" for p in c.problems)
