"""Figures of a memory-rate study: the condition map and the outcome map side by side in meaning,
test-error heat maps, error against each rate, learned rate trajectories.

Each takes runs (the shape in store.py), and where outcomes show, `outcomes.measure`'s frame, or a
history of the rates, and returns a Figure. The rates are on numeric axes with ticks at the swept
values (log where they span decades), so the `decay` line (delta = 1) and the eta = delta line fall
where they belong; theta makes the panels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stawm import schema

from . import style
from .outcomes import KINDS, outcome
from .stats import aggregate, learnable

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _theta_facets(theta: pd.Series) -> pd.Series:
    if theta.nunique() <= 6:
        return theta.map(lambda t: f"θ = {t:g}")
    return pd.qcut(theta, 4, duplicates="drop").astype(str).map(lambda s: f"θ in {s}")


def _dodged(fig: Figure, ax, x, y, points: float, **scatter) -> None:
    """Scatter shifted sideways by a number of typographic points (so outcomes at one point show)."""
    from matplotlib.transforms import ScaledTranslation

    ax.scatter(x, y, transform=ax.transData + ScaledTranslation(points / 72, 0, fig.dpi_scale_trans), **scatter)


def condition_sets(runs: pd.DataFrame) -> pd.Series:
    """Each run's failed flagging conditions as one text ("decay+writes"), "none" when it met them all."""
    return runs["flags"].fillna("").map(lambda s: "+".join(sorted(f for f in s.split(",") if f)) or "none")


def _ordered_sets(sets: pd.Series) -> list[str]:
    return sorted(sets.unique(), key=lambda s: (s != "none", s.count("+"), s))


def _rate_map(runs: pd.DataFrame, colour: pd.Series, colours: dict, marker: pd.Series, markers: dict,
              title: str, legend_title: str) -> Figure:
    """Each run at (delta, eta), one panel per theta: `colour` and `marker` (by run) pick its look.

    Ticks sit at the swept values. Marker size and the number beside it count the runs at a point;
    different looks at one point are drawn side by side. The lines are the derived `decay` condition's
    edge (delta = 1) and the informational reading eta = delta, drawn where they cross the panel.
    """
    from matplotlib.lines import Line2D

    delta, eta, theta = schema.RATE_METRICS  # the config fields of the rates, named as their metrics
    facets = _theta_facets(runs[theta])
    names = sorted(facets.unique(), key=lambda s: runs.loc[facets == s, theta].min())
    fig, axes = style.figure(len(names), width=4.2, height=3.8, sharey=True)
    looks = pd.DataFrame({"colour": colour.to_numpy(), "marker": marker.to_numpy()}, index=runs.index)
    for ax, name in zip(axes, names):
        here = runs.loc[facets == name, [delta, eta]].join(looks)
        counts = here.groupby([delta, eta, "colour", "marker"]).size().reset_index(name="count")
        rank = counts.groupby([delta, eta]).cumcount()  # looks at one point, side by side
        shift = 7 * (rank - (counts.groupby([delta, eta])["count"].transform("size") - 1) / 2)
        for (d, e, c, m, n), pt in zip(counts.itertuples(index=False), shift):
            _dodged(fig, ax, [d], [e], pt, s=30 + 20 * n, color=colours[c], marker=markers[m], zorder=3,
                    edgecolor="white", linewidth=0.5)
            if n > 1:
                ax.annotate(str(n), (d, e), textcoords="offset points", xytext=(pt, 7), ha="center",
                            fontsize=6, color=colours[c])
        x_lo, x_hi = style.value_axis(ax, "x", runs[delta])
        y_lo, y_hi = style.value_axis(ax, "y", runs[eta])
        if x_lo <= 1.0 <= x_hi:
            ax.axvline(1.0, color="grey", linestyle="--", linewidth=1, label="δ = 1 (decay, derived)")
        lo, hi = max(x_lo, y_lo), min(x_hi, y_hi)
        if lo < hi:
            ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1, label="η = δ (informational)")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("delta (δ)")
    axes[0].set_ylabel("eta (η)")
    handles = {f"c:{k}": Line2D([], [], marker="o", linestyle="none", color=v, label=k)
               for k, v in colours.items() if (colour == k).any()}  # one marker size: the size means a count
    if len(set(marker)) > 1:
        handles.update({f"m:{k}": Line2D([], [], marker=v, linestyle="none", color="0.3", label=f"conditions: {k}")
                        for k, v in markers.items() if (marker == k).any()})
    for ax in axes:  # the reference lines, once each
        handles.update((lab, h) for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in handles)
    axes[-1].legend(handles=list(handles.values()), loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7,
                    title=legend_title, title_fontsize=7)
    style.title(axes[0], title, 10, suptitle=True)
    return style.finish(fig)


