"""Model-state helpers shared by every party: which parameters travel, loading them, batching records."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from secure_fedvlp.errors import NonFiniteModelError

__all__ = ["federated_state", "load_federated_state", "make_collate"]


def federated_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The parameters that travel: every parameter with ``requires_grad``, as float32 numpy."""
    return {n: p.detach().cpu().float().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


def load_federated_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load federated parameters into ``model`` in place; names and shapes must match, values must be finite.

    A model with a non-finite value is refused before anything is loaded: a site never lets a
    private record touch it (a crafted NaN or infinity is a way to make records with a chosen
    property behave differently).
    """
    bad = [n for n, v in arrays.items() if not np.isfinite(np.asarray(v)).all()]
    if bad:
        raise NonFiniteModelError(f"the received model holds non-finite values in {bad[:5]}; refused before use.")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    got = set(arrays)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise ValueError(f"federated state mismatch: missing {missing[:5]}, unexpected {extra[:5]}.")
    with torch.no_grad():
        for name, value in arrays.items():
            p = params[name]
            t = torch.as_tensor(np.asarray(value))
            if t.numel() == p.numel() == 1:  # Flower's Array stores 0-d scalars as shape (1,)
                t = t.reshape(p.shape)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"parameter {name!r}: shape {tuple(t.shape)} != model shape {tuple(p.shape)}.")
            p.copy_(t.to(dtype=p.dtype, device=p.device))


def make_collate(model: nn.Module) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Collate dataset items into a batch, tokenising reports with the model's tokenizer."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        reports = [it["report"] for it in items]
        tok = model.tokenize(reports)
        batch = {
            "images": torch.stack([it["image"] for it in items]),
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
            "labels": torch.stack([it["labels"] for it in items]),
            "index": torch.as_tensor([it["index"] for it in items]),
        }
        if items and "mask" in items[0]:  # lesion masks (segmentation methods)
            batch["masks"] = torch.stack([it["mask"] for it in items])
        return batch

    return collate
