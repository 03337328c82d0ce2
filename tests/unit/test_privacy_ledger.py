"""The durable per-client privacy ledger: chain, head file, tamper/truncation detection, budget."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_fedvlp.errors import LedgerError, PrivacyBudgetExhausted
from secure_fedvlp.privacy import (
    Budget,
    DPSGDEvent,
    GaussianEvent,
    PostProcessingEvent,
    PrivacyLedger,
    epsilon_from_events,
    genesis_hash,
    head_path,
    read_ledger,
    replay,
    verify_ledger,
)
from secure_fedvlp.privacy import ledger as ledger_mod

DELTA = 1e-5
EVENTS = [
    DPSGDEvent(1.2, 0.02, 100, 1.0, 0),
    GaussianEvent(1.0, 10.0, "anchor_features", 0),
    PostProcessingEvent("public_reps", 0),
    DPSGDEvent(1.2, 0.02, 100, 1.0, 1, stage="align"),
    GaussianEvent(2.0, 40.0, "dro_loss", 1, count=2),
]


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledgers" / "site-1.jsonl"


@pytest.fixture()
def filled(ledger_path: Path) -> PrivacyLedger:
    led = PrivacyLedger(ledger_path, "site-1", Budget(10.0, DELTA))
    for e in EVENTS:
        led.record(e)
    return led


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines))


# --------------------------------------------------------------------------- format and durability


def test_line_format_and_chain(filled: PrivacyLedger, ledger_path: Path):
    from secure_fedvlp.privacy import NEIGHBOURING_RELATION

    objs = [json.loads(line) for line in _lines(ledger_path)]
    assert [o["seq"] for o in objs] == list(range(len(EVENTS)))
    assert set(objs[0]) == {"seq", "prev_hash", "hash", "time", "client_id", "event"}
    assert objs[0]["prev_hash"] == genesis_hash("site-1") != genesis_hash("site-2")
    for a, b in zip(objs, objs[1:], strict=False):
        assert b["prev_hash"] == a["hash"]
    assert objs[1]["event"] == EVENTS[1].to_dict()
    head = json.loads(head_path(ledger_path).read_text())
    assert head == {
        "client_id": "site-1",
        "count": 5,
        "seq": 4,
        "hash": objs[-1]["hash"],
        "relation": NEIGHBOURING_RELATION,
    }
    assert filled.head.hash == objs[-1]["hash"] and filled.verify().count == 5


def test_head_states_the_neighbouring_relation_and_old_heads_stay_readable(filled: PrivacyLedger, ledger_path: Path):
    """The head file states the relation the events are accounted under; a head written before it was
    stated (no ``relation``) still verifies, resumes, and keeps stating none rather than a relation its
    earlier releases were not made under."""
    from secure_fedvlp.privacy import NEIGHBOURING_RELATION, ledger_relation

    assert NEIGHBOURING_RELATION == "add/remove-one record; released counts are declared public sizes"
    assert ledger_relation(ledger_path) == NEIGHBOURING_RELATION == filled.head.relation
    assert verify_ledger(ledger_path).relation == NEIGHBOURING_RELATION
    hp = head_path(ledger_path)
    old = {k: v for k, v in json.loads(hp.read_text()).items() if k != "relation"}
    hp.write_text(json.dumps(old))
    assert ledger_relation(ledger_path) is None and verify_ledger(ledger_path).count == 5
    resumed = PrivacyLedger(ledger_path, "site-1")
    resumed.record(EVENTS[0])
    assert resumed.head.relation is None and "relation" not in json.loads(hp.read_text())
    hp.write_text(json.dumps({**old, "count": 6, "seq": 5, "hash": resumed.head.hash, "relation": 7}))
    with pytest.raises(LedgerError, match="relation must be a string"):
        verify_ledger(ledger_path)


def test_file_mode_and_fsync_path(ledger_path: Path, monkeypatch: pytest.MonkeyPatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(ledger_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    led = PrivacyLedger(ledger_path, "site-1")
    created = len(synced)
    assert created >= 2  # the file, the head file (and its directory)
    led.record(EVENTS[0])
    assert len(synced) - created >= 3  # the ledger line, the head file, the directory
    for p in (ledger_path, head_path(ledger_path)):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert not list(ledger_path.parent.glob("*.tmp"))


def test_replay_equals_live_accountant(filled: PrivacyLedger, ledger_path: Path):
    live = filled.epsilon(DELTA)
    assert replay(ledger_path).get_epsilon(DELTA) == pytest.approx(live, rel=1e-12)
    assert replay(ledger_path).history == tuple(EVENTS) == filled.events()
    assert live == pytest.approx(epsilon_from_events(EVENTS, DELTA), rel=1e-12)
    # An auditor with an independent accountant gets a consistent number.
    audit = replay(ledger_path, "dp_accounting_rdp").get_epsilon(DELTA)
    assert audit == pytest.approx(live, rel=0.01)


def test_resume_continues_the_chain(filled: PrivacyLedger, ledger_path: Path):
    eps = filled.epsilon(DELTA)
    reopened = PrivacyLedger.open(ledger_path, Budget(10.0, DELTA))
    assert reopened.client_id == "site-1" and reopened.events() == tuple(EVENTS)
    assert reopened.epsilon() == pytest.approx(eps)
    entry = reopened.record(DPSGDEvent(1.2, 0.02, 100, 1.0, 2))
    assert entry.seq == len(EVENTS) and entry.prev_hash == filled.head.hash
    # The constructor on an existing path resumes too, and checks the owner.
    again = PrivacyLedger(ledger_path, "site-1")
    assert len(again) == len(EVENTS) + 1 and again.verify().hash == entry.hash
    with pytest.raises(LedgerError, match="does not match the ledger's client|names client"):
        PrivacyLedger(ledger_path, "site-2")


def test_second_writer_is_detected(filled: PrivacyLedger, ledger_path: Path):
    other = PrivacyLedger.open(ledger_path)
    other.record(PostProcessingEvent("x", 2))
    with pytest.raises(LedgerError, match="another writer"):
        filled.record(PostProcessingEvent("y", 2))
    assert len(read_ledger(ledger_path)) == len(EVENTS) + 1


# --------------------------------------------------------------------------- budget


def test_budget_refusal_writes_nothing(ledger_path: Path):
    led = PrivacyLedger(ledger_path, "site-7", Budget(1.0, DELTA))
    led.record(GaussianEvent(1.0, 10.0, "anchor_features", 0))
    before = ledger_path.read_bytes(), head_path(ledger_path).read_bytes()
    with pytest.raises(
        PrivacyBudgetExhausted, match=r"Client 'site-7' would reach epsilon [0-9.]+ .* budget epsilon 1"
    ):
        led.record(DPSGDEvent(0.8, 0.1, 1000, 1.0, 1))
    assert (ledger_path.read_bytes(), head_path(ledger_path).read_bytes()) == before
    assert len(led) == 1
    led.record(PostProcessingEvent("public_reps", 1))  # free: always allowed


schedules = st.lists(
    st.one_of(
        st.builds(
            DPSGDEvent,
            noise_multiplier=st.sampled_from([0.7, 1.0, 1.5, 3.0]),
            sample_rate=st.sampled_from([0.01, 0.05, 0.1]),
            steps=st.sampled_from([10, 100, 500]),
            clip_norm=st.just(1.0),
            round=st.integers(0, 20),
        ),
        st.builds(
            GaussianEvent,
            sensitivity=st.just(1.0),
            sigma=st.sampled_from([0.5, 2.0, 8.0, 30.0]),
            what=st.just("anchor_features"),
            round=st.integers(0, 20),
            count=st.integers(1, 3),
        ),
        st.builds(PostProcessingEvent, what=st.just("reps"), round=st.integers(0, 20)),
    ),
    max_size=10,
)


@given(schedule=schedules, budget_eps=st.sampled_from([0.5, 2.0, 8.0]))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_schedules_never_exceed_budget(schedule, budget_eps):
    budget = Budget(budget_eps, DELTA)
    with tempfile.TemporaryDirectory() as d:
        led = PrivacyLedger(Path(d) / "c.jsonl", "c", budget)
        accepted = []
        for ev in schedule:
            try:
                led.record(ev)
                accepted.append(ev)
            except PrivacyBudgetExhausted:
                pass
            assert led.epsilon() <= budget_eps
        assert list(led.events()) == accepted
        assert replay(Path(d) / "c.jsonl").get_epsilon(DELTA) <= budget_eps


# --------------------------------------------------------------------------- tampering and truncation


def test_edited_line_detected(filled: PrivacyLedger, ledger_path: Path):
    lines = _lines(ledger_path)
    lines[1] = lines[1].replace('"sigma":10.0', '"sigma":100.0')
    _write(ledger_path, lines)
    with pytest.raises(LedgerError, match=rf"{ledger_path.name} line 2: hash mismatch"):
        verify_ledger(ledger_path)
    with pytest.raises(LedgerError, match="line 2"):
        PrivacyLedger.open(ledger_path)


def test_partial_last_line_detected(filled: PrivacyLedger, ledger_path: Path):
    raw = ledger_path.read_bytes()
    ledger_path.write_bytes(raw[:-20])
    with pytest.raises(LedgerError, match=r"line 5: partial last line"):
        verify_ledger(ledger_path)
    # A committed (head-recorded) entry that is cut must not be "repaired" away.
    with pytest.raises(LedgerError, match="refusing to repair"):
        PrivacyLedger.open(ledger_path, repair=True)


def test_uncommitted_partial_tail_can_be_repaired(filled: PrivacyLedger, ledger_path: Path):
    with open(ledger_path, "ab") as fh:  # a crash in the middle of writing entry 6
        fh.write(b'{"client_id":"site-1","ev')
    with pytest.raises(LedgerError, match="line 6: partial last line"):
        PrivacyLedger.open(ledger_path)
    led = PrivacyLedger.open(ledger_path, repair=True)
    assert len(led) == len(EVENTS) and led.verify().count == len(EVENTS)


def test_removed_last_line_detected(filled: PrivacyLedger, ledger_path: Path):
    _write(ledger_path, _lines(ledger_path)[:-1])
    with pytest.raises(LedgerError, match=r"truncated: it has 4 entries but its head file records 5"):
        verify_ledger(ledger_path)
    with pytest.raises(LedgerError, match="truncated"):
        replay(ledger_path)


def test_reordered_lines_detected(filled: PrivacyLedger, ledger_path: Path):
    lines = _lines(ledger_path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(ledger_path, lines)
    with pytest.raises(LedgerError, match=r"line 2: seq 2 where 1 was expected"):
        verify_ledger(ledger_path)


def test_deleted_middle_line_detected(filled: PrivacyLedger, ledger_path: Path):
    lines = _lines(ledger_path)
    del lines[2]
    _write(ledger_path, lines)
    with pytest.raises(LedgerError, match=r"line 3: .*deleted"):
        verify_ledger(ledger_path)


def test_renumbered_deletion_detected_by_chain(filled: PrivacyLedger, ledger_path: Path):
    """Deleting a line and fixing up seq (and the line's own hash) still breaks prev_hash."""
    objs = [json.loads(line) for line in _lines(ledger_path)]
    del objs[1]
    for i, o in enumerate(objs):
        o["seq"] = i
        o["hash"] = ledger_mod.entry_hash(o)
    _write(ledger_path, [ledger_mod._canonical(o) + "\n" for o in objs])
    with pytest.raises(LedgerError, match=r"line 2: prev_hash does not chain"):
        verify_ledger(ledger_path)


def test_wrong_client_and_bad_json_detected(filled: PrivacyLedger, ledger_path: Path):
    lines = _lines(ledger_path)
    _write(ledger_path, lines[:3] + ["{not json\n"] + lines[4:])
    with pytest.raises(LedgerError, match=r"line 4: not valid JSON"):
        verify_ledger(ledger_path)
    obj = json.loads(lines[2])
    obj["client_id"] = "site-9"
    obj["hash"] = ledger_mod.entry_hash(obj)
    _write(ledger_path, lines[:2] + [ledger_mod._canonical(obj) + "\n"] + lines[3:])
    with pytest.raises(LedgerError, match=r"line 3: client_id 'site-9' does not match"):
        verify_ledger(ledger_path)
    _write(ledger_path, lines)
    with pytest.raises(LedgerError, match=r"line 1: client_id 'site-1' does not match the ledger's client 'site-2'"):
        verify_ledger(ledger_path, client_id="site-2")


def test_missing_head_and_head_lag(filled: PrivacyLedger, ledger_path: Path):
    hp = head_path(ledger_path)
    saved = hp.read_text()
    # The head one entry behind (crash between the append and the head update): accepted.
    head = json.loads(saved)
    prev_hash = json.loads(_lines(ledger_path)[-2])["hash"]
    hp.write_text(json.dumps({**head, "count": 4, "seq": 3, "hash": prev_hash}))
    assert verify_ledger(ledger_path).count == 5
    led = PrivacyLedger.open(ledger_path)  # repairs the head
    assert json.loads(hp.read_text()) == head and len(led) == 5
    hp.unlink()
    with pytest.raises(LedgerError, match="head file .* is missing"):
        verify_ledger(ledger_path)
    assert verify_ledger(ledger_path, require_head=False).count == 5


def test_consistent_rewrite_needs_external_anchor(filled: PrivacyLedger, ledger_path: Path):
    """Dropping the last line AND rewriting the head passes the local check (documented);
    an externally recorded count/hash catches it."""
    reported = filled.head
    lines = _lines(ledger_path)[:-1]
    _write(ledger_path, lines)
    last = json.loads(lines[-1])
    head_path(ledger_path).write_text(json.dumps({"client_id": "site-1", "count": 4, "seq": 3, "hash": last["hash"]}))
    assert verify_ledger(ledger_path).count == 4  # undetectable from the files alone
    with pytest.raises(LedgerError, match="5 were expected"):
        verify_ledger(ledger_path, expected_count=reported.count, expected_head_hash=reported.hash)
    with pytest.raises(LedgerError, match="no longer matches"):
        filled.verify()


def test_ledger_rejects_bad_arguments(ledger_path: Path):
    with pytest.raises(LedgerError, match="client_id"):
        PrivacyLedger(ledger_path, "")
    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger.open(ledger_path)
    led = PrivacyLedger(ledger_path, "c")
    with pytest.raises(TypeError, match="Event must be"):
        led.record({"type": "dpsgd"})  # type: ignore[arg-type]
    assert ledger_path.read_bytes() == b""
