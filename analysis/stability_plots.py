"""Figures of a memory-rate study: outcome map, test-error heat maps, learned rate trajectories.

Each takes runs (the shape in store.py), or a history of the rates, and returns a Figure. The rates
are on numeric axes with ticks at the swept values (log where they span decades), so the `decay`
line (delta = 1) and the eta = delta line fall where they belong; theta makes the panels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stawm import schema

from . import style
from .stats import OUTCOMES, aggregate, learnable, outcome

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


def plot_stability_map(runs: pd.DataFrame) -> Figure:
    """Each run at (delta, eta), one panel per theta, coloured by its Appendix A outcome.

    Ticks sit at the swept values. Marker size and the number beside it count the runs at a
    point; outcomes at one point are drawn side by side. The lines are the `decay` condition
    (delta = 1) and the `eta_gt_delta` reading (eta = delta), drawn where they cross the panel.
    """
    from matplotlib.lines import Line2D

    delta, eta, theta = schema.RATE_METRICS  # the config fields of the rates, named as their metrics
    facets = _theta_facets(runs[theta])
    names = sorted(facets.unique(), key=lambda s: runs.loc[facets == s, theta].min())
    fig, axes = style.figure(len(names), width=4.2, height=3.8, sharey=True)
    kinds, colors = outcome(runs), style.outcome_colors()
    for ax, name in zip(axes, names):
        here = runs[facets == name].assign(outcome=pd.Categorical(kinds[facets == name], OUTCOMES))
        counts = here.groupby([delta, eta, "outcome"], observed=True).size().reset_index(name="count")
        rank = counts.groupby([delta, eta]).cumcount()  # outcomes at one point, side by side
        shift = 7 * (rank - (counts.groupby([delta, eta])["count"].transform("size") - 1) / 2)
        for kind in OUTCOMES:
            mine = counts["outcome"] == kind
            for (d, e, n), pt in zip(counts.loc[mine, [delta, eta, "count"]].itertuples(index=False), shift[mine]):
                _dodged(fig, ax, [d], [e], pt, s=30 + 20 * n, color=colors[kind], zorder=3,
                        edgecolor="white", linewidth=0.5)
                if n > 1:
                    ax.annotate(str(n), (d, e), textcoords="offset points", xytext=(pt, 7), ha="center",
                                fontsize=6, color=colors[kind])
        x_lo, x_hi = style.value_axis(ax, "x", runs[delta])
        y_lo, y_hi = style.value_axis(ax, "y", runs[eta])
        if x_lo <= 1.0 <= x_hi:
            ax.axvline(1.0, color="grey", linestyle="--", linewidth=1, label="δ = 1 (decay)")
        lo, hi = max(x_lo, y_lo), min(x_hi, y_hi)
        if lo < hi:
            ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", linewidth=1, label="η = δ")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("delta (δ)")
    axes[0].set_ylabel("eta (η)")
    handles = {k: Line2D([], [], marker="o", linestyle="none", color=colors[k], label=k)
               for k in OUTCOMES if (kinds == k).any()}  # one marker size: the size means a count
    for ax in axes:  # the reference lines, once each
        handles.update((lab, h) for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in handles)
    handles = list(handles.values())
    axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    style.title(axes[0], f"Appendix A outcome of each of {len(runs)} runs "
                         f"(marker size and number: runs at a point)", 10, suptitle=True)
    return style.finish(fig)


def plot_rate_trajectories(history: pd.DataFrame, runs: pd.DataFrame | None = None) -> Figure:
    """Learned delta, eta, theta per epoch, one line per run and a panel per rate.

    `history` is `metric_histories(runs, schema.RATE_METRICS, ...)`; with `runs`, only learnable
    runs are drawn, coloured by outcome.
    """
    import seaborn as sns
    from matplotlib.lines import Line2D

    if runs is not None:
        history = history[history["run_id"].isin(learnable(runs)["run_id"])]
    rates = [r for r in schema.RATE_METRICS if r in set(history["metric"])]
    if not rates:
        raise ValueError(f"no rate histories ({', '.join(schema.RATE_METRICS)}) of learnable runs to plot")
    kinds = outcome(runs).set_axis(runs["run_id"]) if runs is not None else None
    data = history.assign(outcome=history["run_id"].map(kinds) if kinds is not None else OUTCOMES[0])
    present = [k for k in OUTCOMES if k in set(data["outcome"])]
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


def plot_error_heatmaps(runs: pd.DataFrame, metric: str | None = None) -> Figure:
    """Mean test error (%) over the seeds at each (delta, eta), one heat map per theta.

    Every run counts here, flagged ones included (the map asks what happens at each setting); a cell
    reads "div" where every seed diverged (no error to average), and is outlined where some seed broke
    an Appendix A condition. Every panel has every swept delta and eta (a blank cell: not run). The
    colour scale is shared and logarithmic: errors run from a few percent to chance (about 90%).
    """
    import matplotlib.ticker
    import seaborn as sns
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    metric = metric or schema.TEST_ERROR
    delta, eta, theta = schema.RATE_METRICS
    agg = aggregate(runs, [delta, eta, theta], metric, include_flagged=True)
    diverged = runs.groupby([delta, eta, theta])["diverged"].agg(["sum", "size"]).reset_index()
    agg = agg.merge(diverged, on=[delta, eta, theta])
    agg = agg.assign(pct=100 * agg["mean"], flagged_any=agg["flagged"] > 0,
                     all_diverged=(agg["sum"] == agg["size"]) & (agg["size"] > 0))
    rows, columns = sorted(agg[eta].unique(), reverse=True), sorted(agg[delta].unique())
    values = agg["pct"].dropna()
    low, high = (max(values.min(), 0.1), max(values.max(), 1.0)) if len(values) else (1.0, 100.0)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 90) if low <= t <= high]
    thetas = sorted(agg[theta].unique())
    fig, axes = style.figure(len(thetas), width=0.75 * len(columns) + 1.2, height=0.55 * len(rows) + 1.6)
    for k, (ax, t) in enumerate(zip(axes, thetas)):
        here = agg[agg[theta] == t]

        def grid(column: str, here=here) -> pd.DataFrame:
            return here.pivot(index=eta, columns=delta, values=column).reindex(index=rows, columns=columns)

        last = k == len(thetas) - 1
        sns.heatmap(grid("pct").astype(float), annot=True, fmt=".1f", ax=ax, cmap="viridis_r",
                    norm=LogNorm(vmin=low, vmax=high), cbar=last, linewidths=0.5, linecolor="white",
                    cbar_kws={"label": f"{style.metric_label(metric)[0]}, mean of seeds", "ticks": ticks}
                    if last else None, annot_kws={"fontsize": 7})
        ax.grid(False)
        if last:
            bar = ax.collections[0].colorbar.ax
            bar.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            bar.set_yticklabels([f"{t:g}" for t in ticks])
        for i, j in zip(*np.nonzero(grid("all_diverged").fillna(False).to_numpy(dtype=bool))):
            ax.text(j + 0.5, i + 0.5, "div", ha="center", va="center", fontsize=7, color="red")  # no mean to colour
        flagged = grid("flagged_any")
        for i, j in zip(*np.nonzero(flagged.fillna(False).to_numpy(dtype=bool))):
            ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_title(f"θ = {t:g}", fontsize=10)
        ax.set_xlabel("delta (δ)")
        ax.set_ylabel("eta (η)" if k == 0 else "")
        ax.set_xticklabels([f"{c:g}" for c in columns], rotation=0)
        ax.set_yticklabels([f"{r:g}" for r in rows], rotation=0)
    n = int(agg["n"].max()) if len(agg) else 0
    over = "one seed per cell" if n == 1 else f"mean over up to {n} seeds per cell"
    style.title(axes[0], f"{style.metric_label(metric)[0]}: {over}, flagged runs "
                         f"included; red outline: a seed broke Appendix A; div: every seed diverged", 10,
                suptitle=True)
    return style.finish(fig)
