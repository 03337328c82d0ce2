"""Embedding many records with a model, in batches (evaluation, negative banks, anchors)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["embed_texts", "embed_images"]


@torch.no_grad()
def embed_texts(model: torch.nn.Module, texts: Sequence[str], batch_size: int, device: torch.device) -> torch.Tensor:
    """Normalised text embeddings of ``texts``, in batches, on CPU."""
    chunks = []
    for i in range(0, len(texts), batch_size):
        tok = model.tokenize(list(texts[i : i + batch_size]))
        chunks.append(model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


@torch.no_grad()
def embed_images(model: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    """Normalised image embeddings of ``[N, H, W]`` images, in batches, on CPU."""
    chunks = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).unsqueeze(1).to(device)
        chunks.append(model.encode_image(x).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)