MARKERS = ("o", "X", "s", "D", "^", "v", "P", "*")


def plot_condition_map(runs: pd.DataFrame) -> Figure:
    """The predictions: each run at (delta, eta), one panel per theta, coloured by the flagging conditions
    it failed (before or during training), grey where it met them all."""
    sets = condition_sets(runs)
    colours = style.condition_colors(_ordered_sets(sets))
    return _rate_map(runs, sets, colours, sets.map(lambda _: "o"), {"o": "o"},
                     f"Appendix A conditions failed by each of {len(runs)} runs (predictions; marker size and "
                     f"number: runs at a point)", "conditions failed")


def plot_outcome_map(runs: pd.DataFrame, measured: pd.DataFrame) -> Figure:
    """The outcomes: each run at (delta, eta), one panel per theta, coloured by what happened to it
    (`outcomes.outcome`), its marker the set of conditions it failed: where colour and marker disagree,
    the conditions mispredicted."""
    kinds = outcome(measured).reindex(runs["run_id"]).set_axis(runs.index)
    sets = condition_sets(runs)
    markers = dict(zip(_ordered_sets(sets), MARKERS * 2))
    return _rate_map(runs, kinds, style.outcome_colors(), sets, markers,
                     f"measured outcome of each of {len(runs)} runs (colour) and the conditions it failed (marker)",
                     "outcome")


def plot_rate_trajectories(history: pd.DataFrame, runs: pd.DataFrame | None = None,
                           measured: pd.DataFrame | None = None) -> Figure:
    """Learned delta, eta, theta per epoch, one line per run and a panel per rate.

    `history` is `metric_histories(runs, schema.RATE_METRICS, ...)`; with `runs`, only learnable
    runs are drawn; with `measured` (`outcomes.measure`), coloured by outcome.
    """
    import seaborn as sns
    from matplotlib.lines import Line2D

    if runs is not None:
        history = history[history["run_id"].isin(learnable(runs)["run_id"])]
    rates = [r for r in schema.RATE_METRICS if r in set(history["metric"])]
    if not rates:
        raise ValueError(f"no rate histories ({', '.join(schema.RATE_METRICS)}) of learnable runs to plot")
    kinds = outcome(measured) if measured is not None else None
    data = history.assign(outcome=history["run_id"].map(kinds) if kinds is not None else KINDS[-1])
    present = [k for k in KINDS if k in set(data["outcome"])]
    colors = style.outcome_colors()
    fig, axes = style.figure(len(rates), width=3.8)
    for ax, rate in zip(axes, rates):
        sns.lineplot(data=data[data["metric"] == rate], x="step", y="value", hue="outcome", hue_order=present,
                     palette=colors, units="run_id", estimator=None, marker="o", markersize=4, linewidth=1,
                     alpha=0.7, legend=False, ax=ax)
        if rate == schema.RATE_METRICS[0]:  # delta: the decay bound
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(rate, fontsize=10)
        style.epochs_axis(ax, data["step"])
        ax.set_ylabel("rate" if ax is axes[0] else "")
    handles = [Line2D([], [], marker="o", markersize=4, color=colors[k], label=k) for k in present]
    axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    style.title(axes[0], f"learned memory rates of {data['run_id'].nunique()} runs "
                         f"(one line per run; dashed: δ = 1)", 10, suptitle=True)
    return style.finish(fig)


