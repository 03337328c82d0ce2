"""Membership scores of canaries under a run's final model, and the run's empirical epsilon bound.

The auditor's side of the one-run audit (Steinke, Nasr and Jagielski, 2023; the statistics are in
:mod:`secure_fedvlp.privacy.empirical`, the canaries in :mod:`secure_fedvlp.data.canaries`):

1. rebuild the ``m`` canaries from ``audit.canary_seed`` and load the **released** final model
   (:attr:`RunLayout.model_params <secure_fedvlp.layout.RunLayout.model_params>`), i.e. exactly
   what a model consumer sees;
2. score every canary (:func:`canary_scores`): how strongly the model pairs the canary's image
   with *its own* report rather than with the other canaries' reports, and vice versa.  Each
   canary's image and report are random and unrelated to everything else, so only a model that
   saw the pair can prefer it; the other canaries are known candidates, not private records;
3. guess "in" for the highest scores and "out" for the lowest, compare with the coins, and turn
   the count of correct guesses into a lower bound on epsilon at confidence ``1 - beta``;
4. compare it with the epsilon the canary site's ledger claims.  A lower bound above the claim
   means the run is *not* as private as it says (or its accounting is wrong).

The score was fixed before any reported audit was run (a score picked after seeing the coins
would void the confidence statement).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from secure_fedvlp.errors import DataError, LedgerError
from secure_fedvlp.layout import FinishedRun, RunLayout, load_run

logger = logging.getLogger(__name__)

__all__ = ["SCORE", "canary_scores", "load_final_model", "empirical_audit", "write_empirical_audit", "DEFAULT_BETA"]

#: 1 - confidence of the reported bound (after the Bonferroni correction over guess counts).
DEFAULT_BETA = 0.05
SCORE = (
    "canary-contrastive: 0.5 * (log-softmax of the canary's own image->report similarity among all m "
    "canary reports + log-softmax of its report->image similarity among all m canary images), scaled by "
    "the final model's logit scale"
)


@torch.no_grad()
def canary_scores(
    model: torch.nn.Module, canaries, *, batch_size: int = 64, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Membership score of every canary (higher = more likely trained on); see :data:`SCORE`."""
    from secure_fedvlp.models.embed import embed_images, embed_texts

    if len(canaries) < 2:
        raise ValueError(
            f"Canary scores need at least 2 canaries (the others are the negatives). Found {len(canaries)}."
        )
    device = torch.device(device)
    was = model.training
    model.eval()
    try:
        v = embed_images(model, canaries.images, batch_size, device).double()
        t = embed_texts(model, canaries.reports, batch_size, device).double()
        scale = float(model.logit_scale.value())
    finally:
        model.train(was)
    sim = scale * (v @ t.T)
    score = 0.5 * (F.log_softmax(sim, dim=1).diagonal() + F.log_softmax(sim, dim=0).diagonal())
    return score.numpy()


def load_final_model(cfg, run_dir: str | os.PathLike) -> torch.nn.Module:
    """The released model of a run: the seeded architecture with its released parameters
    (:attr:`RunLayout.model_params <secure_fedvlp.layout.RunLayout.model_params>`) loaded."""
    from secure_fedvlp.build import build_model
    from secure_fedvlp.models.state import load_federated_state

    layout = RunLayout(run_dir)
    path = layout.model_params
    if not path.exists() and layout.export_info.exists():  # a key holder's export, wherever it keeps it
        path = Path(json.loads(layout.export_info.read_text(encoding="utf-8")).get("output", path))
    if not path.exists():
        hint = (
            " The final model is still encrypted; a key holder releases it with `secure-fedvlp export "
            f"{run_dir} --key KEYFILE`."
            if layout.encrypted_model.exists()
            else ""
        )
        raise DataError(f"{path} is missing: no released final model to audit.{hint}")
    model = build_model(cfg)
    with np.load(path) as npz:
        load_federated_state(model, {k: npz[k] for k in npz.files})
    return model


