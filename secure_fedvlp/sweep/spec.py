"""A sweep file read and validated; the grid of cells; each cell's overrides, name and paths.

See the package docstring (:mod:`secure_fedvlp.sweep`) for the file format and the epsilon axis.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from secure_fedvlp.config import load_config, read_toml
from secure_fedvlp.errors import ConfigError
from secure_fedvlp.layout import RunLayout

__all__ = [
    "EPSILON_KEY",
    "NO_DP",
    "SEED_KEY",
    "VARIANT_KEY",
    "SweepLayout",
    "SweepSpec",
    "cell_id",
    "cell_overrides",
    "is_no_dp",
    "load_sweep",
]

#: The grid key of the privacy-utility axis, and the spread axis.
EPSILON_KEY = "privacy.target_epsilon"
SEED_KEY = "run.seed"
#: How a non-private cell is written on the epsilon axis ("inf" is accepted as a synonym).
NO_DP = "none"
#: The cell key naming a non-private variant (``[sweep.no_dp]``), present only when variants are named.
VARIANT_KEY = "sweep.no_dp"


@dataclass(frozen=True)
class SweepLayout:
    """Every path of a sweep directory (nothing is created or read here).

    Each cell is a run directory of its own (:class:`~secure_fedvlp.layout.RunLayout`) under ``cells/``.
    """

    root: Path

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    def cell(self, cid: str) -> RunLayout:
        """The run directory of the cell named ``cid`` (see :func:`cell_id`)."""
        return RunLayout(self.cells / cid)

    def cell_log(self, cid: str) -> Path:
        """The cell's process output (stdout and stderr)."""
        return self.cells / f"{cid}.log"

    @property
    def state(self) -> Path:
        """Exit status and duration of every cell run so far."""
        return self.root / "sweep_state.json"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_png(self) -> Path:
        return self.root / "summary.png"

    @property
    def tradeoff_png(self) -> Path:
        return self.root / "tradeoff.png"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file."""

    path: Path
    name: str
    base: Path
    output_dir: Path
    group_by: str
    grid: dict[str, tuple[Any, ...]]
    fixed: dict[str, Any] = field(default_factory=dict)
    #: Non-private variants: label -> overrides (empty: one unnamed variant without overrides).
    no_dp_variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.output_dir / self.name

    @property
    def layout(self) -> SweepLayout:
        return SweepLayout(self.root)

    @property
    def has_epsilon_axis(self) -> bool:
        return EPSILON_KEY in self.grid

    def cells(self) -> list[dict[str, Any]]:
        """The distinct cells, in grid order (a non-private cell drops the other ``privacy.*`` axes)."""
        keys = list(self.grid)
        out: list[dict[str, Any]] = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            cell = dict(zip(keys, values, strict=True))
            variants: list[dict[str, Any]] = [cell]
            if self.has_epsilon_axis and is_no_dp(cell[EPSILON_KEY]):
                cell = {
                    k: (NO_DP if k == EPSILON_KEY else v)
                    for k, v in cell.items()
                    if k == EPSILON_KEY or not k.startswith("privacy.")
                }
                variants = [{**cell, VARIANT_KEY: label} for label in self.no_dp_variants] or [cell]
            for c in variants:
                if c not in out:
                    out.append(c)
        return out

    def cell_run(self, cell: dict[str, Any]) -> RunLayout:
        """The run directory of a cell."""
        return self.layout.cell(cell_id(cell))


def is_no_dp(value: Any) -> bool:
    """Whether an epsilon-axis value means "no DP" (``"none"``, ``"inf"`` or ``inf``)."""
    if isinstance(value, str):
        return value.strip().lower() in (NO_DP, "inf", "infinity")
    return isinstance(value, float) and math.isinf(value) and value > 0


def _epsilon_problem(value: Any) -> str | None:
    if is_no_dp(value):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        return f'\'sweep.grid."{EPSILON_KEY}"\' values must be positive numbers or "{NO_DP}" (no DP); found {value!r}.'
    return None


def _toml_value(v: Any) -> str:
    """``v`` as an inline TOML value, the right-hand side of ``--set key=value``."""
    if isinstance(v, dict):
        keys = {k: tomli_w.dumps({str(k): 0}).removesuffix(" = 0\n") for k in v}
        return "{" + ", ".join(f"{keys[k]} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return tomli_w.dumps({"v": v}).removeprefix("v = ").removesuffix("\n")


def cell_overrides(spec: SweepSpec, cell: dict[str, Any]) -> list[str]:
    """``key=value`` overrides of one cell (fixed first, grid values win).

    On the epsilon axis a number turns DP on at that target; "none" turns it off and applies the
    cell's ``[sweep.no_dp]`` variant.
    """
    values = {**spec.fixed, **cell}
    variant = spec.no_dp_variants.get(values.pop(VARIANT_KEY, None), {})
    if EPSILON_KEY in cell:
        eps = values.pop(EPSILON_KEY)
        if is_no_dp(eps):
            values = {
                **{k: v for k, v in values.items() if not k.startswith("privacy.")},
                **variant,
                "privacy.enabled": False,
            }
        else:
            values.update({"privacy.enabled": True, EPSILON_KEY: float(eps)})
    return [f"{k}={_toml_value(v)}" for k, v in values.items()]


def cell_id(cell: dict[str, Any]) -> str:
    """A readable, filesystem-safe, stable directory name for a cell."""
    parts = [f"{k.split('.')[-1]}={v}" for k, v in cell.items()]
    readable = "_".join(parts).replace("/", "-").replace(" ", "")[:80]
    digest = hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:8]
    return f"{readable}_{digest}"


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Parse and validate a sweep file; every cell's config is validated before anything runs."""
    path = Path(path)
    data = read_toml(path, "sweep")
    problems = []
    unknown_top = set(data) - {"sweep"}
    if unknown_top:
        problems.append(f"unknown top-level table(s) {sorted(unknown_top)}; a sweep file has only [sweep].")
    sw = data.get("sweep", {})
    allowed = {"name", "base", "output_dir", "group_by", "grid", "set", "no_dp"}
    for k in sorted(set(sw) - allowed):
        problems.append(f"unknown key 'sweep.{k}' (valid keys here: {', '.join(sorted(allowed))}).")
    grid = sw.get("grid", {})
    if not isinstance(grid, dict) or not grid:
        problems.append("'sweep.grid' must be a non-empty table of dotted keys -> lists of values.")
        grid = {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            problems.append(f"'sweep.grid.\"{k}\"' must be a non-empty list; found {v!r}.")
        elif k == EPSILON_KEY:
            problems.extend(p for p in map(_epsilon_problem, v) if p)
    if "privacy.enabled" in grid and EPSILON_KEY in grid:
        problems.append(
            f'\'sweep.grid\' has both "privacy.enabled" and "{EPSILON_KEY}"; the epsilon axis '
            f'already turns DP on (a number) and off ("{NO_DP}").'
        )
    no_dp = sw.get("no_dp", {})
    if not isinstance(no_dp, dict) or not all(isinstance(v, dict) for v in no_dp.values()):
        problems.append(
            "'sweep.no_dp' must hold one table per non-private variant ([sweep.no_dp.\"<label>\"] of "
            f"dotted keys -> values); found {no_dp!r}."
        )
        no_dp = {}
    elif no_dp and EPSILON_KEY not in grid:
        problems.append(
            f"'sweep.no_dp' names variants of the non-private cells of the epsilon axis, but the grid has no "
            f'"{EPSILON_KEY}" axis.'
        )
    base = path.parent / str(sw.get("base", ""))
    if not sw.get("base") or not base.is_file():
        problems.append(
            f"'sweep.base' must name an experiment config next to the sweep file; {str(base)!r} does not exist."
        )
    group_by = str(sw.get("group_by", next(iter(grid), "")))
    if grid and group_by not in grid:
        problems.append(f"'sweep.group_by' = {group_by!r} is not one of the grid keys {sorted(grid)}.")
    if problems:
        raise ConfigError(problems, source=str(path))
    spec = SweepSpec(
        path=path,
        name=str(sw.get("name", path.stem)),
        base=base,
        output_dir=Path(str(sw.get("output_dir", "runs/sweeps"))),
        group_by=group_by,
        grid={k: tuple(v) for k, v in grid.items()},
        fixed=dict(sw.get("set", {})),
        no_dp_variants={str(k): dict(v) for k, v in no_dp.items()},
    )
    cell_problems = []
    for cell in spec.cells():
        try:
            load_config(spec.base, cell_overrides(spec, cell))
        except ConfigError as exc:
            cell_problems.append(f"cell {cell}: " + "; ".join(exc.problems))
    if cell_problems:
        raise ConfigError(cell_problems, source=str(path))
    return spec
