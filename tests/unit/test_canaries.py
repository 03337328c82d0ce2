"""Canaries and the one-run empirical audit on real training (in-process Flower messages, no mocks).

The leakage test trains the tiny model with the real ClientApp (loopback grid: Flower messages,
the real trainers) on a federation with canaries, then audits the released model.
"""

import json
import os
import stat

import numpy as np
import pytest

from secure_fedvlp.build import build_federation, build_model
from secure_fedvlp.cli import main
from secure_fedvlp.config import config_to_dict, dump_toml, load_config
from secure_fedvlp.data.canaries import CANARY_WORDS, make_canaries
from secure_fedvlp.errors import ConfigError, DataError
from secure_fedvlp.evaluation.canary_files import insert_canaries, prepare_canaries, read_coins
from secure_fedvlp.evaluation.membership import canary_scores, empirical_audit, write_empirical_audit
from secure_fedvlp.evaluation.report import RunRecorder, write_report
from secure_fedvlp.layout import RunLayout
from secure_fedvlp.privacy.events import DPSGDEvent
from secure_fedvlp.wire import arrays_to_numpy
from secure_fedvlp.wrappers.dpsgd import make_ledger
from tests.unit.test_methods_contract import run_method, tiny_cfg


def test_canaries_are_deterministic_distinct_and_unlike_the_data():
    a, b = make_canaries(64, 7, 32), make_canaries(64, 7, 32)
    assert np.array_equal(a.images, b.images) and a.reports == b.reports
    c = make_canaries(64, 8, 32)
    assert not np.array_equal(a.images, c.images) and a.reports != c.reports
    assert len(set(a.reports)) == 64  # every canary's report differs
    flat = a.images.reshape(64, -1)
    assert np.min(np.linalg.norm(flat[:, None] - flat[None], axis=-1) + np.eye(64) * 1e9) > 1.0  # and its image
    assert a.images.min() >= 0 and a.images.max() <= 1 and a.labels.sum() == 0  # no finding
    assert all(w in CANARY_WORDS for r in a.reports for w in r.split())
    assert a.record_ids[0] == "canary/00000"


def test_bad_canary_requests_are_named():
    with pytest.raises(ValueError, match="number of canaries"):
        make_canaries(0, 1, 32)
    with pytest.raises(ValueError, match="image size"):
        make_canaries(4, 1, 4)


def _cfg(tmp_path, **audit):
    return tiny_cfg(tmp_path, "fedavg", audit={"canaries": 16, "canary_site": "site1", "canary_seed": 5, **audit})


