"""CLI smoke test: a tiny federated run on the real Flower Simulation Engine, end to end."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from secure_fedvlp.cli import main
from secure_fedvlp.errors import KeyMaterialError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    run_dir = out / "tiny"
    rc = main(["run", "configs/tiny.toml", "--run-dir", str(run_dir), "--set", f"data.cache_dir={cache}"])
    assert rc == 0
    return run_dir


def test_run_writes_everything(tiny_run):
    for name in (
        "config.toml",
        "metrics.jsonl",
        "report.json",
        "report.md",
        "plots/metrics_over_rounds.png",
        "model/federated_params.npz",
    ):
        assert (tiny_run / name).exists(), name


def test_metrics_have_a_record_per_round_and_site(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    evals = {(r["round"], r["site"]) for r in rows if r["phase"] == "evaluate" and r["status"] == "ok"}
    sites = {s for _, s in evals}
    assert len(sites) == 3  # two training sites and the held-out site
    assert evals == {(r, s) for r in (0, 1, 2) for s in sites}
    trained = {r["site"] for r in rows if r["phase"] == "train" and r["status"] == "ok"}
    assert len(trained) == 2  # the held-out site never trains
    roles = {r["site"]: r["role"] for r in rows if r["phase"] == "evaluate"}
    assert sorted(roles.values()) == ["heldout", "train", "train"]


def test_report_has_reference_worst_and_heldout(tiny_run):
    rep = json.loads((tiny_run / "report.json").read_text())
    assert rep["final_round"] == 2
    assert rep["heldout"] and rep["summary_train_sites"]["zs_auroc_macro"]["worst_site"]
    for site in rep["sites"].values():
        assert "zs_auroc_macro" in site["untrained"] and "zs_auroc_macro" in site["final"]


def test_bad_config_key_is_a_clear_error(capsys):
    rc = main(["run", "configs/tiny.toml", "--set", "train.nonsense=1"])
    assert rc == 2
    assert "train.nonsense" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs_dp")
    cache = tmp_path_factory.mktemp("cache_dp")
    run_dir = out / "tiny_dp"
    rc = main(
        [
            "run",
            "configs/tiny.toml",
            "--run-dir",
            str(run_dir),
            "--set",
            f"data.cache_dir={cache}",
            "--set",
            "federation.method=fedaid",
            "--set",
            "train.objective=decomposable",
            "--set",
            "privacy.enabled=true",
            "--set",
            "privacy.target_epsilon=8.0",
            "--set",
            "anchors.enabled=true",
            "--set",
            "anchors.trust_server=true",
        ]
    )
    assert rc == 0
    return run_dir


def test_trusted_aggregator_anchors_are_stated_in_the_report_and_the_audit(tiny_dp_run, capsys):
    """Server-added anchor noise without encryption: the run had to opt in, and the report's not_covered and the
    audit both say the claim holds only against parties other than the server."""
    rep = json.loads((tiny_dp_run / "report.json").read_text())
    assert any("only against parties other than the server" in s for s in rep["privacy"]["not_covered"])
    capsys.readouterr()
    assert main(["audit", str(tiny_dp_run)]) == 0
    out = capsys.readouterr().out
    assert "claim scope: anchors.trust_server = true" in out
    assert "AUDIT PASSED (only against parties other than the server)" in out


def test_dp_run_reports_epsilon_per_client_within_budget(tiny_dp_run):
    from secure_fedvlp.privacy import replay

    rep = json.loads((tiny_dp_run / "report.json").read_text())
    priv = rep["privacy"]
    assert set(priv["clients"]) == {"site1", "site2"}  # training sites only; the held-out site releases nothing
    for c in priv["clients"].values():
        # per round: one DP-SGD job, the DRO-loss report and the anchor release
        assert c["by_mechanism"]["DPSGDEvent"] == 2 and c["by_mechanism"]["GaussianEvent"] == 4
        assert 0 < c["epsilon"] <= 8.0
        # the report's figure is the ledger's: an independent replay agrees
        assert replay(tiny_dp_run / c["ledger"]).get_epsilon(priv["delta"]) == pytest.approx(c["epsilon"])
    assert (tiny_dp_run / "plots" / "epsilon_by_round.png").exists()
    md = (tiny_dp_run / "report.md").read_text()
    assert "Privacy spent" in md and "trusted aggregator" in md  # plaintext anchors: the mode is labelled


@pytest.fixture(scope="module")
def tiny_encrypted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs_enc")
    cache = tmp_path_factory.mktemp("cache_enc")
    run_dir = out / "tiny_enc"
    rc = main(
        [
            "run",
            "configs/tiny.toml",
            "--run-dir",
            str(run_dir),
            "--set",
            f"data.cache_dir={cache}",
            "--set",
            "federation.method=feddra",
            "--set",
            "encryption.enabled=true",
            "--set",
            "privacy.enabled=true",
            "--set",
            "train.objective=decomposable",
            "--set",
            "anchors.enabled=true",
        ]
    )
    assert rc == 0
    return run_dir


def test_encrypted_run_end_to_end_server_keeps_only_ciphertexts(tiny_encrypted_run):
    """`secure-fedvlp run` with encryption on: real Simulation Engine, real CKKS, FedDRA's robust weights."""
    from secure_fedvlp.encryption import AggregateCiphertext, decrypt_aggregate, load_server_context

    run_dir = tiny_encrypted_run
    stats = json.loads((run_dir / "encryption_rounds.json").read_text())
    assert stats and all(sorted(s["accepted"]) == ["site1", "site2"] and not s["rejected"] for s in stats)
    # FedDRA's two stages per round, each aggregated under encryption
    assert {s["stage"] for s in stats} == {"align", "full"}
    # the server's final model is a ciphertext its own context cannot decrypt
    from secure_fedvlp.encryption.envelope import decode_chain

    key_dir = run_dir.parent / f"{run_dir.name}.keys"  # beside the run, never inside it
    assert not (run_dir / "keys").exists() and stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    server = load_server_context(key_dir / "server.ctx")
    _, aggregates = decode_chain((run_dir / "model" / "global_model.ckks").read_bytes())
    assert len(aggregates) == len(stats)  # delta protocol: one signed, packed aggregate per stage
    for blob in aggregates:
        agg = AggregateCiphertext.from_bytes(blob, server)
        assert agg.codec.startswith("packed/") and len(agg.contributions) == 2
        with pytest.raises(KeyMaterialError, match="cannot decrypt"):
            decrypt_aggregate(server, agg)
    # a key holder released it, exactly, and the report says how
    export = json.loads((run_dir / "model" / "export.json").read_text())
    assert export["decryption"] == "exact (packed integers)" and export["flooding_sigma"] == 0.0
    assert export["refused_aggregates"] == []
    # the plaintext model exists only in the key holder's own 0600 file, not on the server's side
    assert not (run_dir / "model" / "federated_params.npz").exists()
    released = run_dir / "clients" / "site1" / "federated_params.npz"
    assert stat.S_IMODE(released.stat().st_mode) == 0o600 and export["output"] == str(released)
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["encryption"]["keys"]["params"]["poly_modulus_degree"] == 8192
    assert rep["encryption"]["export"]["decryption"] == "exact (packed integers)"
    md = (run_dir / "report.md").read_text()
    assert "CKKS-encrypted aggregation" in md and "ciphertext domain" in md
    # DP-SGD, DRO reports and anchors composed in each site's ledger
    for c in rep["privacy"]["clients"].values():
        ledger = [json.loads(x) for x in (run_dir / c["ledger"]).read_text().splitlines()]
        assert [e["event"]["what"] for e in ledger if e["event"].get("what") == "anchors"] == ["anchors"] * 2


