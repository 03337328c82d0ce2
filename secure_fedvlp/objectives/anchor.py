"""Anchor guidance (FedDRA/FedAID): pull each record's embeddings towards the global model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AnchorGuidanceLoss"]


class AnchorGuidanceLoss(nn.Module):
    """``d(v, v_anchor) + d(t, t_anchor)`` with ``d`` = MSE (authors' choice) or ``1 - cos``.

    Compares a record only with the global model's view of the *same* record, so it is a
    mean of per-record terms: per-sample decomposable, hence usable under DP-SGD.
    ``reduction="none"`` returns the per-record terms (MSE: mean over the embedding
    dimension), whose batch mean is the ``"mean"`` value exactly.
    """

    couples_samples = False

    def __init__(self, distance: str = "mse") -> None:
        super().__init__()
        if distance not in ("mse", "cosine"):
            raise ValueError(f"anchor distance must be 'mse' or 'cosine'; found {distance!r}.")
        self.distance = distance

    def _d(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-record distance ``[B]``."""
        b = b.detach()
        if self.distance == "mse":
            return F.mse_loss(a, b, reduction="none").reshape(a.shape[0], -1).mean(dim=1)
        return 1.0 - F.cosine_similarity(a, b, dim=-1)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        anchor_image_emb: torch.Tensor,
        anchor_text_emb: torch.Tensor,
        reduction: str = "mean",
    ) -> dict[str, torch.Tensor]:
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none'; found {reduction!r}.")
        di = self._d(image_emb, anchor_image_emb)
        dt = self._d(text_emb, anchor_text_emb)
        if reduction == "mean":
            di, dt = di.mean(), dt.mean()
        return {"loss": di + dt, "anchor_image": di, "anchor_text": dt}
