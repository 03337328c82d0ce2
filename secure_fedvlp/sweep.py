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
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
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

__all__ = ["SweepSpec", "load_sweep", "run_sweep", "summarise_sweep", "SUMMARY_METRICS", "EPSILON_KEY", "SEED_KEY",
           "NO_DP"]

#: The grid key of the privacy-utility axis, and the spread axis.
EPSILON_KEY = "privacy.target_epsilon"
SEED_KEY = "run.seed"
#: How a non-private cell is written on the epsilon axis ("inf" is accepted as a synonym).
NO_DP = "none"
#: The cell key naming a non-private variant (``[sweep.no_dp]``), present only when variants are named.
VARIANT_KEY = "sweep.no_dp"

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
    #: Non-private variants: label -> overrides (empty: one unnamed variant without overrides).
    no_dp_variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.output_dir / self.name

    @property
    def has_epsilon_axis(self) -> bool:
        return EPSILON_KEY in self.grid

    def cells(self) -> list[dict[str, Any]]:
        """The distinct cells, in grid order (a non-private cell drops the other ``privacy.*`` axes)."""
        keys = list(self.grid)
        out: list[dict[str, Any]] = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            cell = dict(zip(keys, values, strict=True))
            variants: list[dict[str, Any]] = [cell]
            if self.has_epsilon_axis and is_no_dp(cell[EPSILON_KEY]):
                cell = {k: (NO_DP if k == EPSILON_KEY else v) for k, v in cell.items()
                        if k == EPSILON_KEY or not k.startswith("privacy.")}
                variants = [{**cell, VARIANT_KEY: label} for label in self.no_dp_variants] or [cell]
            for c in variants:
                if c not in out:
                    out.append(c)
        return out


def is_no_dp(value: Any) -> bool:
    """Whether an epsilon-axis value means "no DP" (``"none"``, ``"inf"`` or ``inf``)."""
    if isinstance(value, str):
        return value.strip().lower() in (NO_DP, "inf", "infinity")
    return isinstance(value, float) and math.isinf(value) and value > 0


