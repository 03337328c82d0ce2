"""Image-report contrastive objectives (losses are modules returning named terms).

:class:`InfoNCELoss` is the ordinary bidirectional in-batch objective (CLIP / ConVIRT).
Each record's loss depends on every other record of its batch (they are its negatives),
so per-sample clipping does not bound one record's influence: it *couples samples* and is
refused under DP-SGD.

:class:`DecomposableContrastiveLoss` is the DP-safe variant: record ``i``'s negatives come
from fixed banks that hold no other private record of the batch (a public reference set
embedded by the global model, or DP-released anchors), so the batch loss is a mean of
per-record functions and per-sample clipping bounds each record's contribution.

Both take the model's :class:`~secure_fedvlp.models.LogitScale` *module* and apply it to
the similarity logits, so the temperature's per-sample gradient flows through Opacus.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DecomposableContrastiveLoss",
    "InfoNCELoss",
    "ReportVariantsLoss",
    "SiteCentroidLoss",
    "report_variants",
    "split_sentences",
]

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


def split_sentences(report: str) -> list[str]:
    """A report's sentences: split after ``.``, ``!``, ``?`` or ``;`` followed by white space, or at a line
    break; empty pieces dropped."""
    return [p.strip() for p in _SENTENCE_END.split(report.strip()) if p.strip()]


def report_variants(report: str, k: int) -> list[str]:
    """``k`` negatives made from ``report`` itself: the report with sentence ``j`` left out, for each ``j``.

    A report of ``n`` sentences gives ``n`` distinct variants; fewer than ``k`` are repeated in
    turn to make ``k`` (a repeated variant counts more in the softmax, as a harder negative would),
    more than ``k`` keep the first ``k`` sentences' variants.  A one-sentence report's only variant
    is the empty report (what the text tower makes of no text).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; found {k}.")
    sentences = split_sentences(report)
    out = [" ".join(sentences[:j] + sentences[j + 1 :]) for j in range(len(sentences))] or [""]
    return [out[j % len(out)] for j in range(k)]


class InfoNCELoss(nn.Module):
    """Bidirectional in-batch InfoNCE: ``(CE(S/tau, I) + CE(S^T/tau, I)) / 2``."""

    couples_samples = True

    def forward(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: nn.Module, reduction: str = "mean"
    ) -> dict[str, torch.Tensor]:
        if reduction != "mean":
            raise ValueError(
                "in-batch InfoNCE has no per-record loss (each record's term depends on the whole "
                f"batch); only reduction='mean' is defined. Found {reduction!r}."
            )
        logits = logit_scale(image_emb @ text_emb.T)
        target = torch.arange(logits.shape[0], device=logits.device)
        i2t = F.cross_entropy(logits, target)
        t2i = F.cross_entropy(logits.T, target)
        return {"loss": 0.5 * (i2t + t2i), "loss_i2t": i2t, "loss_t2i": t2i}


