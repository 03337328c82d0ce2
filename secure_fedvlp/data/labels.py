"""The label convention, and the one parser every real-data loader uses.

A table gives labels in one of two ways:

* **one column per finding**, named after it (matched to :data:`~secure_fedvlp.data.types.FINDINGS`
  through :data:`LABEL_ALIASES`, e.g. ``Pleural Effusion`` -> ``pleural_effusion``, ``Lung Lesion`` ->
  ``nodule``), with the CheXpert-labeler values ``1`` (positive), ``0`` (negative), blank (not
  mentioned: negative) and ``-1`` (uncertain).  ``1.0``/``0.0``/``-1.0``, ``true``/``false`` and
  ``yes``/``no`` are read the same way; anything else is a row problem naming the column and value.
  Several columns mapped to one finding are combined by "any positive".
* **one ``labels`` column** of ``|``-separated finding names (aliases accepted), blank meaning none.

Uncertain values (``-1``) follow the ``uncertain`` policy: ``"negative"`` (U-Zeros, the default),
``"positive"`` (U-Ones) or ``"error"`` (a row problem).

``no_finding`` is cleared whenever a lesion finding is positive (positives win); when a row gives
no ``no_finding`` value (no such column, or the cell is blank) it is derived as "no lesion finding
is positive".  Listing ``no_finding`` together with a finding in a ``labels`` column is a row problem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from secure_fedvlp.data.tables import Problems, cell
from secure_fedvlp.data.types import FINDINGS

__all__ = [
    "UncertainPolicy",
    "UNCERTAIN_POLICIES",
    "LABEL_ALIASES",
    "CHEXPERT_COLUMNS",
    "finding_for",
    "label_value",
    "parse_labels",
    "resolve_label_columns",
]

UncertainPolicy = Literal["negative", "positive", "error"]
UNCERTAIN_POLICIES: tuple[str, ...] = ("negative", "positive", "error")

#: Dataset label names (normalised: lower case, ``_``/``-`` as spaces) -> FINDINGS.  Explicit on purpose:
#: CheXpert/MIMIC "Lung Lesion" covers nodules and masses and is mapped to ``nodule``.
LABEL_ALIASES: dict[str, str] = {
    "no finding": "no_finding",
    "normal": "no_finding",
    "cardiomegaly": "cardiomegaly",
    "pleural effusion": "pleural_effusion",
    "effusion": "pleural_effusion",
    "consolidation": "consolidation",
    "pneumothorax": "pneumothorax",
    "nodule": "nodule",
    "lung lesion": "nodule",
}
#: The CheXpert-labeler columns of MIMIC-CXR-JPG and CheXpert that are read, mapped explicitly.
CHEXPERT_COLUMNS: dict[str, str] = {
    "No Finding": "no_finding",
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural_effusion",
    "Consolidation": "consolidation",
    "Pneumothorax": "pneumothorax",
    "Lung Lesion": "nodule",
}

_WORDS = {"true": 1.0, "yes": 1.0, "false": 0.0, "no": 0.0}


def finding_for(name: str) -> str | None:
    """The finding a column or label name stands for (via :data:`LABEL_ALIASES`), or None."""
    return LABEL_ALIASES.get(" ".join(name.strip().lower().replace("_", " ").replace("-", " ").split()))


def label_value(v: Any, uncertain: UncertainPolicy) -> float | str:
    """1.0 / 0.0 for one label cell, or the problem with it (a message)."""
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
        x = _WORDS.get(s, float("nan"))
    if x in (0.0, 1.0):
        return x
    if x == -1.0:
        if uncertain == "error":
            return "uncertain value -1 (uncertain='error')"
        return 1.0 if uncertain == "positive" else 0.0
    return f"value {v!r} is not one of 1, 0, -1 or blank"


def _finalise(lab: np.ndarray, no_finding_given: bool) -> np.ndarray:
    if lab[1:].any() or not no_finding_given:
        lab[0] = float(not lab[1:].any())
    return lab


def parse_labels(
    rec: Mapping[str, Any],
    columns: Mapping[str, str] | None,
    *,
    uncertain: UncertainPolicy,
    labels_column: str = "labels",
) -> tuple[np.ndarray, list[str]]:
    """``(multi-hot labels over FINDINGS, problems)`` of one row.

    Parameters
    ----------
    rec : the row's values by column.
    columns : ``{column: finding}`` to read, or None: the ``labels_column`` of ``|``-separated names
        if the row has one, else every column whose name maps to a finding.
    uncertain : policy for ``-1``.
    labels_column : name of the ``|``-separated column.
    """
    lab = np.zeros(len(FINDINGS), np.float32)
    errs: list[str] = []
    if columns is None and labels_column not in rec:
        columns = {c: f for c in rec if isinstance(c, str) and (f := finding_for(c)) is not None}
        if not columns:
            return lab, [f"no {labels_column!r} column and no finding columns"]
    if columns is None:
        for name in (n.strip() for n in cell(rec, labels_column).split("|")):
            if not name:
                continue
            finding = finding_for(name)
            if finding is None:
                errs.append(f"unknown finding {name!r} in column {labels_column!r} (known: {', '.join(FINDINGS)})")
            else:
                lab[FINDINGS.index(finding)] = 1.0
        if lab[0] and lab[1:].any():
            errs.append(
                f"column {labels_column!r} lists no_finding together with findings: {cell(rec, labels_column)!r}"
            )
        return _finalise(lab, no_finding_given=bool(lab[0])), errs
    given_nf = False
    for col, finding in columns.items():
        if col not in rec:
            errs.append(f"missing label column {col!r}")
            continue
        v = label_value(rec[col], uncertain)
        if isinstance(v, str):
            errs.append(f"label column {col!r}: {v}")
        else:
            k = FINDINGS.index(finding)
            lab[k] = max(lab[k], v)
            given_nf |= finding == "no_finding" and cell(rec, col) != ""
    return _finalise(lab, given_nf), errs


def resolve_label_columns(
    header: Sequence[str] | None,
    label_columns: Mapping[str, str] | Sequence[str] | None,
    labels_column: str,
    source: Path,
    problems: Problems,
) -> dict[str, str] | None:
    """The ``columns`` argument of :func:`parse_labels` for a table, adding header problems to ``problems``.

    ``label_columns`` is ``{column: finding}``, a list of columns named after findings, or None
    (a ``labels_column`` if the header has one, else every column named after a finding; for JSONL,
    whose header is None, decided per row).
    """
    if label_columns is None:
        if header is None or labels_column in header:
            return None
        found = {c: f for c in header if (f := finding_for(c)) is not None}
        if not found:
            problems.add(
                source,
                None,
                1,
                f"no label columns: expected a {labels_column!r} column or columns named "
                f"after findings ({', '.join(FINDINGS)}); header is {list(header)}",
            )
        return found
    items = (
        label_columns.items()
        if isinstance(label_columns, Mapping)
        else [(c, finding_for(c) or c) for c in label_columns]
    )
    out: dict[str, str] = {}
    for col, finding in items:
        if finding not in FINDINGS:
            problems.add(
                source,
                None,
                1 if header is not None else None,
                f"unknown label column {col!r} (maps to {finding!r}; known findings: {', '.join(FINDINGS)})",
            )
        elif header is not None and col not in header:
            problems.add(source, None, 1, f"label column {col!r} is not in the header {list(header)}")
        else:
            out[col] = finding
    return out
