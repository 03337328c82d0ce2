"""Noised global anchor features: a per-finding image and text anchor bank, released under DP.

What is released (issue 6; DESIGN.md, "The privacy unit")
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
  Gaussian in the ciphertext domain (:func:`~secure_fedvlp.secagg.add_plaintext_noise`); it
  never holds a plaintext anchor, and sites only ever decrypt the noised sum.
* ``"server"`` with CKKS off: **trusted-aggregator mode**: the server sees each ``S_k`` in clear
  and adds the noise before broadcasting.  The DP guarantee then holds against the other sites
  and model consumers, not against the server; the report labels it.
* ``"distributed"``: each site adds its own share ``N(0, (z C_a)^2 / (t - 1))``, ``t =
  anchors.min_contributors >= 2``, and an aggregate of fewer than ``t`` contributions is
  discarded.  Any ``t - 1`` honest shares then carry the full variance, so a site that knows its
  own share (a curious client), or a server that colludes with one site, still faces ``z C_a``.
  A dropout only removes shares from an aggregate that still has ``>= t`` of them.  Without CKKS
  the server sees each site's individually noised ``S_k``, whose noise is only the share's: the
  ledger then records that smaller sigma (the release as the server sees it), never the total.

Accounting
----------
Every contributing site records a :class:`~secure_fedvlp.privacy.events.GaussianEvent`
(sensitivity ``C_a``, the sigma above, ``what = "anchors"``) in its ledger **before** it sends
``S_k``; a budget that cannot afford it refuses the release and the site sends nothing.  With
CKKS on, contributions are rounded to the fixed-point grid; the clip is tightened by the
largest rounding displacement so that the rounded contribution still has norm ``<= C_a``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.privacy.events import GaussianEvent

__all__ = [
    "ANCHOR_QUERY",
    "ANCHORS_KEY",
    "SUM_KEY",
    "AnchorBank",
    "anchor_dim",
    "anchor_event",
    "planned_anchor_events",
    "share_sigma",
    "total_sigma",
    "effective_clip",
    "record_contributions",
    "site_contribution",
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
    sigma = total_sigma(cfg)
    if a.noise == "distributed" and not cfg.encryption.enabled:
        sigma = share_sigma(cfg)  # the server sees this site's sum with its own share only
    return GaussianEvent(sensitivity=float(a.clip), sigma=sigma, what="anchors", round=int(server_round))


def planned_anchor_events(cfg: ExperimentConfig) -> list[GaussianEvent]:
    """Anchor releases a site is planned to make over the run (one per round), for calibration."""
    if not cfg.anchors.enabled:
        return []
    return [anchor_event(cfg, r) for r in range(1, cfg.federation.num_rounds + 1)]


def effective_clip(cfg: ExperimentConfig, dim: int, fixed_point_bits: int | None) -> float:
    """Clip applied before rounding to the ``2**-f`` grid, so that the rounded contribution has norm <= C_a."""
    clip = float(cfg.anchors.clip)
    if fixed_point_bits is None:
        return clip
    slack = math.sqrt(dim) * 2.0 ** -(fixed_point_bits + 1)  # largest L2 displacement of rounding
    if slack >= 0.5 * clip:
        raise ValueError(f"anchors.clip = {clip} is too small for the fixed-point grid 2^-{fixed_point_bits} "
                         f"over {dim} values (rounding alone moves a contribution by up to {slack:.2e}).")
    return clip - slack


def record_contributions(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                         clip: float) -> torch.Tensor:
    """Per-record clipped contributions ``[N, F * (2 D + 1)]`` from unit-norm embeddings and multi-hot labels."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"image and text embeddings must be [N, D] alike; found {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}.")
    if labels.ndim != 2 or labels.shape[0] != image_emb.shape[0]:
        raise ValueError(f"labels must be [N, F] with N = {image_emb.shape[0]}; found {tuple(labels.shape)}.")
    n = image_emb.shape[0]
    ones = torch.ones(n, 1, dtype=image_emb.dtype, device=image_emb.device)
    per = torch.cat([image_emb, text_emb, ones], dim=1)  # [N, 2D+1]
    c = (labels.to(per.dtype).unsqueeze(-1) * per.unsqueeze(1)).reshape(n, -1)  # [N, F*(2D+1)]
    norms = c.norm(dim=1, keepdim=True)
    return c * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)


@torch.no_grad()
def site_contribution(model: nn.Module, dataset, cfg: ExperimentConfig, device: torch.device, *,
                      fixed_point_bits: int | None = None, generator: torch.Generator | None = None) -> np.ndarray:
    """A site's contribution ``S_k`` (float64): clipped per record, summed, plus its share in distributed mode."""
    from secure_fedvlp.methods.base import make_collate

    labels_all = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.float32)
    emb_dim = int(model.spec.embed_dim)
    dim = anchor_dim(labels_all.shape[1], emb_dim)
    clip = effective_clip(cfg, dim, fixed_point_bits)
    was = model.training
    model.eval()
    total = torch.zeros(dim, dtype=torch.float64)
    try:
        collate = make_collate(model)
        bs = cfg.eval.batch_size
        for start in range(0, len(dataset), bs):
            items = [dataset[i] for i in range(start, min(start + bs, len(dataset)))]
            b = collate(items)
            out = model(b["images"].to(device), b["input_ids"].to(device), b["attention_mask"].to(device))
            c = record_contributions(out["image_emb"].float().cpu(), out["text_emb"].float().cpu(), b["labels"], clip)
            total += c.double().sum(0)
    finally:
        model.train(was)
    if cfg.anchors.noise == "distributed":
        gen = generator if generator is not None else torch.Generator().manual_seed(_fresh_seed())
        total += share_sigma(cfg) * torch.randn(dim, generator=gen, dtype=torch.float64)
    return total.numpy()


def server_noise(cfg: ExperimentConfig, dim: int, generator: np.random.Generator) -> np.ndarray:
    """The server's Gaussian, ``N(0, (z C_a)^2 I)`` (``"server"`` mode only)."""
    if cfg.anchors.noise != "server":
        raise ValueError(f"the server adds anchor noise only with anchors.noise = 'server'; found {cfg.anchors.noise!r}.")
    return generator.normal(0.0, total_sigma(cfg), size=int(dim))


def _fresh_seed() -> int:
    import secrets

    return secrets.randbits(62)


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
        raise ValueError(f"anchor bank has {v.size} values; expected {anchor_dim(num_findings, emb_dim)} "
                         f"({num_findings} findings x (2 x {emb_dim} + 1)).")
    if not np.all(np.isfinite(v)):
        raise ValueError("anchor bank holds non-finite values.")
    m = torch.from_numpy(v.reshape(num_findings, 2 * emb_dim + 1)).float()
    counts = m[:, -1]
    noise_count = total_sigma(cfg) * (1.0 if cfg.anchors.noise == "server" else 1.5)
    keep = torch.nonzero(counts > max(1.0, 3.0 * noise_count)).reshape(-1)
    img = F.normalize(m[keep, :emb_dim], dim=-1)
    txt = F.normalize(m[keep, emb_dim:2 * emb_dim], dim=-1)
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
