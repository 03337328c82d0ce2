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

Each cell runs in its own process (``secure-fedvlp run``) into
``<output_dir>/<name>/cells/<cell-id>``; a cell whose ``report.json`` exists is not run
again, so an interrupted sweep resumes where it stopped, and a failing cell is recorded
and skipped without losing the others.  The summary (``summary.json``, ``summary.md``,
``summary.png``) gives mean and spread over the axes not grouped by (seeds).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fedvlp.config import load_config, read_toml
from secure_fedvlp.errors import ConfigError

logger = logging.getLogger(__name__)
progress = logging.getLogger("secure_fedvlp.progress")

__all__ = ["SweepSpec", "load_sweep", "run_sweep", "summarise_sweep", "SUMMARY_METRICS"]

#: (key in the summary, label): train-site mean, worst train site, held-out site.
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("mean/zs_auroc_macro", "zero-shot AUROC, mean of sites"),
    ("worst/zs_auroc_macro", "zero-shot AUROC, worst site"),
    ("heldout/zs_auroc_macro", "zero-shot AUROC, held-out site"),
    ("mean/mean_R@5", "Recall@5, mean of sites"),
    ("worst/mean_R@5", "Recall@5, worst site"),
    ("heldout/mean_R@5", "Recall@5, held-out site"),
)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file."""

    path: Path
    name: str
    base: Path
    output_dir: Path
    group_by: str
    grid: dict[str, tuple[Any, ...]]
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.output_dir / self.name

    def cells(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(self.grid[k] for k in keys))]


def _toml_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def cell_overrides(spec: SweepSpec, cell: dict[str, Any]) -> list[str]:
    """``key=value`` overrides of one cell (fixed first, grid values win)."""
    return [f"{k}={_toml_literal(v)}" for k, v in {**spec.fixed, **cell}.items()]


def cell_id(cell: dict[str, Any]) -> str:
    """A readable, filesystem-safe, stable directory name for a cell."""
    parts = [f"{k.split('.')[-1]}={v}" for k, v in cell.items()]
    readable = "_".join(parts).replace("/", "-").replace(" ", "")[:80]
    digest = hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:8]
    return f"{readable}_{digest}"


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Parse and validate a sweep file; every cell's config is validated before anything runs."""
    path = Path(path)
    data = read_toml(path, "sweep")
    problems = []
    unknown_top = set(data) - {"sweep"}
    if unknown_top:
        problems.append(f"unknown top-level table(s) {sorted(unknown_top)}; a sweep file has only [sweep].")
    sw = data.get("sweep", {})
    allowed = {"name", "base", "output_dir", "group_by", "grid", "set"}
    for k in sorted(set(sw) - allowed):
        problems.append(f"unknown key 'sweep.{k}' (valid keys here: {', '.join(sorted(allowed))}).")
    grid = sw.get("grid", {})
    if not isinstance(grid, dict) or not grid:
        problems.append("'sweep.grid' must be a non-empty table of dotted keys -> lists of values.")
        grid = {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            problems.append(f"'sweep.grid.\"{k}\"' must be a non-empty list; found {v!r}.")
    base = path.parent / str(sw.get("base", ""))
    if not sw.get("base") or not base.is_file():
        problems.append(f"'sweep.base' must name an experiment config next to the sweep file; {str(base)!r} "
                        "does not exist.")
    group_by = str(sw.get("group_by", next(iter(grid), "")))
    if grid and group_by not in grid:
        problems.append(f"'sweep.group_by' = {group_by!r} is not one of the grid keys {sorted(grid)}.")
    if problems:
        raise ConfigError(problems, source=str(path))
    spec = SweepSpec(path=path, name=str(sw.get("name", path.stem)), base=base,
                     output_dir=Path(str(sw.get("output_dir", "runs/sweeps"))), group_by=group_by,
                     grid={k: tuple(v) for k, v in grid.items()}, fixed=dict(sw.get("set", {})))
    cell_problems = []
    for cell in spec.cells():
        try:
            load_config(spec.base, cell_overrides(spec, cell))
        except ConfigError as exc:
            cell_problems.append(f"cell {cell}: " + "; ".join(exc.problems))
    if cell_problems:
        raise ConfigError(cell_problems, source=str(path))
    return spec


def run_sweep(spec: SweepSpec, *, verbose: bool = False, python: str = sys.executable) -> Path:
    """Run every unfinished cell (each in its own process), then write the summary."""
    root = spec.root
    (root / "cells").mkdir(parents=True, exist_ok=True)
    cells = spec.cells()
    state_path = root / "sweep_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    t0 = time.perf_counter()
    for i, cell in enumerate(cells, 1):
        cid = cell_id(cell)
        cdir = root / "cells" / cid
        if (cdir / "report.json").exists():
            progress.info("[%d/%d] %s: done already, skipped", i, len(cells), cid)
            continue
        progress.info("[%d/%d] %s: running (%.0fs elapsed)", i, len(cells), cid, time.perf_counter() - t0)
        if cdir.exists():  # an interrupted cell: start it again from scratch
            for p in sorted(cdir.rglob("*"), reverse=True):
                p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
        cmd = [python, "-m", "secure_fedvlp.cli", "run", str(spec.base), "--run-dir", str(cdir)]
        for o in cell_overrides(spec, cell):
            cmd += ["--set", o]
        t = time.perf_counter()
        with open(root / "cells" / f"{cid}.log", "w", encoding="utf-8") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        state[cid] = {"cell": cell, "returncode": rc, "seconds": round(time.perf_counter() - t, 1)}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, state_path)
        if rc != 0:
            logger.error("cell %s failed (exit %d); see %s", cid, rc, root / "cells" / f"{cid}.log")
    summarise_sweep(spec)
    return root


