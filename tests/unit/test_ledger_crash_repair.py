"""A crash in the middle of a ledger write: repaired on the next start when the head file proves the partial
line was never committed, refused (with what to do) otherwise.

The torn write is made by a real process that dies (``os._exit``) after the kernel took only part of the
line: ``os.write`` in the ledger module is replaced by one that writes a prefix of what it is given and
then kills the process, the way a power cut or a SIGKILL between two writes would leave the file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from secure_fedvlp.cli import main
from secure_fedvlp.errors import LedgerError
from secure_fedvlp.privacy import Budget, DPSGDEvent, PrivacyLedger, head_path, verify_ledger
from secure_fedvlp.privacy.accountant import make_accountant
from secure_fedvlp.privacy.ledger import REPAIR_COMMAND, repair_ledger

DELTA = 1e-5
EVENT = DPSGDEvent(1.1, 0.05, 10, 1.0, 0)

_CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    from secure_fedvlp.privacy import Budget, DPSGDEvent, PrivacyLedger
    from secure_fedvlp.privacy import ledger as mod

    path, keep = sys.argv[1], int(sys.argv[2])
    led = PrivacyLedger(path, "site1", Budget(50.0, 1e-5))
    for r in range(3):
        led.record(DPSGDEvent(1.1, 0.05, 10, 1.0, r))
    real_write = os.write

    def torn_write(fd, data):  # the kernel takes `keep` bytes of the fourth line, then the process dies
        real_write(fd, bytes(data[:keep]))
        os.fsync(fd)
        os._exit(9)

    mod.os.write = torn_write
    led.record(DPSGDEvent(1.1, 0.05, 10, 1.0, 3))
    """
)


@pytest.fixture(scope="module")
def torn(tmp_path_factory) -> Path:
    """A ledger (and head file) left by a process that died in the middle of its fourth write, made once."""
    path = tmp_path_factory.mktemp("crash") / "privacy_ledger.jsonl"
    proc = subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(path), "40"], check=False)
    assert proc.returncode == 9  # it died in the middle of the write
    raw = path.read_bytes()
    assert raw.count(b"\n") == 3 and not raw.endswith(b"\n")  # three committed lines and a torn fourth
    return path


@pytest.fixture()
def crash_mid_write(torn):
    """``crash_mid_write(path, keep=40)``: put the torn ledger at ``path``, its fourth line cut after ``keep`` bytes."""

    def place(path: Path, keep: int = 40) -> None:
        raw = torn.read_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw[: raw.rindex(b"\n") + 1 + keep])
        head_path(path).write_bytes(head_path(torn).read_bytes())

    return place


def _eps(n: int) -> float:
    return make_accountant("rdp", [DPSGDEvent(1.1, 0.05, 10, 1.0, r) for r in range(n)]).get_epsilon(DELTA)


def test_torn_write_is_named_and_repaired_on_the_next_start(tmp_path, caplog, crash_mid_write):
    path = tmp_path / "site1" / "privacy_ledger.jsonl"
    crash_mid_write(path)
    # read-only checks (the audit, a reply's ledger head) change nothing and name the repair command
    with pytest.raises(LedgerError, match=rf"line 4: partial last line.*never committed.*`{REPAIR_COMMAND} {path}`"):
        verify_ledger(path)
    with pytest.raises(LedgerError, match="never committed"):  # a plain reopen does not repair either
        PrivacyLedger(path, "site1", Budget(50.0, DELTA))
    assert path.read_bytes().count(b"\n") == 3 and not path.read_bytes().endswith(b"\n")

    with caplog.at_level(logging.WARNING, logger="secure_fedvlp.privacy.ledger"):
        led = PrivacyLedger(path, "site1", Budget(50.0, DELTA), repair=True)  # what a site's start does
    assert "dropped an uncommitted partial last line" in caplog.text and "line 4" in caplog.text
    assert len(led) == 3 and led.epsilon() == pytest.approx(_eps(3))  # nothing committed was lost
    led.record(DPSGDEvent(1.1, 0.05, 10, 1.0, 3))  # the site goes on, and its chain verifies
    assert verify_ledger(path).count == 4


