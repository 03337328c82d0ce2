"""Sweeps: every cell validated up front; finished cells are not redone; summary over seeds."""

import json
from pathlib import Path

import pytest

from secure_fedvlp import sweep as sweep_mod
from secure_fedvlp.config import load_config
from secure_fedvlp.errors import ConfigError
from secure_fedvlp.sweep import cell_id, load_sweep, run_sweep, runner

CONFIGS = Path(__file__).parents[2] / "configs"


def _sweep_file(tmp_path, grid='"federation.method" = ["fedavg", "fedprox"]\n"run.seed" = [0, 1]'):
    (tmp_path / "base.toml").write_text((CONFIGS / "tiny.toml").read_text())
    p = tmp_path / "s.toml"
    p.write_text(
        f'[sweep]\nname = "t"\nbase = "base.toml"\noutput_dir = "{tmp_path / "out"}"\n'
        f'group_by = "federation.method"\n\n[sweep.grid]\n{grid}\n'
    )
    return p


def _fake_report(cell_dir, auroc):
    """A finished cell's run directory: its resolved config and a report."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "config.toml").write_text((CONFIGS / "tiny.toml").read_text())
    rep = {
        "summary_train_sites": {
            "zs_auroc_macro": {"mean_final": auroc, "worst_final": auroc - 0.1, "mean_untrained": 0.5}
        },
        "heldout": {},
        "sites": {},
    }
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

    monkeypatch.setattr(runner, "_run_cell", lambda cmd, log: fake_call(cmd))
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

    monkeypatch.setattr(runner, "_run_cell", lambda cmd, log: fake_call(cmd))
    run_sweep(spec)
    state = json.loads((spec.root / "sweep_state.json").read_text())
    assert sorted(v["returncode"] for v in state.values()) == [0, 0, 0, 3]
    assert len(json.loads((spec.root / "summary.json").read_text())["missing_cells"]) == 1


# --------------------------------------------------------------------------- the epsilon axis


def _eps_sweep_file(tmp_path, grid, extra=""):
    base = (CONFIGS / "tiny.toml").read_text().replace("lr = 1e-3", 'lr = 1e-3\nobjective = "decomposable"')
    (tmp_path / "base.toml").write_text(base)
    p = tmp_path / "eps.toml"
    p.write_text(
        f'[sweep]\nname = "e"\nbase = "base.toml"\noutput_dir = "{tmp_path / "out"}"\n'
        f'group_by = "federation.method"\n{extra}\n[sweep.grid]\n{grid}\n'
    )
    return p


EPS_GRID = (
    '"federation.method" = ["fedavg", "fedprox"]\n"privacy.target_epsilon" = [1.0, 8.0, "none"]\n'
    '"privacy.clip_norm" = [0.5, 2.0]\n"run.seed" = [0, 1]'
)


def test_epsilon_axis_turns_dp_on_and_off_and_runs_no_dp_once_per_seed(tmp_path):
    variants = '\n[sweep.no_dp."same objective"]\n[sweep.no_dp."in-batch"]\n"train.objective" = "infonce"\n'
    spec = load_sweep(_eps_sweep_file(tmp_path, EPS_GRID, variants))
    cells = spec.cells()
    # 2 methods x (2 epsilons x 2 clipping norms + 2 non-private variants) x 2 seeds
    assert len(cells) == 2 * (2 * 2 + 2) * 2
    no_dp = [c for c in cells if c["privacy.target_epsilon"] == "none"]
    assert len(no_dp) == 8 and all("privacy.clip_norm" not in c for c in no_dp)
    assert sweep_mod.cell_overrides(spec, no_dp[0]) == [
        'federation.method="fedavg"',
        "run.seed=0",
        "privacy.enabled=false",
    ]
    no_dp = [c for c in no_dp if c["sweep.no_dp"] == "in-batch"]
    dp_cell = next(c for c in cells if c["privacy.target_epsilon"] == 1.0)
    over = sweep_mod.cell_overrides(spec, dp_cell)
    assert "privacy.enabled=true" in over and "privacy.target_epsilon=1.0" in over
    over = sweep_mod.cell_overrides(spec, no_dp[0])
    assert "privacy.enabled=false" in over and 'train.objective="infonce"' in over
    assert not any(o.startswith(("privacy.clip_norm", "privacy.target_epsilon")) for o in over)
    assert len({cell_id(c) for c in cells}) == len(cells)


@pytest.mark.parametrize(
    "grid,extra,match",
    [
        ('"privacy.target_epsilon" = [0.0, 1.0]', "", 'positive numbers or "none"'),
        ('"privacy.target_epsilon" = ["lots"]', "", "found 'lots'"),
        ('"privacy.target_epsilon" = [1.0]\n"privacy.enabled" = [true]', "", "already turns DP on"),
        ('"run.seed" = [0]', '\n[sweep.no_dp.x]\n"train.objective" = "infonce"\n', 'has no "privacy.target_epsilon"'),
        ('"privacy.target_epsilon" = [1.0]', "\n[sweep.no_dp]\nx = 1\n", "one table per non-private variant"),
    ],
)
def test_bad_epsilon_axes_are_named(tmp_path, grid, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(_eps_sweep_file(tmp_path, grid, extra))


def test_dp_cells_are_validated_like_any_config(tmp_path):
    # the base trains with in-batch InfoNCE, which DP refuses: caught before anything runs
    p = _eps_sweep_file(tmp_path, '"federation.method" = ["fedavg"]\n"privacy.target_epsilon" = [2.0, "none"]')
    p.write_text(p.read_text().replace('base = "base.toml"', 'base = "tiny.toml"'))
    (tmp_path / "tiny.toml").write_text((CONFIGS / "tiny.toml").read_text())
    with pytest.raises(ConfigError, match="infonce"):
        load_sweep(p)


def _fake_dp_report(cell_dir, auroc, eps):
    _fake_report(cell_dir, auroc)
    rep = json.loads((cell_dir / "report.json").read_text())
    rep["summary_train_sites"]["mean_R@5"] = {"mean_final": auroc / 4, "worst_final": auroc / 5, "mean_untrained": 0.1}
    if eps is not None:
        rep["privacy"] = {"clients": {"site1": {"epsilon": eps * 0.99}, "site2": {"epsilon": eps * 0.98}}}
    (cell_dir / "report.json").write_text(json.dumps(rep))


def test_epsilon_sweep_summarises_the_tradeoff_and_resumes(tmp_path, monkeypatch):
    variants = '\n[sweep.no_dp."same objective"]\n[sweep.no_dp."in-batch"]\n"train.objective" = "infonce"\n'
    spec = load_sweep(_eps_sweep_file(tmp_path, EPS_GRID, variants))
    ran = []

    def fake_call(cmd, stdout=None, stderr=None):
        sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        eps = next((float(s.split("=")[1]) for s in sets if s.startswith("privacy.target_epsilon=")), None)
        seed = int(next(s.split("=")[1] for s in sets if s.startswith("run.seed=")))
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        ran.append(run_dir.name)
        auroc = (0.5 + eps / 100) if eps is not None else (0.9 if 'train.objective="infonce"' in sets else 0.6)
        _fake_dp_report(run_dir, auroc + 0.02 * seed, eps)
        return 0

    monkeypatch.setattr(runner, "_run_cell", lambda cmd, log: fake_call(cmd))
    run_sweep(spec)
    assert len(ran) == 24
    ran.clear()
    run_sweep(spec)
    assert ran == []  # resumed: nothing redone
    summary = json.loads((spec.root / "summary.json").read_text())
    rows = {
        (r["series"].get("federation.method"), r["series"].get("privacy.clip_norm"), r["epsilon"], r["variant"]): r
        for r in summary["tradeoff"]
    }
    r8 = rows[("fedavg", "0.5", "8.0", None)]
    assert r8["n"] == 2 and r8["mean/zs_auroc_macro"]["min"] == pytest.approx(0.58)
    assert r8["mean/zs_auroc_macro"]["max"] == pytest.approx(0.60) and r8["epsilon_spent_max"]["mean"] == 7.92
    nodp = rows[("fedavg", None, "none", "in-batch")]
    assert nodp["dp"] is False and nodp["mean/zs_auroc_macro"]["mean"] == pytest.approx(0.91)
    assert rows[("fedavg", None, "none", "same objective")]["mean/zs_auroc_macro"]["mean"] == pytest.approx(0.61)
    md = (spec.root / "summary.md").read_text()
    assert "Privacy-utility trade-off" in md and "| fedavg | no DP: in-batch | 2 |" in md
    assert (spec.root / "tradeoff.png").stat().st_size > 10_000 and (spec.root / "summary.png").exists()


def test_cell_overrides_read_back_as_the_grid_values(tmp_path):
    grid = '"federation.method" = ["fedavg"]\n"eval.recall_ks" = [[1, 5], [5, 10]]\n"eval.every_round" = [false]'
    spec = load_sweep(_sweep_file(tmp_path, grid=grid))
    cfgs = [load_config(spec.base, sweep_mod.cell_overrides(spec, c)) for c in spec.cells()]
    assert [(c.eval.recall_ks, c.eval.every_round) for c in cfgs] == [((1, 5), False), ((5, 10), False)]


def test_a_cell_whose_run_directory_cannot_be_read_counts_as_missing(tmp_path, caplog):
    spec = load_sweep(_sweep_file(tmp_path))
    for i, cell in enumerate(spec.cells()):
        _fake_report(spec.cell_run(cell).root, 0.6)
        if i == 0:
            spec.cell_run(cell).config.unlink()  # a report without the run's config
    summary = sweep_mod.summarise_sweep(spec)
    assert summary["missing_cells"] == spec.cells()[:1] and summary["groups"]["fedavg"]["n"] == 1
    assert "cannot be read" in caplog.text


def test_the_summary_lists_the_public_start_beside_the_untrained_reference(tmp_path, monkeypatch):
    spec = load_sweep(_sweep_file(tmp_path))

    def fake_call(cmd, stdout=None, stderr=None):
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        _fake_report(run_dir, 0.7)
        rep = json.loads((run_dir / "report.json").read_text())
        s = rep["summary_train_sites"]["zs_auroc_macro"]
        s.update({"mean_public_start": 0.62, "worst_public_start": 0.58, "worst_untrained": 0.45})
        rep["heldout"] = {"heldout": {"final": {"zs_auroc_macro": 0.66}, "untrained": {}, "public_start": {}}}
        (run_dir / "report.json").write_text(json.dumps(rep))
        return 0

    monkeypatch.setattr(runner, "_run_cell", lambda cmd, log: fake_call(cmd))
    run_sweep(spec)
    summary = json.loads((spec.root / "summary.json").read_text())
    refs = summary["references"]
    assert refs["untrained"]["mean/zs_auroc_macro"]["mean"] == pytest.approx(0.5)
    assert refs["public_start"]["mean/zs_auroc_macro"]["mean"] == pytest.approx(0.62)
    assert refs["public_start"]["worst/zs_auroc_macro"]["n"] == 4
    md = (spec.root / "summary.md").read_text()
    assert "## References" in md and "| public start | 4 | 0.620 ± 0.000" in md and "| untrained | 4 |" in md


def test_an_unfinished_cell_is_moved_aside_with_its_ledger_and_keys_never_deleted(tmp_path, monkeypatch):
    spec = load_sweep(_sweep_file(tmp_path, grid='"federation.method" = ["fedavg"]'))
    cid = cell_id(spec.cells()[0])
    run = spec.layout.cell(cid)
    ledger = run.ledger("site1")
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b'{"a torn, interrupted ledger"')
    run.default_key_dir.mkdir()
    (run.default_key_dir / "client-site1.key").write_bytes(b"key")
    spec.layout.cell_log(cid).write_text("interrupted after 3 finished round(s)")
    monkeypatch.setattr(
        runner, "_run_cell", lambda cmd, log: _fake_report(Path(cmd[cmd.index("--run-dir") + 1]), 0.6) or 0
    )
    run_sweep(spec)
    [aside] = (spec.root / "interrupted").glob(f"{cid}-*[0-9]")
    assert (aside / "clients" / "site1" / "privacy_ledger.jsonl").read_bytes() == b'{"a torn, interrupted ledger"'
    assert (aside.parent / f"{aside.name}.keys" / "client-site1.key").read_bytes() == b"key"
    assert (aside.parent / f"{aside.name}.log").read_text() == "interrupted after 3 finished round(s)"
    assert run.report_json.exists() and not run.default_key_dir.exists()  # the cell ran again, from scratch
