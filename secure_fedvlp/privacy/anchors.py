"""Noised global anchor features: a per-finding image and text anchor bank, released under DP.

What is released
--------------------------------------------------------
Each round, before training, every training site embeds its training records with the current
global model.  Record ``r`` with multi-hot findings ``y_r`` and unit-norm embeddings ``v_r``
(image) and ``t_r`` (report) contributes the vector

    c_r = clip_{C_a}( [ y_rf * (v_r, t_r, 1) ]_{f = 1..F} ),      clip_C(x) = x * min(1, C / ||x||)

(its embeddings under every finding it carries, plus a count), so one record moves the sum
``S = sum_r c_r`` by at most ``C_a`` in L2: the sensitivity under add/remove-one.  Sites send
``S_k``; the released anchor bank is ``sum_k S_k + N(0, (z C_a)^2 I)`` with ``z =
anchors.noise_multiplier``.  Anchors are post-processing of it: per finding, the direction of
the noised image (text) sum, kept only where the noised count is clearly positive.

Who adds the noise (``anchors.noise``)
--------------------------------------
* ``"server"`` with CKKS on: sites encrypt ``S_k``; the server sums ciphertexts and adds the
  Gaussian in the ciphertext domain (:func:`~secure_fedvlp.encryption.add_plaintext_noise`); it
  never holds a plaintext anchor, and sites only ever decrypt the noised sum.
* ``"server"`` with CKKS off: **trusted-aggregator mode**: the server sees each ``S_k`` in clear
  and adds the noise before broadcasting.  The DP guarantee then holds against the other sites
  and model consumers, not against the server; the report labels it.
* ``"distributed"``: each site adds its own share ``N(0, (z C_a)^2 / (t - 1))``, ``t =
  anchors.min_contributors >= 2``, and an aggregate of fewer than ``t`` contributions is
  discarded.  Any ``t - 1`` honest shares carry the full variance, so a site that knows its own
  share (a curious client) still faces ``z C_a`` in an aggregate of ``t`` honest contributions.
  But nothing lets a site check how many contributions an aggregate really holds: without CKKS the
  server sees each ``S_k`` with only its own share of the noise, and with CKKS every site holds the
  one secret key, so a server that forwards a single site's ciphertext as "the aggregate", or that
  colludes with any site, sees that site's sum with its share only.  The ledger therefore records
  the share's sigma in distributed mode, encrypted or not (the release as the weakest view sees it).

Accounting
----------
Every contributing site records a :class:`~secure_fedvlp.privacy.events.GaussianEvent`
(sensitivity ``C_a``, the sigma above, ``what = "anchors"``) in its ledger **before** it sends
``S_k``; a budget that cannot afford it refuses the release and the site sends nothing.  With
CKKS on, a site's sum is rounded to the fixed-point grid; each record is clipped to ``C_a`` minus
twice the largest rounding displacement, so that the rounded sums of neighbouring datasets are
still at most ``C_a`` apart (:func:`effective_clip`).  Distributed noise is accounted at one
share's sigma whether or not the sums are encrypted (see :func:`anchor_event`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.privacy.events import GaussianEvent

__all__ = [
    "ANCHOR_QUERY",
    "TRUSTED_SERVER_SCOPE",
    "claim_scope",
    "ANCHORS_KEY",
    "SUM_KEY",
    "AnchorBank",
    "anchor_dim",
    "anchor_event",
    "planned_anchor_events",
    "share_noise",
    "share_sigma",
    "total_sigma",
    "effective_clip",
    "record_contributions",
    "server_noise",
    "decode_anchors",
    "guidance_targets",
]

#: ``query`` kind that asks a site for its anchor contribution.
ANCHOR_QUERY = "anchors"
#: Name of the ArrayRecord that carries anchors (a contribution, or the noised bank).
ANCHORS_KEY = "anchors"
#: Array (inside that record) holding a plaintext contribution or bank.
SUM_KEY = "anchor-sum"


#: What a run in the trusted-aggregator mode (``anchors.trust_server = true``) does not claim.
TRUSTED_SERVER_SCOPE = (
    "anchors.trust_server = true: the server added the anchor noise without encryption and saw every site's "
    "un-noised anchor sum, so the epsilon below holds only against parties other than the server (other sites, "
    "model consumers, the network)"
)


def claim_scope(cfg: ExperimentConfig) -> list[str]:
    """Limits of the run's DP claim that the anchors configuration implies (empty when there are none)."""
    a = cfg.anchors
    return [TRUSTED_SERVER_SCOPE] if a.enabled and a.trusted_aggregator(cfg.encryption.enabled) else []


