"""Reading CSV/TSV/JSONL tables row by row, and collecting every row problem before raising one error.

A loader walks its tables once, adds each problem it finds to a :class:`Problems` (naming the
table file, the 1-based data row, the file line it sits on, and the column and value), and raises
them together, so a user fixes a table in one pass.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secure_fedvlp.errors import DataError

__all__ = ["Problems", "iter_table", "cell", "check_header", "SPLITS", "parse_split", "unit_hash", "hash_split"]

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}

#: ``(row, line, record)``: 1-based data row, 1-based file line, the row's values by column.
Row = tuple[int, int, dict[str, Any]]


class Problems:
    """Collects row problems (capped) and raises them together as one DataError."""

    def __init__(self, cap: int) -> None:
        self.cap = max(1, int(cap))
        self.items: list[str] = []
        self.dropped = 0

    def add(self, source: Path | str, row: int | None, line: int | None, message: str) -> None:
        """A problem of data row ``row`` (file line ``line``) of ``source``, or of its header when ``row`` is None."""
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
        err = DataError(
            f"{stage} {source}: {n} problem{'s' if n != 1 else ''}; fix them all in one pass:\n{lines}{more}"
        )
        err.problems = list(self.items)  # type: ignore[attr-defined]
        raise err


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115 - closed by the caller's with


def _utf8_rows(path: Path, rows: Iterator[Row]) -> Iterator[Row]:
    """``rows``, with a file that is not UTF-8 reported as a one-line :class:`DataError` naming it."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise DataError(f"Manifest file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None


def iter_table(path: Path) -> tuple[list[str] | None, Iterator[Row]]:
    """``(header, rows)`` of a ``.csv``/``.tsv``/``.jsonl``/``.ndjson`` file, optionally ``.gz``.

    The header is None for JSONL (keys may differ per row).  A JSONL line that is not a JSON
    object yields a record ``{"__error__": message}``.  Blank JSONL lines are skipped.
    """
    if not path.is_file():
        raise DataError(f"Manifest file {path} does not exist.")
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".ndjson"):

        def gen_json() -> Iterator[Row]:
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

        return None, _utf8_rows(path, gen_json())
    if kind in (".csv", ".tsv"):
        delimiter = "\t" if kind == ".tsv" else ","
        try:
            with _open_text(path) as fh:
                header = next(csv.reader(fh, delimiter=delimiter), None)
        except UnicodeDecodeError as exc:
            raise DataError(f"Manifest file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
        if not header:
            raise DataError(f"Manifest file {path} is empty (no header line).")

        def gen_csv() -> Iterator[Row]:
            with _open_text(path) as fh:
                reader = csv.DictReader(fh, delimiter=delimiter)
                for row, rec in enumerate(reader, start=1):
                    yield row, reader.line_num, rec

        return [h.strip() for h in header], _utf8_rows(path, gen_csv())
    raise DataError(
        f"Manifest file {path}: unsupported format {kind or '(no suffix)'!r}; "
        "use .csv, .tsv, .jsonl or .ndjson (optionally .gz)."
    )


def cell(rec: Mapping[str, Any], col: str) -> str:
    """The stripped text of ``rec[col]``; "" when absent, None or NaN."""
    v = rec.get(col)
    if v is None:
        return ""
    if isinstance(v, float) and np.isnan(v):
        return ""
    return str(v).strip()


def check_header(path: Path, header: Sequence[str] | None, required: Sequence[str], problems: Problems) -> None:
    """Add a header problem for each of ``required`` missing from ``header`` (nothing to check for JSONL)."""
    if header is None:
        return
    for col in required:
        if col not in header:
            problems.add(path, None, 1, f"required column {col!r} is missing; header is {list(header)}")


def parse_split(value: str) -> str | None:
    """``train``/``val``/``test`` for a split cell (``valid``, ``validate``, ... accepted), None if unknown."""
    return _SPLIT_ALIASES.get(value.strip().lower())


def unit_hash(seed: int, key: str) -> float:
    """A stable uniform number in [0, 1) for ``key`` (same on every machine and Python run)."""
    h = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def hash_split(seed: int, key: str, val_fraction: float, test_fraction: float) -> str:
    """A deterministic split for a group key: every record with the same key lands in the same split."""
    u = unit_hash(seed, key)
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
