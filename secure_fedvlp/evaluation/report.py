"""Run records and reports.

The server-side :class:`RunRecorder` appends one JSON record per (round, phase, site) to the
run's metrics file (:attr:`RunLayout.metrics <secure_fedvlp.layout.RunLayout.metrics>`) as the
run goes (flushed and fsynced, so a crash loses nothing already measured).  :func:`write_report`
turns that file into the JSON and Markdown reports and PNG plots: final metrics beside the
references, per site, the worst training site, and the held-out site.  The references are the
untrained (seeded) model and, when the run starts from a public start (``model.init_checkpoint``),
that public start: round 0 is then the public start and the untrained model is the reference
evaluation every site ran before it (records tagged ``reference = "untrained"``).  The run's
settings are its resolved config (:func:`~secure_fedvlp.layout.load_run`).
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

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.evaluation.metrics import MACRO_AUROC
from secure_fedvlp.layout import FinishedRun, RunLayout, load_run
from secure_fedvlp.methods.strategy import RoundRecorder
from secure_fedvlp.plotting import Line, Panel, RefLine, line_plot, save_figure
from secure_fedvlp.privacy.anchors import claim_scope

logger = logging.getLogger(__name__)
progress_logger = logging.getLogger("secure_fedvlp.progress")

__all__ = ["RunRecorder", "build_report", "write_report", "HEADLINE"]

#: Metrics shown in the report tables, with their labels.
HEADLINE: tuple[tuple[str, str], ...] = (
    (MACRO_AUROC, "zero-shot AUROC (macro)"),
    ("i2t_R@5", "image->text R@5"),
    ("t2i_R@5", "text->image R@5"),
)
#: Metrics of segmentation methods (FedSM), shown instead when the sites report them.
SEG_HEADLINE: tuple[tuple[str, str], ...] = (
    ("dice", "Dice (FedSM routing)"),
    ("dice_global", "Dice (global model)"),
    ("route_global", "routed to global"),
)


def _headline(rep: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The headline metrics this run's sites reported (VLP metrics, or segmentation ones)."""
    seg = any(k in v["final"] for v in rep["sites"].values() for k, _ in SEG_HEADLINE)
    return SEG_HEADLINE if seg else HEADLINE


class RunRecorder(RoundRecorder):
    """Appends records to the run's metrics file and shows progress."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = RunLayout(self.run_dir).metrics
        self._lock = threading.Lock()

    def record(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=False, default=float)
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def progress(self, message: str) -> None:
        progress_logger.info(message)


def _eval_by_round(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """site -> round -> evaluation record of the round's global model (reference evaluations left out)."""
    out: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if r.get("phase") == "evaluate" and r.get("status") == "ok" and "reference" not in r:
            out[r["site"]][int(r["round"])] = r
    return out


