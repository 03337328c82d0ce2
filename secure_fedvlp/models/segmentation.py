"""Segmentation on a frozen image encoder: a U-Net-style decoder, a site selector, Dice with MONAI.

The image tower of a trained :class:`~secure_fedvlp.models.vlp.VLPModel` stays frozen (it is the
thing being evaluated, or the VLP initialisation FedSM fine-tunes on top of); only a decoder (and
FedSM's selector) train.  Because the encoder is frozen, its features are computed once per image
(:func:`encoder_features`) and the decoder trains on them: a cheap step, and every record's
per-sample gradient is that of a small convolutional network (DP-SGD composes unchanged).

* :class:`UNetDecoder`: skip connections from every resolution level of the encoder (the stem
  and each stage, the deepest one first); each level upsamples the coarser path, concatenates the
  skip and applies two MONAI ``Convolution`` blocks (conv, GroupNorm, ReLU); a last block works at
  the image's resolution without a skip (as segmentation_models_pytorch's U-Net, which MGCA's
  segmentation uses), so every pixel's prediction comes from the frozen encoder's features, never
  from the raw image.  GroupNorm, not BatchNorm, so that a record's output depends on that record alone.
* :class:`SiteSelector`: FedSM's model selector, a linear classifier over the frozen encoder's
  pooled features (one class per training site).
* :func:`dice_loss` (``monai.losses.DiceLoss`` on sigmoid outputs, per image) and
  :func:`per_image_dice` (``monai.metrics.DiceMetric`` at threshold 0.5, ``ignore_empty=False``:
  an empty prediction on an empty mask scores 1, a non-empty one 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from monai.networks.blocks import Convolution
from torch import nn

__all__ = [
    "encoder_features",
    "feature_channels",
    "UNetDecoder",
    "SiteSelector",
    "dice_loss",
    "per_image_dice",
    "SEG_THRESHOLD",
]

#: Probability above which a pixel is predicted as lesion.
SEG_THRESHOLD = 0.5


def _levels(image_encoder: nn.Module) -> list[int]:
    """Indices (0 = stem, i + 1 = stage i) of the last module at each spatial resolution of ``image_encoder``."""
    strides = [1] + [int(stage[0].conv1.stride[0]) for stage in image_encoder.stages]
    keep = []
    for i in range(len(strides)):
        nxt = strides[i + 1] if i + 1 < len(strides) else 2
        if nxt != 1:
            keep.append(i)
    return keep


def feature_channels(image_encoder: nn.Module) -> list[int]:
    """Channels of the maps :func:`encoder_features` returns (finest first)."""
    chans = [int(image_encoder.stem[0].out_channels)] + [int(s[-1].conv2.out_channels) for s in image_encoder.stages]
    return [chans[i] for i in _levels(image_encoder)]


@torch.no_grad()
def encoder_features(
    image_encoder: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """The frozen encoder's feature maps of ``[N, H, W]`` images, one ``[N, C, h, w]`` tensor per resolution.

    Finest first; computed in eval mode, on CPU in float32.
    """
    was = image_encoder.training
    image_encoder.eval()
    device = torch.device(device)
    out: list[list[torch.Tensor]] = []
    levels = _levels(image_encoder)
    try:
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(np.ascontiguousarray(images[i : i + batch_size]), dtype=torch.float32)
            x = x.unsqueeze(1).to(device)
            maps = [image_encoder.stem(x)]
            for stage in image_encoder.stages:
                maps.append(stage(maps[-1]))
            out.append([maps[j].float().cpu() for j in levels])
    finally:
        image_encoder.train(was)
    if not out:
        return []
    return [torch.cat([b[k] for b in out]) for k in range(len(levels))]


def _block(cin: int, cout: int, groups: int) -> nn.Module:
    g = max(1, min(groups, cout))
    while cout % g:
        g -= 1
    return Convolution(2, cin, cout, kernel_size=3, act="RELU", norm=("GROUP", {"num_groups": g}), bias=False)


class UNetDecoder(nn.Module):
    """U-Net-style decoder over frozen encoder features (see the module docstring).

    ``forward(image, features)``: ``image`` ``[B, 1, H, W]`` (only its size is used), ``features`` the
    encoder maps of :func:`encoder_features` for the same records (finest first).  Returns lesion
    logits ``[B, 1, H, W]``.
    """

    def __init__(self, channels: Sequence[int], width: int = 16, groups: int = 4) -> None:
        super().__init__()
        channels = list(channels)
        if not channels:
            raise ValueError("the decoder needs at least one encoder feature map.")
        self.bottom = _block(channels[-1], width, groups)
        # one level per finer encoder map, then the image itself
        self.ups = nn.ModuleList(
            nn.Sequential(_block(width + c, width, groups), _block(width, width, groups)) for c in channels[-2::-1]
        )
        self.top = nn.Sequential(_block(width, width, groups), _block(width, width, groups))
        self.head = Convolution(2, width, 1, kernel_size=1, conv_only=True)

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(features[-1])
        for up, skip in zip(self.ups, list(features[-2::-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        x = self.top(x)
        return self.head(x)


class SiteSelector(nn.Module):
    """FedSM's model selector: site logits from the frozen encoder's deepest map, average-pooled."""

    def __init__(self, in_channels: int, num_sites: int) -> None:
        super().__init__()
        if num_sites < 1:
            raise ValueError(f"the selector needs at least one site class. Found {num_sites}.")
        self.linear = nn.Linear(in_channels, num_sites)

    def forward(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.linear(deepest.mean(dim=(2, 3)))


def dice_loss() -> DiceLoss:
    """MONAI Dice loss on sigmoid outputs, one value per image (``reduction="none"`` gives ``[B, 1, 1, 1]``)."""
    return DiceLoss(sigmoid=True, reduction="none")


def per_image_dice(logits: torch.Tensor, masks: torch.Tensor, threshold: float = SEG_THRESHOLD) -> torch.Tensor:
    """Dice of each image ``[B]`` with its prediction thresholded at ``threshold`` (empty on empty counts 1)."""
    if logits.shape != masks.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and masks {tuple(masks.shape)} shapes differ.")
    pred = (torch.sigmoid(logits.float()) > threshold).float()
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return metric(pred, (masks > 0.5).float()).reshape(-1)
