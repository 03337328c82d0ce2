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

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InfoNCELoss", "DecomposableContrastiveLoss"]


class InfoNCELoss(nn.Module):
    """Bidirectional in-batch InfoNCE: ``(CE(S/tau, I) + CE(S^T/tau, I)) / 2``."""

    couples_samples = True

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: nn.Module,
                reduction: str = "mean") -> dict[str, torch.Tensor]:
        if reduction != "mean":
            raise ValueError("in-batch InfoNCE has no per-record loss (each record's term depends on the whole "
                             f"batch); only reduction='mean' is defined. Found {reduction!r}.")
        logits = logit_scale(image_emb @ text_emb.T)
        target = torch.arange(logits.shape[0], device=logits.device)
        i2t = F.cross_entropy(logits, target)
        t2i = F.cross_entropy(logits.T, target)
        return {"loss": 0.5 * (i2t + t2i), "loss_i2t": i2t, "loss_t2i": t2i}


class DecomposableContrastiveLoss(nn.Module):
    """Per-sample decomposable contrastive loss with negatives from fixed (non-private) banks.

    For record ``i`` with image ``v_i`` and report ``t_i``::

        loss_i2t_i = -log softmax([<v_i,t_i>, <v_i,n^t_1>, ..., <v_i,n^t_K>])[0]
        loss_t2i_i = -log softmax([<t_i,v_i>, <t_i,n^v_1>, ..., <t_i,n^v_K>])[0]

    scaled by the logit scale; the banks are detached.  ``reduction="none"`` returns
    per-record values.
    """

    couples_samples = False

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: nn.Module,
                neg_image_bank: torch.Tensor, neg_text_bank: torch.Tensor,
                reduction: str = "mean") -> dict[str, torch.Tensor]:
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none'; found {reduction!r}.")
        if neg_image_bank.ndim != 2 or neg_text_bank.ndim != 2 or neg_text_bank.shape[0] == 0:
            raise ValueError("negative banks must be non-empty [K, D] matrices; "
                             f"found {tuple(neg_image_bank.shape)} and {tuple(neg_text_bank.shape)}.")
        pos = (image_emb * text_emb).sum(-1, keepdim=True)
        i2t = torch.cat([pos, image_emb @ neg_text_bank.detach().T], dim=1)
        t2i = torch.cat([pos, text_emb @ neg_image_bank.detach().T], dim=1)
        k1 = i2t.shape[1]
        scaled = logit_scale(torch.cat([i2t, t2i], dim=1))  # one call: one per-sample activation
        zeros = torch.zeros(scaled.shape[0], dtype=torch.long, device=scaled.device)
        li2t = F.cross_entropy(scaled[:, :k1], zeros, reduction="none")
        lt2i = F.cross_entropy(scaled[:, k1:], zeros, reduction="none")
        per = 0.5 * (li2t + lt2i)
        if reduction == "none":
            return {"loss": per, "loss_i2t": li2t, "loss_t2i": lt2i}
        return {"loss": per.mean(), "loss_i2t": li2t.mean(), "loss_t2i": lt2i.mean()}
