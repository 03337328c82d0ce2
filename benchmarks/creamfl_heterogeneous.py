"""CreamFL on heterogeneous sites against FedAvg (paired sites only) and the server model on public data alone.

The federation of ``configs/creamfl_heterogeneous.toml``: two paired sites, an image-only site, a
text-only site and a held-out paired site.  Cells, each a ``secure-fedvlp run`` of its own (one
process per cell, as the sweep runs them), for every seed:

* ``creamfl``      -- CreamFL: every site trains its own ``tiny_client`` model; the server model
  learns from the public set and the ensemble of the sites' public-set representations;
* ``fedavg``       -- FedAvg of the server architecture on the paired sites (the image-only and
  text-only sites hold no pair, so FedAvg never asks them to train; they are still evaluated);
* ``server-only``  -- CreamFL's server training alone (``creamfl.use_clients = false``): the same
  public set, no site.  No site trains, so there is no DP variant: it is the reference of both.

``creamfl`` and ``fedavg`` run without DP (the paired sites on in-batch InfoNCE) and with DP-SGD at
``--epsilon`` on every training site (the per-sample decomposable objective, which DP requires);
each DP cell's ledgers are then checked with ``secure-fedvlp audit``.  A cell whose run directory
holds a report is not run again (the script resumes).  Tables (markdown) go to stdout and to
``<out>/summary.md``; every figure is read from the cells' ``report.json``.

    python benchmarks/creamfl_heterogeneous.py [--seeds 0 1 2] [--epsilon 8] [--out runs/creamfl_heterogeneous]
    python benchmarks/creamfl_heterogeneous.py --summarise-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "creamfl": ("CreamFL", ['federation.method="creamfl"']),
    "fedavg": ("FedAvg, paired sites only", ['federation.method="fedavg"']),
    "server-only": ("server model, public set only", ['federation.method="creamfl"', "creamfl.use_clients=false"]),
}
#: (site, role in the table): the text-only site (site4) holds no image, so it has neither metric.
AUROC_SITES = ("site1", "site2", "site3", "heldout")
RECALL_SITES = ("site1", "site2", "heldout")
SITE_LABEL = {
    "site1": "site1 (paired)",
    "site2": "site2 (paired)",
    "site3": "site3 (image only)",
    "site4": "site4 (text only)",
    "heldout": "held-out (paired)",
}


def cells(seeds: list[int], epsilon: float) -> list[dict]:
    """Seed-major, non-private cells first, so that an interrupted measurement holds whole seeds."""
    out = []
    for seed in seeds:
        for dp in (False, True):
            for variant in VARIANTS:
                if variant == "server-only" and dp:
                    continue
                out.append({"variant": variant, "dp": dp, "seed": seed, "epsilon": epsilon if dp else None})
    return out


def cell_name(c: dict) -> str:
    return f"{c['variant']}_{'dp' + format(c['epsilon'], 'g') if c['dp'] else 'nodp'}_seed{c['seed']}"


def overrides(c: dict) -> list[str]:
    o = [f"run.seed={c['seed']}", *VARIANTS[c["variant"]][1]]
    if c["dp"]:
        o += ["privacy.enabled=true", f"privacy.target_epsilon={c['epsilon']}", 'train.objective="decomposable"']
    return o


def run_cells(config: str, out: Path, todo: list[dict], python: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path.cwd()), os.environ.get("PYTHONPATH")) if p)}
    for i, c in enumerate(todo, 1):
        name = cell_name(c)
        run_dir = out / "cells" / name
        entry = state.setdefault(name, {"cell": c})
        if not (run_dir / "report.json").exists():
            print(f"[{i}/{len(todo)}] {name}: running ({time.perf_counter() - t0:.0f}s elapsed)", flush=True)
            cmd = [python, "-m", "secure_fedvlp.cli", "run", config, "--run-dir", str(run_dir)]
            for o in overrides(c):
                cmd += ["--set", o]
            t = time.perf_counter()
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(out / "cells" / f"{name}.log", "w", encoding="utf-8") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            entry.update({"returncode": rc, "seconds": round(time.perf_counter() - t, 1)})
            entry.pop("audit", None)
        else:
            print(f"[{i}/{len(todo)}] {name}: done already", flush=True)
        if c["dp"] and (run_dir / "report.json").exists() and "audit" not in entry:
            proc = subprocess.run(
                [python, "-m", "secure_fedvlp.cli", "audit", str(run_dir)],
                capture_output=True,
                text=True,
                env=env,
            )
            entry["audit"] = {"returncode": proc.returncode, "output": proc.stdout[-4000:] + proc.stderr[-2000:]}
            print(f"    audit: {'PASSED' if proc.returncode == 0 else 'FAILED'} (exit {proc.returncode})", flush=True)
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(state_path)
    return state


# ------------------------------------------------------------------------------------- summary
def _fmt(values: list[float], n: int = 0) -> str:
    """Mean ± sample std; ``(n=k)`` when fewer than the ``n`` seeds asked for are finished."""
    if not values:
        return "n/a"
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}" + (f" (n={len(values)})" if n and len(values) < n else "")


#: Two-sided 95 % Student t quantiles by degrees of freedom (paired differences over n seeds: n - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _fmt_diff(values: list[float], n: int = 0) -> str:
    """A paired difference, signed; in bold when its 95 % t-interval excludes 0; ``(n=k)`` as :func:`_fmt`."""
    if not values:
        return "n/a"
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    clear = len(values) > 1 and abs(m) > _T95.get(len(values) - 1, 2.0) * sd / len(values) ** 0.5
    b = "**" if clear else ""
    return f"{b}{m:+.3f} ± {sd:.3f}{b}" + (f" (n={len(values)})" if n and len(values) < n else "")


def _site_value(report: dict, site: str, key: str, when: str = "final") -> float | None:
    s = report.get("sites", {}).get(site) or report.get("heldout", {}).get(site) or {}
    v = (s.get(when) or {}).get(key)
    return None if v is None else float(v)


def summarise(out: Path, todo: list[dict], state: dict) -> str:
    reports: dict[str, dict] = {}
    for c in todo:
        p = out / "cells" / cell_name(c) / "report.json"
        if p.exists():
            reports[cell_name(c)] = json.loads(p.read_text())
    eps = next((c["epsilon"] for c in todo if c["dp"]), None)
    rows = [("untrained", None, "untrained (round 0)")]
    for variant, (label, _) in VARIANTS.items():
        for dp in (False, True):
            if variant == "server-only" and dp:
                continue
            if variant == "server-only":
                rows.append((variant, dp, f"{label} (no site trains: no DP needed)"))
            else:
                rows.append((variant, dp, f"{label}, " + (f"DP-SGD epsilon {eps:g}" if dp else "no DP")))

    def values(variant, dp, site, key):
        got = []
        for c in todo:
            r = reports.get(cell_name(c))
            if r is None:
                continue
            if variant == "untrained":  # round 0 of the server architecture, one per seed
                if c["variant"] != "server-only":
                    continue
                v = _site_value(r, site, key, "untrained")
            elif c["variant"] != variant or c["dp"] != dp:
                continue
            else:
                v = _site_value(r, site, key)
            if v is not None:
                got.append(v)
        return got

    lines = []
    n_seeds = len({c["seed"] for c in todo})
    for key, sites, title in (
        ("zs_auroc_macro", AUROC_SITES, "Zero-shot AUROC (macro), test split of each site"),
        ("mean_R@5", RECALL_SITES, "Recall@5 (mean of image->text and text->image), test split of each site"),
    ):
        lines += [f"### {title}: mean ± sample std over {n_seeds} seeds", ""]
        lines.append("| model | " + " | ".join(SITE_LABEL[s] for s in sites) + " |")
        lines.append("|---|" + "---|" * len(sites))
        for variant, dp, label in rows:
            lines.append(f"| {label} | " + " | ".join(_fmt(values(variant, dp, s, key), n_seeds) for s in sites) + " |")
        lines.append("")

    # paired differences (same seed, same initial server model)
    lines += [
        "### Paired differences (same seed, same initial server model): mean ± sample std over seeds; "
        "bold where the 95 % t-interval excludes 0",
        "",
    ]
    cols = [("zs_auroc_macro", s) for s in AUROC_SITES] + [("mean_R@5", s) for s in RECALL_SITES]
    lines.append(
        "| difference | " + " | ".join(f"{'AUROC' if k.startswith('zs') else 'R@5'} {s}" for k, s in cols) + " |"
    )
    lines.append("|---|" + "---|" * len(cols))
    comparisons = [
        ("CreamFL - FedAvg, no DP", ("creamfl", False), ("fedavg", False)),
        ("CreamFL - server only, no DP", ("creamfl", False), ("server-only", False)),
        ("CreamFL - FedAvg, DP", ("creamfl", True), ("fedavg", True)),
        ("CreamFL - server only, DP", ("creamfl", True), ("server-only", False)),
    ]
    for label, (va, da), (vb, db) in comparisons:
        cells_out = []
        for key, site in cols:
            diffs = []
            for seed in sorted({c["seed"] for c in todo}):
                a = reports.get(cell_name({"variant": va, "dp": da, "seed": seed, "epsilon": eps if da else None}))
                b = reports.get(cell_name({"variant": vb, "dp": db, "seed": seed, "epsilon": eps if db else None}))
                if a is None or b is None:
                    continue
                x, y = _site_value(a, site, key), _site_value(b, site, key)
                if x is not None and y is not None:
                    diffs.append(x - y)
            cells_out.append(_fmt_diff(diffs, n_seeds))
        lines.append(f"| {label} | " + " | ".join(cells_out) + " |")
    lines.append("")

    # wall time, epsilon, audit
    lines += ["### Cells: wall time, epsilon spent, ledger audit", ""]
    lines.append("| cell | exit | wall (s) | epsilon spent (max over sites) | audit |")
    lines.append("|---|---|---|---|---|")
    total = 0.0
    for c in todo:
        name = cell_name(c)
        e = state.get(name, {})
        r = reports.get(name)
        spent = ""
        if r is not None:
            clients = ((r.get("privacy") or {}).get("clients") or {}).values()
            vals = [float(x["epsilon"]) for x in clients if "epsilon" in x]
            spent = f"{max(vals):.3f}" if vals else "none (no DP)"
        audit = e.get("audit")
        a = "" if audit is None else ("PASSED" if audit["returncode"] == 0 else f"FAILED (exit {audit['returncode']})")
        total += float(e.get("seconds", 0.0))
        lines.append(f"| {name} | {e.get('returncode', '')} | {e.get('seconds', '')} | {spent} | {a} |")
    lines.append(f"\nTotal wall time of the cells run: {total:.0f} s ({total / 60:.1f} min).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/creamfl_heterogeneous.toml")
    ap.add_argument("--out", default="runs/creamfl_heterogeneous")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--summarise-only", action="store_true", help="only rebuild the tables from finished cells")
    args = ap.parse_args(argv)
    out = Path(args.out)
    todo = cells(args.seeds, args.epsilon)
    state_path = out / "state.json"
    if args.summarise_only:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
    else:
        state = run_cells(args.config, out, todo, sys.executable)
    md = summarise(out, todo, state)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(md, encoding="utf-8")
    print(md)
    failed = [n for n, e in state.items() if e.get("returncode") not in (0, None)]
    failed += [n for n, e in state.items() if e.get("audit", {}).get("returncode", 0) != 0]
    if failed:
        print(f"failed cells or audits: {', '.join(sorted(set(failed)))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