def _claimed_epsilon(run: FinishedRun, site: str) -> tuple[float | None, list[str]]:
    """The canary site's spent epsilon, replayed from its verified ledger (None if DP is off)."""
    from secure_fedvlp.privacy import make_accountant, read_ledger

    cfg = run.cfg
    if not cfg.privacy.enabled:
        return None, []
    path = run.layout.ledger(site)
    if not path.exists():
        return None, [f"the canary site {site} has no privacy ledger ({path}): no claim to compare with."]
    try:
        events = [e.event for e in read_ledger(path, client_id=site)]
    except LedgerError as exc:
        return None, [f"the canary site's ledger fails verification: {exc}"]
    return float(make_accountant(cfg.privacy.accountant, events).get_epsilon(cfg.privacy.delta)), []


def empirical_audit(run_dir: str | os.PathLike | FinishedRun, *, beta: float = DEFAULT_BETA) -> dict[str, Any]:
    """The one-run empirical audit of ``run_dir``, recomputed from its files.

    Reads the run's config (:func:`~secure_fedvlp.layout.load_run`; a :class:`FinishedRun` already
    open is used as it is), the auditor's coins, the released model and (with DP on) the canary
    site's ledger.  Raises :class:`~secure_fedvlp.errors.SecureFedVLPError` when one is missing.
    """
    from secure_fedvlp.data.canaries import make_canaries
    from secure_fedvlp.evaluation.canary_files import read_coins
    from secure_fedvlp.privacy.empirical import audit_from_scores, default_guess_counts, epsilon_lower_bound

    run = load_run(run_dir)
    cfg, run_dir = run.cfg, run.root
    if cfg.audit.canaries == 0:
        raise DataError(
            f"{run_dir} was run without canaries (audit.canaries = 0): there is nothing to audit "
            "empirically. Run with audit.canaries > 0 (e.g. configs/audit_canaries.toml)."
        )
    coins = read_coins(run_dir)
    if (coins["m"], coins["canary_seed"]) != (cfg.audit.canaries, cfg.audit.canary_seed):
        raise DataError(
            f"the coin record (m={coins['m']}, canary_seed={coins['canary_seed']}) does not match the "
            f"run's config (m={cfg.audit.canaries}, canary_seed={cfg.audit.canary_seed})."
        )
    included = np.asarray(coins["included"], dtype=bool)
    # Manifest images are resized to data.synthetic.image_size too, so this is every run's image size.
    canaries = make_canaries(cfg.audit.canaries, cfg.audit.canary_seed, cfg.data.synthetic.image_size)
    model = load_final_model(cfg, run_dir)
    scores = canary_scores(model, canaries, batch_size=cfg.eval.batch_size)
    delta = cfg.privacy.delta
    result = audit_from_scores(scores, included, beta=beta, delta=delta)
    choices = default_guess_counts(len(scores))
    max_detectable = max(
        epsilon_lower_bound(len(scores), kp + km, kp + km, beta / len(choices), delta) for kp, km in choices
    )
    site = str(coins["canary_site"])
    claimed, problems = _claimed_epsilon(run, site)
    if claimed is None:
        verdict = "no DP claim (privacy.enabled = false)" if not cfg.privacy.enabled else "no claim to compare with"
    elif result.epsilon_lower_bound > claimed:
        verdict = "FAIL"
        problems.append(
            f"the empirical lower bound {result.epsilon_lower_bound:.4g} (confidence "
            f"{1 - beta:.0%}) exceeds the claimed epsilon {claimed:.4g} of site {site}: the run is not "
            "as private as its ledger says, or its accounting is wrong."
        )
    else:
        verdict = "OK"
    return {
        "canary_site": site,
        "score": SCORE,
        "dp": cfg.privacy.enabled,
        "claimed_epsilon": claimed,
        "accountant": cfg.privacy.accountant if cfg.privacy.enabled else None,
        "max_detectable_epsilon": max_detectable,
        "verdict": verdict,
        "problems": problems,
        **result.to_dict(),
        "scores": [float(s) for s in scores],
    }


def write_empirical_audit(run_dir: str | os.PathLike | FinishedRun, *, beta: float = DEFAULT_BETA) -> dict[str, Any]:
    """Compute the empirical audit and write it to the run's
    :attr:`RunLayout.empirical_audit <secure_fedvlp.layout.RunLayout.empirical_audit>`."""
    run = load_run(run_dir)
    out = empirical_audit(run, beta=beta)
    path = run.layout.empirical_audit
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return out