def anchor_dim(num_findings: int, emb_dim: int) -> int:
    """Length of a contribution: ``F * (2 D + 1)``."""
    return int(num_findings) * (2 * int(emb_dim) + 1)


def total_sigma(cfg: ExperimentConfig) -> float:
    """Std of the noise on the released bank: ``z * C_a``."""
    return float(cfg.anchors.noise_multiplier * cfg.anchors.clip)


def share_sigma(cfg: ExperimentConfig) -> float:
    """Std of one site's share in distributed mode: any ``t - 1`` shares sum to ``total_sigma``."""
    t = int(cfg.anchors.min_contributors)
    return total_sigma(cfg) / math.sqrt(max(1, t - 1))


def anchor_event(cfg: ExperimentConfig, server_round: int) -> GaussianEvent:
    """The release one site records before sending its contribution (see the module docstring)."""
    a = cfg.anchors
    # Distributed noise is accounted at one share, encrypted or not: all sites share one CKKS key and
    # no site can check how many contributions an aggregate holds, so a server that forwards a single
    # site's ciphertext, or that colludes with a key-holding site, sees that site's sum with only its
    # own share of the noise.
    sigma = share_sigma(cfg) if a.noise == "distributed" else total_sigma(cfg)
    return GaussianEvent(sensitivity=float(a.clip), sigma=sigma, what="anchors", round=int(server_round))


def planned_anchor_events(cfg: ExperimentConfig) -> list[GaussianEvent]:
    """Anchor releases a site is planned to make over the run (one per round), for calibration."""
    if not cfg.anchors.enabled:
        return []
    return [anchor_event(cfg, r) for r in range(1, cfg.federation.num_rounds + 1)]


def effective_clip(cfg: ExperimentConfig, dim: int, fixed_point_bits: int | None) -> float:
    """Per-record clip when a site's sum is rounded to the ``2**-f`` grid before it is encrypted.

    Rounding moves a sum by at most ``slack = sqrt(dim) * 2**-(f+1)`` in L2, and the sums of two
    neighbouring datasets are rounded independently, so their rounded values can differ by the
    record's contribution plus ``2 * slack`` (one sum rounded down, the other up).  Clipping each
    record to ``C_a - 2 * slack`` keeps the sensitivity of the rounded sum at ``C_a``, the value the
    ledger records.
    """
    clip = float(cfg.anchors.clip)
    if fixed_point_bits is None:
        return clip
    slack = math.sqrt(dim) * 2.0 ** -(fixed_point_bits + 1)  # largest L2 displacement of rounding one sum
    if 2.0 * slack >= 0.5 * clip:
        raise ValueError(
            f"anchors.clip = {clip} is too small for the fixed-point grid 2^-{fixed_point_bits} "
            f"over {dim} values (rounding two neighbouring sums moves them apart by up to "
            f"{2 * slack:.2e})."
        )
    return clip - 2.0 * slack