class DecomposableContrastiveLoss(nn.Module):
    """Per-sample decomposable contrastive loss with negatives from fixed (non-private) banks.

    For record ``i`` with image embedding ``v_i`` and report embedding ``t_i`` (current model),
    positives ``t~_i``, ``v~_i`` and negative banks ``n^t``, ``n^v`` (all fixed)::

        loss_i2t_i = -log softmax([<v_i,t~_i>, <v_i,n^t_1>, ..., <v_i,n^t_K>])[0]
        loss_t2i_i = -log softmax([<t_i,v~_i>, <t_i,n^v_1>, ..., <t_i,n^v_K>])[0]

    scaled by the logit scale; banks and positives are detached.  ``reduction="none"``
    returns per-record values.

    **The positives must live in the banks' embedding space.**  Trainers pass the global
    model's view of the record itself (``pos_image``, ``pos_text``), the model that embedded
    the banks.  With the current model's own ``t_i``/``v_i`` as positives (the default when
    none are given; right only when the current model *is* the banks' model, e.g. for a
    report on the global model) the loss has a degenerate minimum: moving every current
    image and report embedding towards one common direction, away from the stale banks,
    drives it to ~0 with nothing learned, and the next round's banks, re-embedded by the
    collapsed model, leave the loss at chance (measured on the demo model under DP-SGD:
    3 clipped steps took the loss from 5.9 to 0.4 while the mean cosine between different
    records' image embeddings reached 0.99).  With global positives, lowering ``loss_i2t``
    means putting ``v_i`` nearer its own report than other reports *in one fixed space*.

    **Negatives from the record's own report** (``own_text_negatives``, ``train.report_negatives``).
    Public reports make weak image-to-report negatives: they differ from a site's reports in
    which findings they name but also in wording and layout, and a thousand of them, mostly easy,
    swamp the few that are hard.  A record's own report with one sentence left out
    (:func:`report_variants`) differs from it in exactly one statement, in the site's own words:
    preferring the full report to each variant asks ``v_i`` to carry every statement of the
    report.  The variants are a function of record ``i`` alone (embedded by the current model,
    detached), so the loss stays per-sample decomposable.  Measured on the synthetic federation
    at 2,000 records per site (docs/results.md, "Privacy-utility at scale"): without noise it
    roughly doubles what the public-negative objective gains over a public start.
    """

    couples_samples = False

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: nn.Module,
        neg_image_bank: torch.Tensor,
        neg_text_bank: torch.Tensor,
        reduction: str = "mean",
        pos_image: torch.Tensor | None = None,
        pos_text: torch.Tensor | None = None,
        own_text_negatives: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``own_text_negatives`` (``[B, K, D]``, optional): negatives made from each record's own report
        (:func:`report_variants`); when given, the image-to-report term contrasts ``v_i`` with its report
        against those ``K`` only, not against ``neg_text_bank``."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none'; found {reduction!r}.")
        if neg_image_bank.ndim != 2 or neg_text_bank.ndim != 2 or neg_text_bank.shape[0] == 0:
            raise ValueError(
                "negative banks must be non-empty [K, D] matrices; "
                f"found {tuple(neg_image_bank.shape)} and {tuple(neg_text_bank.shape)}."
            )
        for name, pos_ in (("pos_image", pos_image), ("pos_text", pos_text)):
            if pos_ is not None and pos_.shape != image_emb.shape:
                raise ValueError(f"{name} must be [B, D] = {tuple(image_emb.shape)}; found {tuple(pos_.shape)}.")
        partner_t = text_emb if pos_text is None else pos_text.detach()
        partner_v = image_emb if pos_image is None else pos_image.detach()
        if own_text_negatives is not None:
            if own_text_negatives.ndim != 3 or own_text_negatives.shape[::2] != image_emb.shape:
                raise ValueError(
                    f"own_text_negatives must be [B, K, D] with [B, D] = {tuple(image_emb.shape)}; "
                    f"found {tuple(own_text_negatives.shape)}."
                )
            text_negs = torch.einsum("bd,bkd->bk", image_emb, own_text_negatives.detach())
        else:
            text_negs = image_emb @ neg_text_bank.detach().T
        i2t = torch.cat([(image_emb * partner_t).sum(-1, keepdim=True), text_negs], dim=1)
        t2i = torch.cat([(text_emb * partner_v).sum(-1, keepdim=True), text_emb @ neg_image_bank.detach().T], dim=1)
        k1 = i2t.shape[1]
        scaled = logit_scale(torch.cat([i2t, t2i], dim=1))  # one call: one per-sample activation
        zeros = torch.zeros(scaled.shape[0], dtype=torch.long, device=scaled.device)
        li2t = F.cross_entropy(scaled[:, :k1], zeros, reduction="none")
        lt2i = F.cross_entropy(scaled[:, k1:], zeros, reduction="none")
        per = 0.5 * (li2t + lt2i)
        if reduction == "none":
            return {"loss": per, "loss_i2t": li2t, "loss_t2i": lt2i}
        return {"loss": per.mean(), "loss_i2t": li2t.mean(), "loss_t2i": lt2i.mean()}


