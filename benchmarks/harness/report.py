"""Tables and plots shared by the benchmarks' reports.

* :func:`markdown_table`, :func:`fmt`, :func:`fmt_bytes` - markdown outputs;
* :func:`plot_style`, :func:`save_figure`, :func:`annotate_bars` - one matplotlib look (Agg, PNG).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (``-`` for missing)."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) < 1e-3:
            return f"{x:.2e}"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """GitHub markdown table; cells are formatted with :func:`fmt` unless already strings."""
    headers = list(headers)
    align = list(align) if align is not None else ["l"] + ["r"] * (len(headers) - 1)
    sep = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep[a] for a in align) + " |"]
    for row in rows:
        cells = [c if isinstance(c, str) else fmt(c) for c in row]
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_STYLE = {
    "figure.figsize": (7.0, 4.2), "figure.dpi": 110, "savefig.dpi": 130, "savefig.bbox": "tight",
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "font.family": "DejaVu Sans",
}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def plot_style():
    """Import pyplot with the Agg backend and apply the shared style; returns ``pyplot``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_STYLE)
    plt.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=COLORS)
    return plt


def annotate_bars(ax, bars, values, fmt_str: str = "{:.2f}", fontsize: int = 7) -> None:
    """Write each (finite) value above its bar."""
    for bar, v in zip(bars, values):
        if v is None or not math.isfinite(v):
            continue
        ax.annotate(fmt_str.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=fontsize, xytext=(0, 1), textcoords="offset points")


def save_figure(fig, path: str | Path, footnote: str | None = None) -> Path:
    """Save ``fig`` as PNG (with an optional small footnote, e.g. device/preset) and close it."""
    plt = plot_style()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if footnote:
        fig.tight_layout()
        fig.text(0.01, 0.0, footnote, fontsize=7, color="0.35", ha="left", va="top")
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def provenance_markdown(records: Sequence[dict] | None) -> str:
    """A markdown section listing each part's commit (clean/dirty), device, preset, command and times."""
    if not records:
        return ""
    rows = []
    for i, rec in enumerate(records, start=1):
        commit = (rec.get("commit") or "?")[:12]
        state = {True: "dirty", False: "clean", None: "unknown"}[rec.get("dirty")]
        if rec.get("dirty") and rec.get("dirty_code") is False:
            state = "results only dirty"
        rows.append([str(i), f"`{commit}` ({state})", f"{rec.get('device') or '-'} ({rec.get('device_name') or '-'})",
                     str(rec.get("preset") or "-"), f"`{rec.get('command') or '-'}`",
                     f"{rec.get('started_utc') or '-'} → {rec.get('finished_utc') or '-'}",
                     str(rec.get("source") or "-")])
    return "## Provenance\n\n" + markdown_table(["part", "commit", "device", "preset", "command", "time (UTC)",
                                                 "record"], rows, align=["l"] * 7)
