"""The repository stands alone: no merge-conflict markers, no references to documents outside it.

Every tracked text file (``git ls-files``; binary files are skipped) is checked for

* merge-conflict markers: a line starting with seven ``<`` or seven ``>``, and a line of exactly
  seven ``=`` (or a diff3 base marker of seven ``|``) when it sits between such markers (a bare
  line of ``=`` is legitimate elsewhere, e.g. a reStructuredText underline);
* references that a reader of the repository cannot follow: the shared directory next to the
  checkout, the style, design and methods documents that lived outside the repository (the
  repository's own documents are ``docs/design.md`` and ``docs/methods.md``, lower case), and
  issue-tracker numbers (the word issue or issues followed by a number, with or without ``#``).

The patterns are assembled from parts so that this file does not match them itself, and each
checker is run on planted text first, so a checker that matches nothing fails here instead of
passing silently.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_OPEN, _MID, _BASE, _CLOSE = "<" * 7, "=" * 7, "|" * 7, ">" * 7
_OUTSIDE_DOCS = "STYLE|DESIGN|METHODS"
#: (what, pattern) pairs; the document names are matched case-sensitively (``docs/design.md`` is fine).
OUTSIDE_REFERENCES = (
    ("the shared directory outside the repository", re.compile(re.escape(".." + "/shared"))),
    ("a document outside the repository", re.compile(rf"\b(?:{_OUTSIDE_DOCS})\.md\b")),
    ("an issue-tracker number", re.compile(r"\bissues?" + r" #?\d+", re.IGNORECASE)),
)


def conflict_markers(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every merge-conflict marker line in ``text``."""
    hits: list[tuple[int, str]] = []
    inside = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith(_OPEN):
            hits.append((n, line))
            inside = True
        elif line.startswith(_CLOSE):
            hits.append((n, line))
            inside = False
        elif inside and (line.rstrip() == _MID or line.startswith(_BASE)):
            hits.append((n, line))
    return hits


def outside_references(text: str) -> list[tuple[int, str, str]]:
    """``(line number, what, line)`` of every reference to something outside the repository."""
    hits: list[tuple[int, str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        for what, pattern in OUTSIDE_REFERENCES:
            if pattern.search(line):
                hits.append((n, what, line.strip()))
    return hits


@cache
def tracked_text_files() -> tuple[tuple[str, str], ...]:
    """``(path, text)`` of every tracked file that is text (UTF-8 without NUL bytes)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:  # pragma: no cover - not a git checkout
        pytest.skip(f"not a git checkout ({exc}); nothing to check")
    files = []
    for name in out.decode("utf-8").split("\0"):
        path = ROOT / name
        if not name or not path.is_file():  # deleted in the work tree, or a submodule
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            files.append((name, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return tuple(files)


def _report(hits: dict[str, list]) -> str:
    lines = []
    for name, found in sorted(hits.items()):
        for hit in found:
            lines.append(f"{name}:{hit[0]}: " + " -- ".join(str(h) for h in hit[1:]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the checkers work
def test_conflict_checker_catches_a_planted_conflict(tmp_path):
    planted = tmp_path / "planted.md"
    planted.write_text(
        "\n".join(
            [
                "# title",
                "=" * 7,
                "text",
                _OPEN + " HEAD",
                "ours",
                _BASE + " base",
                "base",
                _MID,
                "theirs",
                _CLOSE + " branch",
                "=" * 7,
                "",
            ]
        ),
        encoding="utf-8",
    )
    hits = conflict_markers(planted.read_text(encoding="utf-8"))
    # The two bare '=' lines outside the conflict (a heading underline, a separator) are not markers.
    assert [n for n, _ in hits] == [4, 6, 8, 10]


def test_reference_checker_catches_planted_references(tmp_path):
    planted = tmp_path / "planted.toml"
    planted.write_text(
        "\n".join(
            [
                "# see " + ".." + "/shared/notes",
                "# as " + "DESIGN" + ".md says",
                "# (" + "is" + "sue 5)",
                "# " + "Iss" + "ues 4-7 and " + "is" + "sue #12",
                "# docs/design.md and docs/methods.md are the repository's own",
                "# an issue with no number, tissue 5, and #12 alone are not tracker references",
                "",
            ]
        ),
        encoding="utf-8",
    )
    hits = outside_references(planted.read_text(encoding="utf-8"))
    assert [(n, what) for n, what, _ in hits] == [
        (1, "the shared directory outside the repository"),
        (2, "a document outside the repository"),
        (3, "an issue-tracker number"),
        (4, "an issue-tracker number"),
    ]


def test_the_repository_has_text_files_to_check():
    names = {name for name, _ in tracked_text_files()}
    assert {"README.md", "SECURITY.md", "pyproject.toml", "docs/design.md", "docs/methods.md"} <= names
    assert not any(name.endswith(".png") for name in names), "binary files must be skipped"


# ---------------------------------------------------------------------------------- the repository
def test_no_tracked_file_holds_a_merge_conflict_marker():
    hits = {name: found for name, text in tracked_text_files() if (found := conflict_markers(text))}
    assert not hits, "merge-conflict markers:\n" + _report(hits)


@pytest.mark.parametrize("kind", ["non-Python", "Python"])
def test_no_tracked_file_refers_outside_the_repository(kind):
    """Every offending file and line is listed, not just the first."""
    hits = {
        name: found
        for name, text in tracked_text_files()
        if name.endswith(".py") == (kind == "Python") and (found := outside_references(text))
    }
    assert not hits, (
        f"{kind} files refer to documents outside the repository or to issue numbers "
        "(say what the reader needs, or point to docs/design.md or docs/methods.md):\n" + _report(hits)
    )