@pytest.mark.slow
def test_a_dp_run_from_a_public_start_end_to_end(tmp_path, capsys):
    """`secure-fedvlp run` with pretrain.enabled on the real Simulation Engine: the public start is trained before
    the sites start, installed in the run and named in its config, every site evaluates the untrained reference
    and the public start, the report carries the three references and the public start's block, and the audit
    passes (the public start spends nothing: no ledger records it). A second run reuses the cached start."""
    cache = tmp_path / "cache"
    sets = [
        f"data.cache_dir={cache}",
        "data.synthetic.pretrain_size=32",
        "pretrain.enabled=true",
        "pretrain.steps=3",
        "pretrain.batch_size=8",
        "federation.num_rounds=1",
        "train.objective=decomposable",
        "privacy.enabled=true",
    ]
    args = [a for s in sets for a in ("--set", s)]
    run_dir = tmp_path / "run"
    assert main(["run", "configs/tiny.toml", "--run-dir", str(run_dir), *args]) == 0
    start = run_dir / "model" / "public_start.npz"
    info = json.loads(start.with_suffix(".json").read_text())
    assert info["public"] and info["epsilon_spent"] == 0.0 and info["from_cache"] is False
    assert f'init_checkpoint = "{start.resolve()}"' in (run_dir / "config.toml").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    refs = {r["site"] for r in rows if r["phase"] == "evaluate" and r.get("reference") == "untrained"}
    assert refs == {"site1", "site2", "heldout"}
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["public_start"]["public"] and rep["public_start"]["hash"] == info["state_hash"]
    for site in rep["sites"].values():
        assert all("zs_auroc_macro" in site[k] for k in ("untrained", "public_start", "final"))
    capsys.readouterr()
    assert main(["audit", str(run_dir)]) == 0
    again = tmp_path / "again"
    assert main(["run", "configs/tiny.toml", "--run-dir", str(again), *args]) == 0
    assert json.loads((again / "model" / "public_start.json").read_text())["from_cache"] is True


