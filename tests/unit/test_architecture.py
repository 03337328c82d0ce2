"""The package's layers point down (import-linter contracts in pyproject.toml) and the config stays light."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_linter_contracts_hold():
    """Every contract in ``[tool.importlinter]``: layers that only point down, a privacy core with no model and
    no Flower, a config that imports no torch."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "KEPT" in proc.stdout


def test_reading_a_config_imports_no_torch():
    code = (
        "import sys; from secure_fedvlp.config import load_config; load_config('configs/demo_dp_scratch.toml'); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "reading a config imported torch" + proc.stderr[-2000:]


def _import_cycles(graph) -> list[list[str]]:
    """Strongly connected components (of more than one module) of the package's direct-import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in graph.modules:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return cycles


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph("secure_fedvlp")
    assert _import_cycles(graph) == []
    # the checker finds a planted cycle
    graph.add_import(importer="secure_fedvlp.errors", imported="secure_fedvlp.config")
    assert any("secure_fedvlp.errors" in c for c in _import_cycles(graph))
