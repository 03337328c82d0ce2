"""A sweep's summary: ``summary.json``, ``summary.md`` and plots over the finished cells.

Without an epsilon axis the cells are grouped by ``group_by`` (mean and sample std over the other
axes, bars in ``summary.png``).  With one, the privacy-utility trade-off: one row per series and
epsilon, statistics over seeds, drawn in ``tradeoff.png`` (copied to ``summary.png``).  Either way
a references table gives the untrained model and, for cells that start from one, the public start
(:data:`REFERENCES`), and the trade-off plot draws both as reference lines.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from secure_fedvlp.errors import ConfigError, DataError
from secure_fedvlp.layout import load_run
from secure_fedvlp.plotting import Bars, Line, Panel, RefLine, save_figure
from secure_fedvlp.sweep.spec import EPSILON_KEY, SEED_KEY, VARIANT_KEY, SweepSpec, cell_id, is_no_dp

logger = logging.getLogger(__name__)

__all__ = ["SUMMARY_METRICS", "TRADEOFF_METRICS", "REFERENCES", "summarise_sweep"]

#: (key in the summary, label): train-site mean, worst train site, held-out site.
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("mean/zs_auroc_macro", "zero-shot AUROC, mean of sites"),
    ("worst/zs_auroc_macro", "zero-shot AUROC, worst site"),
    ("heldout/zs_auroc_macro", "zero-shot AUROC, held-out site"),
    ("mean/mean_R@5", "Recall@5, mean of sites"),
    ("worst/mean_R@5", "Recall@5, worst site"),
    ("heldout/mean_R@5", "Recall@5, held-out site"),
)

#: (metric key, axis label) of the trade-off plot's panels.
TRADEOFF_METRICS: tuple[tuple[str, str], ...] = (
    ("mean/zs_auroc_macro", "zero-shot AUROC (macro), mean of sites"),
    ("mean/mean_R@5", "Recall@5 (mean i2t, t2i), mean of sites"),
    ("worst/zs_auroc_macro", "zero-shot AUROC (macro), worst site"),
)


#: (metric-key prefix, label) of the references a cell's report gives beside its final model.
REFERENCES: tuple[tuple[str, str], ...] = (("untrained", "untrained"), ("public_start", "public start"))


def _cell_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The flat metrics of one finished cell, from its report (final model, and the references as
    ``untrained_<mean|worst|heldout>/<metric>`` and ``public_start_<mean|worst|heldout>/<metric>``)."""
    out: dict[str, float] = {}
    for key, s in report.get("summary_train_sites", {}).items():
        out[f"mean/{key}"] = s["mean_final"]
        out[f"worst/{key}"] = s["worst_final"]
        for ref, _ in REFERENCES:
            if s.get(f"mean_{ref}") is not None:
                out[f"{ref}_mean/{key}"] = s[f"mean_{ref}"]
            if s.get(f"worst_{ref}") is not None:
                out[f"{ref}_worst/{key}"] = s[f"worst_{ref}"]
    for site in report.get("heldout", {}).values():
        for key, v in site["final"].items():
            out[f"heldout/{key}"] = v
        for ref, _ in REFERENCES:
            for key, v in (site.get(ref) or {}).items():
                out[f"{ref}_heldout/{key}"] = v
    for name, site in report.get("sites", {}).items():
        for key, v in site["final"].items():
            out[f"site:{name}/{key}"] = v
    clients = ((report.get("privacy") or {}).get("clients") or {}).values()
    spent = [float(c["epsilon"]) for c in clients if "epsilon" in c]
    if spent:
        out["epsilon_spent_max"] = max(spent)
    return out


def _finished_cells(spec: SweepSpec) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """The metrics of every finished cell, by cell id, and the cells without a (readable) report."""
    metrics: dict[str, dict[str, float]] = {}
    missing = []
    for cell in spec.cells():
        cid = cell_id(cell)
        run = spec.layout.cell(cid)
        report = None
        if run.report_json.exists():
            try:
                report = load_run(run.root).report()
            except (ConfigError, DataError) as exc:
                logger.error("cell %s has a report but its run directory cannot be read: %s", cid, exc)
        if report is None:
            missing.append(cell)
        else:
            metrics[cid] = _cell_metrics(report)
    return metrics, missing


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _stats(values: list[float]) -> dict[str, float]:
    m, sd = _mean_std(values)
    return {"mean": m, "std": sd, "min": min(values), "max": max(values), "n": len(values)}


