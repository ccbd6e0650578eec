"""Figures of a study: ablations and training curves; `save_figure` (the memory-rate figures: stability_plots.py).

Every figure is drawn from runs (the shape in store.py) or metric histories and returned as a
matplotlib Figure (no pyplot state: the report and the notebooks save or display it). Each title
says what its bars or band are and over how many seeds. The ablations' swept values sit on categorical
axes (the title says so), so the ticks are exactly the values a study ran; the memory-rate figures put
the rates at numeric positions (stability_plots.py). Error bars and bands are the mean's 95% Student t
interval (`uncertainty.t_errorbar`, given to seaborn as its `errorbar`: the same interval as the tables).
How they look (style, palettes, titles, axes) is in style.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from stawm import schema

from . import style
from .files import write_whole
from .stats import aggregate, included, rate_fields
from .tables import cell_text, interval_phrase
from .uncertainty import t_errorbar

if TYPE_CHECKING:  # matplotlib and seaborn are imported where used: `import` of the package stays quick
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DODGE = 0.8  # the width seaborn's dodged strips and swarms share among hue levels, per category
SEEDS_ASIDE = 9  # typographic points the seeds' dots sit right of their mean, so neither hides the other
FLAGGED = "0.3"  # dark grey, the colour of runs left out of the statistics: no series' colour


def ablation_fields() -> tuple[str, ...]:
    """The fields the ablations notebook plots (those a study sweeps)."""
    return ("glimpse_size", "glimpses", *rate_fields())


# --- ablations ----------------------------------------------------------------------------------


def plot_ablation(runs: pd.DataFrame, x: str, metric: str | None = None, seeds_expected: int | None = None,
                  exclude_flagged: bool = False, hue: str | None = None, *, ax: Axes | None = None) -> Figure:
    """`metric` against config field `x`: the mean over seeds with its 95% t interval, with every seed's point.

    `x` is categorical (the title says so), one tick per value the runs have. `hue` (another swept field) draws one
    series per value, side by side, so that different configurations are not pooled. Flagged runs
    count like any other (the title says how many) unless `exclude_flagged`, which draws them as
    crosses left out of the statistics; a configuration short of
    `seeds_expected` seeds is labelled n=k/N. Given `ax`, it draws there (one panel of the caller's
    figure, which the caller lays out) and returns that figure; otherwise a figure of its own.
    """
    from matplotlib.lines import Line2D

    metric = metric or schema.TEST_ERROR
    agg = aggregate(runs, [x] + ([hue] if hue else []), metric, seeds_expected, exclude_flagged)
    label, scale = style.metric_label(metric)
    order = style.ordered_text(agg[x])
    levels = style.ordered_text(agg[hue]) if hue else [None]
    colors = style.palette(max(len(levels), 2))
    finite = np.isfinite(runs[metric].astype(float))
    used = included(runs, exclude_flagged) & finite
    left_out = ~used & finite & runs["flagged"].astype(bool)
    data = pd.DataFrame({"x": runs[x].map(cell_text), "y": runs[metric].astype(float) * scale,
                         "hue": runs[hue].map(cell_text) if hue else ""})
    own = ax is None
    fig, (ax,) = style.figure() if own else (ax.figure, (ax,))
    _seeds_and_means(fig, ax, data[used], data[left_out], order, levels if hue else None, colors)
    _label_short(ax, agg, x, hue, order, levels, colors, scale, seeds_expected or agg["n"].max())
    ax.set_xticks(range(len(order)), order)
    ax.set_xlim(-0.5, len(order) - 0.5)
    if not used.any() and not left_out.any():
        ax.text(0.5, 0.5, f"no run has a finite {metric}", transform=ax.transAxes, ha="center")
        ax.set_yticks([])
    ax.set_xlabel(x)
    ax.set_ylabel(label)
    style.within_percent(ax, metric)
    handles = [] if hue else [Line2D([], [], marker="o", linestyle="none", color=colors[0], alpha=0.5,
                                     label="each seed")]
    if left_out.any():
        handles.append(Line2D([], [], marker="X", linestyle="none", color=FLAGGED, label="flagged (left out)"))
    handles += [Line2D([], [], marker="s", color=colors[j] if hue else "black",
                       label=f"{hue}={level}" if hue else "mean [95% t interval]") for j, level in enumerate(levels)]
    ax.legend(handles=handles, fontsize=7)
    spread = interval_phrase(agg, "n=k/N where fewer", formula=False)
    if seeds_expected is not None and not agg["complete"].all():
        spread += " (n=k/N where fewer)"
    flagged = int(runs["flagged"].astype(bool).sum())
    counted = (f"; {flagged} flagged runs left out (crosses)" if exclude_flagged and flagged else
               f"; {flagged} of {len(runs)} runs flagged, all counted" if flagged else "")
    style.title(ax, f"{label} against {x} (categorical axis: the values run)\n{spread}; dots: seeds{counted}")
    return style.finish(fig) if own else fig


def _seeds_and_means(fig, ax, used: pd.DataFrame, left_out: pd.DataFrame, order: list[str],
                     levels: list[str] | None, colors: list) -> None:
    """Seaborn's three layers of an ablation: a swarm of the seeds (set aside, right of their mean),
    crosses for the flagged runs left out, and the mean of the seeds with its 95% t interval on top."""
    import seaborn as sns
    from matplotlib.transforms import ScaledTranslation

    where = dict(x="x", y="y", order=order, legend=False, ax=ax)
    if levels is not None:  # one series per level of the hue, side by side
        where.update(hue="hue", hue_order=levels, dodge=True)
    paint = dict(palette=colors[:len(levels)]) if levels is not None else dict(color=colors[0])
    before = len(ax.collections)
    if len(used):
        sns.swarmplot(data=used, size=4, alpha=0.5, zorder=2, **where, **paint)
    style.tag_new(ax, before, "seed")
    aside = ScaledTranslation(SEEDS_ASIDE / 72, 0, fig.dpi_scale_trans)
    for c in ax.collections[before:]:
        c.set_offset_transform(ax.transData + aside)
    before = len(ax.collections)
    if len(left_out):
        sns.stripplot(data=left_out, jitter=False, marker="X", size=6, zorder=3, **where,
                      **(dict(palette=[FLAGGED] * len(levels)) if levels is not None else dict(color=FLAGGED)))
    style.tag_new(ax, before, "flagged (left out)")
    if len(used):
        lines = len(ax.lines)
        if levels is not None:  # seaborn's dodge for points spans the centres of its dodged swarms
            paint = dict(paint, dodge=DODGE * (len(levels) - 1) / len(levels))
        sns.pointplot(data=used, errorbar=t_errorbar, markers="s", markersize=5, linestyle="none", capsize=0.08,
                      zorder=4, err_kws=dict(linewidth=1.2),
                      **{**where, **(paint if levels is not None else dict(color="black"))})
        for line in ax.lines[lines:]:  # with a marker: the means; bare segments: the interval bars
            line.set_gid("mean" if line.get_marker() not in (None, "None", "") else "interval")


def _label_short(ax, agg: pd.DataFrame, x: str, hue: str | None, order: list[str], levels: list,
                 colors: list, scale: float, target: int) -> None:
    """n=k/N beside each configuration short of its seeds: left of the mean (the seeds are on its
    right), or at the foot of the axes when n=0 leaves no mean."""
    step = DODGE / len(levels) if hue else 0
    for r in agg[~agg["complete"]].to_dict("records"):
        j = levels.index(cell_text(r[hue])) if hue else 0
        at = order.index(cell_text(r[x])) + step * (j - (len(levels) - 1) / 2)
        color = colors[j] if hue else FLAGGED
        if r["n"]:
            ax.annotate(f"n={r['n']}/{target}", (at, r["mean"] * scale), textcoords="offset points",
                        xytext=(-7, 0), ha="right", va="center", fontsize=7, color=color)
        else:
            ax.annotate(f"n=0/{target}", (at, 0), xycoords=("data", "axes fraction"), textcoords="offset points",
                        xytext=(0, 4), ha="center", va="bottom", fontsize=7, color=color)


def ablation_figures(runs: pd.DataFrame, fields: Sequence[str], metric: str | None = None,
                     seeds_expected: int | None = None, exclude_flagged: bool = False,
                     swept: Sequence[str] = ()) -> dict[str, Figure]:
    """`plot_ablation` for each field, named "ablation_<field>"; the other `swept` field (if any) is the
    hue, so that configurations differing in it are not pooled. A study sweeping three fields or more
    gets none: each 1-D plot would pool configurations of the third (its grid is the heat maps' job)."""
    figures = {}
    if len(swept) > 2:
        return figures
    for f in fields:
        hue = next((s for s in swept if s != f), None)
        figures[f"ablation_{f}"] = plot_ablation(runs, f, metric, seeds_expected, exclude_flagged, hue)
    return figures


# --- curves -------------------------------------------------------------------------------------


def plot_curves(history: pd.DataFrame, by: str | Sequence[str] = (), runs: pd.DataFrame | None = None,
                exclude_flagged: bool = False) -> Figure:
    """Mean curve over seeds with its 95% t interval as a band (bars for a single epoch), one per configuration.

    `by` names runs columns (config fields) that tell configurations apart: the first sets the
    colour, a second the line style, three or more one colour per combination. `runs` supplies
    them when the history lacks them, and drops flagged runs when `exclude_flagged`.
    """
    import seaborn as sns

    by = [by] if isinstance(by, str) else list(by)
    if runs is not None and len(by) > 2:  # too many lines for a band and a legend each
        return _curve_per_configuration(history, by, runs, exclude_flagged)
    if runs is not None:
        keep = runs[~runs["flagged"].astype(bool)] if exclude_flagged else runs
        history = history.merge(keep[["run_id"] + [c for c in by if c not in history]], on="run_id")
    metric = history["metric"].iloc[0] if len(history) else "value"
    label, scale = style.metric_label(metric)
    data = pd.DataFrame({"step": history["step"], "y": history["value"] * scale, "run_id": history["run_id"]})
    roles = {}  # seaborn semantic -> the column of text labels behind it
    if len(by) in (1, 2):
        for role, name in zip(("hue", "style"), by):
            data[name] = history[name].map(cell_text)
            roles[role] = name
    elif by:
        data["configuration"] = history[by].apply(lambda r: ", ".join(f"{c}={cell_text(r[c])}" for c in by), axis=1)
        roles["hue"] = "configuration"
    fig, (ax,) = style.figure(width=5.6)
    if len(data):
        order = {role: style.ordered_text(history.sort_values(by)[name] if name in by else data[name])
                 for role, name in roles.items()}
        sns.lineplot(data=data, x="step", y="y", errorbar=t_errorbar, ax=ax,
                     err_style="bars" if data["step"].nunique() < 2 else "band",
                     **{role: name for role, name in roles.items()},
                     **{f"{role}_order": o for role, o in order.items()},
                     **(dict(palette=style.palette(len(order["hue"]))) if "hue" in roles
                        else dict(color=style.palette(1)[0])),
                     **(dict(markers=True, dashes=True) if "style" in roles else dict(marker="o")))
        per_line = data.groupby([data[n] for n in roles.values()] or [np.zeros(len(data))])["run_id"].nunique()
        seeds = f"{per_line.min()}" if per_line.min() == per_line.max() else f"{per_line.min()}–{per_line.max()}"
    else:
        seeds = "0"
        ax.text(0.5, 0.5, "no history", transform=ax.transAxes, ha="center")
    style.epochs_axis(ax, data["step"])
    ax.set_ylabel(label)
    style.within_percent(ax, metric)
    left = "; flagged runs left out" if exclude_flagged and runs is not None else ""
    style.title(ax, (f"{label}: 1 seed per line{left}" if seeds == "1"  # a line per run: no spread to show
                     else f"{label}: mean [95% t interval] over {seeds} seeds per line{left}"))
    if ax.get_legend() is not None:  # seaborn's, titled by the field(s): smaller, not rebuilt
        sns.move_legend(ax, "best", fontsize=7, title_fontsize=7)
    return style.finish(fig)


def _curve_per_configuration(history: pd.DataFrame, by: list[str], runs: pd.DataFrame,
                             exclude_flagged: bool) -> Figure:
    """The mean curve of every configuration of three or more swept fields as a thin line, coloured by
    the first field: a band and a legend entry per configuration would cover the plot."""
    import seaborn as sns

    keep = runs[~runs["flagged"].astype(bool)] if exclude_flagged else runs
    data = history.merge(keep[["run_id", *by]], on="run_id")
    label, scale = style.metric_label(data["metric"].iloc[0] if len(data) else "value")
    means = data.groupby([*by, "step"], dropna=False)["value"].mean().mul(scale).reset_index(name="y")
    means["configuration"] = means[by].astype(str).agg(",".join, axis=1)
    means[by[0]] = means[by[0]].map(cell_text)
    fig, (ax,) = style.figure(width=5.6)
    hues = style.ordered_text(means.sort_values(by[0])[by[0]])
    sns.lineplot(data=means, x="step", y="y", hue=by[0], hue_order=hues, units="configuration", estimator=None,
                 palette=style.palette(len(hues)), linewidth=0.8, alpha=0.7, marker="o", markersize=3, ax=ax)
    style.epochs_axis(ax, means["step"])
    ax.set_ylabel(label)
    seeds = data.groupby(by, dropna=False)["run_id"].nunique()
    n = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}–{seeds.max()}"
    left = ", flagged runs left out" if exclude_flagged else ""
    style.title(ax, f"{label}: {means['configuration'].nunique()} configurations of {', '.join(by)}, each the "
                    f"mean over {n} seeds{left}; colour: {by[0]}")
    sns.move_legend(ax, "best", fontsize=7, title_fontsize=7)
    return style.finish(fig)


def save_figure(fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write the figure as out_dir/name.<format> for each format, each file whole; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_whole(out / f"{name}.{ext}", lambda tmp, ext=ext: fig.savefig(tmp, dpi=150, format=ext))
            for ext in formats]
