"""Real data: manifest loaders (generic CSV/JSONL, MIMIC-CXR-JPG, CheXpert) into a :class:`Federation`.

Every loader parses its tables into records first, collecting *all* row problems (up to
``max_problems``) before raising one :class:`~secure_fedvlp.errors.DataError`, so a user
fixes a manifest in one pass.  Each problem names the table file, the 1-based data row
and the file line it sits on, and the offending column or value.  Images are decoded only
once the tables are clean (decoding is the slow part); unreadable images are then
collected the same way.

Conventions (documented choices)
--------------------------------
* **Labels.**  Either one column per finding (column names matched to :data:`FINDINGS`
  through :data:`LABEL_ALIASES`, e.g. ``Pleural Effusion`` -> ``pleural_effusion``,
  ``Lung Lesion`` -> ``nodule``), values ``1`` / ``0`` / blank (= not mentioned =
  negative) / ``-1`` (uncertain); or one ``labels`` column of ``|``-separated finding
  names.  ``no_finding`` is cleared whenever a lesion finding is positive (positives win);
  when the manifest gives no ``no_finding`` value it is derived as "no lesion finding".
* **Uncertain labels** (``-1``) follow ``uncertain``: ``"negative"`` (U-Zeros, default),
  ``"positive"`` (U-Ones) or ``"error"`` (reported as a row problem).
* **Images.**  PNG/JPEG through Pillow (8-bit divided by 255; 16/32-bit and float images
  min-max scaled per image, because 12-bit data in 16-bit containers is common).  DICOM
  through pydicom: rescale slope/intercept, the first VOI window (centre/width) if present
  else the image's min-max range, clip to [0, 1], and MONOCHROME1 inverted so that bone is
  bright.  Non-square images are zero-padded to a centred square (nothing is cropped) and
  resized (antialiased bilinear) to ``image_size``.
* **Splits.**  A ``split`` value of ``train``, ``val``/``valid``/``validate``/``validation``
  or ``test``; where the column is absent or blank, a deterministic hash of the record's
  group key (image path, or the patient for the adapters) assigns it, so every image of a
  patient lands in the same split.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from secure_fedvlp.data.types import FINDINGS, Federation, SiteData, VLPDataset
from secure_fedvlp.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["LABEL_ALIASES", "load_manifest", "load_manifest_federation", "load_mimic_cxr_jpg", "load_chexpert",
           "load_image", "extract_report_sections", "template_report"]

UncertainPolicy = Literal["negative", "positive", "error"]
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                  "validation": "val", "test": "test", "testing": "test"}

#: Dataset label names (normalised: lower case, ``_``/``-`` as spaces) -> FINDINGS.  Explicit on purpose:
#: CheXpert/MIMIC "Lung Lesion" covers nodules and masses and is mapped to ``nodule``.
LABEL_ALIASES: dict[str, str] = {
    "no finding": "no_finding", "normal": "no_finding",
    "cardiomegaly": "cardiomegaly",
    "pleural effusion": "pleural_effusion", "effusion": "pleural_effusion",
    "consolidation": "consolidation",
    "pneumothorax": "pneumothorax",
    "nodule": "nodule", "lung lesion": "nodule",
}
#: The CheXpert-labeler columns used by MIMIC-CXR-JPG and CheXpert, mapped explicitly.
CHEXPERT_COLUMNS: dict[str, str] = {"No Finding": "no_finding", "Cardiomegaly": "cardiomegaly",
                                    "Pleural Effusion": "pleural_effusion", "Consolidation": "consolidation",
                                    "Pneumothorax": "pneumothorax", "Lung Lesion": "nodule"}


def _norm(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())


# ----------------------------------------------------------------------------- problems


class _Problems:
    """Collects row problems (capped) and raises them together as one DataError."""

    def __init__(self, cap: int) -> None:
        self.cap = max(1, int(cap))
        self.items: list[str] = []
        self.dropped = 0

    def add(self, source: Path | str, row: int | None, line: int | None, message: str) -> None:
        if len(self.items) >= self.cap:
            self.dropped += 1
            return
        where = Path(source).name if source else "manifest"
        if row is None:
            loc = f"{where}, line {line} (header)" if line else where
        else:
            loc = f"{where}, row {row}" + (f" (line {line})" if line is not None else "")
        self.items.append(f"{loc}: {message}")

    @property
    def full(self) -> bool:
        return len(self.items) >= self.cap

    def raise_if_any(self, source: Path | str, stage: str) -> None:
        if not self.items:
            return
        more = f"\n  ... and {self.dropped} more (cap {self.cap})" if self.dropped else ""
        lines = "\n".join(f"  - {p}" for p in self.items)
        n = len(self.items) + self.dropped
        err = DataError(f"{stage} {source}: {n} problem{'s' if n != 1 else ''}; fix them all in one pass:\n"
                        f"{lines}{more}")
        err.problems = list(self.items)  # type: ignore[attr-defined]
        raise err


# ----------------------------------------------------------------------------- tables


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115 - closed by the caller's with


def _iter_table(path: Path) -> tuple[list[str] | None, Iterator[tuple[int, int, dict[str, Any]]]]:
    """``(header or None for JSONL, iterator of (row, line, record))`` for a CSV/TSV/JSONL file (optionally .gz)."""
    if not path.is_file():
        raise DataError(f"Manifest file {path} does not exist.")
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".ndjson"):
        def gen_json() -> Iterator[tuple[int, int, dict[str, Any]]]:
            row = 0
            with _open_text(path) as fh:
                for line_no, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    row += 1
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        rec = {"__error__": f"invalid JSON ({exc.msg} at column {exc.colno})"}
                    if not isinstance(rec, dict):
                        rec = {"__error__": f"expected a JSON object, found {type(rec).__name__}"}
                    yield row, line_no, rec
        return None, gen_json()
    if kind in (".csv", ".tsv"):
        with _open_text(path) as fh:
            header = next(csv.reader(fh, delimiter="\t" if kind == ".tsv" else ","), None)
        if not header:
            raise DataError(f"Manifest file {path} is empty (no header line).")

        def gen_csv() -> Iterator[tuple[int, int, dict[str, Any]]]:
            with _open_text(path) as fh:
                reader = csv.DictReader(fh, delimiter="\t" if kind == ".tsv" else ",")
                row = 0
                for rec in reader:
                    row += 1
                    yield row, reader.line_num, rec
        return [h.strip() for h in header], gen_csv()
    raise DataError(f"Manifest file {path}: unsupported format {kind or '(no suffix)'!r}; "
                    "use .csv, .tsv, .jsonl or .ndjson (optionally .gz).")


def _cell(rec: Mapping[str, Any], col: str) -> str:
    v = rec.get(col)
    if v is None:
        return ""
    if isinstance(v, float) and np.isnan(v):
        return ""
    return str(v).strip()


def _label_value(v: Any, uncertain: UncertainPolicy) -> float | str:
    """1/0 for a label cell, or an error message."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return 0.0
    if isinstance(v, bool):
        return float(v)
    s = str(v).strip().lower()
    if s in ("", "nan", "none", "null"):
        return 0.0
    try:
        x = float(s)
    except ValueError:
        x = {"true": 1.0, "yes": 1.0, "false": 0.0, "no": 0.0}.get(s, float("nan"))
    if x in (0.0, 1.0):
        return x
    if x == -1.0:
        if uncertain == "error":
            return "uncertain value -1 (uncertain='error')"
        return 1.0 if uncertain == "positive" else 0.0
    return f"value {v!r} is not one of 1, 0, -1 or blank"


