"""Opacus per-sample gradient rules for this package's custom modules."""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from secure_fedvlp.models.vlp import LogitScale


@register_grad_sampler(LogitScale)
def compute_logit_scale_grad_sample(
    layer: LogitScale, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """``y = x * exp(s)`` (s clamped at log 100) -> ``dL_b/ds = sum(grad_y_b * x_b) * exp(s)``."""
    if not isinstance(layer.scale, nn.Parameter) or not layer.scale.requires_grad:
        return {}
    x = activations[0]
    s = layer.scale
    unclamped = (s <= LogitScale.MAX).to(x.dtype)
    per_sample = (backprops * x).reshape(x.shape[0], -1).sum(dim=1) * s.clamp(max=LogitScale.MAX).exp() * unclamped
    return {s: per_sample.reshape(x.shape[0], *s.shape)}
