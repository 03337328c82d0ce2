"""A site's report centroids, released once per run under the Gaussian mechanism.

Why
---
A per-sample decomposable objective needs negatives that hold no other private record of the
batch.  Public reports are the obvious choice, but they differ from a site's reports in wording
and layout as much as in findings, and an image head trained against them learns much of that
style difference.  In-batch InfoNCE does not have the problem (its negatives are the site's own
reports) but couples records, so it cannot run under DP-SGD.  The site's *report centroids* sit
in between: a few directions that summarise where the site's reports lie, in the site's own
style, released once with Gaussian noise and then used as fixed negatives by every DP-SGD step
(post-processing of the release).  Measured on the synthetic federation: docs/results.md,
"Privacy-utility at scale".

What is released
----------------
The public reference reports, embedded by the model (whose text side is locked for the whole
run: ``model.trainable = "image_head"``), are clustered into ``k`` bins by spherical k-means
(:func:`public_bins`; public data, deterministic).  Each of the site's training records ``r``
adds its unit-norm report embedding ``t_r`` to the row of its nearest bin::

    S = sum_r onehot(bin(t_r)) t_r^T            (a k x D matrix)

Adding or removing one record changes ``S`` by one unit vector in one row, so the L2
sensitivity of ``S`` is exactly 1 (:func:`bin_sums` checks that every ``t_r`` has norm 1).  The
release is ``S + N(0, sigma^2 I)``, ``sigma`` calibrated so that the release alone spends
``train.site_centroids_budget_share`` of the site's epsilon budget (:func:`site_centroids_sigma`);
the centroids are its rows normalised (post-processing; an all-zero row, an empty bin of a
noise-free run, is dropped).  Without DP (nothing claimed) the sums are used without noise.

Accounting
----------
The site records one :class:`~secure_fedvlp.privacy.events.GaussianEvent` (sensitivity 1,
``sigma``, ``what = "site_centroids"``) in its ledger before it computes ``S``, and keeps the
released centroids in its own directory: later rounds reuse them and release nothing new.  The
release plan counts it once (:meth:`~secure_fedvlp.privacy.plan.ReleasePlan.with_release_once`),
so DP-SGD's noise is calibrated to what the two spend together (RDP composition: the release
costs the total less than its share alone).  The centroids never leave the site.
"""

from __future__ import annotations

import torch

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.privacy.calibration import calibrate_gaussian_sigma
from secure_fedvlp.privacy.events import GaussianEvent

__all__ = [
    "WHAT",
    "FILE",
    "site_centroids_sigma",
    "site_centroids_event",
    "public_bins",
    "bin_sums",
    "release",
    "centroids_of",
]

#: ``what`` of the ledger event.
WHAT = "site_centroids"
#: Where a site keeps its released centroids (in its own directory).
FILE = "site_centroids.pt"
#: One record's contribution is a unit vector: its norm may differ from 1 by rounding only.
_UNIT_TOL = 1e-4


def site_centroids_sigma(cfg: ExperimentConfig) -> float:
    """The release's noise std: the smallest (within the calibration's tolerance, never overshooting) with which
    the release alone spends ``train.site_centroids_budget_share x privacy.target_epsilon`` at ``privacy.delta``."""
    p = cfg.privacy
    if not p.enabled:
        raise ValueError("the site's centroid release is noised only under privacy.enabled.")
    return calibrate_gaussian_sigma(
        cfg.train.site_centroids_budget_share * p.target_epsilon, p.delta, 1.0, accountant=p.accountant
    )


def site_centroids_event(cfg: ExperimentConfig, server_round: int = 1) -> GaussianEvent:
    """The release a site records before it computes its centroid sums."""
    return GaussianEvent(sensitivity=1.0, sigma=site_centroids_sigma(cfg), what=WHAT, round=int(server_round))


@torch.no_grad()
def public_bins(public_text_emb: torch.Tensor, k: int, *, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    """``k`` unit-norm bin centres: spherical k-means of the public reports' embeddings (deterministic).

    Fewer distinct public embeddings than ``k`` give that many bins.
    """
    x = torch.nn.functional.normalize(public_text_emb.double(), dim=1)
    distinct = torch.unique(x.round(decimals=6), dim=0)
    k = min(int(k), len(distinct))
    if k < 1:
        raise ValueError("the public reference set has no report to make bins from.")
    g = torch.Generator().manual_seed(int(seed))
    centres = distinct[torch.randperm(len(distinct), generator=g)[:k]].clone()
    for _ in range(int(iterations)):
        assign = (x @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = sums.norm(dim=1) > 0
        centres[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
    return centres.float()


@torch.no_grad()
def bin_sums(site_text_emb: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """``S`` (float64, ``[k, D]``): each record's unit-norm report embedding added to its nearest bin's row."""
    if site_text_emb.ndim != 2 or site_text_emb.shape[1] != bins.shape[1]:
        raise ValueError(
            f"site report embeddings must be [n, {bins.shape[1]}] to match the bins; "
            f"found {tuple(site_text_emb.shape)}."
        )
    t = site_text_emb.double()
    norms = t.norm(dim=1)
    if len(t) and float((norms - 1.0).abs().max()) > _UNIT_TOL:
        raise ValueError(
            "each record's report embedding must have norm 1 (the release's sensitivity of 1 rests on it); "
            f"found norms from {float(norms.min()):.6g} to {float(norms.max()):.6g}."
        )
    assign = (t @ bins.double().T).argmax(1)
    return torch.zeros(bins.shape[0], bins.shape[1], dtype=torch.float64).index_add_(0, assign, t)


def release(sums: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """``sums + N(0, sigma^2 I)``; ``sigma = 0`` (a run without DP) returns the sums unchanged."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0; found {sigma}.")
    if sigma == 0:
        return sums.clone()
    if generator is None:
        raise ValueError("a noised release needs a noise generator.")
    return sums + sigma * torch.randn(sums.shape, generator=generator, dtype=torch.float64)


def centroids_of(released: torch.Tensor) -> torch.Tensor:
    """The released sums' rows, normalised (all-zero rows dropped): the site's report centroids."""
    keep = released.norm(dim=1) > 0
    if not bool(keep.any()):
        raise ValueError("the site's centroid release has no non-zero row: the site holds no report.")
    return torch.nn.functional.normalize(released[keep], dim=1).float()