def test_a_dp_run_with_the_sites_report_centroids_end_to_end(tmp_path, capsys):
    """`secure-fedvlp run` with train.objective = "site_centroids" under DP on the real Simulation Engine: each
    training site's ledger records the centroid release once (round 1, before its sums exist), its released
    centroids stay in its own directory, later rounds release nothing new, and the audit (every ledger's epsilon
    within the budget, every release the server logged in a ledger) passes."""
    from secure_fedvlp.layout import RunLayout
    from secure_fedvlp.privacy import site_centroids as sc
    from secure_fedvlp.privacy.ledger import read_ledger

    sets = [
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.trainable=image_head",
        "train.objective=site_centroids",
        "train.site_centroids=4",
        "privacy.enabled=true",
        "privacy.target_epsilon=4.0",
        "privacy.grad_sample_mode=ghost",
    ]
    args = [a for s in sets for a in ("--set", s)]
    run_dir = tmp_path / "run"
    assert main(["run", "configs/tiny.toml", "--run-dir", str(run_dir), *args]) == 0
    layout = RunLayout(run_dir)
    for site in ("site1", "site2"):
        entries = read_ledger(layout.ledger(site), client_id=site)
        kinds = [(type(e.event).__name__, getattr(e.event, "what", None), e.event.round) for e in entries]
        assert kinds.count(("GaussianEvent", sc.WHAT, 1)) == 1 and [k for k in kinds if k[1] == sc.WHAT] == [
            ("GaussianEvent", sc.WHAT, 1)
        ]
        assert sum(k[0] == "DPSGDEvent" for k in kinds) == 2
        assert (layout.client_dir(site) / sc.FILE).exists()
    # the released centroids exist only in the two training sites' own directories
    assert sorted(run_dir.rglob(sc.FILE)) == sorted(layout.client_dir(s) / sc.FILE for s in ("site1", "site2"))
    capsys.readouterr()
    assert main(["audit", str(run_dir)]) == 0


# --------------------------------------------------------------------------------------------- CreamFL
def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m secure_fedvlp.cli ...`` in a fresh process: what a user types, registry and all."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run(
        [sys.executable, "-m", "secure_fedvlp.cli", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # the Simulation Engine with five nodes, three rounds (~40 s idle, minutes under load)
def test_creamfl_config_runs_end_to_end_from_the_cli(tmp_path):
    run_dir = tmp_path / "creamfl"
    out = _cli("run", "configs/creamfl.toml", "--run-dir", str(run_dir), "--set", f"data.cache_dir={tmp_path / 'c'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = _rows(run_dir)
    rounds = [r for r in rows if r["phase"] == "creamfl"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:  # the replies' order is the transport's
        assert sorted(r["contributors_image"]) == ["site1", "site2"]
        assert sorted(r["contributors_text"]) == ["site1", "site3"]
    trained = {(r["round"], r["site"]) for r in rows if r["phase"] == "train" and r["status"] == "ok"}
    assert trained == {(r, s) for r in (1, 2, 3) for s in ("site1", "site2", "site3")}
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["final_round"] == 3
    assert "zs_auroc_macro" in rep["sites"]["site2"]["final"]  # the image-only site scores the server model
    assert rep["sites"]["site3"]["final"] == {}  # the text-only site holds no image to score it on
    assert "mean_R@5" in rep["heldout"]["heldout"]["final"]
    # each site's own model stays in its directory; only the server model is written as the run's model
    for site in ("site1", "site2", "site3"):
        assert (run_dir / "clients" / site / "creamfl_local_model.pt").exists()
    assert (run_dir / "model" / "federated_params.npz").exists()


@pytest.mark.slow  # a DP run through the Simulation Engine, then the ledger audit (minutes)
def test_creamfl_dp_run_from_the_cli_passes_the_ledger_audit(tmp_path):
    run_dir = tmp_path / "creamfl_dp"
    out = _cli(
        "run",
        "configs/creamfl.toml",
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.cache_dir={tmp_path / 'c'}",
        "--set",
        "federation.num_rounds=2",
        "--set",
        "privacy.enabled=true",
        "--set",
        "privacy.target_epsilon=8.0",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    audit = _cli("audit", str(run_dir))
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    assert "AUDIT PASSED" in audit.stdout
    rep = json.loads((run_dir / "report.json").read_text())
    spent = {s: c["epsilon"] for s, c in rep["privacy"]["clients"].items()}
    assert set(spent) == {"site1", "site2", "site3"} and all(0 < e <= 8.0 for e in spent.values())
