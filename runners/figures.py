"""Report figures: each task's main metric against the compression axis, one line per method, for print.

Every figure is written as PDF (vector, TrueType fonts) and PNG (300 dpi) with panels of one-column width
(3.4 x 2.6 in, 8 pt text). A method keeps one colour and marker in every figure of every report (``method_style``
depends on the method's name alone, ``STYLES``); its variants (``fips [sparsity_block=16]``, ``svd [sweep=B]``) keep the
colour and differ in line style. Points are the mean over seeds, error bars +- one sample std when a point has
several seeds. Dense is a black star at no compression with a dashed line across the panel, drawn above every
method. The x axis is the ratio removed inside the method's scope (linear) or, with ``x="compression"``, the
whole-model compression factor on a log axis (the guideline of ShrinkBench, arXiv 2003.03033).
"""
from __future__ import annotations

import io
import logging
import math
import zlib
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from runners.report import TaskTable

PANEL_IN = (3.4, 2.6)  # one column of a two-column paper
DPI = 300
RC = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
      "legend.fontsize": 6.5, "lines.linewidth": 1.2, "lines.markersize": 4, "pdf.fonttype": 42,
      "ps.fonttype": 42, "savefig.bbox": "tight", "savefig.pad_inches": 0.02}
X_AXES = {"ratio": ("scope/removed_fraction", "removed inside the method's scope", False),
          "compression": ("compression_x", "compression, whole model (x, log)", True)}
# (colour, marker) of every method of methods/: Okabe-Ito colours; the post-training and the train-time methods
# (rarely in one figure) reuse the colours with other markers, so every pair is distinct; the star is dense's
STYLES = {
    "magnitude": ("#0072B2", "o"), "svd": ("#D55E00", "s"), "svd_llm": ("#009E73", "^"),
    "basis_sharing": ("#CC79A7", "D"), "geo_sharing": ("#E69F00", "v"), "fips": ("#56B4E9", "P"),
    "aafm": ("#8C564B", "X"), "gfm": ("#7F7F7F", "<"),
    "stable_rps": ("#D55E00", ">"), "roast": ("#0072B2", "p"), "hashednet": ("#009E73", "h"),
    "mag": ("#CC79A7", "d"), "random": ("#7F7F7F", "8"), "snip": ("#E69F00", "H"), "grasp": ("#56B4E9", "^"),
    "synflow": ("#8C564B", "s"), "ltr": ("#332288", "D"),
}
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#8C564B", "#7F7F7F", "#332288")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "d", "8", "H")
_LINESTYLES = ("-", "--", ":", "-.")
DENSE_STYLE = {"color": "black", "marker": "*", "markersize": 9}


def method_style(label: str) -> dict[str, str]:
    """Colour, marker and line style of a method label; the same label gets the same style in every figure (an
    unknown method's comes from a hash of its name)."""
    from runners.report import base_name, variant_suffix

    name = base_name(label)
    h = zlib.crc32(name.encode())
    colour, marker = STYLES.get(name, (_COLOURS[h % len(_COLOURS)], _MARKERS[h // len(_COLOURS) % len(_MARKERS)]))
    suffix = variant_suffix(label)
    dash = _LINESTYLES[zlib.crc32(suffix.encode()) % (len(_LINESTYLES) - 1) + 1] if suffix else _LINESTYLES[0]
    return {"color": colour, "marker": marker, "linestyle": dash}


def _values(runs: pd.DataFrame, key: str) -> pd.Series:
    if key not in runs.columns:
        return pd.Series(math.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[key], errors="coerce").astype(float)


def draw_panel(ax, tt: "TaskTable", runs: pd.DataFrame, x: str = "ratio") -> None:
    """Draw one task's panel on ``ax`` from ``runs`` (``collect_runs`` output, that task's done runs used)."""
    from runners.report import base_name, column_label

    key, xlabel, log_x = X_AXES[x]
    t = runs[(runs["task"] == tt.task) & (runs["status"] == "done")].copy()
    t["x"], t["y"] = _values(t, key), _values(t, tt.main_metric)
    if x == "ratio":  # runs recorded before scope accounting fall back to the configured ratio
        t["x"] = t["x"].fillna(t["ratio"])
    t = t[t["x"].map(math.isfinite) & t["y"].map(math.isfinite)]
    dense = t[t["method"].map(base_name) == "dense"]
    dense_x = 1.0 if log_x else 0.0
    for meth in tt.methods:
        if base_name(meth) == "dense":
            continue
        m = t[t["method"] == meth]
        if m.empty:
            continue
        g = m.groupby(m["ratio"].round(9)).agg(x=("x", "mean"), y=("y", "mean"), xe=("x", "std"),
                                               ye=("y", "std")).sort_values("x")
        ax.errorbar(g["x"], g["y"], xerr=g["xe"].fillna(0.0), yerr=g["ye"].fillna(0.0), capsize=2, label=meth,
                    zorder=2, **method_style(meth))
    for i, (label, d) in enumerate(dense.groupby("method")):
        y, ye = d["y"].mean(), d["y"].std() if len(d) > 1 else 0.0
        ax.axhline(y, color="black", linestyle="--", linewidth=0.8, zorder=9)
        ax.errorbar([dense_x], [y], yerr=[ye], capsize=2, linestyle="none", zorder=10, label=label,
                    markerfacecolor="black" if i == 0 else "white", **DENSE_STYLE)
    ys = t["y"]
    if not ys.empty and ys.min() > 0 and ys.max() / ys.min() > 50:
        ax.set_yscale("log")
    if log_x:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        low, high = ax.get_xlim()
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if high / low < 30 else (1.0,)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    arrow = {True: " (higher is better)", False: " (lower is better)"}.get(tt.higher_is_better, "")
    ax.set_title(tt.task)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(column_label(tt.main_metric) + arrow)
    ax.grid(alpha=0.3, linewidth=0.5)
    if not t.empty:  # below the axes, so it never covers a point
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)


def render(tables: dict[str, "TaskTable"], runs: pd.DataFrame, x: str = "ratio", fmt: str = "png") -> bytes:
    """One figure (``fmt`` png or pdf) with a panel per task that has a main metric, three panels a row."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n, tt in tables.items() if tt.main_metric]
    ncols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    with rc_context(RC):
        fig = Figure(figsize=(PANEL_IN[0] * ncols, PANEL_IN[1] * nrows), layout="constrained")
        FigureCanvasAgg(fig)
        if not names:
            ax = fig.add_subplot(1, 1, 1)
            ax.text(0.5, 0.5, "no runs with a main metric", ha="center", va="center")
            ax.set_axis_off()
        for i, name in enumerate(names):
            draw_panel(fig.add_subplot(nrows, ncols, i + 1), tables[name], runs, x)
        buf = io.BytesIO()
        fonts = logging.getLogger("fontTools")  # the PDF font subsetting logs every font table at INFO
        level = fonts.level
        fonts.setLevel(max(level, logging.WARNING))
        try:
            fig.savefig(buf, format=fmt, dpi=DPI,
                        metadata={"Software": None} if fmt == "png" else {"CreationDate": None})
        finally:
            fonts.setLevel(level)
    return buf.getvalue()