def _epsilon_problem(value: Any) -> str | None:
    if is_no_dp(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        return (f"'sweep.grid.\"{EPSILON_KEY}\"' values must be positive numbers or \"{NO_DP}\" (no DP); "
                f"found {value!r}.")
    return None


def _toml_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def cell_overrides(spec: SweepSpec, cell: dict[str, Any]) -> list[str]:
    """``key=value`` overrides of one cell (fixed first, grid values win).

    On the epsilon axis a number turns DP on at that target; "none" turns it off and applies the
    cell's ``[sweep.no_dp]`` variant.
    """
    values = {**spec.fixed, **cell}
    variant = spec.no_dp_variants.get(values.pop(VARIANT_KEY, None), {})
    if EPSILON_KEY in cell:
        eps = values.pop(EPSILON_KEY)
        if is_no_dp(eps):
            values = {**{k: v for k, v in values.items() if not k.startswith("privacy.")}, **variant,
                      "privacy.enabled": False}
        else:
            values.update({"privacy.enabled": True, EPSILON_KEY: float(eps)})
    return [f"{k}={_toml_literal(v)}" for k, v in values.items()]


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
    allowed = {"name", "base", "output_dir", "group_by", "grid", "set", "no_dp"}
    for k in sorted(set(sw) - allowed):
        problems.append(f"unknown key 'sweep.{k}' (valid keys here: {', '.join(sorted(allowed))}).")
    grid = sw.get("grid", {})
    if not isinstance(grid, dict) or not grid:
        problems.append("'sweep.grid' must be a non-empty table of dotted keys -> lists of values.")
        grid = {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            problems.append(f"'sweep.grid.\"{k}\"' must be a non-empty list; found {v!r}.")
        elif k == EPSILON_KEY:
            problems.extend(p for p in map(_epsilon_problem, v) if p)
    if "privacy.enabled" in grid and EPSILON_KEY in grid:
        problems.append(f"'sweep.grid' has both \"privacy.enabled\" and \"{EPSILON_KEY}\"; the epsilon axis "
                        f"already turns DP on (a number) and off (\"{NO_DP}\").")
    no_dp = sw.get("no_dp", {})
    if not isinstance(no_dp, dict) or not all(isinstance(v, dict) for v in no_dp.values()):
        problems.append("'sweep.no_dp' must hold one table per non-private variant ([sweep.no_dp.\"<label>\"] of "
                        f"dotted keys -> values); found {no_dp!r}.")
        no_dp = {}
    elif no_dp and EPSILON_KEY not in grid:
        problems.append(f"'sweep.no_dp' names variants of the non-private cells of the epsilon axis, but the grid has no "
                        f"\"{EPSILON_KEY}\" axis.")
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
                     grid={k: tuple(v) for k, v in grid.items()}, fixed=dict(sw.get("set", {})),
                     no_dp_variants={str(k): dict(v) for k, v in no_dp.items()})
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
        if s.get("worst_untrained") is not None:
            out[f"untrained_worst/{key}"] = s["worst_untrained"]
    for site in report.get("heldout", {}).values():
        for key, v in site["final"].items():
            out[f"heldout/{key}"] = v
    for name, site in report.get("sites", {}).items():
        for key, v in site["final"].items():
            out[f"site:{name}/{key}"] = v
    clients = ((report.get("privacy") or {}).get("clients") or {}).values()
    spent = [float(c["epsilon"]) for c in clients if "epsilon" in c]
    if spent:
        out["epsilon_spent_max"] = max(spent)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarise_sweep(spec: SweepSpec) -> dict[str, Any]:
    """Summarise the finished cells.

    Without an epsilon axis: group by ``spec.group_by``, mean and sample std over the other axes
    (``summary.png``: bars).  With one: the privacy-utility trade-off per series and epsilon,
    statistics over seeds (``tradeoff.png``, also written as ``summary.png``).
    """
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
                               "fixed": spec.fixed, "no_dp_variants": spec.no_dp_variants, "missing_cells": missing,
                               "groups": {}}
    order = [str(v) for v in spec.grid[spec.group_by]]
    for g in order:
        rows = groups.get(g, [])
        keys = sorted(set().union(*rows)) if rows else []
        summary["groups"][g] = {"n": len(rows), **{
            k: dict(zip(("mean", "std"), _mean_std([r[k] for r in rows if k in r]), strict=True)) for k in keys}}
    lines = [f"# Sweep `{spec.name}`", "", f"Fixed overrides: {spec.fixed or 'none'}.", ""]
    if spec.has_epsilon_axis:
        summary["tradeoff"] = _tradeoff(spec)
        lines += _tradeoff_markdown(spec, summary["tradeoff"])
    else:
        lines += _group_markdown(spec, summary, order)
    if missing:
        lines += ["", f"{len(missing)} cell(s) have no report (failed or not run yet): {missing}"]
    (root / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    if spec.has_epsilon_axis:
        _plot_tradeoff(spec, summary["tradeoff"], root / "tradeoff.png")
        shutil.copyfile(root / "tradeoff.png", root / "summary.png")
    else:
        _plot(spec, summary, order)
    return summary


def _group_markdown(spec: SweepSpec, summary: dict[str, Any], order: list[str]) -> list[str]:
    lines = [f"Grouped by `{spec.group_by}`; mean ± sample std over "
             f"{', '.join(k for k in spec.grid if k != spec.group_by) or 'nothing'}.", "",
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
    return lines


# --------------------------------------------------------------------------- privacy-utility trade-off

#: (metric key, axis label) of the trade-off plot's panels.
TRADEOFF_METRICS: tuple[tuple[str, str], ...] = (
    ("mean/zs_auroc_macro", "zero-shot AUROC (macro), mean of sites"),
    ("mean/mean_R@5", "Recall@5 (mean i2t, t2i), mean of sites"),
    ("worst/zs_auroc_macro", "zero-shot AUROC (macro), worst site"),
)


def _series_key(spec: SweepSpec, cell: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The cell's line in the trade-off plot: every axis but epsilon and the seed (and, for a
    non-private cell, the privacy axes it does not have; its variant is kept apart)."""
    return tuple((k, str(v)) for k, v in cell.items() if k not in (EPSILON_KEY, SEED_KEY, VARIANT_KEY))


def _stats(values: list[float]) -> dict[str, float]:
    m, sd = _mean_std(values)
    return {"mean": m, "std": sd, "min": min(values), "max": max(values), "n": len(values)}


def _tradeoff(spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per (series, epsilon): statistics over seeds of every finished cell's metrics."""
    buckets: dict[tuple[Any, ...], list[dict[str, float]]] = defaultdict(list)
    order: list[tuple[Any, ...]] = []
    for cell in spec.cells():
        key = (_series_key(spec, cell), str(cell[EPSILON_KEY]), cell.get(VARIANT_KEY))
        if key not in order:
            order.append(key)
        rep_path = spec.root / "cells" / cell_id(cell) / "report.json"
        if rep_path.exists():
            buckets[key].append(_cell_metrics(json.loads(rep_path.read_text())))
    rows = []
    for series, eps, variant in order:
        cells = buckets.get((series, eps, variant), [])
        metrics = sorted(set().union(*cells)) if cells else []
        rows.append({"series": dict(series), "epsilon": eps, "dp": not is_no_dp(eps), "variant": variant,
                     "n": len(cells),
                     **{k: _stats([c[k] for c in cells if k in c]) for k in metrics}})
    return rows


def _label(series: dict[str, str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" if k != "federation.method" else v for k, v in series.items()) or "all"


def _tradeoff_markdown(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    def cell(r: dict[str, Any], k: str) -> str:
        if k not in r:
            return "n/a"
        s = r[k]
        return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"

    seeds = len(spec.grid.get(SEED_KEY, (None,)))
    lines = ["## Privacy-utility trade-off", "",
             f"Mean ± sample std [min, max] over {seeds} seed(s). 'epsilon spent' is the largest client's epsilon, "
             f"recomputed from its ledger (delta as configured). Non-private variants: "
             + (", ".join(f"'{k}' ({v or 'no overrides'})" for k, v in spec.no_dp_variants.items()) or
                "one, without overrides") + ". Plot: `tradeoff.png`.", "",
             "| series | target epsilon | n | epsilon spent | " + " | ".join(lab for _, lab in TRADEOFF_METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(TRADEOFF_METRICS)]
    for r in rows:
        spent = f"{r['epsilon_spent_max']['mean']:.3f}" if "epsilon_spent_max" in r else ("-" if r["dp"] else "∞")
        eps = r["epsilon"] if r["dp"] else ("no DP" + (f": {r['variant']}" if r.get("variant") else ""))
        lines.append(f"| {_label(r['series'])} | {eps} | {r['n']} | {spent} | "
                     + " | ".join(cell(r, k) for k, _ in TRADEOFF_METRICS) + " |")
    return lines


def _plot_tradeoff(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> None:
    """Utility against epsilon per series (method, clipping norm, ...): mean line, min-max band over
    seeds; the non-private run at the right edge, past a break, labelled "no DP"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({float(r["epsilon"]) for r in rows if r["dp"]})
    x_nodp = (finite[-1] * 4.0) if finite else 1.0
    series = []
    for r in rows:
        key = tuple(sorted(r["series"].items()))
        if r["dp"] and key not in series:
            series.append(key)
    if not series:  # only non-private cells
        series = [tuple(sorted(r["series"].items())) for r in rows]

    def no_dp_rows(key: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
        want = {k: v for k, v in key if not k.startswith("privacy.")}
        return [r for r in rows if not r["dp"] and r["series"] == want]

    variants = list(dict.fromkeys(r.get("variant") for r in rows if not r["dp"]))
    markers = ("s", "D", "^", "v", "P")
    offsets = {v: x_nodp * (1.25 ** (i - (len(variants) - 1) / 2)) for i, v in enumerate(variants)}

    fig, axes = plt.subplots(1, len(TRADEOFF_METRICS), figsize=(5.2 * len(TRADEOFF_METRICS), 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(dict(k).get("federation.method", "") for k in series))
    styles = ("-", "--", "-.", (0, (5, 1, 1, 1)))
    for ax, (metric, label) in zip(axes, TRADEOFF_METRICS, strict=True):
        seen: dict[str, int] = defaultdict(int)
        for key in series:
            method = dict(key).get("federation.method", "")
            c = colours[methods.index(method) % len(colours)]  # colour: method; line style: the other axes
            ls = styles[seen[method] % len(styles)]
            seen[method] += 1
            pts = sorted(((float(r["epsilon"]), r[metric]) for r in rows
                          if r["dp"] and tuple(sorted(r["series"].items())) == key and metric in r), key=lambda t: t[0])
            xs = [x for x, _ in pts]
            if pts:
                ax.plot(xs, [s["mean"] for _, s in pts], marker="o", color=c, linestyle=ls, label=_label(dict(key)))
                ax.fill_between(xs, [s["min"] for _, s in pts], [s["max"] for _, s in pts], color=c, alpha=0.15)
            for nd in no_dp_rows(key):
                if metric not in nd:
                    continue
                s, v = nd[metric], nd.get("variant")
                x = offsets.get(v, x_nodp) if finite else offsets.get(v, 1.0)
                ax.errorbar([x], [s["mean"]], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]],
                            marker=markers[variants.index(v) % len(markers)], color=c, capsize=4, linestyle="none",
                            label=None if pts else _label(dict(key)))
        if len(variants) > 1 or variants[:1] != [None]:
            for i, v in enumerate(variants):  # one legend entry per non-private variant
                ax.plot([], [], marker=markers[i % len(markers)], color="black", linestyle="none",
                        label=f"no DP: {v}" if v else "no DP")
        untrained = [r[f"untrained_{metric}"]["mean"] for r in rows if f"untrained_{metric}" in r]
        if untrained:
            ax.axhline(sum(untrained) / len(untrained), color="grey", linestyle="--", linewidth=0.8, label="untrained")
        if finite:
            ax.set_xscale("log")
            ax.axvline(finite[-1] * 2.0, color="black", linewidth=0.6, linestyle=(0, (2, 4)))
        ticks = finite + [x_nodp]
        ax.set_xticks(ticks, [f"{e:g}" for e in finite] + ["no DP"])
        ax.minorticks_off()
        ax.set_xlabel("target epsilon per client (delta as configured)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = len(spec.grid.get(SEED_KEY, (None,)))
    fig.suptitle(f"Sweep {spec.name}: utility vs epsilon (mean, min-max band over {seeds} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

