"""Sweeps: a grid of experiment overrides over one base config, resumable, summarised.

A sweep file (TOML)::

    [sweep]
    name = "compare_methods"
    base = "demo.toml"            # relative to the sweep file
    output_dir = "runs/sweeps"
    group_by = "federation.method"

    [sweep.grid]                  # dotted config keys -> values; the cartesian product is run
    "federation.method" = ["fedavg", "feddra"]
    "run.seed" = [0, 1, 2]

    [sweep.set]                   # fixed overrides for every cell
    "federation.num_rounds" = 5

**The epsilon axis.** ``"privacy.target_epsilon"`` in the grid is the privacy-utility axis: a
positive number makes the cell a DP run (``privacy.enabled = true`` at that target), and
``"none"`` (or ``inf``) makes it the non-private run.  A non-private cell ignores the other
``privacy.*`` axes (clipping norm, ...), so it is run once, not once per clipping norm.
``[sweep.no_dp]`` names non-private *variants*, each with overrides of its own, e.g. the same
objective as the DP cells (isolates the effect of the noise) and the ordinary in-batch
objective that DP forbids (the usual non-private pipeline); without it there is one variant,
``"no DP"``, with no overrides.  Such a sweep writes a trade-off table and ``tradeoff.png``:
utility against epsilon per method (and clipping norm), mean and min-max over seeds, with the
non-private variants drawn at the right edge::

    [sweep.grid]
    "federation.method" = ["fedavg", "fedprox"]
    "privacy.target_epsilon" = [1.0, 8.0, "none"]
    "privacy.clip_norm" = [0.5, 2.0]
    "run.seed" = [0, 1]

    [sweep.no_dp."same objective"]
    [sweep.no_dp."in-batch InfoNCE"]
    "train.objective" = "infonce"

Each cell runs in its own process (``secure-fedvlp run``) into
``<output_dir>/<name>/cells/<cell-id>``; a cell whose ``report.json`` exists is not run
again, so an interrupted sweep resumes where it stopped, and a failing cell is recorded
and skipped without losing the others.  The summary (``summary.json``, ``summary.md``,
``summary.png``) gives mean and spread over the axes not grouped by (seeds).

Modules: :mod:`~secure_fedvlp.sweep.spec` reads and validates a sweep file and names its cells
and paths, :mod:`~secure_fedvlp.sweep.runner` runs the cells, :mod:`~secure_fedvlp.sweep.summary`
writes the summary and its plots.
"""

from secure_fedvlp.sweep.runner import run_sweep
from secure_fedvlp.sweep.spec import (
    EPSILON_KEY,
    NO_DP,
    SEED_KEY,
    VARIANT_KEY,
    SweepLayout,
    SweepSpec,
    cell_id,
    cell_overrides,
    is_no_dp,
    load_sweep,
)
from secure_fedvlp.sweep.summary import SUMMARY_METRICS, TRADEOFF_METRICS, summarise_sweep

__all__ = [
    "EPSILON_KEY",
    "NO_DP",
    "SEED_KEY",
    "SUMMARY_METRICS",
    "TRADEOFF_METRICS",
    "VARIANT_KEY",
    "SweepLayout",
    "SweepSpec",
    "cell_id",
    "cell_overrides",
    "is_no_dp",
    "load_sweep",
    "run_sweep",
    "summarise_sweep",
]