def plot_error_heatmaps(runs: pd.DataFrame, metric: str | None = None, threshold: float | None = None) -> Figure:
    """Mean test error (%) over the seeds at each (delta, eta), one heat map per theta.

    Every run counts, flagged ones included (the map asks what happens at each setting). Each panel has
    its own linear colour scale (errors at theta = 0 sit near chance and would flatten every other
    panel's), with its bar. A cell reads "div" where every seed diverged (no error to average); a "*"
    marks a setting where some seed broke a flagging condition; with `threshold` (a fraction: the
    failure threshold, e.g. `degraded`'s), cells at or above it are outlined in red and the bars
    show it as a line. Every panel has every swept delta and eta (a blank cell: not run).
    """
    import seaborn as sns
    from matplotlib.patches import Rectangle

    metric = metric or schema.TEST_ERROR
    delta, eta, theta = schema.RATE_METRICS
    agg = aggregate(runs, [delta, eta, theta], metric)
    diverged = runs.groupby([delta, eta, theta])["diverged"].agg(["sum", "size"]).reset_index()
    agg = agg.merge(diverged, on=[delta, eta, theta])
    agg = agg.assign(pct=100 * agg["mean"], flagged_any=agg["flagged"] > 0,
                     all_diverged=(agg["sum"] == agg["size"]) & (agg["size"] > 0))
    rows, columns = sorted(agg[eta].unique(), reverse=True), sorted(agg[delta].unique())
    thetas = sorted(agg[theta].unique())
    label = style.metric_label(metric)[0]
    fig, axes = style.figure(len(thetas), width=0.75 * len(columns) + 2.0, height=0.55 * len(rows) + 1.8)
    for k, (ax, t) in enumerate(zip(axes, thetas)):
        here = agg[agg[theta] == t]

        def grid(column: str, here=here) -> pd.DataFrame:
            return here.pivot(index=eta, columns=delta, values=column).reindex(index=rows, columns=columns)

        pct = grid("pct").astype(float)
        flagged = grid("flagged_any").fillna(False).to_numpy(dtype=bool)
        text = np.where(np.isnan(pct), "", pct.map(lambda v: f"{v:.1f}").to_numpy() + np.where(flagged, "*", ""))
        low, high = np.nanmin(pct.to_numpy()), np.nanmax(pct.to_numpy())
        low, high = (low - 0.5, high + 0.5) if high - low < 0.1 else (low, high)  # one value: a scale around it
        sns.heatmap(pct, annot=text, fmt="", ax=ax, cmap="viridis_r", linewidths=0.5, linecolor="white",
                    vmin=low, vmax=high,
                    cbar_kws={"label": f"{label}, mean of seeds"}, annot_kws={"fontsize": 7})
        ax.grid(False)
        if threshold is not None:
            bar = ax.collections[0].colorbar
            if bar.vmin <= 100 * threshold <= bar.vmax:
                bar.ax.axhline(100 * threshold, color="red", linewidth=1.5)
            for i, j in zip(*np.nonzero((pct >= 100 * threshold).to_numpy())):
                ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        for i, j in zip(*np.nonzero(grid("all_diverged").fillna(False).to_numpy(dtype=bool))):
            ax.text(j + 0.5, i + 0.5, "div", ha="center", va="center", fontsize=7, color="red")  # no mean to colour
        ax.set_title(f"θ = {t:g}", fontsize=10)
        ax.set_xlabel("delta (δ)")
        ax.set_ylabel("eta (η)" if k == 0 else "")
        ax.set_xticklabels([f"{c:g}" for c in columns], rotation=0)
        ax.set_yticklabels([f"{r:g}" for r in rows], rotation=0)
    n = int(agg["n"].max()) if len(agg) else 0
    over = "one seed per cell" if n == 1 else f"mean over up to {n} seeds per cell"
    marked = f"; red: at or above the failure threshold {100 * threshold:.1f}%" if threshold is not None else ""
    style.title(axes[0], f"{label}: {over}, every run counted; linear colour scale per panel; *: a seed failed "
                         f"an Appendix A condition; div: every seed diverged{marked}", 10, suptitle=True)
    return style.finish(fig)


