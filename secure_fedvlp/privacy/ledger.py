"""A durable, append-only, hash-chained privacy ledger per client.

File format
-----------
``<path>`` is JSON Lines; line ``n`` (1-based) holds entry ``seq = n - 1``::

    {"client_id": ..., "event": {"type": ..., ...}, "hash": ..., "prev_hash": ...,
     "seq": ..., "time": "2026-01-01T00:00:00.000000+00:00"}

written as canonical JSON (``sort_keys=True, separators=(",", ":")``, ASCII).  ``hash`` is the
SHA-256 of the canonical JSON of the entry *without* ``"hash"``; ``prev_hash`` is the previous
entry's hash, and for ``seq = 0`` the genesis hash
``sha256("secure_fedvlp.privacy.ledger/v1\\0" + client_id)``, so a chain cannot be moved to
another client.

``<path>.head`` (the *head file*) holds ``{"client_id", "count", "seq", "hash", "relation"}``:
the last entry's count and hash, and the neighbouring relation the ledger's events are accounted
under (:data:`~secure_fedvlp.privacy.relation.NEIGHBOURING_RELATION`, fixed when the ledger is
created).  It is replaced atomically (temporary file, fsync, ``os.replace``, directory fsync) after
each append.  A head file written before the relation was stated has no ``"relation"``; it is read
as it is (relation unknown) and keeps none.

Write-ahead rule
----------------
:meth:`PrivacyLedger.record` is called *before* the release it records, and the caller
releases only after it returns.  It checks the budget first (refusing writes nothing), then
appends the line, flushes and ``os.fsync``-s it, then updates the head file.  A crash after
the record but before the release over-counts; it never under-counts.

What verification detects
-------------------------
* an edited line (hash mismatch), bad JSON, a malformed entry or event, a wrong ``client_id``;
* a deleted or reordered line (``seq`` gap / ``prev_hash`` mismatch);
* a partial last line (no trailing newline, or unparsable final line);
* removal of whole lines from the end, by comparing with the head file: a file shorter than
  the head, or a last hash that differs from the head's, is a :class:`LedgerError`.  A file
  exactly one entry *ahead* of the head is accepted with a warning (a crash between the line's
  fsync and the head update; it can only over-count) and the head is repaired on open;
* a missing head file next to a non-empty ledger.

Crash repair
------------
A crash in the middle of :meth:`PrivacyLedger.record`'s append leaves a partial last line.  The head
file is written only after the whole line is fsynced, so when the complete lines verify and the head
file records no more of them (one fewer at most), the partial line was never committed and nothing
was released under it: :func:`repair_ledger` (``secure-fedvlp ledger repair LEDGER``, and a site,
which opens its ledger with ``repair=True`` at its start and at every release) truncates it away under
the ledger's lock and logs it.  Anything else (a committed entry cut, no head file, an edited line)
is refused, saying so and to restore both files from a backup; the read-only checks
(:func:`verify_ledger`, the audit) name the repair command when the head file proves a partial line
uncommitted.

What it does not detect
-----------------------
The chain is unkeyed.  Someone who can write both files can rewrite them consistently (for
example drop the last entries *and* rewrite the head, or recompute every hash).  Catching that
needs a reference kept outside the client's control: pass ``expected_count`` /
``expected_head_hash`` to :func:`verify_ledger`: in a run, the head hash and sequence number each
DP reply carries to the server, which logs them and against which ``secure-fedvlp audit`` checks
the ledger (:mod:`secure_fedvlp.privacy.audit`).  Deleting both files is likewise only detectable
from outside.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fedvlp.errors import LedgerError, PrivacyError
from secure_fedvlp.privacy.accountant import PrivacyAccountant, make_accountant
from secure_fedvlp.privacy.budget import Budget, check_release
from secure_fedvlp.privacy.events import PrivacyEvent, check_event, event_from_dict
from secure_fedvlp.privacy.relation import NEIGHBOURING_RELATION

try:  # POSIX advisory lock against a second writer; absent on Windows.
    import fcntl as _fcntl
except ImportError:  # pragma: no cover
    _fcntl = None  # type: ignore[assignment]

__all__ = [
    "LedgerEntry",
    "LedgerHead",
    "PrivacyLedger",
    "genesis_hash",
    "entry_hash",
    "read_ledger",
    "verify_ledger",
    "replay",
    "head_path",
    "ledger_relation",
    "repair_ledger",
    "REPAIR_COMMAND",
]

logger = logging.getLogger(__name__)

_GENESIS_PREFIX = b"secure_fedvlp.privacy.ledger/v1\x00"
_ENTRY_KEYS = frozenset({"seq", "prev_hash", "hash", "time", "client_id", "event"})
_HEAD_KEYS = frozenset({"client_id", "count", "seq", "hash"})
_HEAD_OPTIONAL_KEYS = frozenset({"relation"})
FILE_MODE = 0o600


def genesis_hash(client_id: str) -> str:
    """The ``prev_hash`` of entry 0 of ``client_id``'s ledger."""
    return hashlib.sha256(_GENESIS_PREFIX + client_id.encode("utf-8")).hexdigest()


