"""threat_models/ and SECURITY.md: fixed shape, and every claim names a test that exists.

A claim without a test is not a claim: this test fails if a document cites a test file or a test
function that does not exist (renamed, deleted, mistyped), if a row of a "What is protected"
table cites no test, or if a document departs from the fixed shape.

A claim that something is stopped (dropped, refused, rejected, detected, authenticated, signed,
replayed, forged, tampered) must also cite at least one test that *tries* it: a test whose body
expects an exception (``pytest.raises``) or sends a tampered, forged, replayed or failing input (or forges a file) and
asserts on the drop or refusal (:func:`exercises_an_attack`).  A test that only checks that an
honest run works does not show that an attack fails.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TM = ROOT / "threat_models"
DOCS = sorted(p for p in TM.glob("*.md") if p.name != "README.md")
SHAPE = [
    "## TL;DR",
    "## Parties and trust",
    "## Attacker capabilities",
    "## What is protected",
    "## What is not protected",
]
#: A backticked reference: `tests/unit/test_x.py::test_name`, `test_x.py::test_name`, `::test_name`
#: (same file as the previous reference) or `tests/unit/test_x.py` (the whole file).
REF = re.compile(r"`((?:tests/)?[\w/]*test_\w+\.py)?(?:::(\w+))?[^`]*`")


@cache
def _test_files() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in (ROOT / "tests").rglob("test_*.py"):
        out.setdefault(p.name, []).append(p)
    return out


@cache
def _functions(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _resolve(file_part: str) -> Path:
    if "/" in file_part:
        p = ROOT / file_part
        assert p.exists(), f"cited test file {file_part} does not exist"
        return p
    found = _test_files().get(file_part, [])
    assert len(found) == 1, f"cited test file {file_part} matches {len(found)} files under tests/"
    return found[0]


def references(text: str, where: str) -> list[tuple[Path, str | None]]:
    """Every (file, function) a document cites, with ``::name`` resolved against the last file."""
    refs: list[tuple[Path, str | None]] = []
    last: Path | None = None
    for m in REF.finditer(text):
        file_part, name = m.group(1), m.group(2)
        if not file_part and not name:
            continue
        if file_part:
            last = _resolve(file_part)
        assert last is not None, f"{where}: `::{name}` cites no file before it"
        refs.append((last, name))
    return refs


#: Words of a claim that says an attack is stopped.
CLAIM_WORDS = ("drop", "refus", "reject", "detect", "authenticat", "signed", "signature", "replay", "forg", "tamper")
#: What a test body must contain to count as trying an attack (lower-cased source of the function).
ATTACK_EVIDENCE = (
    "pytest.raises",
    "dropped",
    "refused",
    "rejected",
    "tamper",
    "forge",
    "poison",
    "replay",
    "fail_nodes",
    "has_error",
    "does not verify",
)


@cache
def _function_source(path: Path, name: str) -> str:
    text = path.read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return ast.get_source_segment(text, node) or ""
    return ""


def exercises_an_attack(path: Path, name: str | None) -> bool:
    """Whether the cited test tries what the claim says is stopped (see the module docstring).

    A whole file (``name is None``) counts when any of its tests does.
    """
    src = path.read_text(encoding="utf-8") if name is None else _function_source(path, name)
    src = src.lower()
    return any(w in src for w in ATTACK_EVIDENCE)


def claims_a_stopped_attack(claim: str) -> bool:
    """Whether a claim says that something is dropped, refused, detected, authenticated..."""
    c = claim.lower()
    return any(w in c for w in CLAIM_WORDS)


def check_attack_tests(rows: list[tuple[str, str]], where: str) -> int:
    """Every ``(claim, tests cell)`` whose claim says an attack is stopped cites a test that tries it."""
    n = 0
    for claim, cell in rows:
        if not claims_a_stopped_attack(claim):
            continue
        refs = references(cell, where)
        assert any(exercises_an_attack(p, name) for p, name in refs), (
            f"{where}: the claim {claim[:80]!r}... cites no test that tries the attack "
            f"(cited: {[f'{p.name}::{name}' for p, name in refs]})"
        )
        n += 1
    return n


def _table_rows(section: str) -> list[list[str]]:
    rows = [r for r in section.splitlines() if r.startswith("|") and not set(r) <= set("|- ")]
    return [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows[1:]]


def check_refs(text: str, where: str) -> int:
    n = 0
    for path, name in references(text, where):
        if name is not None:
            assert name in _functions(path), f"{where}: {path.relative_to(ROOT)}::{name} does not exist"
        n += 1
    return n


def test_every_adversary_of_the_design_has_a_document():
    names = {p.stem for p in DOCS}
    assert {
        "honest_but_curious_server",
        "curious_client",
        "server_colluding_with_client",
        "network_eavesdropper",
        "model_consumer",
        "malicious_client",
        "failing_client",
    } <= names
    index = (TM / "README.md").read_text(encoding="utf-8")
    for p in DOCS:
        assert f"({p.name})" in index, f"threat_models/README.md does not link {p.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_document_has_the_fixed_shape_and_every_claim_names_an_existing_test(doc):
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Threat model: "), f"{doc.name}: first line must be '# Threat model: ...'"
    heads = [line.strip() for line in text.splitlines() if line.startswith("## ")]
    got = [h for h in heads if any(h.startswith(s) for s in SHAPE)]
    assert [next(s for s in SHAPE if h.startswith(s)) for h in got] == SHAPE, f"{doc.name}: sections {heads}"
    protected = text.split("## What is protected", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in protected.splitlines() if r.startswith("|") and not set(r) <= set("|- ")]
    rows = rows[1:]  # header
    assert rows, f"{doc.name}: 'What is protected' has no claims"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) >= 2 and REF.search(cells[-1]), f"{doc.name}: claim without a test: {row}"
    assert check_refs(text, doc.name) >= len(rows)
    check_attack_tests([(" ".join(c[:-1]), c[-1]) for c in _table_rows(protected)], doc.name)


def test_security_md_cites_only_existing_tests():
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    assert check_refs(text, "SECURITY.md") > 5


def test_security_md_claims_that_stop_an_attack_cite_a_test_that_tries_it():
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    table = text.split("## What is protected today", 1)[1].split("\n## ", 1)[0]
    rows = [(f"{c[0]} {c[1]}", c[-1]) for c in _table_rows(table) if len(c) >= 4]
    assert check_attack_tests(rows, "SECURITY.md") >= 5


def test_the_checker_catches_a_claim_whose_test_does_not_try_the_attack():
    honest_only = "`tests/unit/test_encryption_keys.py::test_presets_meet_128_bit_security`"
    with pytest.raises(AssertionError, match="cites no test that tries the attack"):
        check_attack_tests([("forged contributions are dropped", honest_only)], "x")
    tries = "`tests/unit/test_encryption_attacks.py::test_swapped_signatures_are_dropped`"
    assert check_attack_tests([("forged contributions are dropped", tries)], "x") == 1
    assert check_attack_tests([("the parameters meet 128-bit security", honest_only)], "x") == 0


def test_the_checker_catches_a_missing_test():
    with pytest.raises(AssertionError, match="does not exist"):
        check_refs("`tests/unit/test_threat_models.py::test_that_was_never_written`", "x")
    with pytest.raises(AssertionError, match="does not exist"):
        check_refs("`tests/unit/test_nothing_here.py::test_a`", "x")
