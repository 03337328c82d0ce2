"""Validated table rows -> a :class:`~secure_fedvlp.data.types.Federation`: decode the images, group by site.

Images are decoded only once every table is clean (decoding is the slow part); unreadable
images are then collected as row problems the same way.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secure_fedvlp.data.images import is_rle, load_image, load_mask
from secure_fedvlp.data.tables import SPLITS, Problems
from secure_fedvlp.data.types import FINDINGS, Federation, SiteData, VLPDataset
from secure_fedvlp.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["Record", "assemble"]


@dataclass
class Record:
    """One validated row: where it came from, its image file, report, labels, site and split."""

    source: Path
    row: int
    line: int
    image: Path | None  # None for a text-only site's record
    report: str
    has_text: bool
    labels: np.ndarray
    site: str
    split: str
    rid: str = ""  # record id; default "<site>/<split>/row<row>"
    modality: str = "paired"  # what the record's site holds (data.spec.MODALITIES)
    mask: str = ""  # lesion mask: a PNG path or a SIIM run-length encoding; "" = not annotated

    @property
    def has_image(self) -> bool:
        """Whether the record carries an image (a text-only site's records carry none)."""
        return self.modality != "text" and self.image is not None


def assemble(
    records: list[Record],
    source: Path,
    *,
    image_size: int,
    heldout_site: str | None,
    public_site: str | None,
    num_workers: int,
    problems: Problems,
) -> Federation:
    """Decode images (collecting unreadable ones) and group records into a Federation.

    Training sites are sorted by name; ``heldout_site`` becomes ``Federation.heldout`` and
    ``public_site`` (all its splits) ``Federation.public``.
    """
    names = sorted({r.site for r in records})
    site_modality: dict[str, str] = {}
    for rec in records:  # every row of a site must declare the same modality
        first = site_modality.setdefault(rec.site, rec.modality)
        if rec.modality != first:
            problems.add(
                rec.source,
                rec.row,
                rec.line,
                f"site {rec.site!r} is declared {first!r} elsewhere but {rec.modality!r} here",
            )
    problems.raise_if_any(source, "Inconsistent site modalities in")
    for role, name in (("heldout_site", heldout_site), ("public_site", public_site)):
        if name is not None and name not in names:
            raise DataError(f"{role}={name!r} is not a site of {source}; sites found: {', '.join(names) or 'none'}.")
    if not records:
        raise DataError(f"Manifest {source} yields no records (after filtering).")

    def decode(rec: Record) -> np.ndarray | str:
        if not rec.has_image:  # a text-only site is never asked for an image
            return np.zeros((image_size, image_size), np.float32)
        try:
            return load_image(rec.image, image_size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem of this row
            return f"cannot read image {str(rec.image)!r} ({type(exc).__name__}: {exc})"

    images = np.zeros((len(records), image_size, image_size), np.float32)
    if num_workers > 1:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            results = list(pool.map(decode, records))
    else:
        results = []
        for rec in records:
            results.append(decode(rec))
            if isinstance(results[-1], str) and problems.full:
                break
    # results stop early once the problem list is full, so the lengths may differ
    for i, (rec, res) in enumerate(zip(records, results, strict=False)):
        if isinstance(res, str):
            problems.add(rec.source, rec.row, rec.line, res)
        else:
            images[i] = res
    problems.raise_if_any(source, "Cannot load images listed in")
    masks = np.zeros((len(records), image_size, image_size), np.uint8)
    annotated = np.array([bool(r.mask) for r in records], bool)
    for i, rec in enumerate(records):
        if not annotated[i]:
            continue
        try:
            # a PNG mask's path was resolved, and checked to lie under the image root, by the manifest reader
            roots = [] if is_rle(rec.mask) else [Path(rec.mask).parent]
            masks[i] = load_mask(rec.mask, rec.image, image_size, roots)
        except Exception as exc:  # noqa: BLE001 - any mask failure is a data problem of this row
            problems.add(
                rec.source, rec.row, rec.line, f"cannot read mask {rec.mask[:60]!r} ({type(exc).__name__}: {exc})"
            )
    problems.raise_if_any(source, "Cannot load masks listed in")

    def dataset(site: str, split: str) -> VLPDataset:
        idx = [i for i, r in enumerate(records) if r.site == site and r.split == split]
        sel = [records[i] for i in idx]
        lab = np.stack([r.labels for r in sel]) if sel else np.zeros((0, len(FINDINGS)), np.float32)
        # masks only where every record of the split is annotated (segmentation needs them all)
        has_masks = bool(sel) and bool(annotated[idx].all())
        if sel and annotated[idx].any() and not has_masks:
            logger.warning(
                "%s: site %r split %r has masks for %d of %d records; its masks are not used",
                source,
                site,
                split,
                int(annotated[idx].sum()),
                len(sel),
            )
        return VLPDataset(
            site,
            images[idx],
            [r.report for r in sel],
            lab,
            masks[idx] if has_masks else None,
            [r.rid or f"{site}/{split}/row{r.row:06d}" for r in sel],
            np.array([r.has_image for r in sel], bool),
            np.array([r.has_text for r in sel], bool),
        )

    sites, heldout, public = [], None, None
    for name in names:
        if name == public_site:
            parts = [dataset(name, s) for s in SPLITS]
            public = VLPDataset(
                name,
                np.concatenate([p.images for p in parts]),
                sum((p.reports for p in parts), []),
                np.concatenate([p.labels for p in parts]),
                None,
                sum((p.record_ids for p in parts), []),
                None,
                np.concatenate([p.has_text for p in parts]),
            )
            continue
        role = "heldout" if name == heldout_site else "train"
        sd = SiteData(name, role, *(dataset(name, s) for s in SPLITS), site_modality.get(name, "paired"))
        if role == "heldout":
            heldout = sd
        else:
            if len(sd.train) == 0:
                logger.warning("site %r of %s has no training records", name, source)
            sites.append(sd)
    if not sites:
        raise DataError(
            f"{source} has no training site: its only sites ({', '.join(names)}) are the held-out or public site."
        )
    logger.info(
        "loaded %d records from %s: %s",
        len(records),
        source,
        ", ".join(
            f"{s.name}={len(s.train)}/{len(s.val)}/{len(s.test)}" for s in sites + ([heldout] if heldout else [])
        ),
    )
    return Federation(tuple(sites), heldout, public)
