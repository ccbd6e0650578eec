"""How the figures look: one style, palettes, titles that fit, and axes whose ticks are the values run.

The pieces plots.py draws with. A figure is a bare matplotlib Figure (no pyplot state), laid out
once when it is finished; matplotlib and seaborn are imported inside the functions, so importing
the package stays quick.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .outcomes import KINDS
from .tables import cell_text, is_percent

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def palette(n: int) -> list:
    """n colours told apart with colour-blindness too."""
    import seaborn as sns

    return sns.color_palette("colorblind", n)


def outcome_colors() -> dict:
    """A colour per measured outcome (outcomes.KINDS), the same in every figure: trained green, degraded
    orange, no learning purple, diverged red."""
    c = palette(8)
    return dict(zip(KINDS, (c[3], c[4], c[1], c[2])))


def condition_colors(names) -> dict:
    """A colour per set of failed conditions (as text, "none" first), grey for none."""
    import seaborn as sns

    names = list(names)
    c = sns.color_palette("Set2", max(len(names), 2))  # not the outcomes' palette: a prediction is no outcome
    return {name: ("0.6" if name == "none" else c[i % len(c)]) for i, name in enumerate(names)}


def figure(ncols: int = 1, width: float = 4.8, height: float = 3.6, sharey: bool = False, ratios=None):
    """A figure of `ncols` panels side by side in seaborn's whitegrid style: (fig, axes); `ratios` (one number
    per panel) widens some panels, `width` being the mean panel's width."""
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))  # laid out once by finish(): no layout engine rerun per save
    with sns.axes_style("whitegrid"):
        axes = fig.subplots(1, ncols, sharey=sharey, squeeze=False,
                            gridspec_kw=dict(width_ratios=ratios) if ratios else None)[0]
    return fig, axes


def finish(fig: Figure) -> Figure:
    """The figure laid out, titles and legends included."""
    fig.tight_layout()
    return fig


def title(ax, text: str, fontsize: float = 9, suptitle: bool = False) -> None:
    """A title wrapped to the width of its axes (or figure), so no line runs off the edge."""
    fig = ax.figure
    inches = fig.get_figwidth() * (0.95 if suptitle else ax.get_position().width)
    chars = int(inches * 72 / (0.55 * fontsize))  # an average glyph is about 0.55 em wide
    lines = "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))
    (fig.suptitle if suptitle else ax.set_title)(lines, fontsize=fontsize)


def metric_label(metric: str) -> tuple[str, float]:
    """The axis label of a metric and the factor its logged values are shown with (100 for percent)."""
    name = metric.replace("_", " ")
    return (f"{name} (%)", 100.0) if is_percent(metric) else (name, 1.0)


def within_percent(ax, metric: str) -> None:
    """Keep a percent axis within 0-100 (with a margin): a t interval over 2 or 3 seeds can reach past both ends
    (t = 12.7 at n = 2), where no error lies; the bars are then cut at the frame, their numbers in the tables."""
    if is_percent(metric):
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, -3.0), min(high, 103.0))


def ordered_text(values: pd.Series) -> list[str]:
    """The distinct values as axis or legend labels, in the order given (aggregate sorts by value)."""
    return list(dict.fromkeys(values.map(cell_text)))


def tag_new(ax, before: int, gid: str) -> None:
    """Name the collections a seaborn call just added (tests and readers find them); drop empty ones."""
    for c in list(ax.collections[before:]):
        if len(c.get_offsets()):
            c.set_gid(gid)
        else:
            c.remove()


def epochs_axis(ax, steps) -> None:
    """Epochs on x: a tick at each epoch run when there are few, whole numbers otherwise."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    ax.set_xlabel("epoch")
    run = np.unique(np.asarray(steps))
    ax.xaxis.set_major_locator(FixedLocator(run) if 0 < len(run) <= 12 else MaxNLocator(integer=True))
    if len(run) == 1:  # one epoch: a point in the middle, not a bare frame
        ax.set_xlim(run[0] - 1, run[0] + 1)


def log_scale(values) -> bool:
    """Whether positive values span 20x or more: rates swept over decades."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return len(v) > 1 and (v > 0).all() and v.max() / v.min() >= 20


def symlog_scale(values) -> float | None:
    """The linear threshold of a symlog axis for values that span decades but include 0 or negatives (a rate
    of 0, a learned delta below 0): the smallest positive |value|; None when a plain or log axis will do."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    positive = np.abs(v[v != 0])
    if len(v) < 2 or (v > 0).all() or len(positive) == 0 or positive.max() / positive.min() < 20:
        return None
    return float(positive.min())


def value_axis(ax, which: str, values, extent=()) -> tuple[float, float]:
    """A numeric axis with ticks exactly at the distinct `values` (log when they span 20x or more; symlog,
    linear below the smallest positive value, when they also hold 0 or negatives); `extent` (e.g. learned
    rates) widens the limits without ticks of its own. Returns the limits set."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    v = np.unique(np.asarray(values, dtype=float))
    every = np.concatenate([v, np.asarray([x for x in extent if np.isfinite(x)], dtype=float)])
    threshold = symlog_scale(every)
    if log_scale(every):
        getattr(ax, f"set_{which}scale")("log")
        lo, hi = every.min() / 1.6, every.max() * 1.6
    elif threshold is not None:
        getattr(ax, f"set_{which}scale")("symlog", linthresh=threshold, linscale=0.5)
        lo = every.min() * 1.6 if every.min() < 0 else -threshold / 2
        hi = every.max() * 1.6
    else:
        pad = 0.15 * (every.max() - every.min()) or 0.25 * abs(every[0]) or 0.5
        lo, hi = every.min() - pad, every.max() + pad
    axis = getattr(ax, f"{which}axis")
    extra = np.setdiff1d(every, v)  # values beyond those run (learned ones)
    few = len(v) < 3 and len(extra) > 0 and threshold is None and not log_scale(every)
    # one or two values run, and learned ones around them: plain ticks, so that the learned ones can be read
    ticks = v
    if threshold is not None and len(extra):  # learned values crossed 0: mark 0, and a round negative if any
        ticks = np.union1d(v, [0.0] + ([-10 ** np.round(np.log10(-every.min()))] if every.min() < 0 else []))
    axis.set_major_locator(MaxNLocator(5) if few else FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda t, _: f"{t:g}"))
    axis.set_minor_locator(NullLocator())  # no unlabelled lines between the values a study ran
    getattr(ax, f"set_{which}lim")(lo, hi)
    return lo, hi
