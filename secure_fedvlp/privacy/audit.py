"""Audit a run's privacy spending from its ledgers alone, with independent accountants.

For every client that took part in training, :func:`audit_run`:

1. verifies the ledger's hash chain and head file (edits, deletions, reordering, truncation);
2. recomputes epsilon from the ledger's events with four accountants: RDP (Opacus'
   analysis), RDP (Google's ``dp-accounting``, an independent implementation), PLD
   (``dp-accounting``) and PRV (Opacus' privacy-random-variable accountant, an independent
   numerical accountant of the same tight kind as PLD);
3. takes the **claim** to be the value of the accountant the run was configured with
   (``privacy.accountant``: ``"rdp"`` -> Opacus RDP, ``"pld"`` -> ``dp-accounting`` PLD), and
   checks that an independent implementation of the same analysis agrees with it (Opacus RDP vs
   ``dp-accounting`` RDP within :data:`RDP_TOLERANCE`; for a PLD claim, PLD vs Opacus PRV within
   :data:`PRV_TOLERANCE`), that PLD is at most the RDP bound (up to :data:`PLD_SLACK`), that the
   claim is within the run's budget, and that it equals what the run reported in its report
   (:attr:`RunLayout.report_json <secure_fedvlp.layout.RunLayout.report_json>`, within
   :data:`REPORT_TOLERANCE` relative);
4. checks that the ledger's head file states the neighbouring relation of the claim
   (:data:`~secure_fedvlp.privacy.relation.NEIGHBOURING_RELATION`: add/remove-one record, with every
   released count a declared public size).  A ledger that states another relation, or none (written
   before the relation was stated, when sites released their exact counts), fails: its epsilon is
   not a claim under that relation.
5. checks the ledger against what the server logged, which the site does not control (the run's
   metrics file, :attr:`RunLayout.metrics <secure_fedvlp.layout.RunLayout.metrics>`): every ledger
   head a reply of the site carried (hash and sequence number, ``phase = "ledger"`` records) must be
   the entry of the ledger at that sequence number (``expected_head_hash``), the claim must be at
   least every epsilon the site reported to the server, and every release the server logged
   (training jobs, anchor contributions, scalar reports) must be in the ledger.  This is what
   detects a consistent rewrite of a ledger and its head file (and of the report): the chain
   alone only shows that the files agree with each other.

Every accountant's value is a valid upper bound on the true epsilon, so the smallest of them
holds; the budget is enforced (by the training run, and here) with the run's own accountant. When
an independent implementation lands slightly above the budget while the claim is within it (the
implementations differ by their order grids or discretisation, well inside the tolerances), the
audit says so in a note and still passes.

A client that trained but has no ledger is a failure.  Nothing here trusts the training
process beyond the files it left; the run's settings are its resolved config, read by
:func:`~secure_fedvlp.layout.load_run`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from secure_fedvlp.errors import LedgerError, SecureFedVLPError
from secure_fedvlp.layout import FinishedRun, load_run
from secure_fedvlp.privacy.accountant import NEGLIGIBLE_NOISE_MULTIPLIER, make_accountant
from secure_fedvlp.privacy.anchors import claim_scope
from secure_fedvlp.privacy.ledger import LedgerEntry, genesis_hash, ledger_relation, read_ledger
from secure_fedvlp.privacy.relation import NEIGHBOURING_RELATION

__all__ = [
    "ClientAudit",
    "RunAudit",
    "audit_run",
    "attach_empirical",
    "format_audit",
    "format_empirical",
    "RDP_TOLERANCE",
    "PLD_SLACK",
    "PRV_TOLERANCE",
    "REPORT_TOLERANCE",
    "REPORTED_TOLERANCE",
]

#: Relative agreement required between the two RDP implementations (measured worst case 0.71 %
#: over z in [0.8, 4], eps <= 20; see tests/unit/test_privacy_accounting.py).
RDP_TOLERANCE = 0.02
#: PLD may exceed the RDP bound only by discretisation error.
PLD_SLACK = 0.02
#: Relative agreement required between dp-accounting's PLD and Opacus' PRV accountant when PLD is
#: the claim (measured 0.14-0.26 % on the demo runs; PRV's own error bound is eps_error = 0.01 nats).
PRV_TOLERANCE = 0.02
#: The recomputed epsilon must equal the reported one to this relative precision.
REPORT_TOLERANCE = 1e-6
#: An epsilon a site reported to the server may exceed its ledger's total by this relative amount only
#: (the site's accountant composed the same events, in another order).
REPORTED_TOLERANCE = 1e-6


@dataclass
class ClientAudit:
    client: str
    ledger: str
    events: int = 0
    epsilon_rdp: float | None = None
    epsilon_dp_accounting_rdp: float | None = None
    epsilon_pld: float | None = None
    epsilon_prv: float | None = None
    #: The accountant whose value is the run's claim (``privacy.accountant``) and that value.
    claimed_accountant: str = "rdp"
    claimed: float | None = None
    reported: float | None = None
    #: The neighbouring relation the ledger's head file states (None: it states none).
    relation: str | None = None
    problems: list[str] = field(default_factory=list)
    #: Observations that do not fail the audit (an independent bound slightly above the budget).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RunAudit:
    run_dir: str
    delta: float
    budget_epsilon: float | None
    clients: list[ClientAudit]
    problems: list[str] = field(default_factory=list)
    #: The one-run empirical audit (``--empirical``): see :mod:`secure_fedvlp.evaluation.membership`.
    empirical: dict[str, Any] | None = None
    #: Limits of the claim the configuration implies (printed; they do not fail the audit).
    scope: list[str] = field(default_factory=list)
    #: The neighbouring relation of the claim (each ledger must state it).
    relation: str = NEIGHBOURING_RELATION

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.clients)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        for c, d in zip(self.clients, out["clients"], strict=True):
            d["ok"] = c.ok
        return out


def opacus_prv_epsilon(events, delta: float, eps_error: float = 0.01) -> float:
    """Epsilon of ``events`` by Opacus' PRV accountant (Gopi et al. 2021), independent of ``dp-accounting``.

    A DP-SGD event is ``steps`` sampled Gaussians ``(z, q)``; a Gaussian release is ``count``
    Gaussians with ``q = 1``; post-processing costs nothing.  Returns ``inf`` for an event with a
    noise multiplier below :data:`~secure_fedvlp.privacy.accountant.NEGLIGIBLE_NOISE_MULTIPLIER`,
    as every other accountant here does.
    """
    import warnings

    from opacus.accountants import PRVAccountant

    from secure_fedvlp.privacy.events import DPSGDEvent, GaussianEvent

    acc = PRVAccountant()
    for e in events:
        if isinstance(e, DPSGDEvent):
            if e.sample_rate == 0.0 or e.steps == 0:
                continue
            if e.noise_multiplier < NEGLIGIBLE_NOISE_MULTIPLIER:
                return math.inf
            acc.history.append((float(e.noise_multiplier), float(e.sample_rate), int(e.steps)))
        elif isinstance(e, GaussianEvent):
            if e.noise_multiplier < NEGLIGIBLE_NOISE_MULTIPLIER:
                return math.inf
            acc.history.append((float(e.noise_multiplier), 1.0, int(e.count)))
    if not acc.history:
        return 0.0
    with warnings.catch_warnings():  # q = 1 takes log(0) on a masked branch inside Opacus' PRV
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta, eps_error=eps_error))


def _trained_clients(records: list[dict[str, Any]]) -> set[str]:
    """The sites whose training replies the run recorded (including those stopped by their budget)."""
    return {
        r["site"]
        for r in records
        if r.get("phase") == "train" and r.get("status") in ("ok", "budget_exhausted") and "site" in r
    }


@dataclass
class _ServerLog:
    """What the server logged about one site: the ledger heads its replies carried, the epsilons it reported,
    and the releases the server saw (``(kind, round, stage, seq)``; ``seq``: the head the reply carried)."""

    heads: list[dict[str, Any]] = field(default_factory=list)
    reported: list[tuple[float, int, str]] = field(default_factory=list)
    releases: list[tuple[str, int, str | None, int | None]] = field(default_factory=list)


def _server_log(records: list[dict[str, Any]]) -> dict[str, _ServerLog]:
    logs: dict[str, _ServerLog] = {}
    for r in records:
        phase, rnd = r.get("phase"), int(r.get("round", 0))
        if phase == "anchors" and r.get("status") == "released":
            for site in r.get("contributors", []):
                logs.setdefault(site, _ServerLog()).releases.append(("anchors", rnd, None, None))
            continue
        site = r.get("site")
        if not isinstance(site, str):
            continue
        log = logs.setdefault(site, _ServerLog())
        if isinstance(r.get("epsilon"), (int, float)):
            log.reported.append((float(r["epsilon"]), rnd, str(r.get("release", phase))))
        if phase == "ledger":
            log.heads.append(r)
            if not r.get("refused_for_budget") and r.get("release") != "evaluate":
                log.releases.append((str(r["release"]), rnd, r.get("stage"), int(r["ledger_seq"])))
        elif phase == "train" and r.get("status") == "ok":
            log.releases.append(("train", rnd, r.get("stage"), None))
    return logs


def _holds(entries: list[LedgerEntry], kind: str, rnd: int, stage: str | None, seq: int | None) -> bool:
    """Whether the ledger records the release ``kind`` of round ``rnd`` (at or before entry ``seq``)."""
    upto = entries if seq is None else entries[: seq + 1]
    for e in upto:
        ev = e.event
        if getattr(ev, "round", None) != rnd:
            continue
        if kind == "train":
            if type(ev).__name__ == "DPSGDEvent" and (stage is None or getattr(ev, "stage", None) == stage):
                return True
        elif getattr(ev, "what", None) in (kind, f"{kind} report"):
            return True
    return False


def _check_against_server(
    a: ClientAudit, site: str, entries: list[LedgerEntry], log: _ServerLog | None, claim_kind: str
) -> None:
    """Step 4 of the module docstring: the ledger against the heads, epsilons and releases the server logged."""
    if log is None or not log.heads:
        if log is not None and (log.releases or log.reported):  # it took part, yet no reply carried a head
            a.problems.append(
                f"client {site}: the server logged no ledger head for this site, so its ledger cannot be checked "
                "against a reference outside the site."
            )
    else:
        bad = []
        for h in log.heads:
            seq, digest = int(h["ledger_seq"]), str(h["ledger_head"])
            actual = genesis_hash(site) if seq == -1 else (entries[seq].hash if 0 <= seq < len(entries) else None)
            if actual != digest:
                bad.append(h)
        if bad:
            h = bad[0]
            more = f" (and {len(bad) - 1} more logged heads)" if len(bad) > 1 else ""
            a.problems.append(
                f"client {site}: the ledger does not hold the head the server logged in round {h['round']} "
                f"({h['release']}): entry {h['ledger_seq']} with hash {str(h['ledger_head'])[:16]}...; the ledger "
                f"has {len(entries)} entries{more}. It was rewritten after the server logged it."
            )
    claim = a.claimed
    if log is not None and claim is not None and log.reported:
        eps, rnd, phase = max(log.reported)
        if eps > claim * (1 + REPORTED_TOLERANCE) + 1e-12:
            a.problems.append(
                f"client {site} reported epsilon {eps:.6g} to the server in round {rnd} ({phase}), above the "
                f"ledger's total {claim:.6g} ({claim_kind}): releases are missing from the ledger."
            )
    missing = [] if log is None else [r for r in log.releases if not _holds(entries, *r)]
    for kind, rnd, stage, _ in sorted(set(missing), key=lambda x: (x[1], x[0], str(x[2]))):
        a.problems.append(
            f"client {site}: the server logged a {kind} release in round {rnd}"
            + (f" ({stage} stage)" if stage else "")
            + " that is not in the ledger."
        )


def audit_run(run_dir: str | os.PathLike | FinishedRun) -> RunAudit:
    """Audit every client ledger of ``run_dir`` (see the module docstring).

    A directory that is not a run directory, or whose config is missing or invalid, gives an audit
    that fails with the problem named (nothing to recompute without the run's settings).
    """
    try:
        run = load_run(run_dir)
    except SecureFedVLPError as exc:
        return RunAudit(
            str(run_dir.root if isinstance(run_dir, FinishedRun) else run_dir), float("nan"), None, [], [str(exc)]
        )
    layout, priv = run.layout, run.cfg.privacy
    problems: list[str] = []
    delta = priv.delta
    budget = priv.target_epsilon if priv.enabled else None
    if priv.enabled and priv.seeded_randomness:
        problems.append(
            "privacy.seeded_randomness = true: the DP-SGD noise and Poisson sampling were derived from "
            "run.seed, which the server holds, so the run makes no DP claim against the server or anyone "
            "who knows the seed."
        )
    claim_kind = priv.accountant
    if not priv.enabled:
        problems.append("privacy.enabled is false in the run's config: the run made no DP claim to audit.")
    reported: dict[str, float] = {}
    try:
        rep = run.report()
        if rep is None:
            problems.append(f"{layout.report_json} is missing: nothing reported to compare with.")
    except SecureFedVLPError as exc:  # a report that is not valid JSON
        rep = None
        problems.append(f"{exc} Nothing reported to compare with.")
    for site, c in (((rep or {}).get("privacy") or {}).get("clients") or {}).items():
        if "epsilon" in c:
            reported[site] = float(c["epsilon"])
    try:
        records = run.metrics()
    except SecureFedVLPError as exc:
        records = []
        problems.append(f"{exc} The clients that trained cannot be checked against the ledgers.")
    trained = _trained_clients(records)
    server_log = _server_log(records)

    ledgers = run.ledgers()
    audits = []
    for site in sorted(trained - set(ledgers)):
        audits.append(
            ClientAudit(site, "", problems=[f"client {site} trained but has no ledger ({layout.ledger(site)})."])
        )
    for site, path in ledgers.items():
        a = ClientAudit(site, layout.relative(path), claimed_accountant=claim_kind, reported=reported.get(site))
        audits.append(a)
        try:
            entries = read_ledger(path, client_id=site)
        except LedgerError as exc:
            a.problems.append(f"tampered or damaged ledger: {exc}")
            continue
        events = [e.event for e in entries]
        a.events = len(events)
        a.relation = ledger_relation(path)
        if a.relation != NEIGHBOURING_RELATION:
            a.problems.append(
                f"the ledger states the neighbouring relation {a.relation!r}, not {NEIGHBOURING_RELATION!r}: "
                "its epsilon is not a claim under the run's relation"
                + (
                    " (a ledger written before the relation was stated, when exact counts were released)."
                    if a.relation is None
                    else "."
                )
            )
        a.epsilon_rdp = make_accountant("rdp", events).get_epsilon(delta)
        a.epsilon_dp_accounting_rdp = make_accountant("dp_accounting_rdp", events).get_epsilon(delta)
        a.epsilon_pld = make_accountant("pld", events).get_epsilon(delta)
        try:
            a.epsilon_prv = opacus_prv_epsilon(events, delta)
        except Exception as exc:  # noqa: BLE001 - a numerical failure of the cross-check is reported, not raised
            a.epsilon_prv = None
            if claim_kind == "pld":
                a.problems.append(f"the PRV cross-check of the PLD claim could not be computed: {exc}")
        rdp, alt, pld, prv = a.epsilon_rdp, a.epsilon_dp_accounting_rdp, a.epsilon_pld, a.epsilon_prv
        a.claimed = claim = rdp if claim_kind == "rdp" else pld
        if events and abs(rdp - alt) > RDP_TOLERANCE * max(rdp, 1e-12):
            a.problems.append(
                f"accountants disagree: Opacus RDP {rdp:.6g} vs dp-accounting RDP {alt:.6g} "
                f"(tolerance {RDP_TOLERANCE:.0%})."
            )
        if events and pld > rdp * (1 + PLD_SLACK):
            a.problems.append(f"PLD epsilon {pld:.6g} exceeds the RDP bound {rdp:.6g} beyond discretisation slack.")
        if (
            events
            and claim_kind == "pld"
            and prv is not None
            and math.isfinite(pld)
            and abs(pld - prv) > PRV_TOLERANCE * max(pld, 1e-12)
        ):
            a.problems.append(
                f"accountants disagree: dp-accounting PLD {pld:.6g} vs Opacus PRV {prv:.6g} "
                f"(tolerance {PRV_TOLERANCE:.0%})."
            )
        if budget is not None and claim > budget * (1 + 1e-9):
            a.problems.append(f"budget exceeded: epsilon {claim:.6g} ({claim_kind}) > {budget:g} at delta {delta:g}.")
        elif budget is not None:
            checks = [("dp-accounting RDP", alt)] if claim_kind == "rdp" else [("Opacus PRV", prv)]
            for name, value in checks:
                if value is not None and value > budget * (1 + 1e-9):
                    a.notes.append(
                        f"{name} gives {value:.6g}, {100 * (value / budget - 1):.2f} % above the budget "
                        f"{budget:g} (the claim, {claim_kind} {claim:.6g}, is within it; the two agree "
                        "within the stated tolerance and each is an upper bound, so the smaller holds)."
                    )
        if a.reported is None:
            a.problems.append("the run reported no epsilon for this client.")
        elif not math.isclose(a.reported, claim, rel_tol=REPORT_TOLERANCE, abs_tol=1e-12):
            a.problems.append(
                f"mismatch: the run reported epsilon {a.reported:.6g}, the ledger gives {claim:.6g} ({claim_kind})."
            )
        if priv.enabled:
            _check_against_server(a, site, entries, server_log.get(site), claim_kind)
    return RunAudit(str(layout.root), delta, budget, audits, problems, scope=claim_scope(run.cfg))


def attach_empirical(audit: RunAudit, empirical: dict[str, Any]) -> RunAudit:
    """Add an empirical audit's result to ``audit``; its problems (a lower bound above the claim) fail it."""
    audit.empirical = empirical
    audit.problems.extend(f"empirical audit: {p}" for p in empirical.get("problems", []))
    return audit


def format_audit(audit: RunAudit) -> str:
    """A human-readable table."""
    lines = [
        f"Privacy audit of {audit.run_dir} (delta = {audit.delta:g}, budget epsilon = {audit.budget_epsilon})",
        f"Neighbouring relation: {audit.relation}",
        "",
        f"{'client':<10} {'events':>6} {'RDP':>9} {'RDP (dp-acc)':>13} {'PLD':>9} {'PRV':>9} {'claimed':>15} "
        f"{'reported':>9}  verdict",
    ]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    for c in audit.clients:
        claimed = f"{f(c.claimed)} ({c.claimed_accountant})" if c.claimed is not None else "-"
        lines.append(
            f"{c.client:<10} {c.events:>6} {f(c.epsilon_rdp):>9} {f(c.epsilon_dp_accounting_rdp):>13} "
            f"{f(c.epsilon_pld):>9} {f(c.epsilon_prv):>9} {claimed:>15} {f(c.reported):>9}  "
            f"{'OK' if c.ok else 'FAIL'}"
        )
        for p in c.problems:
            lines.append(f"           - {p}")
        for n in c.notes:
            lines.append(f"           note: {n}")
    if audit.empirical is not None:
        lines += ["", format_empirical(audit.empirical)]
    for p in audit.problems:
        lines.append(f"run: {p}")
    for s in audit.scope:
        lines.append(f"claim scope: {s}")
    verdict = "AUDIT PASSED" if audit.ok else "AUDIT FAILED"
    lines += ["", f"{verdict} (only against parties other than the server)" if audit.scope and audit.ok else verdict]
    return "\n".join(lines)


def format_empirical(emp: dict[str, Any]) -> str:
    """Two lines for the terminal: the bound beside the claim, and the verdict (problems are listed by the caller)."""
    claimed = emp.get("claimed_epsilon")
    claim = f"{claimed:.4f} ({emp['accountant']} accountant, ledger)" if claimed is not None else "none"
    auc = emp.get("auc")
    auc_text = "n/a" if auc is None or math.isnan(auc) else f"{auc:.3f}"
    return "\n".join(
        [
            f"Empirical audit (Steinke, Nasr and Jagielski 2023, one run): {emp['m']} canaries, "
            f"{emp['members']} included at {emp['canary_site']}; {emp['correct']}/{emp['guesses']} guesses correct "
            f"(k+={emp['k_plus']}, k-={emp['k_minus']}), score AUC {auc_text}",
            f"  epsilon lower bound {emp['epsilon_lower_bound']:.4f} at {emp['confidence']:.0%} confidence "
            f"(delta = {emp['delta']:g}; at most {emp['max_detectable_epsilon']:.2f} detectable with this many "
            "canaries)"
            f"  vs claimed epsilon {claim}  ->  {emp['verdict']}",
        ]
    )