def _canonical(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``entry`` without its ``"hash"`` key."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode("ascii")).hexdigest()


def head_path(path: str | os.PathLike[str]) -> Path:
    """Path of the head file that goes with ledger ``path``."""
    p = Path(path)
    return p.with_name(p.name + ".head")


@dataclass(frozen=True)
class LedgerEntry:
    """One verified ledger line."""

    seq: int
    prev_hash: str
    hash: str
    time: str
    client_id: str
    event: PrivacyEvent

    def to_dict(self) -> dict[str, Any]:
        """The line's JSON object."""
        return {
            "seq": self.seq,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "time": self.time,
            "client_id": self.client_id,
            "event": self.event.to_dict(),
        }


@dataclass(frozen=True)
class LedgerHead:
    """Summary of a verified ledger: owner, number of entries and the last hash."""

    client_id: str | None
    count: int
    hash: str | None
    #: The neighbouring relation the events are accounted under (None: a ledger from before it was stated).
    relation: str | None = None


# --------------------------------------------------------------------------- fs helpers


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a created/renamed entry in it is durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_head(path: Path, client_id: str, count: int, last_hash: str, relation: str | None) -> None:
    hp = head_path(path)
    tmp = hp.with_name(hp.name + ".tmp")
    head: dict[str, Any] = {"client_id": client_id, "count": count, "seq": count - 1, "hash": last_hash}
    if relation is not None:
        head["relation"] = relation
    data = _canonical(head) + "\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, data.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, hp)
    _fsync_dir(hp.parent)


def _read_head(path: Path) -> dict[str, Any] | None:
    hp = head_path(path)
    if not hp.exists():
        return None
    try:
        head = json.loads(hp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"Ledger head file {hp} is unreadable or not JSON: {exc}.") from exc
    if not isinstance(head, dict) or not _HEAD_KEYS <= set(head) <= _HEAD_KEYS | _HEAD_OPTIONAL_KEYS:
        raise LedgerError(
            f"Ledger head file {hp} must be an object with keys {sorted(_HEAD_KEYS)} (and optionally "
            f"{sorted(_HEAD_OPTIONAL_KEYS)}). Found {head!r}."
        )
    if not isinstance(head.get("relation", ""), str):
        raise LedgerError(f"Ledger head file {hp}: relation must be a string. Found {head['relation']!r}.")
    c = head["count"]
    if isinstance(c, bool) or not isinstance(c, int) or c < 0 or head["seq"] != c - 1:
        raise LedgerError(f"Ledger head file {hp} has an invalid count/seq: {head!r}.")
    return head


# --------------------------------------------------------------------------- reading


def _parse_lines(path: Path, client_id: str | None) -> tuple[list[LedgerEntry], str | None, int]:
    """Parse and chain-check every line.

    Returns the entries, the ledger's client id, and the byte length of the verified part.
    A partial last line raises ``LedgerError`` whose ``partial_tail_offset`` attribute is set
    (so :meth:`PrivacyLedger.open` can repair a crash artefact when the head allows it).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise LedgerError(f"Ledger {path} does not exist.") from exc
    except OSError as exc:
        raise LedgerError(f"Ledger {path} cannot be read: {exc}.") from exc
    return _parse_bytes(raw, path, client_id)


def _parse_bytes(raw: bytes, path: Path, client_id: str | None) -> tuple[list[LedgerEntry], str | None, int]:
    """:func:`_parse_lines` of the ledger content ``raw`` (read from ``path``)."""
    entries: list[LedgerEntry] = []
    owner = client_id
    prev = genesis_hash(owner) if owner is not None else None
    offset = 0
    lines = raw.split(b"\n")
    # ``split`` leaves a final empty element when the file ends with a newline.
    complete, tail = lines[:-1], lines[-1]
    for i, line in enumerate(complete):
        lineno = i + 1
        where = f"Ledger {path} line {lineno}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{where}: not valid JSON ({exc}); the file is corrupt or was edited.") from exc
        if not isinstance(obj, dict) or set(obj) != _ENTRY_KEYS:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise LedgerError(f"{where}: an entry must have exactly the keys {sorted(_ENTRY_KEYS)}. Found {keys}.")
        cid = obj["client_id"]
        if not isinstance(cid, str) or not cid:
            raise LedgerError(f"{where}: client_id must be a non-empty string. Found {cid!r}.")
        if owner is None:
            owner = cid
            prev = genesis_hash(owner)
        if cid != owner:
            raise LedgerError(f"{where}: client_id {cid!r} does not match the ledger's client {owner!r}.")
        if obj["seq"] != i or isinstance(obj["seq"], bool):
            raise LedgerError(
                f"{where}: seq {obj['seq']!r} where {i} was expected; a line was deleted, inserted or reordered."
            )
        if obj["hash"] != entry_hash(obj):
            raise LedgerError(f"{where}: hash mismatch; the line was edited after it was written.")
        if obj["prev_hash"] != prev:
            raise LedgerError(
                f"{where}: prev_hash does not chain to line {lineno - 1 if lineno > 1 else 'genesis'}; "
                "a line was deleted, inserted or reordered."
            )
        if not isinstance(obj["time"], str):
            raise LedgerError(f"{where}: time must be a string. Found {obj['time']!r}.")
        try:
            event = event_from_dict(obj["event"])
        except PrivacyError as exc:
            raise LedgerError(f"{where}: invalid event: {exc}") from exc
        entries.append(LedgerEntry(obj["seq"], obj["prev_hash"], obj["hash"], obj["time"], cid, event))
        prev = obj["hash"]
        offset += len(line) + 1
    if tail:
        err = LedgerError(
            f"Ledger {path} line {len(complete) + 1}: partial last line ({len(tail)} bytes, no newline); "
            "the file was truncated or a write was interrupted."
        )
        err.partial_tail_offset = offset  # type: ignore[attr-defined]
        raise err
    return entries, owner, offset


def _check_against_head(
    path: Path, entries: list[LedgerEntry], head: dict[str, Any] | None, owner: str | None, require_head: bool
) -> int:
    """Compare parsed entries with the head file; return how many entries the head lags (0 or 1)."""
    hp = head_path(path)
    if head is None:
        if entries and require_head:
            raise LedgerError(
                f"Ledger {path} has {len(entries)} entries but its head file {hp} is missing; "
                "truncation cannot be ruled out."
            )
        return 0
    if owner is not None and head["client_id"] != owner:
        raise LedgerError(f"Ledger head file {hp} names client {head['client_id']!r}, the ledger {owner!r}.")
    n, hc = len(entries), head["count"]
    if n < hc:
        raise LedgerError(
            f"Ledger {path} is truncated: it has {n} entries but its head file records {hc}; "
            f"line {n + 1} onwards is missing."
        )
    if hc == 0:
        if head["hash"] != genesis_hash(head["client_id"]):
            raise LedgerError(f"Ledger head file {hp} of an empty ledger does not hold the genesis hash.")
    elif entries[hc - 1].hash != head["hash"]:
        raise LedgerError(
            f"Ledger {path} line {hc}: hash differs from the head file's; the ledger was rewritten or replaced."
        )
    lag = n - hc
    if lag > 1:
        raise LedgerError(
            f"Ledger {path} has {n} entries but its head file records {hc}; more than one entry was "
            "appended without updating the head (not written by PrivacyLedger, or an old head file was restored)."
        )
    if lag == 1:
        logger.warning(
            "Ledger %s is one entry ahead of its head file (a crash between the append and the head "
            "update); the extra entry counts, which can only over-count.",
            path,
        )
    return lag


#: The command that repairs a ledger torn by a crash in the middle of a write (:func:`repair_ledger`).
REPAIR_COMMAND = "secure-fedvlp ledger repair"


def _torn_tail_verdict(path: Path, complete: bytes, client_id: str | None) -> str | None:
    """Why the partial last line after ``complete`` (the ledger's complete lines) may have been committed,
    or None when the head file proves it never was.

    :meth:`PrivacyLedger.record` writes the head file only after the whole line (newline included) is
    fsynced, so a partial last line is uncommitted exactly when the complete lines verify and the head
    file records no more of them than there are (one fewer at most: the crash of an earlier write).
    """
    try:
        head = _read_head(path)
        if head is None:
            return f"its head file {head_path(path)} is missing, so nothing shows the line was never committed"
        entries, owner, _ = _parse_bytes(complete, path, client_id)
        _check_against_head(path, entries, head, owner, require_head=True)
    except LedgerError as exc:
        return str(exc).rstrip(".")
    return None


def _not_repairable(path: Path, why: str) -> str:
    return (
        f"refusing to repair: {why}. Dropping or rewriting lines could under-count the privacy spent; restore "
        f"{path} and {head_path(path)} together from a backup."
    )


def _with_repair_hint(path: Path, exc: LedgerError, client_id: str | None) -> LedgerError:
    """``exc`` (a ledger that does not verify) with what to do about it: the repair command for a partial
    last line the head file proves uncommitted, a backup for anything else."""
    tail_at = getattr(exc, "partial_tail_offset", None)
    if tail_at is None:
        return exc
    try:
        raw = path.read_bytes()
    except OSError:
        return exc
    why = _torn_tail_verdict(path, raw[:tail_at], client_id)
    if why is None:
        hint = (
            f"The head file shows that line was never committed (a crash in the middle of a write): run "
            f"`{REPAIR_COMMAND} {path}` to drop it (the site does so itself the next time it opens its ledger)."
        )
    else:
        hint = _not_repairable(path, why)
    new = LedgerError(f"{exc} {hint}")
    new.partial_tail_offset = tail_at  # type: ignore[attr-defined]
    return new


def repair_ledger(path: str | os.PathLike[str], *, client_id: str | None = None) -> str | None:
    """Repair what a crash in the middle of a ledger write leaves, and nothing else.

    Under the ledger's lock (no writer is mid-append): a partial last line is dropped (truncated away)
    when the head file proves it was never committed, and a head file one entry behind (a crash between
    an append and the head update) is brought up to date.  Both are logged.  Returns what was repaired
    (None: the ledger was intact).

    Raises
    ------
    LedgerError
        For anything else (a committed entry cut, a missing head file, an edited or reordered line...),
        naming the problem and saying to restore both files from a backup; nothing is changed.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDWR)
    except FileNotFoundError:
        raise LedgerError(f"Ledger {p} does not exist.") from None
    try:
        if _fcntl is not None:
            _fcntl.flock(fd, _fcntl.LOCK_EX)
        raw = os.pread(fd, os.fstat(fd).st_size, 0)
        done: list[str] = []
        try:
            entries, owner, _ = _parse_bytes(raw, p, client_id)
        except LedgerError as exc:
            tail_at = getattr(exc, "partial_tail_offset", None)
            why = str(exc).rstrip(".") if tail_at is None else _torn_tail_verdict(p, raw[:tail_at], client_id)
            if why is not None:
                raise LedgerError(f"Ledger {p}: {_not_repairable(p, why)}") from None
            os.ftruncate(fd, tail_at)
            os.fsync(fd)
            logger.warning(
                "Ledger %s: dropped an uncommitted partial last line (%d bytes, line %d): a crash in the middle "
                "of a write, which the head file shows was never committed (nothing was released under it).",
                p,
                len(raw) - tail_at,
                raw[:tail_at].count(b"\n") + 1,
            )
            done.append(f"dropped an uncommitted partial last line ({len(raw) - tail_at} bytes)")
            entries, owner, _ = _parse_bytes(raw[:tail_at], p, client_id)
        head = _read_head(p)
        try:
            lag = _check_against_head(p, entries, head, owner, require_head=True)
        except LedgerError as exc:
            raise LedgerError(f"Ledger {p}: {_not_repairable(p, str(exc).rstrip('.'))}") from None
        if lag and head is not None:
            _write_head(p, head["client_id"], len(entries), entries[-1].hash, head.get("relation"))
            logger.warning("Ledger %s: head file brought up to the last entry (%d).", p, len(entries))
            done.append(f"head file brought up to entry {len(entries)}")
    finally:
        os.close(fd)  # releases the lock
    return "; ".join(done) or None


def verify_ledger(
    path: str | os.PathLike[str],
    *,
    client_id: str | None = None,
    require_head: bool = True,
    expected_count: int | None = None,
    expected_head_hash: str | None = None,
) -> LedgerHead:
    """Verify a ledger file (and its head file) and return its head.

    Parameters
    ----------
    path
        The ledger file.
    client_id
        If given, every line must belong to this client (and the chain starts at its genesis).
    require_head
        If True (default), a non-empty ledger without a head file is an error.
    expected_count, expected_head_hash
        An external reference (for example reported to the server): the ledger must have at
        least ``expected_count`` entries and entry ``expected_count`` (or the last entry) must
        have hash ``expected_head_hash``.  This is what detects a consistent rewrite of both files.

    Raises
    ------
    LedgerError
        Naming the file and the line on the first problem found.
    """
    return _verify(Path(path), client_id, require_head, expected_count, expected_head_hash)[1]


def _verify(
    p: Path,
    client_id: str | None,
    require_head: bool,
    expected_count: int | None,
    expected_head_hash: str | None,
) -> tuple[list[LedgerEntry], LedgerHead]:
    try:
        entries, owner, _ = _parse_lines(p, client_id)
    except LedgerError as exc:
        raise _with_repair_hint(p, exc, client_id) from None
    head = _read_head(p)
    _check_against_head(p, entries, head, owner, require_head)
    n = len(entries)
    if expected_count is not None and n < expected_count:
        raise LedgerError(f"Ledger {p} has {n} entries but {expected_count} were expected; it was truncated.")
    if expected_head_hash is not None:
        k = expected_count if expected_count is not None else n
        actual = entries[k - 1].hash if k > 0 else (genesis_hash(owner) if owner else None)
        if actual != expected_head_hash:
            raise LedgerError(f"Ledger {p} line {k}: hash does not match the externally recorded head hash.")
    last = entries[-1].hash if entries else (genesis_hash(owner) if owner else None)
    return entries, LedgerHead(owner, n, last, head.get("relation") if head else None)


def ledger_relation(path: str | os.PathLike[str]) -> str | None:
    """The neighbouring relation stated in ledger ``path``'s head file (None: the head states none)."""
    head = _read_head(Path(path))
    return head.get("relation") if head else None


def read_ledger(
    path: str | os.PathLike[str], *, client_id: str | None = None, require_head: bool = True
) -> list[LedgerEntry]:
    """Verify and return every entry of a ledger file."""
    p = Path(path)
    try:
        entries, owner, _ = _parse_lines(p, client_id)
    except LedgerError as exc:
        raise _with_repair_hint(p, exc, client_id) from None
    _check_against_head(p, entries, _read_head(p), owner, require_head)
    return entries


def replay(
    path: str | os.PathLike[str],
    accountant: str = "rdp",
    *,
    require_head: bool = True,
    **options: Any,
) -> PrivacyAccountant:
    """Recompute a client's accountant from its ledger file alone (verified first).

    An auditor can pass an accountant other than the one the client used (for example
    ``"dp_accounting_rdp"`` or ``"pld"``) to check the client's epsilon independently.
    """
    entries = read_ledger(path, require_head=require_head)
    return make_accountant(accountant, (e.event for e in entries), **options)


# --------------------------------------------------------------------------- the ledger


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


class PrivacyLedger:
    """A client's durable privacy ledger with budget enforcement.

    Creating a ledger on a path that already holds one resumes it (after verifying it and
    checking that it belongs to ``client_id``), so a restarted client continues its history.

    Parameters
    ----------
    path
        Ledger file (JSON Lines).  Its directory is created if needed; files are mode 0600.
    client_id
        The client this ledger belongs to (non-empty).
    budget
        The client's budget, enforced by :meth:`record`; None records without a limit.
    accountant
        Accountant used for the budget check and :meth:`epsilon` (default ``"rdp"``).
    accountant_options
        Options for that accountant.
    repair
        On resume, drop a partial last line if (and only if) the head file shows it was never
        committed (a crash mid-write; the caller never released it).  Default False: raise.

    Notes
    -----
    Call :meth:`record` *before* releasing; release only after it returns.  One writer per
    ledger: :meth:`record` takes an exclusive ``flock`` and checks that nobody else appended.
    A new ledger states :data:`~secure_fedvlp.privacy.relation.NEIGHBOURING_RELATION` in its head
    file (:attr:`relation`); a resumed one keeps the relation its head states (None for a ledger
    written before the relation was stated: its earlier releases were not made under it).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        client_id: str,
        budget: Budget | None = None,
        *,
        accountant: str = "rdp",
        accountant_options: Mapping[str, Any] | None = None,
        repair: bool = False,
    ) -> None:
        if not isinstance(client_id, str) or not client_id.strip():
            raise LedgerError(f"Ledger client_id must be a non-empty string. Found {client_id!r}.")
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"Budget must be a Budget or None. Found {type(budget).__name__}.")
        self.path = Path(path)
        self.client_id = client_id
        self.budget = budget
        self._accountant_name = accountant
        self._accountant_options = dict(accountant_options or {})
        self._accountant = make_accountant(accountant, **self._accountant_options)
        self._entries: list[LedgerEntry] = []
        self.relation: str | None = NEIGHBOURING_RELATION
        if self.path.exists() and (self.path.stat().st_size > 0 or head_path(self.path).exists()):
            self._resume(repair)
        else:
            self._create()

    # ------------------------------------------------------------------ construction

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        budget: Budget | None = None,
        *,
        accountant: str = "rdp",
        accountant_options: Mapping[str, Any] | None = None,
        repair: bool = False,
    ) -> PrivacyLedger:
        """Resume an existing ledger (verified first); the client id is read from the files."""
        p = Path(path)
        if not p.exists():
            raise LedgerError(f"Ledger {p} does not exist; create it with PrivacyLedger(path, client_id).")
        head = _read_head(p)
        owner: str | None = head["client_id"] if head else None
        if owner is None:
            try:
                _, owner, _ = _parse_lines(p, None)
            except LedgerError as exc:
                if not (repair and hasattr(exc, "partial_tail_offset")):
                    raise
                raise LedgerError(
                    f"Ledger {p}: " + _not_repairable(p, f"it has a partial last line and no head file {head_path(p)}")
                ) from exc
        if owner is None:
            raise LedgerError(f"Ledger {p} is empty and has no head file; its client is unknown.")
        return cls(p, owner, budget, accountant=accountant, accountant_options=accountant_options, repair=repair)

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _write_head(self.path, self.client_id, 0, genesis_hash(self.client_id), self.relation)
        _fsync_dir(self.path.parent)
        self._offset = 0
        logger.info("Created privacy ledger %s for client %r.", self.path, self.client_id)

    def _resume(self, repair: bool) -> None:
        try:
            entries, owner, offset = _parse_lines(self.path, self.client_id)
        except LedgerError as exc:
            if not repair:
                raise _with_repair_hint(self.path, exc, self.client_id) from None
            if getattr(exc, "partial_tail_offset", None) is None:  # not a torn write: nothing to repair
                raise LedgerError(f"Ledger {self.path}: {_not_repairable(self.path, str(exc).rstrip('.'))}") from None
            repair_ledger(self.path, client_id=self.client_id)  # raises unless the head proves it uncommitted
            entries, owner, offset = _parse_lines(self.path, self.client_id)
        head = _read_head(self.path)
        lag = _check_against_head(self.path, entries, head, self.client_id, require_head=True)
        if head is None:
            if entries:  # pragma: no cover - _check_against_head raised
                raise LedgerError(f"Ledger {self.path} has no head file.")
            _write_head(self.path, self.client_id, 0, genesis_hash(self.client_id), self.relation)
        else:
            self.relation = head.get("relation")
            if lag:
                _write_head(self.path, self.client_id, len(entries), entries[-1].hash, self.relation)
        self._entries = entries
        self._offset = offset
        self._accountant.compose_all(e.event for e in entries)
        logger.info("Resumed privacy ledger %s for client %r with %d entries.", self.path, self.client_id, len(entries))
        if self.budget is not None:
            spent = self._accountant.get_epsilon(self.budget.delta)
            if spent > self.budget.epsilon:
                logger.warning(
                    "Client %r has already spent epsilon %.6g > budget %g; every further release will be refused.",
                    self.client_id,
                    spent,
                    self.budget.epsilon,
                )

    # ------------------------------------------------------------------ queries

    def events(self) -> tuple[PrivacyEvent, ...]:
        """Every recorded event, in order."""
        return tuple(e.event for e in self._entries)

    def entries(self) -> tuple[LedgerEntry, ...]:
        """Every recorded entry, in order."""
        return tuple(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def head(self) -> LedgerHead:
        """Owner, count and last hash (report the hash to the server as an external anchor)."""
        last = self._entries[-1].hash if self._entries else genesis_hash(self.client_id)
        return LedgerHead(self.client_id, len(self._entries), last, self.relation)

    @property
    def accountant(self) -> PrivacyAccountant:
        """A copy of the live accountant (mutating it does not affect the ledger)."""
        return self._accountant.copy()

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the budget's delta)."""
        if delta is None:
            if self.budget is None:
                raise LedgerError("Ledger.epsilon needs a delta when the ledger has no budget.")
            delta = self.budget.delta
        return self._accountant.get_epsilon(delta)

    def verify(self, *, expected_count: int | None = None, expected_head_hash: str | None = None) -> LedgerHead:
        """Re-read and verify the files; also check they still match what this object wrote."""
        entries, head = _verify(self.path, self.client_id, True, expected_count, expected_head_hash)
        n = len(self._entries)
        if len(entries) < n or (n and entries[n - 1].hash != self._entries[-1].hash):
            raise LedgerError(f"Ledger {self.path} no longer matches the {n} entries this process wrote.")
        return head

    # ------------------------------------------------------------------ writing

    def check(self, event: PrivacyEvent) -> float:
        """Projected epsilon with ``event`` (budget's delta); raises if over budget.  Writes nothing."""
        check_event(event)
        if self.budget is None:
            raise LedgerError("Ledger.check needs a budget.")
        return check_release(self._accountant, event, self.budget, client_id=self.client_id)

    @contextlib.contextmanager
    def _locked_append_fd(self) -> Iterator[int]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            if _fcntl is not None:
                _fcntl.flock(fd, _fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # closing releases the lock

    def record(self, event: PrivacyEvent) -> LedgerEntry:
        """Durably record ``event``; call it BEFORE the release it describes.

        Order: budget check (refusal writes nothing) -> append line -> flush + fsync ->
        update head file -> update the in-memory accountant.

        Raises
        ------
        PrivacyBudgetExhausted
            If the release would exceed the budget (names client, projected epsilon, budget).
        LedgerError
            If the file changed underneath this process (another writer, truncation).
        """
        check_event(event)
        if self.budget is not None:
            check_release(self._accountant, event, self.budget, client_id=self.client_id)
        seq = len(self._entries)
        prev = self._entries[-1].hash if self._entries else genesis_hash(self.client_id)
        body: dict[str, Any] = {
            "seq": seq,
            "prev_hash": prev,
            "time": _now(),
            "client_id": self.client_id,
            "event": event.to_dict(),
        }
        body["hash"] = entry_hash(body)
        line = (_canonical(body) + "\n").encode("ascii")
        with self._locked_append_fd() as fd:
            size = os.fstat(fd).st_size
            if size != self._offset:
                raise LedgerError(
                    f"Ledger {self.path} is {size} bytes but this process wrote {self._offset}; another writer "
                    "appended or the file was truncated. Nothing was recorded; reopen and verify."
                )
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        self._offset += len(line)
        entry = LedgerEntry(seq, prev, body["hash"], body["time"], self.client_id, event)
        self._entries.append(entry)
        self._accountant.compose(event)
        _write_head(self.path, self.client_id, len(self._entries), entry.hash, self.relation)
        logger.debug("Ledger %s: recorded seq %d (%s, round %d).", self.path, seq, event.type_name, event.round)
        return entry
