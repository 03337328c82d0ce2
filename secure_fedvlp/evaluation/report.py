"""Run records and reports.

The server-side :class:`RunRecorder` appends one JSON record per (round, phase, site) to
``metrics.jsonl`` as the run goes (flushed and fsynced, so a crash loses nothing already
measured).  :func:`write_report` turns that file into ``report.json``, ``report.md`` and
PNG plots: final metrics beside the untrained (round-0) reference, per site, the worst
training site, and the held-out site.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from secure_fedvlp.evaluation.metrics import MACRO_AUROC
from secure_fedvlp.methods.base import RoundRecorder

logger = logging.getLogger(__name__)
progress_logger = logging.getLogger("secure_fedvlp.progress")

__all__ = ["RunRecorder", "read_metrics", "build_report", "write_report", "HEADLINE"]

#: Metrics shown in the report tables, with their labels.
HEADLINE: tuple[tuple[str, str], ...] = (
    (MACRO_AUROC, "zero-shot AUROC (macro)"),
    ("i2t_R@5", "image->text R@5"),
    ("t2i_R@5", "text->image R@5"),
)


class RunRecorder(RoundRecorder):
    """Appends records to ``run_dir/metrics.jsonl`` and shows progress."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._lock = threading.Lock()

    def record(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=False, default=float)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def progress(self, message: str) -> None:
        progress_logger.info(message)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (a torn last line is ignored with a warning)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                logger.warning("%s: ignoring a torn last line %d", path, i)
            else:
                raise
    return out


