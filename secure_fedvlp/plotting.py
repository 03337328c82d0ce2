"""Figures of reports and sweeps: panels of lines, shaded bands, error bars and bars, saved as PNG.

A figure is described by plain data (:class:`Panel` holding :class:`Line` and :class:`Bars`, with
:class:`RefLine` reference lines) and drawn by :func:`save_figure` with matplotlib's Agg backend,
so no display is needed.  matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["Line", "Bars", "RefLine", "Panel", "save_figure", "line_plot", "DPI"]

#: Resolution of every saved figure.
DPI = 110


@dataclass(frozen=True)
class Line:
    """A line (or, with ``linestyle="none"``, markers only) with an optional band or error bars.

    ``band`` is a (lower, upper) pair shaded between; ``yerr`` is a (below, above) pair of error-bar
    lengths.  A line without points and with a label is a legend entry only.  ``color`` takes any
    matplotlib colour, e.g. ``"C0"``, ``"C1"``, ... for the default cycle.
    """

    x: Sequence[float]
    y: Sequence[float]
    label: str | None = None
    color: str | None = None
    linestyle: Any = "-"
    marker: str | None = "o"
    band: tuple[Sequence[float], Sequence[float]] | None = None
    yerr: tuple[Sequence[float], Sequence[float]] | None = None


@dataclass(frozen=True)
class Bars:
    """Bars at ``x`` (numeric positions) of the given ``width``, with optional symmetric error bars."""

    x: Sequence[float]
    height: Sequence[float]
    width: float = 0.8
    yerr: Sequence[float] | None = None
    label: str | None = None


@dataclass(frozen=True)
class RefLine:
    """A horizontal (or, ``vertical=True``, vertical) reference line across the panel."""

    value: float
    label: str | None = None
    color: str = "grey"
    linestyle: Any = "--"
    linewidth: float | None = 0.8
    vertical: bool = False


@dataclass(frozen=True)
class Panel:
    """One set of axes.

    ``xticks`` is (positions, labels); ``integer_x`` puts ticks on whole numbers only (rounds);
    ``grid`` is the axis (``"both"``, ``"x"`` or ``"y"``) whose grid lines are drawn.
    """

    items: Sequence[Line | Bars] = ()
    xlabel: str = ""
    ylabel: str = ""
    refs: Sequence[RefLine] = ()
    xscale: Literal["linear", "log"] = "linear"
    xticks: tuple[Sequence[float], Sequence[str]] | None = None
    integer_x: bool = False
    legend: bool = False
    grid: Literal["both", "x", "y"] = "both"


def _draw(ax: Any, panel: Panel) -> None:
    for item in panel.items:
        if isinstance(item, Bars):
            ax.bar(
                list(item.x),
                list(item.height),
                item.width,
                yerr=None if item.yerr is None else list(item.yerr),
                capsize=3,
                label=item.label,
            )
            continue
        x, y = list(item.x), list(item.y)
        if item.yerr is not None:
            ax.errorbar(
                x,
                y,
                yerr=[list(item.yerr[0]), list(item.yerr[1])],
                marker=item.marker,
                color=item.color,
                linestyle=item.linestyle,
                capsize=4,
                label=item.label,
            )
        else:
            ax.plot(x, y, marker=item.marker, color=item.color, linestyle=item.linestyle, label=item.label)
        if item.band is not None and x:
            ax.fill_between(x, list(item.band[0]), list(item.band[1]), color=item.color, alpha=0.15)
    for ref in panel.refs:
        draw = ax.axvline if ref.vertical else ax.axhline
        kwargs = {} if ref.linewidth is None else {"linewidth": ref.linewidth}
        draw(ref.value, color=ref.color, linestyle=ref.linestyle, label=ref.label, **kwargs)
    if panel.xscale != "linear":
        ax.set_xscale(panel.xscale)
    if panel.xticks is not None:
        ax.set_xticks(list(panel.xticks[0]), list(panel.xticks[1]))
        ax.minorticks_off()
    if panel.integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(axis=panel.grid, alpha=0.3)
    if panel.legend:
        ax.legend(fontsize=8)


def save_figure(
    path: str | os.PathLike,
    panels: Sequence[Panel],
    *,
    title: str | None = None,
    panel_size: tuple[float, float] = (6.0, 4.0),
) -> Path:
    """Draw ``panels`` side by side (each ``panel_size`` inches), save the PNG at ``path`` and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("a figure needs at least one panel")
    path = Path(path)
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False)
    try:
        for ax, panel in zip(axes[0], panels, strict=True):
            _draw(ax, panel)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def line_plot(
    path: str | os.PathLike,
    series: Mapping[str, Mapping[float, float]],
    *,
    xlabel: str,
    ylabel: str,
    ref: RefLine | None = None,
    integer_x: bool = True,
) -> Path:
    """One line per name (sorted) through its ``{x: y}`` points, with a legend; e.g. a value per site over rounds."""
    lines = [Line(list(points), list(points.values()), label=name) for name, points in sorted(series.items())]
    panel = Panel(
        lines, xlabel=xlabel, ylabel=ylabel, refs=() if ref is None else (ref,), integer_x=integer_x, legend=True
    )
    return save_figure(path, [panel])