def plot_error_by_rate(runs: pd.DataFrame, metric: str | None = None) -> Figure:
    """Test error against each rate in turn, one panel per rate: the mean ± std (ddof=1) over every run at
    that value (seeds and the other rates pooled), one line per theta in the delta and eta panels (theta
    decides more than the others: with ReLU6, theta = 0 writes nothing). Every run counts; a log scale
    keeps both chance and a few percent readable."""
    import seaborn as sns
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    metric = metric or schema.TEST_ERROR
    label, scale = style.metric_label(metric)
    delta, eta, theta = schema.RATE_METRICS
    data = runs.assign(y=runs[metric].astype(float) * scale, θ=runs[theta].map(lambda t: f"{t:g}"))
    levels = [f"{t:g}" for t in sorted(runs[theta].unique())]
    fig, axes = style.figure(3, width=3.8, sharey=True)
    for ax, rate in zip(axes, (delta, eta, theta)):
        hue = dict(hue="θ", hue_order=levels, palette=style.palette(len(levels))) if rate != theta else dict(
            color=style.palette(1)[0])
        sns.pointplot(data=data, x=rate, y="y", errorbar="sd", markersize=4, linewidth=1, capsize=0.1,
                      dodge=0.3 if rate != theta and len(levels) > 1 else False, ax=ax, **hue)
        ax.set_xticks(range(runs[rate].nunique()), [f"{v:g}" for v in sorted(runs[rate].unique())])
        ax.set_xlabel(rate)
        ax.set_ylabel(label if ax is axes[0] else "")
        ax.set_yscale("log")  # a memory that writes nothing sits near chance, the rest at a few percent
        ax.yaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50, 90]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        if ax.get_legend() is not None and ax is not axes[1]:
            ax.get_legend().remove()
    sns.move_legend(axes[1], "best", fontsize=7, title_fontsize=7)
    style.title(axes[0], f"{label} against each rate: mean ± std (ddof=1) over every run at a value "
                         f"({len(runs)} runs, every run counted; log scale)", 10, suptitle=True)
    return style.finish(fig)


MEMORY_STATE = ("readout_dead", "readout_saturated", "max_abs_w")  # the last epoch's, logged by every run


def plot_memory_state(runs: pd.DataFrame) -> Figure:
    """What the memory looked like at the end of training, against delta, one line per theta: the fraction
    of read-outs sigma(W q) at 0 (dead units) and at Lambda (saturated), and the largest |W| (log scale).
    Read-outs: mean ± std (ddof=1) over every run at a value (seeds and eta pooled); |W|, which spans orders of
    magnitude and is never negative: median and interquartile range. Every run counts."""
    import seaborn as sns

    delta, _, theta = schema.RATE_METRICS
    missing = [m for m in MEMORY_STATE if m not in runs]
    if missing:
        raise ValueError(f"the runs logged no {', '.join(missing)} (runs older than the memory statistics)")
    levels = [f"{t:g}" for t in sorted(runs[theta].unique())]
    data = runs.assign(θ=runs[theta].map(lambda t: f"{t:g}"))
    labels = {"readout_dead": "read-outs at 0 (%)", "readout_saturated": "read-outs at Λ (%)",
              "max_abs_w": "max |W| (median, quartiles)"}
    fig, axes = style.figure(3, width=3.8)
    for ax, metric in zip(axes, MEMORY_STATE):
        w_panel = metric == "max_abs_w"  # |W|: heavy-tailed, never negative
        sns.pointplot(data=data.assign(y=data[metric].astype(float) * (1 if w_panel else 100)), x=delta, y="y",
                      hue="θ", hue_order=levels, palette=style.palette(len(levels)),
                      estimator="median" if w_panel else "mean", errorbar=("pi", 50) if w_panel else "sd",
                      markersize=4, linewidth=1, capsize=0.1, dodge=0.3 if len(levels) > 1 else False, ax=ax)
        ax.set_xticks(range(runs[delta].nunique()), [f"{v:g}" for v in sorted(runs[delta].unique())])
        ax.set_xlabel("delta (δ)")
        ax.set_ylabel(labels[metric])
        if w_panel:
            ax.set_yscale("symlog", linthresh=1e-3)  # W = 0 exactly where nothing is written
            ax.set_ylim(bottom=0)
        if ax is not axes[-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), fontsize=7, title_fontsize=7)
    style.title(axes[0], f"the memory at the last epoch (each run's mean over its steps; max over them for |W|), "
                         f"every run at a δ ({len(runs)} runs): read-outs mean ± std, |W| median and quartiles",
                10, suptitle=True)
    return style.finish(fig)
