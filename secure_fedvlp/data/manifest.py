"""The generic manifest: one CSV/TSV/JSONL row per image, with its report, labels, site and split.

The table is parsed into records first, collecting *all* row problems (up to ``max_problems``)
before raising one :class:`~secure_fedvlp.errors.DataError`; each names the file, the 1-based
data row and the file line, and the offending column and value.  Images are decoded only once
the table is clean.

Labels follow :mod:`secure_fedvlp.data.labels`; images :mod:`secure_fedvlp.data.images`.
A ``split`` value is ``train``, ``val``/``valid``/``validate``/``validation`` or ``test``; where
the column is absent or blank, a deterministic hash of the image path assigns it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from secure_fedvlp.data.images import describe_missing_image, is_rle, outside_image_roots, resolve_image
from secure_fedvlp.data.labels import UncertainPolicy, parse_labels, resolve_label_columns
from secure_fedvlp.data.records import Record, assemble
from secure_fedvlp.data.spec import MODALITIES
from secure_fedvlp.data.tables import Problems, cell, check_header, hash_split, iter_table, parse_split
from secure_fedvlp.data.types import Federation

__all__ = ["load_manifest", "load_manifest_federation"]


def load_manifest(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    image_size: int = 64,
    label_columns: Mapping[str, str] | Sequence[str] | None = None,
    site_column: str = "site",
    split_column: str = "split",
    image_column: str = "image",
    report_column: str = "report",
    labels_column: str = "labels",
    modality_column: str = "modality",
    mask_column: str = "mask",
    heldout_site: str | None = None,
    public_site: str | None = None,
    default_site: str | None = None,
    uncertain: UncertainPolicy = "negative",
    allow_missing_text: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    num_workers: int = 1,
    max_problems: int = 20,
) -> Federation:
    """Load a CSV/TSV/JSONL manifest of image path, report, labels, site and optional split.

    Parameters
    ----------
    path : the manifest (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, optionally ``.gz``).
    image_root : directory relative image paths are resolved against (default: the manifest's directory).
    image_size : side length images are resized to.
    label_columns : ``{column: finding}`` or a list of columns named after findings (via
        :data:`~secure_fedvlp.data.labels.LABEL_ALIASES`).  Default: a ``labels_column`` of
        ``|``-separated finding names if the manifest has one, else every column whose name maps to a finding.
    site_column, split_column, image_column, report_column, labels_column : column names.
    modality_column : optional column declaring what each row's site holds: ``paired`` (blank or
        absent), ``image`` (images with labels; the report may be blank and is never read) or ``text``
        (reports with labels; the image may be blank and is never read).  Every row of a site must
        declare the same modality.
    mask_column : optional column of lesion masks: a PNG path (resolved like images) or a SIIM-ACR
        run-length encoding (``-1`` = empty); a split's masks are used when every record of it has one.
    heldout_site : a site that never trains (``Federation.heldout``).
    public_site : a site whose records (all splits) become ``Federation.public``.
    default_site : site of every record when the manifest has no site column.
    uncertain : policy for ``-1`` labels: ``"negative"`` (default), ``"positive"`` or ``"error"``.
    allow_missing_text : if True an empty report marks the record ``has_text=False``; else it is an error.
    val_fraction, test_fraction, seed : hash-based split of records whose split is absent or blank.
    num_workers : image-decoding threads.
    max_problems : how many problems to collect before raising.

    Returns
    -------
    Federation
        Training sites sorted by name, the held-out site if named, the public set if named.

    Raises
    ------
    DataError
        Listing every problem found (file name, 1-based row, line, column/value), up to ``max_problems``.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    problems = Problems(max_problems)
    header, rows = iter_table(path)
    required = [image_column] + ([report_column] if not allow_missing_text else [])
    check_header(path, header, required + ([site_column] if default_site is None else []), problems)
    mapping = resolve_label_columns(header, label_columns, labels_column, path, problems)
    problems.raise_if_any(path, "Invalid manifest")

    records: list[Record] = []
    for row, line, rec in rows:
        if "__error__" in rec:
            problems.add(path, row, line, rec["__error__"])
            continue
        errs: list[str] = []
        modality = cell(rec, modality_column).lower() or "paired"
        if modality not in MODALITIES:
            errs.append(f"column {modality_column!r} has value {modality!r}; expected one of {', '.join(MODALITIES)}")
        if header is None:  # JSONL: keys may differ per row
            for col in required + ([site_column] if default_site is None else []):
                if col not in rec and not (col == image_column and modality == "text"):
                    errs.append(f"required column {col!r} is missing")
        img = cell(rec, image_column) if modality != "text" else ""  # a text-only site's image is never read
        image_path = None
        if image_column in rec and not img and modality != "text":
            errs.append(f"column {image_column!r} is blank")
        elif img and outside_image_roots(img, [root]):
            errs.append(f"column {image_column!r}: image path {img!r} is outside the image root {root}")
        elif img:
            image_path, tried = resolve_image(img, [root])
            if image_path is None:
                errs.append(describe_missing_image(image_column, img, tried))
        report = cell(rec, report_column) if modality != "image" else ""  # an image-only site's report is never read
        if not report and report_column in rec and not allow_missing_text and modality == "paired":
            errs.append(f"column {report_column!r} is empty (set allow_missing_text=True to keep it as has_text=False)")
        site = cell(rec, site_column) or (default_site or "")
        if not site and site_column in rec:
            errs.append(f"column {site_column!r} is blank")
        raw_split = cell(rec, split_column)
        split = (
            parse_split(raw_split)
            if raw_split
            else hash_split(seed, img or report or f"row{row}", val_fraction, test_fraction)
        )
        if split is None:
            errs.append(f"column {split_column!r} has value {raw_split!r}; expected train, val/validate or test")
        lab, lab_errs = parse_labels(rec, mapping, uncertain=uncertain, labels_column=labels_column)
        errs += lab_errs
        mask = cell(rec, mask_column) if modality != "text" else ""  # a text-only site has no image to mask
        if mask and not is_rle(mask) and outside_image_roots(mask, [root]):
            errs.append(f"column {mask_column!r}: mask path {mask!r} is outside the image root {root}")
        elif mask and not is_rle(mask):
            mask_path, tried = resolve_image(mask, [root])
            if mask_path is None:
                errs.append(describe_missing_image(mask_column, mask, tried))
            mask = str(mask_path or "")
        for e in errs:
            problems.add(path, row, line, e)
        if not errs and (image_path is not None or modality == "text"):
            records.append(
                Record(
                    path, row, line, image_path, report, bool(report), lab, site, split, modality=modality, mask=mask
                )
            )
    problems.raise_if_any(path, "Invalid manifest")
    return assemble(
        records,
        path,
        image_size=image_size,
        heldout_site=heldout_site,
        public_site=public_site,
        num_workers=num_workers,
        problems=problems,
    )


#: Another name of :func:`load_manifest`, kept for callers that use it.
load_manifest_federation = load_manifest
