"""`secure-fedvlp audit`: passes on a clean DP run; fails, with the reason, on each kind of problem."""

import json
import shutil

import pytest

from secure_fedvlp.cli import main
from secure_fedvlp.config import config_to_dict, dump_toml
from secure_fedvlp.evaluation.report import RunRecorder, write_report
from secure_fedvlp.privacy.audit import audit_run
from tests.unit.test_methods_contract import run_method, tiny_cfg


def _two_round_dp_run(tmp, method, **privacy):
    """A real 2-round DP run of ``method`` (tiny config) with its config, metrics and report on disk."""
    cfg = tiny_cfg(
        tmp,
        method,
        privacy={"enabled": True, **privacy},
        train={"objective": "decomposable"},
        federation={"num_rounds": 2},
    )
    strategy, result, rec, grid, init = run_method(cfg, tmp, rounds=2)
    run_dir = tmp / "run"
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(cfg)))
    recorder = RunRecorder(run_dir)
    for row in rec.rows:
        recorder.record(row)
    write_report(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    return _two_round_dp_run(tmp_path_factory.mktemp("audit"), "fedaid", target_epsilon=8.0)


def _fresh_copy(run_dir, tmp_path):
    """A test's own copy of a module-scoped run, free to tamper with."""
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


@pytest.fixture
def run(clean_run, tmp_path):
    return _fresh_copy(clean_run, tmp_path)


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


RELATION = "add/remove-one record; released counts are declared public sizes"


def test_relation_is_stated_in_the_report_the_ledgers_and_the_audit(run, capsys):
    """The neighbouring relation is in report.json (privacy section, and per client with its declared size),
    in report.md, in every ledger's head file and in `secure-fedvlp audit` (text and JSON); a ledger whose
    head states no relation (one written when exact counts were released) fails the audit."""
    rep = json.loads((run / "report.json").read_text())
    assert rep["privacy"]["neighbouring_relation"] == RELATION
    assert any("exact size" in x for x in rep["privacy"]["not_covered"])  # evaluation replies, named
    for site in ("site1", "site2"):
        assert rep["privacy"]["clients"][site]["relation"] == RELATION
        assert rep["privacy"]["clients"][site]["declared_size"] == 20
        assert json.loads(_ledger(run, site).with_name("privacy_ledger.jsonl.head").read_text())["relation"] == RELATION
    assert f"Neighbouring relation: {RELATION}" in (run / "report.md").read_text()
    assert main(["audit", str(run)]) == 0
    assert f"Neighbouring relation: {RELATION}" in capsys.readouterr().out
    assert main(["audit", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["relation"] == RELATION and all(c["relation"] == RELATION for c in out["clients"])
    head = _ledger(run).with_name("privacy_ledger.jsonl.head")
    head.write_text(json.dumps({k: v for k, v in json.loads(head.read_text()).items() if k != "relation"}))
    audit = audit_run(run)
    assert not audit.ok
    assert any("neighbouring relation" in p for c in audit.clients if c.client == "site1" for p in c.problems)


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


# -- a run accounted with PLD: the claim is the PLD value, cross-checked by Opacus' PRV ----------------


@pytest.fixture(scope="module")
def pld_run(tmp_path_factory):
    return _two_round_dp_run(tmp_path_factory.mktemp("audit-pld"), "fedavg", target_epsilon=4.0, accountant="pld")


@pytest.fixture
def prun(pld_run, tmp_path):
    return _fresh_copy(pld_run, tmp_path)


def _set_budget(run, value):
    text = (run / "config.toml").read_text()
    assert "target_epsilon = 4.0" in text
    (run / "config.toml").write_text(text.replace("target_epsilon = 4.0", f"target_epsilon = {value!r}"))


def test_pld_accounted_run_is_audited_against_its_own_claim(prun, capsys):
    """A run calibrated and budgeted with PLD must pass although its (looser) RDP bound is above the budget."""
    audit = audit_run(prun)
    assert audit.ok, audit.to_dict()
    for c in audit.clients:
        assert c.claimed_accountant == "pld" and c.claimed == pytest.approx(c.epsilon_pld)
        assert c.reported == pytest.approx(c.epsilon_pld)
        assert c.epsilon_pld <= 4.0 < c.epsilon_rdp  # calibrated to the PLD target: RDP alone would fail it
        assert abs(c.epsilon_pld - c.epsilon_prv) <= 0.02 * c.epsilon_pld  # the independent PRV cross-check
    assert main(["audit", str(prun)]) == 0
    assert "(pld)" in capsys.readouterr().out


def test_pld_claim_over_budget_fails(prun):
    pld = audit_run(prun).clients[0].claimed
    _set_budget(prun, round(pld * 0.95, 6))
    audit = audit_run(prun)
    assert not audit.ok and any("budget exceeded" in p and "(pld)" in p for c in audit.clients for p in c.problems)


def test_independent_bound_above_budget_is_a_note_not_a_failure(prun, capsys):
    c = audit_run(prun).clients[0]
    # Opacus' PRV reports an upper estimate (eps_error = 0.01): above the pessimistic PLD here
    assert c.epsilon_prv > c.claimed
    _set_budget(prun, round(0.5 * (c.claimed + c.epsilon_prv), 9))
    audit = audit_run(prun)
    assert audit.ok, audit.to_dict()
    assert all(any("Opacus PRV" in n and "above the budget" in n for n in c.notes) for c in audit.clients)
    assert main(["audit", str(prun)]) == 0
    assert "note: Opacus PRV" in capsys.readouterr().out


def test_pld_and_prv_disagreeing_fails(prun, monkeypatch):
    import secure_fedvlp.privacy.audit as audit_mod

    monkeypatch.setattr(
        audit_mod,
        "opacus_prv_epsilon",
        lambda events, delta: 1.5 * audit_mod.make_accountant("pld", events).get_epsilon(delta),
    )
    audit = audit_run(prun)
    assert not audit.ok and any(
        "PLD" in p and "PRV" in p and "disagree" in p for c in audit.clients for p in c.problems
    )


def test_prv_matches_pld_on_a_known_history():
    """The cross-check itself: Opacus' PRV on DP-SGD + Gaussian releases lands within 2 % of dp-accounting's PLD."""
    from secure_fedvlp.privacy.audit import make_accountant, opacus_prv_epsilon
    from secure_fedvlp.privacy.events import DPSGDEvent, GaussianEvent, PostProcessingEvent

    events = [
        DPSGDEvent(noise_multiplier=1.2, sample_rate=0.1, steps=50, clip_norm=1.0, round=1),
        GaussianEvent(sensitivity=1.0, sigma=10.0, what="report", round=1),
        PostProcessingEvent(what="anchors", round=1),
    ]
    pld = make_accountant("pld", events).get_epsilon(1e-5)
    prv = opacus_prv_epsilon(events, 1e-5)
    assert 0 < pld and abs(prv - pld) <= 0.02 * pld
    assert opacus_prv_epsilon([], 1e-5) == 0.0


def test_seeded_randomness_run_fails_the_audit_and_the_report_says_why(run):
    """privacy.seeded_randomness derives the noise and the batches from run.seed, which the server holds:
    the run makes no DP claim, whatever its ledger says."""
    text = (run / "config.toml").read_text()
    assert "seeded_randomness = false" in text
    (run / "config.toml").write_text(text.replace("seeded_randomness = false", "seeded_randomness = true"))
    audit = audit_run(run)
    assert not audit.ok and any("seeded_randomness" in p and "server" in p for p in audit.problems)
    write_report(run)
    assert "Warning: privacy.seeded_randomness = true" in (run / "report.md").read_text()


def test_a_directory_that_is_not_a_run_is_named_by_every_reader(tmp_path, capsys):
    """audit, report and the empirical audit open a run the same way (layout.load_run) and say what is missing."""
    from secure_fedvlp.errors import ConfigError, DataError
    from secure_fedvlp.evaluation.membership import empirical_audit

    empty = tmp_path / "empty"
    empty.mkdir()
    for where in (empty, tmp_path / "nowhere"):
        audit = audit_run(where)
        assert not audit.ok and audit.clients == [] and audit.run_dir == str(where)
        assert len(audit.problems) == 1 and str(where) in audit.problems[0], audit.problems
        assert main(["audit", str(where)]) == 1
        assert "AUDIT FAILED" in capsys.readouterr().out
        assert main(["report", str(where)]) == 2
        assert str(where) in capsys.readouterr().err
        with pytest.raises(DataError, match=str(where)):
            empirical_audit(where)
    assert "config.toml is missing" in audit_run(empty).problems[0]
    (empty / "config.toml").write_text("[privacy]\ndelta = 2.0\n")  # out of range: an invalid config
    audit = audit_run(empty)
    assert not audit.ok and "privacy.delta" in audit.problems[0] and "2.0" in audit.problems[0]
    with pytest.raises(ConfigError, match="privacy.delta"):
        empirical_audit(empty)
    assert main(["report", str(empty)]) == 2
    assert "privacy.delta" in capsys.readouterr().err


# -- the ledger anchored outside the client: the server logs each site's head -------------------------


def test_the_server_logs_each_sites_ledger_head_and_the_honest_run_matches_it(run):
    """Every DP reply (train, DRO-loss report, evaluate) carries the site's ledger head and sequence number; the
    server writes them to its own metrics file, not the site's directory, and the honest ledger holds each."""
    from secure_fedvlp.privacy.ledger import read_ledger, verify_ledger

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    heads = [r for r in rows if r.get("phase") == "ledger"]
    for site in ("site1", "site2"):
        mine = [r for r in heads if r["site"] == site]
        releases = {(rnd, k) for rnd in (1, 2) for k in ("train", "dro-loss")}
        assert {(r["round"], r["release"]) for r in mine} == releases | {(rnd, "evaluate") for rnd in (0, 1, 2)}
        entries = read_ledger(_ledger(run, site))
        for r in mine:  # the external reference the ledger code checks (seq -1: the empty ledger's genesis hash)
            verify_ledger(
                _ledger(run, site),
                client_id=site,
                expected_count=r["ledger_seq"] + 1,
                expected_head_hash=r["ledger_head"],
            )
        assert max(r["ledger_seq"] for r in mine) == len(entries) - 1


def _forge_ledger_without_round(run, site, drop_round):
    """The attacker's consistent rewrite of ``site``'s records: its ledger re-recorded by the ledger code itself
    without ``drop_round``'s releases (so the hash chain and the head file verify on their own), and report.json
    rewritten from the forged ledgers by the report code."""
    from secure_fedvlp.privacy.ledger import PrivacyLedger, head_path, read_ledger

    path = _ledger(run, site)
    kept = [e.event for e in read_ledger(path, client_id=site) if e.event.round != drop_round]
    path.unlink()
    head_path(path).unlink()
    forged = PrivacyLedger(path, site)
    for event in kept:
        forged.record(event)
    write_report(run)
    return kept


@pytest.mark.parametrize("drop_round", [2, 1])
def test_a_consistent_rewrite_of_a_ledger_fails_against_the_servers_log(run, drop_round, capsys):
    from secure_fedvlp.privacy.ledger import verify_ledger

    before = json.loads((run / "report.json").read_text())["privacy"]["clients"]["site1"]["epsilon"]
    kept = _forge_ledger_without_round(run, "site1", drop_round)
    assert len(kept) == 2
    assert verify_ledger(_ledger(run, "site1"), client_id="site1").count == 2  # the forgery verifies on its own
    after = json.loads((run / "report.json").read_text())["privacy"]["clients"]["site1"]["epsilon"]
    assert after < before  # and the rewritten report claims the lower epsilon
    audit = audit_run(run)
    assert not audit.ok
    by_site = {c.client: c for c in audit.clients}
    assert by_site["site2"].ok, by_site["site2"].problems  # the honest site still passes
    problems = by_site["site1"].problems
    assert all("site1" in p for p in problems), problems
    assert any("head" in p and "the server logged" in p for p in problems), problems
    assert any("reported epsilon" in p and "above the ledger's" in p for p in problems), problems
    assert any(f"round {drop_round}" in p and "not in the ledger" in p for p in problems), problems
    assert main(["audit", str(run)]) == 1
    out = capsys.readouterr().out
    assert "AUDIT FAILED" in out and "client site1" in out


def test_the_dp_report_names_clear_evaluation_as_not_covered(run):
    """Under DP the train replies carry no loss, so the report's not_covered names the clear evaluation metrics
    (what they release) but no training losses."""
    rep = json.loads((run / "report.json").read_text())
    text = " ".join(rep["privacy"]["not_covered"])
    assert "per-finding zero-shot AUROC" in text and "which findings occur" in text and "test-record count" in text
    assert "training losses" not in text
    assert rep["not_covered"] == rep["privacy"]["not_covered"]