def _eval_by_round(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """site -> round -> evaluation record."""
    out: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if r.get("phase") == "evaluate" and r.get("status") == "ok":
            out[r["site"]][int(r["round"])] = r
    return out


def privacy_section(run_dir: Path) -> dict[str, Any] | None:
    """Per-client epsilon by round, replayed from each client's (verified) ledger, and the budget.

    Returns None when the run has no ledgers (DP off).  A ledger that fails verification is
    reported as such (never silently skipped).
    """
    import tomllib

    from secure_fedvlp.errors import LedgerError
    from secure_fedvlp.privacy import epsilon_curve, read_ledger

    ledgers = sorted((run_dir / "clients").glob("*/privacy_ledger.jsonl"))
    if not ledgers:
        return None
    cfg_path = run_dir / "config.toml"
    priv = tomllib.loads(cfg_path.read_text())["privacy"] if cfg_path.exists() else {}
    delta = float(priv.get("delta", 1e-5))
    accountant = str(priv.get("accountant", "rdp"))
    clients: dict[str, Any] = {}
    for path in ledgers:
        site = path.parent.name
        try:
            entries = read_ledger(path)
        except LedgerError as exc:
            clients[site] = {"error": str(exc)}
            continue
        events = [e.event for e in entries]
        curve = epsilon_curve(events, delta, accountant) if events else []
        clients[site] = {
            "epsilon_by_round": {int(r): float(e) for r, e in curve},
            "epsilon": float(curve[-1][1]) if curve else 0.0,
            "events": len(events),
            "by_mechanism": {k: sum(1 for e in events if type(e).__name__ == k)
                             for k in ("DPSGDEvent", "GaussianEvent", "PostProcessingEvent")},
            "ledger": str(path.relative_to(run_dir)),
        }
    not_covered = ["evaluation metrics on each site's test split (sent in clear; not a DP release)"]
    seeded = bool(priv.get("seeded_randomness", False))
    if seeded:
        not_covered.insert(0, SEEDED_WARNING)
    return {"delta": delta, "accountant": accountant, "budget_epsilon": priv.get("target_epsilon"),
            "seeded_randomness": seeded, "clients": clients, "not_covered": not_covered}


#: What a run with ``privacy.seeded_randomness = true`` does not guarantee (report and audit).
SEEDED_WARNING = ("privacy.seeded_randomness = true: DP-SGD's Poisson sampling and noise were derived from run.seed, "
                  "which the server and anyone holding the config know; the epsilon below holds against nobody who "
                  "knows the seed (reproducible run for tests and experiments, not a DP release)")


def encryption_section(run_dir: Path) -> dict[str, Any] | None:
    """CKKS aggregation of an encrypted run: per-round accepted/rejected contributions, upload
    sizes, and how the final model was released (``model/export.json``)."""
    rounds_path = run_dir / "secagg_rounds.json"
    if not rounds_path.exists():
        return None
    rounds = json.loads(rounds_path.read_text(encoding="utf-8"))
    sizes = [b for r in rounds for b in r.get("bytes_per_update", {}).values()]
    export_path = run_dir / "model" / "export.json"
    keys_manifest = run_dir / "keys" / "manifest.json"
    return {
        "rounds": rounds,
        "mean_upload_bytes": (sum(sizes) / len(sizes)) if sizes else None,
        "export": json.loads(export_path.read_text(encoding="utf-8")) if export_path.exists() else None,
        "keys": json.loads(keys_manifest.read_text(encoding="utf-8")) if keys_manifest.exists() else None,
    }


def empirical_section(run_dir: Path) -> dict[str, Any] | None:
    """The run's empirical privacy audit (``empirical_audit.json``, written by the auditor's step after
    training), without the per-canary scores; None when the run had no canaries."""
    path = run_dir / "empirical_audit.json"
    if not path.exists():
        return None
    try:
        emp = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return {"error": f"{path} is not valid JSON: {exc}"}
    emp.pop("scores", None)
    return emp


def build_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Summarise a run: per-site final vs untrained, worst training site, held-out site."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    evals = _eval_by_round(records)
    roles = {site: next(iter(rs.values())).get("role", "train") for site, rs in evals.items() if rs}
    keys = [k for k, _ in HEADLINE] + ["mean_R@5"]
    sites: dict[str, Any] = {}
    final_round = max((rnd for rs in evals.values() for rnd in rs), default=0)
    for site, rs in sorted(evals.items()):
        last = max(rs)
        sites[site] = {
            "role": roles[site],
            "final_round": last,
            "untrained": {k: rs[0][k] for k in keys if 0 in rs and k in rs[0]},
            "final": {k: rs[last][k] for k in keys if k in rs[last]},
            "final_per_finding": {k.split("/", 1)[1]: v for k, v in rs[last].items() if k.startswith("zs_auroc/")},
        }
    train_sites = [s for s, v in sites.items() if v["role"] == "train"]
    summary: dict[str, Any] = {}
    for k in keys:
        fin = {s: sites[s]["final"].get(k) for s in train_sites if k in sites[s]["final"]}
        unt = {s: sites[s]["untrained"].get(k) for s in train_sites if k in sites[s]["untrained"]}
        if fin:
            worst = min(fin, key=fin.get)
            summary[k] = {
                "mean_final": sum(fin.values()) / len(fin),
                "mean_untrained": (sum(unt.values()) / len(unt)) if unt else None,
                "worst_site": worst,
                "worst_final": fin[worst],
                "worst_untrained": min(unt.values()) if unt else None,
            }
    heldout = {s: v for s, v in sites.items() if v["role"] == "heldout"}
    dropped = [r for r in records if r.get("status") in ("dropped", "error")]  # budget stops are listed apart
    train_loss: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r.get("phase") == "train" and r.get("status") == "ok" and "train_loss" in r:
            train_loss[r["site"]][int(r["round"])] = r["train_loss"]
    config_path = run_dir / "config.toml"
    stopped = {r["site"]: {"round": r["round"], "reason": r.get("reason", ""), "epsilon": r.get("epsilon")}
               for r in records if r.get("status") == "budget_exhausted"}
    return {
        "privacy": privacy_section(run_dir),
        "encryption": encryption_section(run_dir),
        "empirical_audit": empirical_section(run_dir),
        "anchors": [r for r in records if r.get("phase") == "anchors" and r.get("status") in ("released", "withheld")]
        or None,
        "stopped_clients": stopped,
        "run_dir": str(run_dir),
        "config": config_path.read_text(encoding="utf-8") if config_path.exists() else None,
        "final_round": final_round,
        "sites": sites,
        "summary_train_sites": summary,
        "heldout": heldout,
        "failures": dropped,
        "train_loss": {s: dict(sorted(v.items())) for s, v in train_loss.items()},
    }


def _f(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}"


def _markdown(rep: dict[str, Any]) -> str:
    lines = [f"# Run report: `{rep['run_dir']}`", "", f"Rounds completed: {rep['final_round']}.", ""]
    lines += ["## Final model vs untrained reference (test split of each site)", ""]
    header = "| site | role | " + " | ".join(f"{lab} (untrained -> final)" for _, lab in HEADLINE) + " |"
    lines += [header, "|" + "---|" * (2 + len(HEADLINE))]
    for site, v in rep["sites"].items():
        cells = [f"{_f(v['untrained'].get(k))} -> **{_f(v['final'].get(k))}**" for k, _ in HEADLINE]
        lines.append(f"| {site} | {v['role']} | " + " | ".join(cells) + " |")
    lines += ["", "## Training sites: mean and worst site", "",
              "| metric | mean untrained | mean final | worst site (final) | lowest site untrained | worst site final |",
              "|---|---|---|---|---|---|"]
    for k, lab in HEADLINE:
        s = rep["summary_train_sites"].get(k)
        if s:
            lines.append(f"| {lab} | {_f(s['mean_untrained'])} | {_f(s['mean_final'])} | {s['worst_site']} | "
                         f"{_f(s['worst_untrained'])} | {_f(s['worst_final'])} |")
    if rep["heldout"]:
        lines += ["", "## Held-out site (never trains: out-of-distribution)", ""]
        for site, v in rep["heldout"].items():
            lines.append(f"- **{site}**: " + ", ".join(
                f"{lab} {_f(v['untrained'].get(k))} -> {_f(v['final'].get(k))}" for k, lab in HEADLINE))
    lines += ["", "## Zero-shot AUROC per finding (final)", ""]
    findings = sorted({f for v in rep["sites"].values() for f in v["final_per_finding"]})
    if findings:
        lines += ["| site | " + " | ".join(findings) + " |", "|---|" + "---|" * len(findings)]
        for site, v in rep["sites"].items():
            lines.append(f"| {site} | " + " | ".join(_f(v["final_per_finding"].get(f)) for f in findings) + " |")
    priv = rep.get("privacy")
    if priv:
        lines += ["", f"## Privacy spent (sample-level DP, delta = {priv['delta']}, {priv['accountant']} accountant)", ""]
        if priv.get("seeded_randomness"):
            lines += [f"**Warning: {SEEDED_WARNING}.**", ""]
        lines += [
                  f"Budget per client: epsilon = {priv['budget_epsilon']}. Recomputed from each client's ledger "
                  "(hash chain verified). Plot: `plots/epsilon_by_round.png`.", ""]
        rounds = sorted({r for c in priv["clients"].values() for r in c.get("epsilon_by_round", {})})
        lines += ["| client | " + " | ".join(f"round {r}" for r in rounds) + " | releases (DP-SGD / Gaussian) |",
                  "|---|" + "---|" * (len(rounds) + 1)]
        for site, c in priv["clients"].items():
            if "error" in c:
                lines.append(f"| {site} | ledger FAILED verification: {c['error']} |")
                continue
            cells = [_f(c["epsilon_by_round"].get(r)) for r in rounds]
            lines.append(f"| {site} | " + " | ".join(cells) +
                         f" | {c['by_mechanism']['DPSGDEvent']} / {c['by_mechanism']['GaussianEvent']} |")
        lines += ["", "Not covered by DP (named, not hidden): " + "; ".join(priv["not_covered"]) + "."]
    emp = rep.get("empirical_audit")
    if emp:
        lines += ["", "## Empirical privacy audit (canaries, one run)", ""]
        if "error" in emp:
            lines.append(f"Unreadable: {emp['error']}")
        else:
            claimed = emp.get("claimed_epsilon")
            lines += [
                f"{emp['m']} canaries (random-noise images, random-word reports), each included with probability 1/2 "
                f"at **{emp['canary_site']}** ({emp['members']} included; the coins stay with the auditor). Score: "
                f"{emp['score']}. Best of {len(emp['choices'])} pre-set guess counts (Bonferroni): "
                f"{emp['correct']}/{emp['guesses']} guesses correct (k+ = {emp['k_plus']}, k- = {emp['k_minus']}).", "",
                "| empirical epsilon lower bound | confidence | delta | claimed epsilon (ledger) | most this audit can show "
                "| verdict |", "|---|---|---|---|---|---|",
                f"| **{emp['epsilon_lower_bound']:.3f}** | {emp['confidence']:.0%} | {emp['delta']:g} | "
                f"{'none (DP off)' if claimed is None else f'{claimed:.3f}'} | {emp['max_detectable_epsilon']:.2f} | "
                f"{emp['verdict']} |"]
            lines += [f"- {p}" for p in emp.get("problems", [])]
    enc = rep.get("encryption")
    if enc:
        lines += ["", "## CKKS-encrypted aggregation", ""]
        if enc.get("keys"):
            k = enc["keys"]
            lines.append(f"Context {k.get('fingerprint')} (N={k['params'].get('poly_modulus_degree')}, moduli "
                         f"{k['params'].get('coeff_mod_bit_sizes')}, {k.get('security_bits')}-bit security).")
        if enc.get("mean_upload_bytes"):
            lines.append(f"Mean encrypted upload: {enc['mean_upload_bytes'] / 2**20:.1f} MiB per client and stage.")
        for r in enc["rounds"]:
            rej = "; ".join(f"{s}: {why}" for s, why in r["rejected"].items())
            lines.append(f"- round {r['round']} ({r['stage']}): summed {len(r['accepted'])} "
                         f"({', '.join(r['accepted'])})" + (f"; dropped {rej}" if rej else ""))
        ex = enc.get("export")
        if ex:
            lines += ["", f"Final model released by a key holder: {ex['decryption']}; flooding sigma "
                          f"{ex['flooding_sigma']:g}" + (f", fixed point 2^-{ex['fixed_point_bits']}, probability "
                          f"that any value decodes wrongly <= {ex['model_failure_probability_bound']:.1e}"
                          if "fixed_point_bits" in ex else f", {ex.get('flooding_bits')}-bit statistical security")
                      + "."]
        else:
            lines += ["", "The final model is encrypted (`model/global_model.ckks`); release it with "
                          "`secure-fedvlp export RUN_DIR --key KEYFILE`."]
    if rep.get("anchors"):
        lines += ["", "## Noised global anchors", ""]
        for r in rep["anchors"]:
            if r["status"] == "released":
                lines.append(f"- round {r['round']}: released from {', '.join(r['contributors'])}; {r['mode']}; "
                             f"clip C_a = {r['clip']:g}, noise std {r['sigma_total']:g}, accounted in each "
                             f"contributor's ledger as a Gaussian release with sigma {r['sigma_accounted']:g}")
            else:
                lines.append(f"- round {r['round']}: withheld ({r['reason']})")
    if rep.get("stopped_clients"):
        lines += ["", "## Clients stopped by their privacy budget", ""]
        for site, v in rep["stopped_clients"].items():
            lines.append(f"- **{site}** stopped at round {v['round']} (epsilon spent {_f(v['epsilon'])}): {v['reason']}")
    if rep["failures"]:
        lines += ["", "## Dropped or failed client replies", ""]
        for r in rep["failures"]:
            lines.append(f"- round {r.get('round')} {r.get('phase')} at {r.get('site')}: {r.get('reason')}")
    if rep["train_loss"]:
        lines += ["", "Plots: `plots/metrics_over_rounds.png`, `plots/train_loss.png`.", ""]
    else:  # DP clients keep their training losses (un-noised functions of their records) to themselves
        lines += ["", "Plots: `plots/metrics_over_rounds.png`. No training-loss plot: under DP the clients keep "
                      "their losses locally (`clients/<site>/local_train_metrics.jsonl`).", ""]
    return "\n".join(lines)


def _line_plot(path: Path, series: dict[str, dict[int, float]], ylabel: str,
               hline: tuple[float, str] | None = None) -> Path:
    """One line per site over rounds (optionally a labelled horizontal reference line)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for site, values in sorted(series.items()):
        ax.plot(list(values), list(values.values()), marker="o", label=site)
    if hline is not None:
        ax.axhline(hline[0], color="red", linestyle="--", label=hline[1])
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(run_dir: Path, rep: dict[str, Any], records: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    evals = _eval_by_round(records)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (key, label) in zip(axes, ((MACRO_AUROC, "zero-shot AUROC (macro)"), ("mean_R@5", "Recall@5 (mean i2t, t2i)")),
                                strict=True):
        for site, rs in sorted(evals.items()):
            rounds = sorted(r for r in rs if key in rs[r])
            if not rounds:
                continue
            held = rep["sites"].get(site, {}).get("role") == "heldout"
            ax.plot(rounds, [rs[r][key] for r in rounds], marker="o", linestyle="--" if held else "-",
                    label=f"{site} (held-out)" if held else site)
        ax.set_xlabel("round (0 = untrained)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes[1].legend(fontsize=8)
    fig.suptitle("Federated evaluation per site")
    fig.tight_layout()
    p = out_dir / "metrics_over_rounds.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    if rep["train_loss"]:
        paths.append(_line_plot(out_dir / "train_loss.png", rep["train_loss"], "mean local training loss"))
    priv = rep.get("privacy")
    if priv and priv["clients"]:
        series = {site: c["epsilon_by_round"] for site, c in priv["clients"].items() if c.get("epsilon_by_round")}
        budget = priv.get("budget_epsilon")
        paths.append(_line_plot(out_dir / "epsilon_by_round.png", series, f"epsilon spent (delta={priv['delta']})",
                                hline=(float(budget), "budget") if budget is not None else None))
    return paths


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.json``, ``report.md`` and plots for a run; return the path of report.md."""
    run_dir = Path(run_dir)
    rep = build_report(run_dir)
    (run_dir / "report.json").write_text(json.dumps(rep, indent=2, sort_keys=True, allow_nan=True), encoding="utf-8")
    md = run_dir / "report.md"
    md.write_text(_markdown(rep), encoding="utf-8")
    try:
        _plots(run_dir, rep, read_metrics(run_dir))
    except Exception:  # a plotting failure must not lose the report
        logger.exception("could not draw plots for %s", run_dir)
    return md