def _cell_metrics(report: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, s in report.get("summary_train_sites", {}).items():
        out[f"mean/{key}"] = s["mean_final"]
        out[f"worst/{key}"] = s["worst_final"]
        if s.get("mean_untrained") is not None:
            out[f"untrained_mean/{key}"] = s["mean_untrained"]
    for site in report.get("heldout", {}).values():
        for key, v in site["final"].items():
            out[f"heldout/{key}"] = v
    for name, site in report.get("sites", {}).items():
        for key, v in site["final"].items():
            out[f"site:{name}/{key}"] = v
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarise_sweep(spec: SweepSpec) -> dict[str, Any]:
    """Group finished cells by ``spec.group_by``; mean and sample std over the other axes."""
    root = spec.root
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    missing = []
    for cell in spec.cells():
        rep_path = root / "cells" / cell_id(cell) / "report.json"
        if not rep_path.exists():
            missing.append(cell)
            continue
        groups[str(cell[spec.group_by])].append(_cell_metrics(json.loads(rep_path.read_text())))
    summary: dict[str, Any] = {"sweep": spec.name, "group_by": spec.group_by, "grid": spec.grid,
                               "fixed": spec.fixed, "missing_cells": missing, "groups": {}}
    order = [str(v) for v in spec.grid[spec.group_by]]
    for g in order:
        rows = groups.get(g, [])
        keys = sorted(set().union(*rows)) if rows else []
        summary["groups"][g] = {"n": len(rows), **{
            k: dict(zip(("mean", "std"), _mean_std([r[k] for r in rows if k in r]), strict=True)) for k in keys}}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    lines = [f"# Sweep `{spec.name}`", "",
             f"Grouped by `{spec.group_by}`; mean ± sample std over {', '.join(k for k in spec.grid if k != spec.group_by) or 'nothing'}. "
             f"Fixed overrides: {spec.fixed or 'none'}.", "",
             "| " + spec.group_by + " | n | " + " | ".join(lab for _, lab in SUMMARY_METRICS) + " |",
             "|---|---|" + "---|" * len(SUMMARY_METRICS)]
    for g in order:
        grp = summary["groups"][g]
        cells = [f"{grp[k]['mean']:.3f} ± {grp[k]['std']:.3f}" if k in grp else "n/a" for k, _ in SUMMARY_METRICS]
        lines.append(f"| {g} | {grp['n']} | " + " | ".join(cells) + " |")
    site_keys = sorted({k for g in order for k in summary["groups"][g] if k.startswith("site:")
                        and k.endswith("zs_auroc_macro")})
    if site_keys:
        lines += ["", "Per-site zero-shot AUROC (macro), mean ± std:", "",
                  "| " + spec.group_by + " | " + " | ".join(k.split("/")[0][5:] for k in site_keys) + " |",
                  "|---|" + "---|" * len(site_keys)]
        for g in order:
            grp = summary["groups"][g]
            lines.append(f"| {g} | " + " | ".join(
                f"{grp[k]['mean']:.3f} ± {grp[k]['std']:.3f}" if k in grp else "n/a" for k in site_keys) + " |")
    if missing:
        lines += ["", f"{len(missing)} cell(s) have no report (failed or not run yet): {missing}"]
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(spec, summary, order)
    return summary


def _plot(spec: SweepSpec, summary: dict[str, Any], order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric in zip(axes, ("zs_auroc_macro", "mean_R@5"), strict=True):
        width = 0.25
        for j, (prefix, label) in enumerate((("mean", "mean of sites"), ("worst", "worst site"),
                                             ("heldout", "held-out site"))):
            k = f"{prefix}/{metric}"
            means = [summary["groups"][g].get(k, {}).get("mean", float("nan")) for g in order]
            stds = [summary["groups"][g].get(k, {}).get("std", 0.0) for g in order]
            xs = [i + (j - 1) * width for i in range(len(order))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
        ax.set_xticks(range(len(order)), order)
        ax.set_ylabel("zero-shot AUROC (macro)" if metric == "zs_auroc_macro" else "Recall@5 (mean i2t, t2i)")
        ax.set_xlabel(spec.group_by)
        ax.grid(axis="y", alpha=0.3)
        if metric == "zs_auroc_macro":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Sweep {spec.name}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(spec.root / "summary.png", dpi=110)
    plt.close(fig)