def test_coins_stay_with_the_auditor_and_the_site_gets_its_list(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    rec = prepare_canaries(cfg, run_dir, ["site1", "site2"])
    assert len(rec["included"]) == 16 and rec["source"].startswith("secrets")
    for path in (RunLayout(run_dir).canary_coins, RunLayout(run_dir).site_canaries("site1")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    site_list = json.loads(RunLayout(run_dir).site_canaries("site1").read_text())
    assert site_list["include"] == [i for i, c in enumerate(rec["included"]) if c]
    assert "included" not in site_list  # the site learns its records, not the coins of the others
    # a restart in the same directory keeps the coins; a different request is refused
    assert prepare_canaries(cfg, run_dir, ["site1", "site2"])["included"] == rec["included"]
    other = _cfg(tmp_path, canary_seed=6)
    with pytest.raises(ConfigError, match="fresh run directory"):
        prepare_canaries(other, run_dir, ["site1", "site2"])
    assert read_coins(run_dir)["included"] == rec["included"]


def test_canary_site_must_be_a_training_site(tmp_path):
    cfg = _cfg(tmp_path, canaries=4, canary_site="heldout")
    with pytest.raises(ConfigError, match="'audit.canary_site' must be one of the training sites"):
        prepare_canaries(cfg, tmp_path / "run", ["site1", "site2"])
    cfg = _cfg(tmp_path, canaries=4, canary_site="")  # "" = first training site
    assert prepare_canaries(cfg, tmp_path / "run2", ["site1", "site2"])["canary_site"] == "site1"


def test_only_the_canary_site_adds_exactly_its_included_canaries(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    coins = np.arange(16) % 3 == 0
    prepare_canaries(cfg, run_dir, ["site1", "site2"], coins=coins)
    fed = build_federation(cfg)
    s1, s2 = fed.site("site1"), fed.site("site2")
    names = [s.name for s in fed.sites]
    new1 = insert_canaries(cfg, run_dir, s1, names)
    assert len(new1.train) == len(s1.train) + coins.sum()
    assert new1.train.record_ids[len(s1.train) :] == [f"canary/{i:05d}" for i in np.flatnonzero(coins)]
    assert new1.test is s1.test and new1.val is s1.val  # evaluation splits untouched
    assert insert_canaries(cfg, run_dir, s2, names) is s2
    RunLayout(run_dir).site_canaries("site1").unlink()
    with pytest.raises(DataError, match="canaries.json is missing"):
        insert_canaries(cfg, run_dir, s1, names)


def _leaky_run(tmp_path, rounds, **extra):
    """Train with canaries through the real ClientApp; lay the run out as `secure-fedvlp run` does."""
    cfg = tiny_cfg(
        tmp_path,
        "fedavg",
        audit={"canaries": 64, "canary_site": "site1", "canary_seed": 11},
        data={
            "synthetic": {
                "num_sites": 2,
                "heldout_site": False,
                "train_per_site": 32,
                "val_per_site": 4,
                "test_per_site": 8,
                "public_size": 8,
                "image_size": 32,
                "seed": 3,
            }
        },
        train={"local_steps": 20, "batch_size": 16, "lr": 3e-3, "text_lr": 1e-3},
        eval={"every_round": False},
        federation={"num_rounds": rounds},
        **extra,
    )
    run_dir = tmp_path / "run"
    coins = np.random.default_rng(0).random(64) < 0.5
    prepare_canaries(cfg, run_dir, ["site1", "site2"], coins=coins)
    _, result, rec, _, _ = run_method(cfg, tmp_path, rounds=rounds)
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(cfg)))
    (run_dir / "model").mkdir(exist_ok=True)
    np.savez(run_dir / "model" / "federated_params.npz", **arrays_to_numpy(result.arrays))
    recorder = RunRecorder(run_dir)
    for row in rec.rows:
        recorder.record(row)
    return cfg, run_dir, coins


@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory):
    return _leaky_run(tmp_path_factory.mktemp("leaky"), rounds=10)


def test_canaries_inserted_at_site1_reached_training(leaky_run):
    cfg, run_dir, coins = leaky_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    n = {r["site"]: r["num-examples"] for r in rows if r["phase"] == "train" and r["status"] == "ok"}
    assert n == {"site1": 32 + coins.sum(), "site2": 32}


def test_without_dp_the_audit_shows_clear_leakage(leaky_run, capsys):
    cfg, run_dir, coins = leaky_run
    emp = write_empirical_audit(run_dir)
    assert emp["m"] == 64 and emp["members"] == coins.sum() and emp["canary_site"] == "site1"
    assert emp["auc"] > 0.8, emp
    assert emp["epsilon_lower_bound"] > 0.5, emp  # clear leakage
    assert emp["claimed_epsilon"] is None and emp["verdict"].startswith("no DP claim")
    # recomputation from the files is deterministic
    assert empirical_audit(run_dir)["scores"] == emp["scores"]
    # and the scores do not depend on the coins: an untrained model scores no better than chance
    untrained = canary_scores(build_model(cfg), make_canaries(64, 11, 32))
    from secure_fedvlp.privacy.empirical import audit_from_scores

    assert audit_from_scores(untrained, coins).epsilon_lower_bound < emp["epsilon_lower_bound"]
    write_report(run_dir)
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["empirical_audit"]["epsilon_lower_bound"] == emp["epsilon_lower_bound"]
    assert "scores" not in rep["empirical_audit"]
    assert "Empirical privacy audit" in (run_dir / "report.md").read_text()
    # the CLI prints the bound; the run made no DP claim, so the ledger audit itself fails
    assert main(["audit", str(run_dir), "--empirical"]) == 1
    out = capsys.readouterr().out
    assert "epsilon lower bound" in out and "claimed epsilon none" in out


