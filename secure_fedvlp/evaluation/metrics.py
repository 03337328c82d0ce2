"""Downstream evaluation of an image-report model on one site's split.

* **Zero-shot finding classification**: each finding has positive and negative text
  prompts; an image's score for a finding is ``cos(img, mean(pos)) - cos(img, mean(neg))``
  (CheXzero-style).  AUROC per finding and the macro mean over findings that have both
  classes in the split.
* **Retrieval**: image-to-text and text-to-image Recall@K over the split's paired
  records.  Synthetic and templated reports repeat verbatim; a retrieved report whose
  text is identical to the ground-truth report counts as a hit (identical strings are
  indistinguishable to any text model), and likewise for the images paired with it.

Everything here is pure given embeddings (:func:`zero_shot_scores`, :func:`recall_at_k`),
plus one driver (:func:`evaluate_split`) that embeds a dataset with a model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from secure_fedvlp.data.types import FINDINGS
from secure_fedvlp.models.embed import embed_images, embed_texts

logger = logging.getLogger(__name__)

__all__ = ["FINDING_PROMPTS", "binary_auroc", "zero_shot_scores", "recall_at_k", "evaluate_split", "MACRO_AUROC"]

MACRO_AUROC = "zs_auroc_macro"

#: Positive / negative prompts per finding.  Kept generic (not copied from any site's
#: report templates) so zero-shot is a real transfer test.
FINDING_PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "no_finding": (
        ("no acute cardiopulmonary abnormality", "normal chest radiograph", "the lungs are clear"),
        ("abnormal chest radiograph", "acute cardiopulmonary abnormality", "there is a finding"),
    ),
    "cardiomegaly": (
        ("cardiomegaly", "the heart is enlarged", "enlarged cardiac silhouette"),
        ("no cardiomegaly", "normal heart size", "the cardiac silhouette is normal"),
    ),
    "pleural_effusion": (
        ("pleural effusion", "fluid in the pleural space", "blunting of the costophrenic angle"),
        ("no pleural effusion", "no effusion", "sharp costophrenic angles"),
    ),
    "consolidation": (
        ("consolidation", "airspace opacity", "focal consolidation in the lung"),
        ("no consolidation", "no focal airspace opacity", "no airspace disease"),
    ),
    "pneumothorax": (
        ("pneumothorax", "collapsed lung with a pleural line", "air in the pleural space"),
        ("no pneumothorax", "no evidence of pneumothorax", "the lungs are fully expanded"),
    ),
    "nodule": (
        ("pulmonary nodule", "a small rounded opacity", "a nodular density in the lung"),
        ("no pulmonary nodule", "no nodules", "no focal nodular opacity"),
    ),
}


def binary_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of ``scores`` for binary ``labels`` (ties counted half, scikit-learn's); NaN if one class only."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def zero_shot_scores(image_emb: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor) -> torch.Tensor:
    """Scores ``[N, F]`` from normalised image embeddings and per-finding prompt embeddings ``[F, D]``."""
    return image_emb @ pos_emb.T - image_emb @ neg_emb.T


def recall_at_k(sim: torch.Tensor, match: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K for a query-by-candidate similarity matrix.

    ``match[i, j]`` is True when candidate ``j`` is a correct answer for query ``i``
    (every query has at least one).  Recall@K is the fraction of queries with a correct
    candidate among the top K.
    """
    if sim.shape != match.shape:
        raise ValueError(f"similarity {tuple(sim.shape)} and match {tuple(match.shape)} shapes differ.")
    n_cand = sim.shape[1]
    out = {}
    kmax = min(max(ks), n_cand)
    top = sim.topk(kmax, dim=1).indices
    hits = torch.gather(match, 1, top)
    for k in ks:
        out[k] = float(hits[:, : min(k, n_cand)].any(dim=1).float().mean())
    return out


@torch.no_grad()
def prompt_embeddings(
    model: torch.nn.Module, device: torch.device, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (re-normalised) positive and negative prompt embeddings, ``[F, D]`` each."""
    pos, neg = [], []
    for finding in FINDINGS:
        p, n = FINDING_PROMPTS[finding]
        for bank, prompts in ((pos, p), (neg, n)):
            e = embed_texts(model, prompts, batch_size, device).mean(0)
            bank.append(e / e.norm().clamp_min(1e-12))
    return torch.stack(pos), torch.stack(neg)


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    dataset,
    *,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Zero-shot AUROC (per finding, macro) and retrieval Recall@K of ``model`` on ``dataset``.

    Returns a flat dict of floats; findings with a single class in the split are left out
    of the dict (and of the macro mean) rather than reported as NaN.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        out: dict[str, float] = {"num-examples": float(len(dataset))}
        has_img = np.asarray(dataset.has_image, dtype=bool)
        has_txt = np.asarray(dataset.has_text, dtype=bool)
        if has_img.any():
            img_emb = embed_images(model, dataset.images[has_img], batch_size, device)
            pos, neg = prompt_embeddings(model, device, batch_size)
            scores = zero_shot_scores(img_emb, pos, neg).numpy()
            labels = np.asarray(dataset.labels)[has_img]
            aurocs = []
            for f_idx, finding in enumerate(FINDINGS):
                a = binary_auroc(labels[:, f_idx], scores[:, f_idx])
                if not np.isnan(a):
                    out[f"zs_auroc/{finding}"] = a
                    aurocs.append(a)
            if aurocs:
                out[MACRO_AUROC] = float(np.mean(aurocs))
        paired = np.flatnonzero(has_img & has_txt)
        if paired.size >= 2:
            img = embed_images(model, dataset.images[paired], batch_size, device)
            reports = [dataset.reports[i] for i in paired]
            txt = embed_texts(model, reports, batch_size, device)
            codes = {r: c for c, r in enumerate(dict.fromkeys(reports))}
            ids = torch.tensor([codes[r] for r in reports])
            match = ids[:, None] == ids[None, :]
            sim = img @ txt.T
            for k, v in recall_at_k(sim, match, ks).items():
                out[f"i2t_R@{k}"] = v
            for k, v in recall_at_k(sim.T.contiguous(), match.T.contiguous(), ks).items():
                out[f"t2i_R@{k}"] = v
            out["mean_R@5" if 5 in ks else f"mean_R@{ks[0]}"] = 0.5 * (
                out[f"i2t_R@{5 if 5 in ks else ks[0]}"] + out[f"t2i_R@{5 if 5 in ks else ks[0]}"]
            )
        return out
    finally:
        model.train(was_training)