class ReportVariantsLoss(nn.Module):
    """Per-record image-to-report objective against the record's own report variants (``train.objective =
    "report_variants"``).

    For record ``i`` with image embedding ``v_i``, report embedding ``t_i`` and the embeddings
    ``t_i1 .. t_iK`` of ``K`` variants of that report with one sentence left out
    (:func:`report_variants`), all embedded by the model being trained::

        loss_i = -log softmax([<v_i,t_i>, <v_i,t_i1>, ..., <v_i,t_iK>])[0]

    scaled by the logit scale.  The loss asks the image to carry every statement of its report
    (each variant differs from the report in exactly one statement, in the site's own words), and
    the gradient reaches the text head through the report *and* its variants, so the text head
    learns which statements set one report apart from its near neighbours.  Every term is a
    function of record ``i`` alone (its image and its report), so the objective is per-sample
    decomposable: per-sample clipping bounds each record's contribution.

    Unlike :class:`DecomposableContrastiveLoss` there is no report-to-image term against public
    images and no public bank: on the synthetic federation the same objective with that term gained
    less without noise (docs/results.md, "Privacy-utility at scale").

    ``candidates`` is ``[B, 1 + K, D]``: each record's report first, then its variants.  The
    trainer projects the report and its variants in *one* call of the text head, so that every
    trained module runs once per step (ghost clipping computes one norm per module call).
    """

    couples_samples = False

    def forward(
        self, image_emb: torch.Tensor, candidates: torch.Tensor, logit_scale: nn.Module, reduction: str = "mean"
    ) -> dict[str, torch.Tensor]:
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none'; found {reduction!r}.")
        if candidates.ndim != 3 or candidates.shape[1] < 2 or candidates.shape[::2] != image_emb.shape:
            raise ValueError(
                f"candidates must be [B, 1 + K, D] with K >= 1 and [B, D] = {tuple(image_emb.shape)}; "
                f"found {tuple(candidates.shape)}."
            )
        logits = logit_scale(torch.einsum("bd,bkd->bk", image_emb, candidates))
        zeros = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        per = F.cross_entropy(logits, zeros, reduction="none")
        if reduction == "none":
            return {"loss": per, "loss_i2t": per}
        return {"loss": per.mean(), "loss_i2t": per.mean()}


class SiteCentroidLoss(nn.Module):
    """Per-record image-to-report objective against the site's released report centroids (``train.objective =
    "site_centroids"``).

    For record ``i`` with image embedding ``v_i``, report embedding ``t_i`` and the site's report
    centroids ``c_1 .. c_k`` (:mod:`secure_fedvlp.privacy.site_centroids`: released once per run
    with Gaussian noise, then fixed)::

        loss_i = -log softmax([<v_i,t_i>, <v_i,c_1>, ..., <v_i,c_k>])[0]

    scaled by the logit scale.  The centroids summarise the site's reports in the site's own
    wording, so the image is asked to match its own report better than "a typical report of this
    site": what sets it apart is its findings, not the site's style (public reports as negatives
    teach much of the style difference instead).  Record ``i``'s loss is a function of its own
    image and report and of the released centroids (post-processing of a DP release, accounted
    in the ledger), so per-sample clipping bounds each record's contribution.  The report
    embeddings are the locked text side's (``model.trainable = "image_head"``): only the image
    head and the temperature train.
    """

    couples_samples = False

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: nn.Module,
        centroids: torch.Tensor,
        reduction: str = "mean",
    ) -> dict[str, torch.Tensor]:
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none'; found {reduction!r}.")
        if centroids.ndim != 2 or centroids.shape[0] < 1 or centroids.shape[1] != image_emb.shape[1]:
            raise ValueError(
                f"centroids must be [k, {image_emb.shape[1]}] with k >= 1; found {tuple(centroids.shape)}."
            )
        if text_emb.shape != image_emb.shape:
            raise ValueError(f"text_emb must be [B, D] = {tuple(image_emb.shape)}; found {tuple(text_emb.shape)}.")
        logits = torch.cat(
            [(image_emb * text_emb.detach()).sum(-1, keepdim=True), image_emb @ centroids.detach().T], dim=1
        )
        scaled = logit_scale(logits)
        zeros = torch.zeros(scaled.shape[0], dtype=torch.long, device=scaled.device)
        per = F.cross_entropy(scaled, zeros, reduction="none")
        if reduction == "none":
            return {"loss": per, "loss_i2t": per}
        return {"loss": per.mean(), "loss_i2t": per.mean()}