def _reference_evals(records: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """site -> evaluation record of the reference model ``kind`` (e.g. the untrained model beside a public start)."""
    return {
        r["site"]: r
        for r in records
        if r.get("phase") == "evaluate" and r.get("status") == "ok" and r.get("reference") == kind
    }


def has_public_start(cfg: ExperimentConfig) -> bool:
    """Whether the run's round-0 model is a public start (a checkpoint loaded over the seeded model)."""
    return bool(cfg.model.init_checkpoint)


def max_evaluations_per_site(cfg: ExperimentConfig) -> int:
    """One evaluation per round, round 0 included, plus the untrained reference when the run has a public start."""
    return cfg.federation.num_rounds + 1 + (1 if has_public_start(cfg) else 0)


#: What the report keeps of a public start's description (``model/public_start.json``).
_PUBLIC_START_KEYS = (
    "source",
    "steps",
    "batch_size",
    "lr",
    "text_lr",
    "corpus_size",
    "state_hash",
    "key",
    "wall_seconds",
    "cpu_seconds",
    "model",
    "seed",
    "origin",
    "corpus",
)


def public_start_section(run: FinishedRun) -> dict[str, Any] | None:
    """The run's public start: public, epsilon spent 0, its source, steps, corpus size and hash; None without one.

    Read from the run's :attr:`~secure_fedvlp.layout.RunLayout.public_start_info` (written by
    ``secure-fedvlp run``), else from the description beside ``model.init_checkpoint`` (a ``flwr run``).
    """
    if not has_public_start(run.cfg):
        return None
    from secure_fedvlp.methods.public_start import read_info

    layout = run.layout
    info = None
    if layout.public_start_info.exists():
        try:
            info = json.loads(layout.public_start_info.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            logger.warning("%s is unreadable: %s", layout.public_start_info, exc)
    if info is None:
        info = read_info(run.cfg.model.init_checkpoint) or {"source": "checkpoint"}
    out = {k: info[k] for k in _PUBLIC_START_KEYS if k in info}
    out.update(
        {
            "public": True,
            "epsilon_spent": 0.0,
            "hash": info.get("state_hash"),
            "checkpoint": run.cfg.model.init_checkpoint,
            "note": "public data only, before any site trained: no site's record was read and no privacy budget "
            "was spent (no ledger records it)",
        }
    )
    return out


def privacy_section(run: FinishedRun) -> dict[str, Any] | None:
    """Per-client epsilon by round, replayed from each client's (verified) ledger, and the budget.

    Returns None when the run has no ledgers (DP off).  A ledger that fails verification is
    reported as such (never silently skipped).
    """
    from secure_fedvlp.errors import LedgerError
    from secure_fedvlp.privacy import NEIGHBOURING_RELATION, epsilon_curve, ledger_relation, read_ledger

    ledgers = run.ledgers()
    if not ledgers:
        return None
    priv = run.cfg.privacy
    delta, accountant = priv.delta, priv.accountant
    clients: dict[str, Any] = {}
    for site, path in ledgers.items():
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
            "by_mechanism": {
                k: sum(1 for e in events if type(e).__name__ == k)
                for k in ("DPSGDEvent", "GaussianEvent", "PostProcessingEvent")
            },
            "ledger": run.layout.relative(path),
            "relation": ledger_relation(path),
            "declared_size": run.cfg.declared_size(site),
        }
    return {
        "delta": delta,
        "accountant": accountant,
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "budget_epsilon": priv.target_epsilon,
        "seeded_randomness": priv.seeded_randomness,
        "clients": clients,
        "not_covered": releases_not_covered(run.cfg),
    }


def releases_not_covered(cfg: ExperimentConfig) -> list[str]:
    """What leaves a site without DP covering it, or what limits the claim, under ``cfg`` (report and SECURITY.md)."""
    out = list(claim_scope(cfg))
    if cfg.privacy.enabled and cfg.privacy.seeded_randomness:
        out.append(SEEDED_WARNING)
    if not cfg.privacy.enabled:
        out.append(
            "privacy.enabled = false: no release is covered by DP (model updates, scalar reports such as "
            "FedDRA's DRO losses, anchor contributions)"
        )
        out.append(
            "training losses (train_loss and its terms, un-noised functions of each site's records), sent to the "
            "server in clear in every train reply without DP, also under CKKS (which encrypts only the parameters)"
        )
    ev = cfg.eval
    if ev.release == "clear":
        out.append(
            f"evaluation metrics of every site on its {ev.split} split, sent to the server in clear "
            "(eval.release = 'clear'; not a DP release): the per-finding zero-shot AUROC, which findings occur in "
            "the split (a finding with a single class there has no AUROC key), retrieval Recall@K and the "
            f"exact {ev.split}-record count (the split's exact size); "
            "each site evaluates only the current round's global model, once "
            f"(at most {max_evaluations_per_site(cfg)} evaluations per site"
            + (", the untrained reference beside the public start included)" if has_public_start(cfg) else ")")
        )
    return out


def evaluation_section(cfg: ExperimentConfig, layout: RunLayout) -> dict[str, Any]:
    """Where the evaluation metrics went (``eval.release``), and how many evaluations a site answers at most."""
    ev = cfg.eval
    return {
        "release": ev.release,
        "split": ev.split,
        "max_evaluations_per_site": max_evaluations_per_site(cfg),
        "metrics_at": (
            layout.relative(layout.metrics)
            if ev.release == "clear"
            else layout.relative(layout.local_eval_metrics("<site>"))
        ),
    }


#: What a run with ``privacy.seeded_randomness = true`` does not guarantee (report and audit).
SEEDED_WARNING = (
    "privacy.seeded_randomness = true: DP-SGD's Poisson sampling and noise were derived from run.seed, "
    "which the server and anyone holding the config know; the epsilon below holds against nobody who "
    "knows the seed (reproducible run for tests and experiments, not a DP release)"
)


def run_status(records: list[dict[str, Any]]) -> tuple[str, str | None, list[int]]:
    """``(status, reason, degraded rounds)`` of a run from its metrics records.

    FAILED when the server refused to go on (a ``phase = "run"`` failure record) or when no round
    adopted an aggregate (the final model is then the untrained one); OK otherwise.  A round is
    degraded when fewer sites contributed to its aggregate than were asked.
    """
    failed = [r for r in records if r.get("phase") == "run" and r.get("status") == "failed"]
    rounds = [r for r in records if r.get("phase") == "round"]
    degraded = sorted({int(r["round"]) for r in rounds if r.get("degraded")})
    if failed:
        return "FAILED", str(failed[-1].get("reason", "")), degraded
    if not any(r.get("adopted", True) for r in rounds):
        return "FAILED", "no round adopted an aggregate: the final model is the untrained initial model", degraded
    return "OK", None, degraded


def encryption_section(layout: RunLayout, cfg: ExperimentConfig | None = None) -> dict[str, Any] | None:
    """CKKS aggregation of an encrypted run: per-round accepted/rejected contributions, upload
    sizes, and how the final model was released (:attr:`RunLayout.export_info`)."""
    rounds_path = layout.encryption_rounds
    if not rounds_path.exists():
        return None
    from secure_fedvlp.encryption.keys import MANIFEST_NAME

    rounds = json.loads(rounds_path.read_text(encoding="utf-8"))
    sizes = [b for r in rounds for b in r.get("bytes_per_update", {}).values()]
    export_path = layout.export_info
    kdir = Path(cfg.encryption.key_dir) if cfg is not None and cfg.encryption.key_dir else layout.keys
    keys_manifest = kdir / MANIFEST_NAME
    return {
        "rounds": rounds,
        "mean_upload_bytes": (sum(sizes) / len(sizes)) if sizes else None,
        "export": json.loads(export_path.read_text(encoding="utf-8")) if export_path.exists() else None,
        "keys": json.loads(keys_manifest.read_text(encoding="utf-8")) if keys_manifest.exists() else None,
    }


#: What downstream evaluation releases under eval.release = "clear" (report and SECURITY.md).
DOWNSTREAM_NOT_COVERED = (
    "downstream evaluation metrics of every site (linear-probe macro AUROC per label fraction with its spread over "
    "seeds and the number of training records used, segmentation Dice, wall times), computed at the site on its own "
    "training and test records for the final model and the untrained and public-start references and sent in clear "
    "(eval.release = 'clear'; not a DP release); at most one evaluation per model and site"
)


def downstream_section(layout: RunLayout) -> dict[str, Any] | None:
    """The downstream metrics the sites released (``secure-fedvlp evaluate``) and their summary, or None."""
    path = layout.downstream_results
    if not path.exists():
        return None
    from secure_fedvlp.evaluation.downstream_run import downstream_summary

    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return {"error": f"{layout.relative(path)} is not valid JSON: {exc}"}
    return {"results": results, "summary": downstream_summary(results), "file": layout.relative(path)}


def empirical_section(layout: RunLayout) -> dict[str, Any] | None:
    """The run's empirical privacy audit (:attr:`RunLayout.empirical_audit`, written by the auditor's step
    after training), without the per-canary scores; None when the run had no canaries."""
    path = layout.empirical_audit
    if not path.exists():
        return None
    try:
        emp = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return {"error": f"{path} is not valid JSON: {exc}"}
    emp.pop("scores", None)
    return emp


def build_report(run_dir: str | os.PathLike | FinishedRun) -> dict[str, Any]:
    """Summarise a run: per-site final vs untrained, worst training site, held-out site.

    ``run_dir`` is opened with :func:`~secure_fedvlp.layout.load_run` (a :class:`FinishedRun`, e.g.
    the server's own resolved config, is used as it is).
    """
    run = load_run(run_dir)
    layout = run.layout
    records = run.metrics()
    evals = _eval_by_round(records)
    public = has_public_start(run.cfg)
    untrained_ref = _reference_evals(records, "untrained")
    roles = {site: next(iter(rs.values())).get("role", "train") for site, rs in evals.items() if rs}
    keys = [k for k, _ in HEADLINE] + ["mean_R@5"] + [k for k, _ in SEG_HEADLINE]
    sites: dict[str, Any] = {}
    final_round = max((rnd for rs in evals.values() for rnd in rs), default=0)
    for site, rs in sorted(evals.items()):
        last = max(rs)
        round0 = {k: rs[0][k] for k in keys if 0 in rs and k in rs[0]}
        ref = untrained_ref.get(site, {})
        sites[site] = {
            "role": roles[site],
            "final_round": last,
            # with a public start, round 0 is the public start and the untrained model is its own reference
            "untrained": {k: ref[k] for k in keys if k in ref} if public else round0,
            "public_start": round0 if public else {},
            "final": {k: rs[last][k] for k in keys if k in rs[last]},
            "final_per_finding": {k.split("/", 1)[1]: v for k, v in rs[last].items() if k.startswith("zs_auroc/")},
        }
    train_sites = [s for s, v in sites.items() if v["role"] == "train"]
    summary: dict[str, Any] = {}

    def mean(d: dict[str, float]) -> float | None:
        return (sum(d.values()) / len(d)) if d else None

    for k in keys:
        fin = {s: sites[s]["final"].get(k) for s in train_sites if k in sites[s]["final"]}
        unt = {s: sites[s]["untrained"].get(k) for s in train_sites if k in sites[s]["untrained"]}
        pub = {s: sites[s]["public_start"].get(k) for s in train_sites if k in sites[s]["public_start"]}
        if fin:
            worst = min(fin, key=fin.get)
            summary[k] = {
                "mean_final": mean(fin),
                "mean_untrained": mean(unt),
                "mean_public_start": mean(pub),
                "worst_site": worst,
                "worst_final": fin[worst],
                "worst_untrained": min(unt.values()) if unt else None,
                "worst_public_start": min(pub.values()) if pub else None,
            }
    heldout = {s: v for s, v in sites.items() if v["role"] == "heldout"}
    dropped = [r for r in records if r.get("status") in ("dropped", "error")]  # budget stops are listed apart
    train_loss: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r.get("phase") == "train" and r.get("status") == "ok" and "train_loss" in r:
            train_loss[r["site"]][int(r["round"])] = r["train_loss"]
    stopped = {
        r["site"]: {"round": r["round"], "reason": r.get("reason", ""), "epsilon": r.get("epsilon")}
        for r in records
        if r.get("status") == "budget_exhausted"
    }
    status, reason, degraded = run_status(records)
    downstream = downstream_section(layout)
    not_covered = releases_not_covered(run.cfg)
    if downstream and downstream.get("results", {}).get("release") == "clear":
        not_covered.append(DOWNSTREAM_NOT_COVERED)
    priv = privacy_section(run)
    if priv is not None:
        priv["not_covered"] = not_covered
    return {
        "status": status,
        "status_reason": reason,
        "degraded_rounds": degraded,
        "public_start": public_start_section(run),
        "privacy": priv,
        "not_covered": not_covered,
        "downstream": downstream,
        "evaluation": evaluation_section(run.cfg, layout),
        "encryption": encryption_section(layout, run.cfg),
        "empirical_audit": empirical_section(layout),
        "anchors": [r for r in records if r.get("phase") == "anchors" and r.get("status") in ("released", "withheld")]
        or None,
        "stopped_clients": stopped,
        "run_dir": str(layout.root),
        "config": layout.config.read_text(encoding="utf-8") if layout.config.exists() else None,
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


def _public_start_lines(ps: dict[str, Any]) -> list[str]:
    """The report's "Public start" section."""
    src = ps.get("source", "checkpoint")
    if src == "checkpoint":
        made = f"a checkpoint given as model.init_checkpoint (`{ps.get('origin') or ps.get('checkpoint')}`)"
    else:
        made = (
            f"non-private pre-training on {ps.get('corpus_size', '?')} public records ({src}), "
            f"{ps.get('steps', '?')} steps of {ps.get('batch_size', '?')}, in-batch InfoNCE"
            + (f", {ps['wall_seconds']:.0f} s" if isinstance(ps.get("wall_seconds"), (int, float)) else "")
        )
    return [
        "## Public start",
        "",
        f"The round-0 model is a public start: {made}; state hash `{str(ps.get('hash'))[:16]}`. "
        "**Public**: it was made before any site trained, from public data only; no site's record was read, "
        "**no privacy budget was spent** (epsilon 0) and no ledger records it. Every party built it from the "
        "config (the seeded model with the checkpoint loaded over it), and each site checked that the round-0 "
        "model it evaluated is this one. Round 0 in the tables and plots is the public start; the untrained "
        "(seeded) model was evaluated once per site as a reference.",
        "",
    ]


def _markdown(rep: dict[str, Any]) -> str:
    layout = RunLayout(rep["run_dir"])
    ps = rep.get("public_start")
    lines = [f"# Run report: `{rep['run_dir']}`", ""]
    if rep.get("status") == "FAILED":
        lines += [f"**Status: FAILED**: {rep.get('status_reason')}.", ""]
    lines += [f"Rounds completed: {rep['final_round']}.", ""]
    if rep.get("degraded_rounds"):
        lines += [
            "Degraded rounds (fewer sites contributed than were asked; see the failures below): "
            + ", ".join(map(str, rep["degraded_rounds"]))
            + ".",
            "",
        ]
    if ps:
        lines += _public_start_lines(ps)
    refs = "untrained -> public start -> final" if ps else "untrained -> final"
    lines += [f"## Final model vs {'references' if ps else 'untrained reference'} (test split of each site)", ""]
    ev = rep.get("evaluation") or {}
    if ev.get("release") == "local":
        lines += [
            "Evaluation metrics stayed at each site (eval.release = 'local'): the server received none; each site "
            f"keeps its own in `{ev['metrics_at']}`.",
            "",
        ]

    def chain(v: dict[str, Any], k: str, bold: bool = True) -> str:
        fin = _f(v["final"].get(k))
        parts = [_f(v["untrained"].get(k))] + ([_f(v.get("public_start", {}).get(k))] if ps else [])
        return " -> ".join(parts + [f"**{fin}**" if bold else fin])

    headline = _headline(rep)
    header = "| site | role | " + " | ".join(f"{lab} ({refs})" for _, lab in headline) + " |"
    lines += [header, "|" + "---|" * (2 + len(headline))]
    for site, v in rep["sites"].items():
        lines.append(f"| {site} | {v['role']} | " + " | ".join(chain(v, k) for k, _ in headline) + " |")
    lines += ["", "## Training sites: mean and worst site", ""]
    if ps:
        lines += [
            "| metric | mean untrained | mean public start | mean final | worst site (final) | lowest site untrained "
            "| lowest site public start | worst site final |",
            "|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines += [
            "| metric | mean untrained | mean final | worst site (final) | lowest site untrained | worst site final |",
            "|---|---|---|---|---|---|",
        ]
    for k, lab in headline:
        s = rep["summary_train_sites"].get(k)
        if not s:
            continue
        if ps:
            lines.append(
                f"| {lab} | {_f(s['mean_untrained'])} | {_f(s.get('mean_public_start'))} | {_f(s['mean_final'])} | "
                f"{s['worst_site']} | {_f(s['worst_untrained'])} | {_f(s.get('worst_public_start'))} | "
                f"{_f(s['worst_final'])} |"
            )
        else:
            lines.append(
                f"| {lab} | {_f(s['mean_untrained'])} | {_f(s['mean_final'])} | {s['worst_site']} | "
                f"{_f(s['worst_untrained'])} | {_f(s['worst_final'])} |"
            )
    if rep["heldout"]:
        lines += ["", "## Held-out site (never trains: out-of-distribution)", ""]
        for site, v in rep["heldout"].items():
            lines.append(f"- **{site}** ({refs}): " + ", ".join(f"{lab} {chain(v, k, False)}" for k, lab in headline))
    lines += ["", "## Zero-shot AUROC per finding (final)", ""]
    findings = sorted({f for v in rep["sites"].values() for f in v["final_per_finding"]})
    if findings:
        lines += ["| site | " + " | ".join(findings) + " |", "|---|" + "---|" * len(findings)]
        for site, v in rep["sites"].items():
            lines.append(f"| {site} | " + " | ".join(_f(v["final_per_finding"].get(f)) for f in findings) + " |")
    lines += _downstream_markdown(rep.get("downstream"))
    priv = rep.get("privacy")
    if priv:
        lines += [
            "",
            f"## Privacy spent (sample-level DP, delta = {priv['delta']}, {priv['accountant']} accountant)",
            "",
        ]
        if priv.get("seeded_randomness"):
            lines += [f"**Warning: {SEEDED_WARNING}.**", ""]
        lines += [
            f"Budget per client: epsilon = {priv['budget_epsilon']}. Recomputed from each client's ledger "
            "(hash chain verified). Plot: `plots/epsilon_by_round.png`.",
            "",
            f"Neighbouring relation: {priv.get('neighbouring_relation', 'not stated')} (every count a site "
            "released, its DP-SGD sample rate and its aggregation weight come from its declared size, not from "
            "its data).",
            "",
        ]
        rounds = sorted({r for c in priv["clients"].values() for r in c.get("epsilon_by_round", {})})
        lines += [
            "| client | " + " | ".join(f"round {r}" for r in rounds) + " | releases (DP-SGD / Gaussian) |",
            "|---|" + "---|" * (len(rounds) + 1),
        ]
        for site, c in priv["clients"].items():
            if "error" in c:
                lines.append(f"| {site} | ledger FAILED verification: {c['error']} |")
                continue
            cells = [_f(c["epsilon_by_round"].get(r)) for r in rounds]
            lines.append(
                f"| {site} | "
                + " | ".join(cells)
                + f" | {c['by_mechanism']['DPSGDEvent']} / {c['by_mechanism']['GaussianEvent']} |"
            )
        lines += ["", "Not covered by DP (named, not hidden): " + "; ".join(priv["not_covered"]) + "."]
    elif rep.get("not_covered"):
        lines += ["", "Not covered by DP (named, not hidden): " + "; ".join(rep["not_covered"]) + "."]
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
                f"{emp['correct']}/{emp['guesses']} guesses correct (k+ = {emp['k_plus']}, k- = {emp['k_minus']}).",
                "",
                "| empirical epsilon lower bound | confidence | delta | claimed epsilon (ledger) "
                "| most this audit can show | verdict |",
                "|---|---|---|---|---|---|",
                f"| **{emp['epsilon_lower_bound']:.3f}** | {emp['confidence']:.0%} | {emp['delta']:g} | "
                f"{'none (DP off)' if claimed is None else f'{claimed:.3f}'} | {emp['max_detectable_epsilon']:.2f} | "
                f"{emp['verdict']} |",
            ]
            lines += [f"- {p}" for p in emp.get("problems", [])]
    enc = rep.get("encryption")
    if enc:
        lines += ["", "## CKKS-encrypted aggregation", ""]
        if enc.get("keys"):
            k = enc["keys"]
            lines.append(
                f"Context {k.get('fingerprint')} (N={k['params'].get('poly_modulus_degree')}, moduli "
                f"{k['params'].get('coeff_mod_bit_sizes')}, {k.get('security_bits')}-bit security)."
            )
        if enc.get("mean_upload_bytes"):
            lines.append(f"Mean encrypted upload: {enc['mean_upload_bytes'] / 2**20:.1f} MiB per client and stage.")
        for r in enc["rounds"]:
            rej = "; ".join(f"{s}: {why}" for s, why in r["rejected"].items())
            lines.append(
                f"- round {r['round']} ({r['stage']}): summed {len(r['accepted'])} "
                f"({', '.join(r['accepted'])})" + (f"; dropped {rej}" if rej else "")
            )
        ex = enc.get("export")
        if ex:
            lines += [
                "",
                f"Final model released by a key holder: {ex['decryption']}; flooding sigma "
                f"{ex['flooding_sigma']:g}"
                + (
                    f", fixed point 2^-{ex['fixed_point_bits']}, probability "
                    f"that any value decodes wrongly <= {ex['model_failure_probability_bound']:.1e}"
                    if "fixed_point_bits" in ex
                    else f", {ex['codec']}, {ex['aggregates']} aggregate(s) applied, "
                    f"{len(ex.get('refused_aggregates', []))} refused, probability that any value decodes "
                    f"wrongly <= {ex['model_failure_probability_bound']:.1e}"
                    if "aggregates" in ex
                    else f", {ex.get('flooding_bits')}-bit statistical security"
                )
                + ".",
            ]
        else:
            lines += [
                "",
                f"The final model is encrypted (`{layout.relative(layout.encrypted_model)}`); release it "
                "with `secure-fedvlp export RUN_DIR --key KEYFILE`.",
            ]
    if rep.get("anchors"):
        lines += ["", "## Noised global anchors", ""]
        for r in rep["anchors"]:
            if r["status"] == "released":
                lines.append(
                    f"- round {r['round']}: released from {', '.join(r['contributors'])}; {r['mode']}; "
                    f"clip C_a = {r['clip']:g}, noise std {r['sigma_total']:g}, accounted in each "
                    f"contributor's ledger as a Gaussian release with sigma {r['sigma_accounted']:g}"
                )
            else:
                lines.append(f"- round {r['round']}: withheld ({r['reason']})")
    if rep.get("stopped_clients"):
        lines += ["", "## Clients stopped by their privacy budget", ""]
        for site, v in rep["stopped_clients"].items():
            lines.append(
                f"- **{site}** stopped at round {v['round']} (epsilon spent {_f(v['epsilon'])}): {v['reason']}"
            )
    if rep["failures"]:
        lines += ["", "## Dropped or failed client replies", ""]
        for r in rep["failures"]:
            lines.append(f"- round {r.get('round')} {r.get('phase')} at {r.get('site')}: {r.get('reason')}")
    if rep["train_loss"]:
        lines += ["", "Plots: `plots/metrics_over_rounds.png`, `plots/train_loss.png`.", ""]
    else:  # DP clients keep their training losses (un-noised functions of their records) to themselves
        lines += [
            "",
            "Plots: `plots/metrics_over_rounds.png`. No training-loss plot: under DP the clients keep "
            f"their losses locally (`{layout.relative(layout.local_train_metrics('<site>'))}`).",
            "",
        ]
    return "\n".join(lines)


def _downstream_markdown(ds: dict[str, Any] | None) -> list[str]:
    if not ds:
        return []
    lines = ["", "## Downstream evaluation (frozen image encoder, at each site on its own records)", ""]
    if "error" in ds:
        return lines + [f"Unreadable: {ds['error']}"]
    res = ds["results"]
    by_task = res.get("settings", {})
    if "fractions" in by_task:  # written before settings were kept per task
        by_task = {", ".join(res.get("tasks", [])): by_task}
    for task, st in sorted(by_task.items()):
        detail = (
            f"label fractions {st.get('fractions')}, {st.get('seeds')} sub-sampling seeds"
            if task == "linear"
            else f"decoder {st.get('seg_steps')} steps, {st.get('seeds')} seed(s)"
        )
        lines.append(f"- {task}: {detail} (mean +- std over seeds)")
    lines += [
        "",
        f"Test split of each site. Metrics released: eval.release = '{res.get('release')}' (`{ds['file']}`).",
        "",
    ]
    models = [m for m in ("untrained", "public_start", "final") if any(m in v for v in ds["summary"].values())]
    metrics = list(ds["summary"])
    if not metrics:
        return lines + ["No metrics reached the server (kept at the sites)."]
    lines += ["| site | role | metric | " + " | ".join(models) + " |", "|---|---|---|" + "---|" * len(models)]
    for site, v in sorted(res.get("sites", {}).items()):
        for metric in metrics:
            cells = []
            for m in models:
                got = v["models"].get(m)
                if not isinstance(got, dict):
                    cells.append("kept at site" if got else "n/a")
                    continue
                mean, sd = got.get(metric), got.get(f"{metric}/std")
                cells.append(_f(mean) + (f" +- {sd:.3f}" if isinstance(sd, float) and sd == sd and sd > 0 else ""))
            lines.append(f"| {site} | {v['role']} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "| metric | model | training sites mean | worst training site | held-out |", "|---|---|---|---|---|"]
    for metric, per_model in ds["summary"].items():
        for m, row in per_model.items():
            held = ", ".join(f"{s} {_f(x)}" for s, x in row["heldout"].items()) or "n/a"
            worst = f"{row['worst_site']} {_f(row['worst'])}" if "worst_site" in row else "n/a"
            lines.append(f"| {metric} | {m} | {_f(row.get('mean_train'))} | {worst} | {held} |")
    return lines


def _plots(run_dir: Path, rep: dict[str, Any], records: list[dict[str, Any]]) -> list[Path]:
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    evals = _eval_by_round(records)

    def site_lines(key: str) -> list[Line]:
        lines = []
        for site, rs in sorted(evals.items()):
            rounds = sorted(r for r in rs if key in rs[r])
            if rounds:
                held = rep["sites"].get(site, {}).get("role") == "heldout"
                lines.append(
                    Line(
                        rounds,
                        [rs[r][key] for r in rounds],
                        linestyle="--" if held else "-",
                        label=f"{site} (held-out)" if held else site,
                    )
                )
        return lines

    public = bool(rep.get("public_start"))
    xlabel = "round (0 = public start)" if public else "round (0 = untrained)"

    def untrained_ref(key: str) -> tuple[RefLine, ...]:
        s = (rep.get("summary_train_sites") or {}).get(key) or {}
        if not public or s.get("mean_untrained") is None:
            return ()
        return (RefLine(float(s["mean_untrained"]), "untrained (mean of training sites)", linestyle="--"),)

    panels = [
        Panel(
            site_lines(MACRO_AUROC),
            xlabel=xlabel,
            ylabel="zero-shot AUROC (macro)",
            integer_x=True,
            refs=(RefLine(0.5, linestyle=":"), *untrained_ref(MACRO_AUROC)),
        ),
        Panel(
            site_lines("mean_R@5"),
            xlabel=xlabel,
            ylabel="Recall@5 (mean i2t, t2i)",
            integer_x=True,
            legend=True,
            refs=untrained_ref("mean_R@5"),
        ),
    ]
    paths = [
        save_figure(
            out_dir / "metrics_over_rounds.png", panels, title="Federated evaluation per site", panel_size=(5.5, 4.0)
        )
    ]
    if rep["train_loss"]:
        paths.append(
            line_plot(out_dir / "train_loss.png", rep["train_loss"], xlabel="round", ylabel="mean local training loss")
        )
    priv = rep.get("privacy")
    if priv and priv["clients"]:
        series = {site: c["epsilon_by_round"] for site, c in priv["clients"].items() if c.get("epsilon_by_round")}
        budget = priv.get("budget_epsilon")
        ref = RefLine(float(budget), "budget", color="red", linewidth=None) if budget is not None else None
        paths.append(
            line_plot(
                out_dir / "epsilon_by_round.png",
                series,
                xlabel="round",
                ylabel=f"epsilon spent (delta={priv['delta']})",
                ref=ref,
            )
        )
    return paths


def write_report(run_dir: str | os.PathLike | FinishedRun) -> Path:
    """Write the JSON and Markdown reports and the plots of a run; return the path of the Markdown report.

    ``run_dir`` as for :func:`build_report`.
    """
    run = load_run(run_dir)
    layout = run.layout
    rep = build_report(run)
    layout.report_json.write_text(json.dumps(rep, indent=2, sort_keys=True, allow_nan=True), encoding="utf-8")
    md = layout.report_md
    md.write_text(_markdown(rep), encoding="utf-8")
    try:
        _plots(layout.root, rep, run.metrics())
    except Exception:  # a plotting failure must not lose the report
        logger.exception("could not draw plots for %s", layout.root)
    return md
