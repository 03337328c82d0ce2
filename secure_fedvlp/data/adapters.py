"""Adapters for two public chest X-ray datasets in their published layouts: MIMIC-CXR-JPG and CheXpert.

Both read the CheXpert-labeler columns through :data:`~secure_fedvlp.data.labels.CHEXPERT_COLUMNS`
with the one label parser (:func:`~secure_fedvlp.data.labels.parse_labels`), partition patients
into simulated sites by a stable hash, and collect every row problem before raising one
:class:`~secure_fedvlp.errors.DataError` naming the file, row, column and value.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from secure_fedvlp.data.images import describe_missing_image, resolve_image
from secure_fedvlp.data.labels import CHEXPERT_COLUMNS, UncertainPolicy, parse_labels
from secure_fedvlp.data.records import Record, assemble
from secure_fedvlp.data.tables import Problems, cell, check_header, hash_split, iter_table, parse_split, unit_hash
from secure_fedvlp.data.types import FINDINGS, Federation
from secure_fedvlp.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["load_mimic_cxr_jpg", "load_chexpert", "extract_report_sections", "template_report"]

MIMIC_TABLES = ("mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-chexpert", "mimic-cxr-2.0.0-split")
_IDS = ("subject_id", "study_id", "dicom_id")


# ----------------------------------------------------------------------------- reports

_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z &/()\-]*[A-Z)])[ \t]*:", re.MULTILINE)


def extract_report_sections(text: str, sections: Sequence[str] = ("findings", "impression")) -> str:
    """The named sections of a free-text radiology report, in the order given, whitespace-collapsed.

    Headings are upper-case words followed by a colon at the start of a line (``FINDINGS:``,
    ``IMPRESSION:``), as in MIMIC-CXR.  Returns "" when none of the sections is present.
    """
    heads = [(m.group(1).strip().lower(), m.start(), m.end()) for m in _HEADING.finditer(text)]
    parts = []
    for want in sections:
        for j, (name, _start, end) in enumerate(heads):
            if name == want.lower():
                stop = heads[j + 1][1] if j + 1 < len(heads) else len(text)
                body = " ".join(text[end:stop].split())
                if body:
                    parts.append(body)
                break
    return " ".join(parts)


def template_report(labels: np.ndarray) -> str:
    """A templated report stating every positive finding and negating the others (for CheXpert)."""
    names = {
        "cardiomegaly": "cardiomegaly",
        "pleural_effusion": "pleural effusion",
        "consolidation": "consolidation",
        "pneumothorax": "pneumothorax",
        "nodule": "lung nodule or mass",
    }
    pos = [names[f] for k, f in enumerate(FINDINGS[1:], start=1) if labels[k]]
    neg = [names[f] for k, f in enumerate(FINDINGS[1:], start=1) if not labels[k]]
    if not pos:
        return "No acute cardiopulmonary abnormality. " + " ".join(f"No {n}." for n in neg)
    text = " ".join(f"{n[0].upper()}{n[1:]}." for n in pos)
    return text + ("" if not neg else " " + " ".join(f"No {n}." for n in neg))


# ----------------------------------------------------------------------------- helpers


def _dataset_dir(root: str | os.PathLike, what: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{what} directory {str(path)!r} does not exist (or is not a directory).")
    return path


def _find_table(root: Path, stem: str) -> Path:
    for suffix in (".csv", ".csv.gz"):
        p = root / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise DataError(f"{stem}.csv(.gz) not found in {root}.")


def _site_name(prefix: str, num_sites: int, patient: str, seed: int) -> str:
    if num_sites <= 1:
        return prefix
    return f"{prefix}{int(unit_hash(seed + 7919, patient) * num_sites) + 1}"


# ----------------------------------------------------------------------------- MIMIC-CXR-JPG


def load_mimic_cxr_jpg(
    root: str | os.PathLike,
    *,
    reports_root: str | os.PathLike | None = None,
    image_size: int = 64,
    views: Sequence[str] = ("PA", "AP"),
    uncertain: UncertainPolicy = "negative",
    sections: Sequence[str] = ("findings", "impression"),
    missing_report: Literal["error", "no_text", "skip"] = "no_text",
    num_sites: int = 1,
    site_prefix: str = "mimic",
    heldout_site: str | None = None,
    public_site: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    num_workers: int = 1,
    max_problems: int = 20,
) -> Federation:
    """Load MIMIC-CXR-JPG (frontal views) with its reports' FINDINGS and IMPRESSION sections.

    Layout: ``root/mimic-cxr-2.0.0-{chexpert,split,metadata}.csv[.gz]`` and
    ``root/files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``; reports (from MIMIC-CXR) at
    ``reports_root/files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` (``reports_root`` defaults to ``root``).

    Parameters
    ----------
    views : ``ViewPosition`` values kept (metadata table); frontal by default.
    uncertain : policy for ``-1`` CheXpert-labeler values (:mod:`secure_fedvlp.data.labels`).
    sections : report sections extracted, in order.
    missing_report : a report file that is absent or has none of ``sections``: ``"error"`` (row problem),
        ``"no_text"`` (kept with ``has_text=False``; default) or ``"skip"`` (dropped).
    num_sites, site_prefix : partition patients into ``num_sites`` simulated sites by a stable hash
        (``mimic1``..``mimicK``; a single site is named ``site_prefix``).
    heldout_site, public_site : one of those site names to hold out / to use as the public reference set.
    limit : keep only the first ``limit`` frontal images (smoke tests).

    Labels come from the CheXpert-labeler table; studies missing from it are skipped (logged).
    Splits come from the official split table (``validate`` -> ``val``; an image missing from it is
    assigned by a hash of its patient).  Problems name the table they were found in.
    """
    root = _dataset_dir(root, "MIMIC-CXR-JPG")
    rroot = _dataset_dir(reports_root, "MIMIC-CXR reports") if reports_root is not None else root
    problems = Problems(max_problems)
    meta_path, label_path, split_path = (_find_table(root, stem) for stem in MIMIC_TABLES)
    required = {
        meta_path: [*_IDS, "ViewPosition"],
        label_path: ["subject_id", "study_id", *CHEXPERT_COLUMNS],
        split_path: ["dicom_id", "split"],
    }
    tables = {}
    for path in required:
        header, rows = iter_table(path)
        check_header(path, header, required[path], problems)
        tables[path] = rows
    problems.raise_if_any(root, "Invalid MIMIC-CXR-JPG tables in")

    labels: dict[tuple[str, str], tuple[np.ndarray, list[str], int, int]] = {}
    for row, line, rec in tables[label_path]:
        lab, errs = parse_labels(rec, CHEXPERT_COLUMNS, uncertain=uncertain)
        labels[(cell(rec, "subject_id"), cell(rec, "study_id"))] = (lab, errs, row, line)
    splits: dict[str, tuple[str, int, int]] = {
        cell(rec, "dicom_id"): (cell(rec, "split"), row, line) for row, line, rec in tables[split_path]
    }
    keep_views = {v.upper() for v in views}
    records: list[Record] = []
    reported_label_rows: set[int] = set()
    unlabeled = no_report = 0
    for row, line, rec in tables[meta_path]:
        if limit is not None and len(records) >= limit:
            break
        if cell(rec, "ViewPosition").upper() not in keep_views:
            continue
        subj, study, dicom = (cell(rec, c) for c in _IDS)
        blank = [c for c, v in zip(_IDS, (subj, study, dicom), strict=True) if not v]
        if blank:
            many = len(blank) > 1
            problems.add(
                meta_path,
                row,
                line,
                f"column{'s' if many else ''} {', '.join(map(repr, blank))} {'are' if many else 'is'} blank",
            )
            continue
        if (subj, study) not in labels:
            unlabeled += 1
            continue
        lab, lab_errs, lrow, lline = labels[(subj, study)]
        if lab_errs and lrow not in reported_label_rows:
            reported_label_rows.add(lrow)
            for e in lab_errs:
                problems.add(label_path, lrow, lline, f"{e} (subject_id {subj}, study_id {study})")
        rel = Path("files") / f"p{subj[:2]}" / f"p{subj}" / f"s{study}"
        errs: list[str] = []
        image = root / rel / f"{dicom}.jpg"
        if not image.is_file():
            errs.append(f"image of dicom_id {dicom!r} not found (looked for {image})")
        report_file = rroot / rel.parent / f"s{study}.txt"
        report = (
            extract_report_sections(report_file.read_text(encoding="utf-8", errors="replace"), sections)
            if report_file.is_file()
            else ""
        )
        if not report:
            no_report += 1
            why = "not found" if not report_file.is_file() else f"has none of the sections {list(sections)}"
            if missing_report == "error":
                errs.append(f"report {report_file} {why}")
            elif missing_report == "skip":
                continue
        raw, srow, sline = splits.get(dicom, ("", 0, 0))
        split = parse_split(raw) if raw else hash_split(seed, subj, 0.1, 0.2)
        if split is None:
            problems.add(
                split_path,
                srow,
                sline,
                f"column 'split' has value {raw!r} for dicom_id {dicom!r}; expected train, validate or test",
            )
        for e in errs:
            problems.add(meta_path, row, line, e)
        if not errs and not lab_errs and split is not None:
            site = _site_name(site_prefix, num_sites, subj, seed)
            records.append(
                Record(
                    meta_path,
                    row,
                    line,
                    image,
                    report,
                    bool(report),
                    lab.copy(),
                    site,
                    split,
                    rid=f"{site}/{split}/{dicom}",
                )
            )
    if unlabeled:
        logger.warning("%d frontal images of %s have no CheXpert-labeler row; skipped.", unlabeled, root)
    if no_report:
        logger.warning(
            "%d frontal images of %s have no usable report under %s (missing_report=%r).",
            no_report,
            root,
            rroot,
            missing_report,
        )
    problems.raise_if_any(root, "Invalid MIMIC-CXR-JPG data in")
    return assemble(
        records,
        meta_path,
        image_size=image_size,
        heldout_site=heldout_site,
        public_site=public_site,
        num_workers=num_workers,
        problems=problems,
    )


# ----------------------------------------------------------------------------- CheXpert


def load_chexpert(
    root: str | os.PathLike,
    *,
    image_size: int = 64,
    frontal_only: bool = True,
    uncertain: UncertainPolicy = "negative",
    reports: Literal["template", "none"] = "template",
    val_fraction: float = 0.1,
    num_sites: int = 1,
    site_prefix: str = "chexpert",
    heldout_site: str | None = None,
    public_site: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    num_workers: int = 1,
    max_problems: int = 20,
) -> Federation:
    """Load CheXpert (``root/train.csv``, ``root/valid.csv``; images under the paths in ``Path``).

    CheXpert ships **no reports**.  With ``reports="template"`` (default) each record gets a
    *synthesized* templated report from its labels (:func:`template_report`): it carries no
    information beyond the labels, so text-side results on CheXpert are not evidence of report
    understanding.  With ``reports="none"`` records have ``report=""`` and ``has_text=False``.

    Parameters
    ----------
    frontal_only : keep ``Frontal/Lateral == "Frontal"`` rows.
    uncertain : policy for ``-1`` labels (CheXpert's "uncertain").
    val_fraction : patients of ``train.csv`` moved to the val split (stable hash); ``valid.csv`` is the test split.
    num_sites, site_prefix, heldout_site, public_site : patient-hash partition into simulated sites, as in
        :func:`load_mimic_cxr_jpg`.
    limit : keep only the first ``limit`` rows of each table (smoke tests).

    ``Path`` values (``CheXpert-v1.0-small/train/patientXXXXX/...``) are resolved against
    ``root.parent``, then ``root``, then ``root`` without the first path component.
    """
    root = _dataset_dir(root, "CheXpert")
    problems = Problems(max_problems)
    records: list[Record] = []
    for table, split_mode in (("train.csv", "hash"), ("valid.csv", "test")):
        path = root / table
        if not path.is_file():
            if table == "valid.csv":
                logger.warning("%s not found; CheXpert test split is empty.", path)
                continue
            raise DataError(f"CheXpert table {path} does not exist.")
        header, rows = iter_table(path)
        check_header(
            path, header, ["Path", *CHEXPERT_COLUMNS] + (["Frontal/Lateral"] if frontal_only else []), problems
        )
        if problems.items:
            continue
        kept = 0
        for row, line, rec in rows:
            if limit is not None and kept >= limit:
                break
            if frontal_only and cell(rec, "Frontal/Lateral").lower() != "frontal":
                continue
            kept += 1
            value = cell(rec, "Path")
            errs: list[str] = []
            image = None
            if not value:
                errs.append("column 'Path' is blank")
            else:
                rel = Path(value)
                image, tried = resolve_image(rel, [root.parent, root])
                if image is None and len(rel.parts) > 1:
                    image, more = resolve_image(Path(*rel.parts[1:]), [root])
                    tried += [p for p in more if p not in tried]
                if image is None:
                    errs.append(describe_missing_image("Path", value, tried))
            lab, lab_errs = parse_labels(rec, CHEXPERT_COLUMNS, uncertain=uncertain)
            errs += lab_errs
            for e in errs:
                problems.add(path, row, line, e)
            if errs or image is None:
                continue
            patient = next((p for p in rel.parts if p.startswith("patient")), str(rel))
            split = "test" if split_mode == "test" else ("val" if unit_hash(seed, patient) < val_fraction else "train")
            report = template_report(lab) if reports == "template" else ""
            site = _site_name(site_prefix, num_sites, patient, seed)
            records.append(
                Record(
                    path,
                    row,
                    line,
                    image,
                    report,
                    bool(report),
                    lab,
                    site,
                    split,
                    rid=f"{site}/{split}/{'/'.join(rel.parts[-3:])}",
                )
            )
    problems.raise_if_any(root, "Invalid CheXpert data in")
    return assemble(
        records,
        root / "train.csv",
        image_size=image_size,
        heldout_site=heldout_site,
        public_site=public_site,
        num_workers=num_workers,
        problems=problems,
    )