def summarise_sweep(spec: SweepSpec) -> dict[str, Any]:
    """Summarise the finished cells.

    Without an epsilon axis: group by ``spec.group_by``, mean and sample std over the other axes
    (``summary.png``: bars).  With one: the privacy-utility trade-off per series and epsilon,
    statistics over seeds (``tradeoff.png``, also written as ``summary.png``).
    """
    layout = spec.layout
    metrics, missing = _finished_cells(spec)
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for cell in spec.cells():
        if (m := metrics.get(cell_id(cell))) is not None:
            groups[str(cell[spec.group_by])].append(m)
    summary: dict[str, Any] = {
        "sweep": spec.name,
        "group_by": spec.group_by,
        "grid": spec.grid,
        "fixed": spec.fixed,
        "no_dp_variants": spec.no_dp_variants,
        "missing_cells": missing,
        "groups": {},
    }
    order = [str(v) for v in spec.grid[spec.group_by]]
    for g in order:
        rows = groups.get(g, [])
        keys = sorted(set().union(*rows)) if rows else []
        summary["groups"][g] = {
            "n": len(rows),
            **{k: dict(zip(("mean", "std"), _mean_std([r[k] for r in rows if k in r]), strict=True)) for k in keys},
        }
    lines = [f"# Sweep `{spec.name}`", "", f"Fixed overrides: {spec.fixed or 'none'}.", ""]
    if spec.has_epsilon_axis:
        summary["tradeoff"] = _tradeoff(spec, metrics)
        lines += _tradeoff_markdown(spec, summary["tradeoff"])
    else:
        lines += _group_markdown(spec, summary, order)
    summary["references"] = _references(metrics)
    lines += _references_markdown(summary["references"])
    if missing:
        lines += ["", f"{len(missing)} cell(s) have no report (failed or not run yet): {missing}"]
    layout.summary_json.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    layout.summary_md.write_text("\n".join(lines) + "\n")
    if spec.has_epsilon_axis:
        _plot_tradeoff(spec, summary["tradeoff"], layout.tradeoff_png)
        shutil.copyfile(layout.tradeoff_png, layout.summary_png)
    else:
        _plot_groups(spec, summary, order, layout.summary_png)
    return summary


def _references(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per reference (:data:`REFERENCES`), statistics over every finished cell that has it of the same
    metrics as the summary's (:data:`SUMMARY_METRICS`: mean of sites, worst site, held-out site)."""
    out: dict[str, dict[str, Any]] = {}
    for ref, _ in REFERENCES:
        row: dict[str, Any] = {}
        for k, _ in SUMMARY_METRICS:
            where, metric = k.split("/", 1)
            values = [m[f"{ref}_{where}/{metric}"] for m in metrics.values() if f"{ref}_{where}/{metric}" in m]
            if values:
                row[k] = _stats(values)
        if row:
            out[ref] = row
    return out


def _references_markdown(refs: dict[str, dict[str, Any]]) -> list[str]:
    if not refs:
        return []
    labels = dict(REFERENCES)
    lines = [
        "",
        "## References",
        "",
        "The models every cell is compared with, mean ± sample std [min, max] over the cells that have them: the "
        "untrained (seeded) model and, where a cell starts from one, the public start (public data only, no "
        "privacy budget spent).",
        "",
        "| reference | n | " + " | ".join(lab for _, lab in SUMMARY_METRICS) + " |",
        "|---|---|" + "---|" * len(SUMMARY_METRICS),
    ]
    for ref, row in refs.items():
        n = max(s["n"] for s in row.values())
        cells = [
            f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f} [{row[k]['min']:.3f}, {row[k]['max']:.3f}]"
            if k in row
            else "n/a"
            for k, _ in SUMMARY_METRICS
        ]
        lines.append(f"| {labels[ref]} | {n} | " + " | ".join(cells) + " |")
    return lines