def record_contributions(
    image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, clip: float
) -> torch.Tensor:
    """Per-record clipped contributions ``[N, F * (2 D + 1)]`` from unit-norm embeddings and multi-hot labels."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(
            f"image and text embeddings must be [N, D] alike; found {tuple(image_emb.shape)} and "
            f"{tuple(text_emb.shape)}."
        )
    if labels.ndim != 2 or labels.shape[0] != image_emb.shape[0]:
        raise ValueError(f"labels must be [N, F] with N = {image_emb.shape[0]}; found {tuple(labels.shape)}.")
    n = image_emb.shape[0]
    ones = torch.ones(n, 1, dtype=image_emb.dtype, device=image_emb.device)
    per = torch.cat([image_emb, text_emb, ones], dim=1)  # [N, 2D+1]
    c = (labels.to(per.dtype).unsqueeze(-1) * per.unsqueeze(1)).reshape(n, -1)  # [N, F*(2D+1)]
    norms = c.norm(dim=1, keepdim=True)
    return c * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)


def share_noise(cfg: ExperimentConfig, dim: int, generator: torch.Generator) -> torch.Tensor:
    """One site's noise share in distributed mode, ``N(0, share_sigma^2 I)`` (float64)."""
    return share_sigma(cfg) * torch.randn(int(dim), generator=generator, dtype=torch.float64)


def server_noise(cfg: ExperimentConfig, dim: int, generator: np.random.Generator) -> np.ndarray:
    """The server's Gaussian, ``N(0, (z C_a)^2 I)`` (``"server"`` mode only)."""
    if cfg.anchors.noise != "server":
        raise ValueError(
            f"the server adds anchor noise only with anchors.noise = 'server'; found {cfg.anchors.noise!r}."
        )
    return generator.normal(0.0, total_sigma(cfg), size=int(dim))


@dataclass(frozen=True)
class AnchorBank:
    """The noised anchors a site decodes: unit-norm image and text anchors of the findings kept."""

    image: torch.Tensor  # [K, D]
    text: torch.Tensor  # [K, D]
    findings: torch.Tensor  # [K] finding indices
    counts: torch.Tensor  # [F] noised counts (all findings)
    num_findings: int

    def __len__(self) -> int:
        return int(self.findings.numel())


def decode_anchors(vector: np.ndarray, num_findings: int, emb_dim: int, cfg: ExperimentConfig) -> AnchorBank:
    """Post-processing of the noised bank: per-finding directions where the noised count is > 3 sigma."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if v.size != anchor_dim(num_findings, emb_dim):
        raise ValueError(
            f"anchor bank has {v.size} values; expected {anchor_dim(num_findings, emb_dim)} "
            f"({num_findings} findings x (2 x {emb_dim} + 1))."
        )
    if not np.all(np.isfinite(v)):
        raise ValueError("anchor bank holds non-finite values.")
    m = torch.from_numpy(v.reshape(num_findings, 2 * emb_dim + 1)).float()
    counts = m[:, -1]
    noise_count = total_sigma(cfg) * (1.0 if cfg.anchors.noise == "server" else 1.5)
    keep = torch.nonzero(counts > max(1.0, 3.0 * noise_count)).reshape(-1)
    img = F.normalize(m[keep, :emb_dim], dim=-1)
    txt = F.normalize(m[keep, emb_dim : 2 * emb_dim], dim=-1)
    return AnchorBank(img, txt, keep, counts, num_findings)


def guidance_targets(labels: torch.Tensor, bank: AnchorBank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-record targets: the normalised mean of the anchors of the record's findings.

    Returns ``(image_target [N, D], text_target [N, D], has_target [N] bool)``; a record with no
    kept finding has no target.  Each record's target depends on its own labels and on the
    (released, public) bank only, so terms built from it are per-sample decomposable.
    """
    sel = labels[:, bank.findings.to(labels.device)].to(torch.float32)  # [N, K]
    has = sel.sum(1) > 0
    img = F.normalize(sel @ bank.image.to(labels.device), dim=-1)
    txt = F.normalize(sel @ bank.text.to(labels.device), dim=-1)
    return img, txt, has


def bank_from_record(record: Mapping[str, Any], num_findings: int, emb_dim: int, cfg: ExperimentConfig) -> AnchorBank:
    """Decode the (decrypted) ``anchors`` ArrayRecord of a train message."""
    if SUM_KEY not in record:
        raise ValueError(f"the '{ANCHORS_KEY}' record carries no '{SUM_KEY}' array.")
    return decode_anchors(record[SUM_KEY].numpy(), num_findings, emb_dim, cfg)
