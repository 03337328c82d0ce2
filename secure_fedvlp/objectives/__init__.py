"""Objectives: contrastive (in-batch and per-sample decomposable) and anchor guidance."""

from secure_fedvlp.objectives.anchor import AnchorGuidanceLoss
from secure_fedvlp.objectives.contrastive import (
    DecomposableContrastiveLoss,
    InfoNCELoss,
    ReportVariantsLoss,
    SiteCentroidLoss,
    report_variants,
    split_sentences,
)

__all__ = [
    "AnchorGuidanceLoss",
    "DecomposableContrastiveLoss",
    "InfoNCELoss",
    "ReportVariantsLoss",
    "SiteCentroidLoss",
    "report_variants",
    "split_sentences",
]
