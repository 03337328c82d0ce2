"""The shared plotting helper: figures described as data, drawn headless, every figure closed."""

import subprocess
import sys

import pytest

from secure_fedvlp.evaluation.report import _plots
from secure_fedvlp.plotting import Bars, Line, Panel, RefLine, line_plot, save_figure

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_figure_of_every_kind_of_item_is_written_and_closed(tmp_path):
    import matplotlib.pyplot as plt

    lines = Panel(
        [
            Line([1, 4, 16], [0.5, 0.6, 0.7], label="dp", color="C1", band=([0.45, 0.55, 0.65], [0.55, 0.65, 0.75])),
            Line([64], [0.8], yerr=([0.05], [0.02]), marker="s", linestyle="none", label="no DP"),
            Line([], [], marker="D", color="black", linestyle="none", label="legend only"),
        ],
        xlabel="epsilon",
        ylabel="AUROC",
        refs=[RefLine(0.5, "untrained"), RefLine(32, vertical=True, linewidth=None)],
        xscale="log",
        xticks=([1, 4, 16, 64], ["1", "4", "16", "no DP"]),
        legend=True,
    )
    bars = Panel([Bars([0, 1], [0.6, 0.7], 0.4, yerr=[0.01, 0.02], label="mean")], grid="y", integer_x=True)
    path = save_figure(tmp_path / "f.png", [lines, bars], title="t")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000
    assert plt.get_fignums() == []


def test_line_plot_draws_one_line_per_name(tmp_path):
    path = line_plot(
        tmp_path / "l.png",
        {"b": {1: 2.0, 2: 1.0}, "a": {1: 3.0}},
        xlabel="round",
        ylabel="loss",
        ref=RefLine(1.5, "budget", color="red"),
    )
    assert path.read_bytes()[:8] == PNG


def test_a_figure_needs_a_panel(tmp_path):
    with pytest.raises(ValueError, match="at least one panel"):
        save_figure(tmp_path / "none.png", [])


def test_importing_the_helper_does_not_import_matplotlib():
    code = "import sys, secure_fedvlp.plotting; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_the_report_draws_its_three_plots(tmp_path):
    records = [
        {
            "phase": "evaluate",
            "status": "ok",
            "site": site,
            "round": r,
            "role": role,
            "zs_auroc_macro": 0.5 + 0.05 * r,
            "mean_R@5": 0.1 * r,
        }
        for site, role in (("site1", "train"), ("pub", "heldout"))
        for r in range(3)
    ]
    rep = {
        "sites": {"site1": {"role": "train"}, "pub": {"role": "heldout"}},
        "train_loss": {"site1": {1: 2.0, 2: 1.0}},
        "privacy": {"delta": 1e-5, "budget_epsilon": 8.0, "clients": {"site1": {"epsilon_by_round": {1: 2.0, 2: 4.0}}}},
    }
    paths = _plots(tmp_path, rep, records)
    assert [p.name for p in paths] == ["metrics_over_rounds.png", "train_loss.png", "epsilon_by_round.png"]
    assert all(p.parent == tmp_path / "plots" and p.read_bytes()[:8] == PNG for p in paths)