def _unit_hash(seed: int, key: str) -> float:
    h = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _hash_split(seed: int, key: str, val_fraction: float, test_fraction: float) -> str:
    u = _unit_hash(seed, key)
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


# ----------------------------------------------------------------------------- records


@dataclass
class _Record:
    source: Path
    row: int
    line: int
    image: Path
    report: str
    has_text: bool
    labels: np.ndarray
    site: str
    split: str
    rid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _finalise_labels(lab: np.ndarray, no_finding_given: bool) -> np.ndarray:
    if lab[1:].any() or not no_finding_given:
        lab[0] = float(not lab[1:].any())
    return lab


# ----------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Read one PNG/JPEG/DICOM file as float32 ``[image_size, image_size]`` in [0, 1].

    Parameters
    ----------
    path : path of the image; DICOM is recognised by suffix (.dcm/.dicom) or the ``DICM`` preamble.
    image_size : output side length.

    Raises
    ------
    Exception
        Whatever the decoder raises on an unreadable file (callers wrap it in DataError).
    """
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom") or _is_dicom(path):
        arr = _read_dicom(path)
    else:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("L", (2 * image_size, 2 * image_size))  # decode at reduced scale: much faster
            if im.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            else:  # I;16*, I, F: high bit depth -> min-max
                arr = _minmax(np.asarray(im, dtype=np.float64))
    return _square_resize(arr.astype(np.float32), image_size)


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def _first(v: Any) -> float | None:
    if v is None:
        return None
    try:
        if not isinstance(v, (str, bytes)) and hasattr(v, "__len__"):  # pydicom MultiValue: first value
            v = v[0]
        return float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    arr = np.asarray(ds.pixel_array, dtype=np.float64)
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
        arr = arr.mean(axis=-1)
    if arr.ndim == 3:  # multi-frame: first frame
        arr = arr[0]
    slope = _first(getattr(ds, "RescaleSlope", None))
    intercept = _first(getattr(ds, "RescaleIntercept", None))
    arr = arr * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    centre, width = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
    if centre is not None and width is not None and width > 0:
        out = np.clip((arr - (centre - width / 2.0)) / width, 0.0, 1.0)
    else:
        out = _minmax(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out


def _square_resize(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h != w:
        side = max(h, w)
        pad = np.zeros((side, side), np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        pad[top:top + h, left:left + w] = arr
        arr = pad
    if arr.shape[0] != size:
        arr = np.asarray(Image.fromarray(arr.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- assembly


def _assemble(records: list[_Record], source: Path, *, image_size: int, heldout_site: str | None,
              public_site: str | None, num_workers: int, problems: _Problems) -> Federation:
    """Decode images (collecting unreadable ones) and group records into a Federation."""
    names = sorted({r.site for r in records})
    for role, name in (("heldout_site", heldout_site), ("public_site", public_site)):
        if name is not None and name not in names:
            raise DataError(f"{role}={name!r} is not a site of {source}; sites found: {', '.join(names) or 'none'}.")
    if not records:
        raise DataError(f"Manifest {source} yields no records (after filtering).")

    def decode(rec: _Record) -> np.ndarray | str:
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
    for i, (rec, res) in enumerate(zip(records, results)):
        if isinstance(res, str):
            problems.add(rec.source, rec.row, rec.line, res)
        else:
            images[i] = res
    problems.raise_if_any(source, "Cannot load images listed in")

    def dataset(site: str, split: str) -> VLPDataset:
        idx = [i for i, r in enumerate(records) if r.site == site and r.split == split]
        sel = [records[i] for i in idx]
        lab = np.stack([r.labels for r in sel]) if sel else np.zeros((0, len(FINDINGS)), np.float32)
        return VLPDataset(site, images[idx], [r.report for r in sel], lab, None,
                          [r.rid or f"{site}/{split}/row{r.row:06d}" for r in sel], np.ones(len(sel), bool),
                          np.array([r.has_text for r in sel], bool))

    sites, heldout, public = [], None, None
    for name in names:
        if name == public_site:
            parts = [dataset(name, s) for s in SPLITS]
            public = VLPDataset(name, np.concatenate([p.images for p in parts]), sum((p.reports for p in parts), []),
                                np.concatenate([p.labels for p in parts]), None,
                                sum((p.record_ids for p in parts), []), None,
                                np.concatenate([p.has_text for p in parts]))
            continue
        role = "heldout" if name == heldout_site else "train"
        sd = SiteData(name, role, *(dataset(name, s) for s in SPLITS))
        if role == "heldout":
            heldout = sd
        else:
            if len(sd.train) == 0:
                logger.warning("site %r of %s has no training records", name, source)
            sites.append(sd)
    logger.info("loaded %d records from %s: %s", len(records), source,
                ", ".join(f"{s.name}={len(s.train)}/{len(s.val)}/{len(s.test)}"
                          for s in sites + ([heldout] if heldout else [])))
    return Federation(tuple(sites), heldout, public)


# ----------------------------------------------------------------------------- generic manifest


def _resolve_label_columns(header: Sequence[str] | None, label_columns: Mapping[str, str] | Sequence[str] | None,
                           labels_column: str, source: Path, problems: _Problems) -> dict[str, str] | None:
    """Column -> finding, or None for the single ``|``-separated labels column."""
    if label_columns is None:
        if header is None:
            return None  # JSONL: decided per row (labels key, or finding keys)
        if labels_column in header:
            return None
        found = {c: LABEL_ALIASES[_norm(c)] for c in header if _norm(c) in LABEL_ALIASES}
        if not found:
            problems.add(source, None, 1, f"no label columns: expected a {labels_column!r} column or columns named "
                         f"after findings ({', '.join(FINDINGS)}); header is {list(header)}")
        return found
    items = (label_columns.items() if isinstance(label_columns, Mapping)
             else [(c, LABEL_ALIASES.get(_norm(c), c)) for c in label_columns])
    out: dict[str, str] = {}
    for col, finding in items:
        if finding not in FINDINGS:
            problems.add(source, None, 1 if header is not None else None,
                         f"unknown label column {col!r} (maps to {finding!r}; known findings: {', '.join(FINDINGS)})")
        elif header is not None and col not in header:
            problems.add(source, None, 1, f"label column {col!r} is not in the header {list(header)}")
        else:
            out[col] = finding
    return out


def _parse_labels(rec: Mapping[str, Any], mapping: dict[str, str] | None, labels_column: str,
                  uncertain: UncertainPolicy) -> tuple[np.ndarray, list[str]]:
    lab = np.zeros(len(FINDINGS), np.float32)
    errs: list[str] = []
    if mapping is None and labels_column not in rec:
        mapping = {c: LABEL_ALIASES[_norm(c)] for c in rec if isinstance(c, str) and _norm(c) in LABEL_ALIASES}
        if not mapping:
            return lab, [f"no {labels_column!r} column and no finding columns"]
    if mapping is None:
        names = [n.strip() for n in _cell(rec, labels_column).split("|") if n.strip()]
        for n in names:
            f = n if n in FINDINGS else LABEL_ALIASES.get(_norm(n))
            if f is None:
                errs.append(f"unknown finding {n!r} in column {labels_column!r} (known: {', '.join(FINDINGS)})")
            else:
                lab[FINDINGS.index(f)] = 1.0
        if lab[0] and lab[1:].any():
            errs.append(f"column {labels_column!r} lists no_finding together with findings: {_cell(rec, labels_column)!r}")
        return _finalise_labels(lab, no_finding_given=bool(lab[0])), errs
    given_nf = False
    for col, finding in mapping.items():
        if col not in rec:
            errs.append(f"missing label column {col!r}")
            continue
        v = _label_value(rec[col], uncertain)
        if isinstance(v, str):
            errs.append(f"label column {col!r}: {v}")
        else:
            k = FINDINGS.index(finding)
            lab[k] = max(lab[k], v)
            given_nf |= finding == "no_finding" and _cell(rec, col) != ""
    return _finalise_labels(lab, given_nf), errs


def load_manifest(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, image_size: int = 64,
                  label_columns: Mapping[str, str] | Sequence[str] | None = None, site_column: str = "site",
                  split_column: str = "split", image_column: str = "image", report_column: str = "report",
                  labels_column: str = "labels", heldout_site: str | None = None, public_site: str | None = None,
                  default_site: str | None = None, uncertain: UncertainPolicy = "negative",
                  allow_missing_text: bool = False, val_fraction: float = 0.1, test_fraction: float = 0.2,
                  seed: int = 0, num_workers: int = 1, max_problems: int = 20) -> Federation:
    """Load a CSV/TSV/JSONL manifest of image path, report, labels, site and optional split.

    Parameters
    ----------
    path : the manifest (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, optionally ``.gz``).
    image_root : directory relative image paths are resolved against (default: the manifest's directory).
    image_size : side length images are resized to.
    label_columns : ``{column: finding}`` or a list of columns named after findings (via
        :data:`LABEL_ALIASES`).  Default: a ``labels_column`` of ``|``-separated finding names if the
        manifest has one, else every column whose name maps to a finding.
    site_column, split_column, image_column, report_column, labels_column : column names.
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
    problems = _Problems(max_problems)
    header, rows = _iter_table(path)
    if header is not None:
        required = [image_column] + ([report_column] if not allow_missing_text else [])
        if default_site is None:
            required.append(site_column)
        for col in required:
            if col not in header:
                problems.add(path, None, 1, f"required column {col!r} is missing; header is {header}")
    mapping = _resolve_label_columns(header, label_columns, labels_column, path, problems)
    problems.raise_if_any(path, "Invalid manifest")

    records: list[_Record] = []
    for row, line, rec in rows:
        errs: list[str] = [rec["__error__"]] if "__error__" in rec else []
        if errs:
            for e in errs:
                problems.add(path, row, line, e)
            continue
        for col in (image_column, site_column, report_column):
            if header is None and col not in rec and not (col == site_column and default_site is not None) \
                    and not (col == report_column and allow_missing_text):
                errs.append(f"required column {col!r} is missing")
        img = _cell(rec, image_column)
        image_path = root / img if img else None
        if image_column in rec and not img:
            errs.append(f"column {image_column!r} is blank")
        elif image_path is not None and not image_path.is_file():
            errs.append(f"image file {img!r} not found (looked for {image_path})")
        report = _cell(rec, report_column)
        if not report and report_column in rec and not allow_missing_text:
            errs.append(f"column {report_column!r} is empty (set allow_missing_text=True to keep it as has_text=False)")
        site = _cell(rec, site_column) or (default_site or "")
        if not site and site_column in rec:
            errs.append(f"column {site_column!r} is blank")
        raw_split = _cell(rec, split_column).lower()
        split = _SPLIT_ALIASES.get(raw_split) if raw_split else _hash_split(seed, img, val_fraction, test_fraction)
        if split is None:
            errs.append(f"column {split_column!r} has value {raw_split!r}; expected train, val/validate or test")
        lab, lab_errs = _parse_labels(rec, mapping, labels_column, uncertain)
        errs += lab_errs
        for e in errs:
            problems.add(path, row, line, e)
        if not errs:
            records.append(_Record(path, row, line, image_path, report, bool(report), lab, site, split))
    problems.raise_if_any(path, "Invalid manifest")
    return _assemble(records, path, image_size=image_size, heldout_site=heldout_site, public_site=public_site,
                     num_workers=num_workers, problems=problems)


#: The name :mod:`secure_fedvlp.flower.runtime` calls; the same function as :func:`load_manifest`.
load_manifest_federation = load_manifest


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
    names = {"cardiomegaly": "cardiomegaly", "pleural_effusion": "pleural effusion",
             "consolidation": "consolidation", "pneumothorax": "pneumothorax", "nodule": "lung nodule or mass"}
    pos = [names[f] for k, f in enumerate(FINDINGS[1:], start=1) if labels[k]]
    neg = [names[f] for k, f in enumerate(FINDINGS[1:], start=1) if not labels[k]]
    if not pos:
        return "No acute cardiopulmonary abnormality. " + " ".join(f"No {n}." for n in neg)
    text = " ".join(f"{n[0].upper()}{n[1:]}." for n in pos)
    return text + ("" if not neg else " " + " ".join(f"No {n}." for n in neg))


# ----------------------------------------------------------------------------- adapters


def _find_table(root: Path, stem: str) -> Path:
    for suffix in (".csv", ".csv.gz"):
        p = root / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise DataError(f"{stem}.csv(.gz) not found in {root}.")


def _chexpert_labels(rec: Mapping[str, Any], uncertain: UncertainPolicy) -> tuple[np.ndarray, list[str]]:
    lab = np.zeros(len(FINDINGS), np.float32)
    errs: list[str] = []
    given_nf = False
    for col, finding in CHEXPERT_COLUMNS.items():
        if col not in rec:
            errs.append(f"missing label column {col!r}")
            continue
        v = _label_value(rec[col], uncertain)
        if isinstance(v, str):
            errs.append(f"label column {col!r}: {v}")
        else:
            lab[FINDINGS.index(finding)] = v
            given_nf |= finding == "no_finding" and _cell(rec, col) != ""
    return _finalise_labels(lab, given_nf), errs


def _site_name(prefix: str, num_sites: int, patient: str, seed: int) -> str:
    if num_sites <= 1:
        return prefix
    return f"{prefix}{int(_unit_hash(seed + 7919, patient) * num_sites) + 1}"


def load_mimic_cxr_jpg(root: str | os.PathLike, *, reports_root: str | os.PathLike | None = None,
                       image_size: int = 64, views: Sequence[str] = ("PA", "AP"),
                       uncertain: UncertainPolicy = "negative", sections: Sequence[str] = ("findings", "impression"),
                       missing_report: Literal["error", "no_text", "skip"] = "no_text", num_sites: int = 1,
                       site_prefix: str = "mimic", heldout_site: str | None = None, limit: int | None = None,
                       seed: int = 0, num_workers: int = 1, max_problems: int = 20) -> Federation:
    """Load MIMIC-CXR-JPG (frontal views) with its reports' FINDINGS and IMPRESSION sections.

    Layout: ``root/mimic-cxr-2.0.0-{chexpert,split,metadata}.csv[.gz]`` and
    ``root/files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``; reports (from MIMIC-CXR) at
    ``reports_root/files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` (``reports_root`` defaults to ``root``).

    Parameters
    ----------
    views : ``ViewPosition`` values kept (metadata table); frontal by default.
    uncertain : policy for ``-1`` CheXpert-labeler values (see module docstring).
    sections : report sections extracted, in order.
    missing_report : a report file that is absent or has none of ``sections``: ``"error"`` (row problem),
        ``"no_text"`` (kept with ``has_text=False``; default) or ``"skip"`` (dropped).
    num_sites, site_prefix : partition patients into ``num_sites`` simulated sites by a stable hash
        (``mimic1``..``mimicK``; a single site is named ``site_prefix``).
    heldout_site : one of those site names to hold out.
    limit : keep only the first ``limit`` frontal images (smoke tests).

    Labels come from the CheXpert-labeler table via :data:`CHEXPERT_COLUMNS` (``Lung Lesion`` ->
    ``nodule``); studies missing from it are skipped (logged).  Splits come from the official split
    table (``validate`` -> ``val``).  Row numbers in errors refer to the metadata table.
    """
    root = Path(root)
    rroot = Path(reports_root) if reports_root is not None else root
    problems = _Problems(max_problems)
    meta_path = _find_table(root, "mimic-cxr-2.0.0-metadata")
    label_path = _find_table(root, "mimic-cxr-2.0.0-chexpert")
    split_path = _find_table(root, "mimic-cxr-2.0.0-split")
    labels: dict[tuple[str, str], tuple[np.ndarray, list[str], int, int]] = {}
    for row, line, rec in _iter_table(label_path)[1]:
        lab, errs = _chexpert_labels(rec, uncertain)
        labels[(_cell(rec, "subject_id"), _cell(rec, "study_id"))] = (lab, errs, row, line)
    splits = {_cell(rec, "dicom_id"): _cell(rec, "split").lower() for _r, _l, rec in _iter_table(split_path)[1]}
    keep_views = {v.upper() for v in views}
    records: list[_Record] = []
    unlabeled = 0
    for row, line, rec in _iter_table(meta_path)[1]:
        if limit is not None and len(records) >= limit:
            break
        if _cell(rec, "ViewPosition").upper() not in keep_views:
            continue
        subj, study, dicom = _cell(rec, "subject_id"), _cell(rec, "study_id"), _cell(rec, "dicom_id")
        if not (subj and study and dicom):
            problems.add(meta_path, row, line, "subject_id, study_id or dicom_id is blank")
            continue
        if (subj, study) not in labels:
            unlabeled += 1
            continue
        lab, lab_errs, lrow, lline = labels[(subj, study)]
        for e in lab_errs:
            problems.add(label_path, lrow, lline, e)
        rel = Path("files") / f"p{subj[:2]}" / f"p{subj}" / f"s{study}"
        image = root / rel / f"{dicom}.jpg"
        errs = [] if image.is_file() else [f"image file not found: {image}"]
        report_file = rroot / rel.parent / f"s{study}.txt"
        report = extract_report_sections(report_file.read_text(encoding="utf-8", errors="replace"), sections) \
            if report_file.is_file() else ""
        if not report:
            why = "not found" if not report_file.is_file() else f"has none of the sections {list(sections)}"
            if missing_report == "error":
                errs.append(f"report {report_file} {why}")
            elif missing_report == "skip":
                continue
        raw = splits.get(dicom, "")
        split = _SPLIT_ALIASES.get(raw) or _hash_split(seed, subj, 0.1, 0.2)
        for e in errs:
            problems.add(meta_path, row, line, e)
        if not errs and not lab_errs:
            site = _site_name(site_prefix, num_sites, subj, seed)
            records.append(_Record(meta_path, row, line, image, report, bool(report), lab.copy(), site, split,
                                   rid=f"{site}/{split}/{dicom}"))
    if unlabeled:
        logger.warning("%d frontal images of %s have no CheXpert-labeler row; skipped.", unlabeled, root)
    problems.raise_if_any(root, "Invalid MIMIC-CXR-JPG data in")
    return _assemble(records, meta_path, image_size=image_size, heldout_site=heldout_site, public_site=None,
                     num_workers=num_workers, problems=problems)


def load_chexpert(root: str | os.PathLike, *, image_size: int = 64, frontal_only: bool = True,
                  uncertain: UncertainPolicy = "negative", reports: Literal["template", "none"] = "template",
                  val_fraction: float = 0.1, num_sites: int = 1, site_prefix: str = "chexpert",
                  heldout_site: str | None = None, limit: int | None = None, seed: int = 0, num_workers: int = 1,
                  max_problems: int = 20) -> Federation:
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
    num_sites, site_prefix, heldout_site : patient-hash partition into simulated sites, as in
        :func:`load_mimic_cxr_jpg`.
    limit : keep only the first ``limit`` rows of each table (smoke tests).

    ``Path`` values (``CheXpert-v1.0-small/train/patientXXXXX/...``) are resolved against
    ``root.parent``, then ``root``, then ``root`` without the first path component.
    """
    root = Path(root)
    problems = _Problems(max_problems)
    records: list[_Record] = []
    for table, split_mode in (("train.csv", "hash"), ("valid.csv", "test")):
        path = root / table
        if not path.is_file():
            if table == "valid.csv":
                logger.warning("%s not found; CheXpert test split is empty.", path)
                continue
            raise DataError(f"CheXpert table {path} does not exist.")
        header, rows = _iter_table(path)
        for col in ["Path", *CHEXPERT_COLUMNS] + (["Frontal/Lateral"] if frontal_only else []):
            if header is not None and col not in header:
                problems.add(path, None, 1, f"required column {col!r} is missing")
        if problems.items:
            continue
        kept = 0
        for row, line, rec in rows:
            if limit is not None and kept >= limit:
                break
            if frontal_only and _cell(rec, "Frontal/Lateral").lower() != "frontal":
                continue
            kept += 1
            rel = Path(_cell(rec, "Path"))
            cands = [root.parent / rel, root / rel] + ([root / Path(*rel.parts[1:])] if len(rel.parts) > 1 else [])
            image = next((c for c in cands if c.is_file()), None)
            errs = [] if image is not None else [f"image file {str(rel)!r} not found (tried {', '.join(map(str, cands))})"]
            lab, lab_errs = _chexpert_labels(rec, uncertain)
            errs += lab_errs
            patient = next((p for p in rel.parts if p.startswith("patient")), str(rel))
            for e in errs:
                problems.add(path, row, line, e)
            if errs:
                continue
            split = "test" if split_mode == "test" else (
                "val" if _unit_hash(seed, patient) < val_fraction else "train")
            report = template_report(lab) if reports == "template" else ""
            site = _site_name(site_prefix, num_sites, patient, seed)
            records.append(_Record(path, row, line, image, report, bool(report), lab, site, split,
                                   rid=f"{site}/{split}/{'/'.join(rel.parts[-3:])}"))
    problems.raise_if_any(root, "Invalid CheXpert data in")
    return _assemble(records, root / "train.csv", image_size=image_size, heldout_site=heldout_site,
                     public_site=None, num_workers=num_workers, problems=problems)