def test_the_site_start_repairs_its_ledger(tmp_path, caplog, crash_mid_write):
    """The site's start opens its ledger through ``make_ledger(..., repair=True)`` (``client_parts``)."""
    from secure_fedvlp.config import PrivacyConfig
    from secure_fedvlp.wrappers.dpsgd import make_ledger

    path = tmp_path / "privacy_ledger.jsonl"
    crash_mid_write(path, keep=5)
    privacy = PrivacyConfig(enabled=True, target_epsilon=50.0, delta=DELTA)
    with pytest.raises(LedgerError, match="never committed"):
        make_ledger(path, "site1", privacy)
    with caplog.at_level(logging.WARNING, logger="secure_fedvlp.privacy.ledger"):
        assert len(make_ledger(path, "site1", privacy, repair=True)) == 3
    assert "dropped an uncommitted partial last line (5 bytes" in caplog.text


def test_torn_committed_entry_is_refused_and_nothing_changes(tmp_path):
    """The head file records the fourth entry, whose line was cut: dropping it would under-count."""
    path = tmp_path / "privacy_ledger.jsonl"
    led = PrivacyLedger(path, "site1", Budget(50.0, DELTA))
    for r in range(4):
        led.record(DPSGDEvent(1.1, 0.05, 10, 1.0, r))
    path.write_bytes(path.read_bytes()[:-30])
    before = path.read_bytes()
    for attempt in (lambda: PrivacyLedger(path, "site1", repair=True), lambda: repair_ledger(path)):
        with pytest.raises(LedgerError, match=r"refusing to repair: .*head file records 4.*restore .* from a backup"):
            attempt()
    with pytest.raises(LedgerError, match="refusing to repair"):  # the read-only check says the same
        verify_ledger(path)
    assert path.read_bytes() == before


def test_torn_write_without_head_or_after_an_edit_is_refused(tmp_path, crash_mid_write):
    path = tmp_path / "privacy_ledger.jsonl"
    crash_mid_write(path)
    lines = path.read_bytes().split(b"\n")
    hp = head_path(path)
    head = hp.read_bytes()
    hp.unlink()  # nothing shows the torn line was never committed
    with pytest.raises(LedgerError, match=r"refusing to repair: its head file .* is missing"):
        repair_ledger(path)
    hp.write_bytes(head)
    edited = json.loads(lines[1])
    edited["event"]["sample_rate"] = 0.01  # a smaller spend, hash left as it was
    path.write_bytes(b"\n".join([lines[0], json.dumps(edited, sort_keys=True).encode(), *lines[2:]]))
    before = path.read_bytes()
    for attempt in (lambda: PrivacyLedger(path, "site1", repair=True), lambda: repair_ledger(path)):
        with pytest.raises(LedgerError, match=r"refusing to repair: .*line 2: hash mismatch.*from a backup"):
            attempt()
    assert path.read_bytes() == before


def test_cli_repairs_a_run_and_refuses_in_one_line(tmp_path, capsys, crash_mid_write):
    run = tmp_path / "run"
    torn = run / "clients" / "site1" / "privacy_ledger.jsonl"
    crash_mid_write(torn)
    intact = PrivacyLedger(run / "clients" / "site2" / "privacy_ledger.jsonl", "site2", Budget(50.0, DELTA))
    intact.record(EVENT)
    assert main(["ledger", "repair", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{torn}: dropped an uncommitted partial last line" in out and "intact, nothing to repair" in out
    assert verify_ledger(torn).count == 3

    torn.write_bytes(torn.read_bytes()[:-10])  # now a committed entry is cut
    assert main(["ledger", "repair", str(torn)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Ledger ") and "refusing to repair" in err and err.count("\n") == 1


def test_a_reply_of_the_site_repairs_a_write_torn_by_another_of_its_processes(tmp_path, caplog, crash_mid_write):
    """In simulation a site's messages go to whichever process is free: one that already started the site
    (and so never passes through the start again) repairs the torn write before it reports its ledger head."""
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from secure_fedvlp.flower.client_app import ClientRuntime
    from secure_fedvlp.wire import LEDGER_KEY, LEDGER_SEQ

    path = tmp_path / "privacy_ledger.jsonl"
    crash_mid_write(path)
    site = SimpleNamespace(name="site1")
    runtime = ClientRuntime(setup=None, site=site, model=None, trainer=None, device=None, ledger_path=path)
    with caplog.at_level(logging.WARNING, logger="secure_fedvlp.privacy.ledger"):
        content = runtime.with_ledger_head(RecordDict())
    assert content[LEDGER_KEY][LEDGER_SEQ] == 2 and "dropped an uncommitted partial last line" in caplog.text
    assert verify_ledger(path).count == 3