def _group_markdown(spec: SweepSpec, summary: dict[str, Any], order: list[str]) -> list[str]:
    others = ", ".join(k for k in spec.grid if k != spec.group_by) or "nothing"
    lines = [
        f"Grouped by `{spec.group_by}`; mean ± sample std over {others}.",
        "",
        "| " + spec.group_by + " | n | " + " | ".join(lab for _, lab in SUMMARY_METRICS) + " |",
        "|---|---|" + "---|" * len(SUMMARY_METRICS),
    ]
    for g in order:
        grp = summary["groups"][g]
        cells = [f"{grp[k]['mean']:.3f} ± {grp[k]['std']:.3f}" if k in grp else "n/a" for k, _ in SUMMARY_METRICS]
        lines.append(f"| {g} | {grp['n']} | " + " | ".join(cells) + " |")
    site_keys = sorted(
        {k for g in order for k in summary["groups"][g] if k.startswith("site:") and k.endswith("zs_auroc_macro")}
    )
    if site_keys:
        lines += [
            "",
            "Per-site zero-shot AUROC (macro), mean ± std:",
            "",
            "| " + spec.group_by + " | " + " | ".join(k.split("/")[0][5:] for k in site_keys) + " |",
            "|---|" + "---|" * len(site_keys),
        ]
        for g in order:
            grp = summary["groups"][g]
            cells = [f"{grp[k]['mean']:.3f} ± {grp[k]['std']:.3f}" if k in grp else "n/a" for k in site_keys]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


def _plot_groups(spec: SweepSpec, summary: dict[str, Any], order: list[str], path: Path) -> None:
    """Bars per group: mean of sites, worst site and held-out site, mean ± std over the other axes."""
    width = 0.25
    panels = []
    for metric, ylabel in (("zs_auroc_macro", "zero-shot AUROC (macro)"), ("mean_R@5", "Recall@5 (mean i2t, t2i)")):
        bars = []
        for j, (prefix, label) in enumerate(
            (("mean", "mean of sites"), ("worst", "worst site"), ("heldout", "held-out site"))
        ):
            k = f"{prefix}/{metric}"
            means = [summary["groups"][g].get(k, {}).get("mean", float("nan")) for g in order]
            stds = [summary["groups"][g].get(k, {}).get("std", 0.0) for g in order]
            bars.append(Bars([i + (j - 1) * width for i in range(len(order))], means, width, yerr=stds, label=label))
        refs = (RefLine(0.5, linestyle=":"),) if metric == "zs_auroc_macro" else ()
        panels.append(
            Panel(
                bars,
                xlabel=spec.group_by,
                ylabel=ylabel,
                refs=refs,
                xticks=(list(range(len(order))), order),
                legend=not panels,
                grid="y",
            )
        )
    save_figure(path, panels, title=f"Sweep {spec.name}: mean ± std over seeds", panel_size=(6.0, 4.0))


# --------------------------------------------------------------------------- privacy-utility trade-off