def test_a_false_claim_fails_the_audit(leaky_run, tmp_path, capsys):
    """A run that says it is DP at a small epsilon but trained without noise is caught."""
    import shutil

    cfg, src, _ = leaky_run
    run_dir = tmp_path / "claims_dp"
    shutil.copytree(src, run_dir)
    claimed = load_config(
        run_dir / "config.toml", ["privacy.enabled=true", "privacy.target_epsilon=0.3", "train.objective=decomposable"]
    )
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(claimed)))
    # Ledgers claiming much noise for every round the server logged (a well-formed, hash-chained lie), with the heads
    # the server would have logged from the replies of such a run: noise not applied, yet every release accounted.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recorder = RunRecorder(run_dir)
    for site in ("site1", "site2"):
        led = make_ledger(run_dir / "clients" / site / "privacy_ledger.jsonl", site, claimed.privacy)
        for r in rows:
            if r["phase"] == "train" and r["status"] == "ok" and r["site"] == site:
                entry = led.record(
                    DPSGDEvent(
                        noise_multiplier=20.0, sample_rate=0.1, steps=10, clip_norm=1.0, round=r["round"], stage="full"
                    )
                )
                recorder.record(
                    {
                        "round": r["round"],
                        "phase": "ledger",
                        "release": "train",
                        "stage": "full",
                        "site": site,
                        "refused_for_budget": False,
                        "ledger_head": entry.hash,
                        "ledger_seq": entry.seq,
                    }
                )
    write_report(run_dir)
    emp = empirical_audit(run_dir)
    assert emp["claimed_epsilon"] < emp["epsilon_lower_bound"] and emp["verdict"] == "FAIL"
    assert main(["audit", str(run_dir)]) == 0  # the ledgers alone look fine ...
    capsys.readouterr()
    assert main(["audit", str(run_dir), "--empirical", "--json"]) == 1  # ... the canaries say otherwise
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["empirical"]["verdict"] == "FAIL"
    assert any("exceeds the claimed epsilon" in p for p in out["problems"])


def test_empirical_audit_names_what_is_missing(leaky_run, tmp_path, capsys):
    import shutil

    _, src, _ = leaky_run
    run_dir = tmp_path / "r"
    shutil.copytree(src, run_dir)
    (run_dir / "model" / "federated_params.npz").unlink()
    with pytest.raises(DataError, match="no released final model"):
        empirical_audit(run_dir)
    RunLayout(run_dir).canary_coins.unlink()
    with pytest.raises(DataError, match="canary_coins.json is missing"):
        empirical_audit(run_dir)
    assert main(["audit", str(run_dir), "--empirical"]) == 1
    assert "empirical audit impossible" in capsys.readouterr().out
    no_canaries = load_config(run_dir / "config.toml", ["audit.canaries=0"])
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(no_canaries)))
    with pytest.raises(DataError, match="without canaries"):
        empirical_audit(run_dir)
    with pytest.raises(SystemExit):  # argparse refuses a bad --beta
        main(["audit", str(run_dir), "--empirical", "--beta", "2"])
    assert "--beta must be in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad,match", [({"canaries": 1}, "'audit.canaries' must be 0"), ({"canaries": -3}, "'audit.canaries' must be 0")]
)
def test_bad_audit_config_is_named(tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(tmp_path, "fedavg", audit=bad)
