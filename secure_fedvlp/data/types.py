"""Dataset containers shared by the synthetic generator and the real-data loaders."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from secure_fedvlp.data.spec import MODALITIES
from secure_fedvlp.errors import DataError

__all__ = ["FINDINGS", "MODALITIES", "VLPDataset", "SiteData", "Federation"]

#: The findings every dataset is mapped to, in label-column order.
FINDINGS: tuple[str, ...] = (
    "no_finding",
    "cardiomegaly",
    "pleural_effusion",
    "consolidation",
    "pneumothorax",
    "nodule",
)


class VLPDataset(Dataset):
    """In-memory image-report dataset of one site split.

    Attributes
    ----------
    images : float32 ``[N, H, W]`` in [0, 1]
    reports : list of str ("" where ``has_text`` is False)
    labels : float32 ``[N, len(FINDINGS)]`` multi-hot
    masks : uint8 ``[N, H, W]`` lesion masks, or None
    record_ids : stable unique ids
    has_image, has_text : bool ``[N]`` (missing-modality support)
    """

    def __init__(
        self,
        site: str,
        images: np.ndarray,
        reports: Sequence[str],
        labels: np.ndarray,
        masks: np.ndarray | None = None,
        record_ids: Sequence[str] | None = None,
        has_image: np.ndarray | None = None,
        has_text: np.ndarray | None = None,
    ) -> None:
        n = len(reports)
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.float32)
        if images.ndim != 3 or images.shape[0] != n:
            raise DataError(f"site {site!r}: images must be [N, H, W] with N = {n} reports; found {images.shape}.")
        if labels.shape != (n, len(FINDINGS)):
            raise DataError(f"site {site!r}: labels must be [{n}, {len(FINDINGS)}]; found {labels.shape}.")
        if masks is not None and masks.shape != images.shape:
            raise DataError(f"site {site!r}: masks {masks.shape} must match images {images.shape}.")
        self.site = site
        self.images = images
        self.reports = list(reports)
        self.labels = labels
        self.masks = None if masks is None else np.asarray(masks, dtype=np.uint8)
        self.record_ids = list(record_ids) if record_ids is not None else [f"{site}/{i:06d}" for i in range(n)]
        self.has_image = np.ones(n, bool) if has_image is None else np.asarray(has_image, bool)
        self.has_text = np.array([bool(r) for r in self.reports]) if has_text is None else np.asarray(has_text, bool)

    def __len__(self) -> int:
        return len(self.reports)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "image": torch.from_numpy(self.images[i]).unsqueeze(0),
            "report": self.reports[i],
            "labels": torch.from_numpy(self.labels[i]),
            "index": int(i),
            "has_image": bool(self.has_image[i]),
            "has_text": bool(self.has_text[i]),
        }
        if self.masks is not None:
            item["mask"] = torch.from_numpy(self.masks[i].astype(np.float32)).unsqueeze(0)
        return item

    def subset(self, indices: Sequence[int] | np.ndarray) -> VLPDataset:
        """A new dataset holding the records at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return VLPDataset(
            self.site,
            self.images[idx],
            [self.reports[i] for i in idx],
            self.labels[idx],
            None if self.masks is None else self.masks[idx],
            [self.record_ids[i] for i in idx],
            self.has_image[idx],
            self.has_text[idx],
        )

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the records' images, reports, labels, ids and modality flags: pins a public set."""
        h = hashlib.sha256()
        for arr in (self.images, self.labels, self.has_image, self.has_text):
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        for text in (*self.reports, *self.record_ids):
            h.update(text.encode("utf-8") + b"\0")
        return h.hexdigest()

    def prevalence(self) -> np.ndarray:
        """Fraction of records positive for each finding."""
        return self.labels.mean(0) if len(self) else np.zeros(len(FINDINGS))


@dataclass(frozen=True)
class SiteData:
    """One site's splits.

    ``modality`` is what the site holds (:data:`MODALITIES`): ``"paired"`` image-report pairs,
    ``"image"`` images with finding labels and no reports, ``"text"`` reports with finding labels and
    no images.  A site is never asked for a modality it does not hold (its records carry
    ``has_text`` / ``has_image`` False for it).
    """

    name: str
    role: str  # "train" or "heldout"
    train: VLPDataset
    val: VLPDataset
    test: VLPDataset
    modality: str = "paired"

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise DataError(f"site {self.name!r}: modality {self.modality!r} is not one of {', '.join(MODALITIES)}.")


@dataclass(frozen=True)
class Federation:
    """All sites of a federation, plus the held-out site and a public reference set."""

    sites: tuple[SiteData, ...]
    heldout: SiteData | None = None
    public: VLPDataset | None = None

    def all_sites(self) -> tuple[SiteData, ...]:
        """Training sites, then the held-out site if any."""
        return self.sites + ((self.heldout,) if self.heldout is not None else ())

    def site(self, name: str) -> SiteData:
        for s in self.all_sites():
            if s.name == name:
                return s
        raise DataError(f"unknown site {name!r}; this federation has: {', '.join(s.name for s in self.all_sites())}.")