def _series_key(cell: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The cell's line in the trade-off plot: every axis but epsilon and the seed (and, for a
    non-private cell, the privacy axes it does not have; its variant is kept apart)."""
    return tuple((k, str(v)) for k, v in cell.items() if k not in (EPSILON_KEY, SEED_KEY, VARIANT_KEY))


def _tradeoff(spec: SweepSpec, metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per (series, epsilon): statistics over seeds of every finished cell's metrics."""
    buckets: dict[tuple[Any, ...], list[dict[str, float]]] = defaultdict(list)
    order: list[tuple[Any, ...]] = []
    for cell in spec.cells():
        key = (_series_key(cell), str(cell[EPSILON_KEY]), cell.get(VARIANT_KEY))
        if key not in order:
            order.append(key)
        if (m := metrics.get(cell_id(cell))) is not None:
            buckets[key].append(m)
    rows = []
    for series, eps, variant in order:
        cells = buckets.get((series, eps, variant), [])
        keys = sorted(set().union(*cells)) if cells else []
        rows.append(
            {
                "series": dict(series),
                "epsilon": eps,
                "dp": not is_no_dp(eps),
                "variant": variant,
                "n": len(cells),
                **{k: _stats([c[k] for c in cells if k in c]) for k in keys},
            }
        )
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
    variants = ", ".join(f"'{k}' ({v or 'no overrides'})" for k, v in spec.no_dp_variants.items())
    lines = [
        "## Privacy-utility trade-off",
        "",
        f"Mean ± sample std [min, max] over {seeds} seed(s). 'epsilon spent' is the largest client's epsilon, "
        f"recomputed from its ledger (delta as configured). Non-private variants: "
        f"{variants or 'one, without overrides'}. Plot: `tradeoff.png`.",
        "",
        "| series | target epsilon | n | epsilon spent | " + " | ".join(lab for _, lab in TRADEOFF_METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(TRADEOFF_METRICS),
    ]
    for r in rows:
        spent = f"{r['epsilon_spent_max']['mean']:.3f}" if "epsilon_spent_max" in r else ("-" if r["dp"] else "∞")
        eps = r["epsilon"] if r["dp"] else ("no DP" + (f": {r['variant']}" if r.get("variant") else ""))
        lines.append(
            f"| {_label(r['series'])} | {eps} | {r['n']} | {spent} | "
            + " | ".join(cell(r, k) for k, _ in TRADEOFF_METRICS)
            + " |"
        )
    return lines


def _plot_tradeoff(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> None:
    """Utility against epsilon per series (method, clipping norm, ...): mean line, min-max band over
    seeds; the non-private run at the right edge, past a break, labelled "no DP"."""
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
    methods = list(dict.fromkeys(dict(k).get("federation.method", "") for k in series))
    styles = ("-", "--", "-.", (0, (5, 1, 1, 1)))
    ticks = (finite + [x_nodp], [f"{e:g}" for e in finite] + ["no DP"])

    panels = []
    for metric, ylabel in TRADEOFF_METRICS:
        items: list[Line] = []
        seen: dict[str, int] = defaultdict(int)
        for key in series:
            method = dict(key).get("federation.method", "")
            colour = f"C{methods.index(method)}"  # colour: method; line style: the other axes
            style = styles[seen[method] % len(styles)]
            seen[method] += 1
            label = _label(dict(key))
            pts = sorted(
                (
                    (float(r["epsilon"]), r[metric])
                    for r in rows
                    if r["dp"] and tuple(sorted(r["series"].items())) == key and metric in r
                ),
                key=lambda t: t[0],
            )
            if pts:
                items.append(
                    Line(
                        [x for x, _ in pts],
                        [s["mean"] for _, s in pts],
                        label=label,
                        color=colour,
                        linestyle=style,
                        band=([s["min"] for _, s in pts], [s["max"] for _, s in pts]),
                    )
                )
            for nd in no_dp_rows(key):
                if metric not in nd:
                    continue
                s, v = nd[metric], nd.get("variant")
                items.append(
                    Line(
                        [offsets[v]],
                        [s["mean"]],
                        yerr=([s["mean"] - s["min"]], [s["max"] - s["mean"]]),
                        marker=markers[variants.index(v) % len(markers)],
                        color=colour,
                        linestyle="none",
                        label=None if pts else label,
                    )
                )
        if len(variants) > 1 or variants[:1] != [None]:  # one legend entry per non-private variant
            items += [
                Line(
                    [],
                    [],
                    label=f"no DP: {v}" if v else "no DP",
                    marker=markers[i % len(markers)],
                    color="black",
                    linestyle="none",
                )
                for i, v in enumerate(variants)
            ]
        refs = []
        for ref, label in REFERENCES:
            values = [r[f"{ref}_{metric}"]["mean"] for r in rows if f"{ref}_{metric}" in r]
            if values:
                refs.append(RefLine(statistics.fmean(values), label, linestyle="--" if ref == "untrained" else "-."))
        if finite:  # the break before the non-private points
            refs.append(RefLine(finite[-1] * 2.0, color="black", linestyle=(0, (2, 4)), linewidth=0.6, vertical=True))
        panels.append(
            Panel(
                items,
                xlabel="target epsilon per client (delta as configured)",
                ylabel=ylabel,
                refs=refs,
                xscale="log" if finite else "linear",
                xticks=ticks,
                legend=not panels,
            )
        )
    seeds = len(spec.grid.get(SEED_KEY, (None,)))
    save_figure(
        path,
        panels,
        title=f"Sweep {spec.name}: utility vs epsilon (mean, min-max band over {seeds} seed(s))",
        panel_size=(5.2, 4.2),
    )
