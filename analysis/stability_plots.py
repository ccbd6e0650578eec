"""Figures of a memory-rate study: the condition map and the outcome map side by side in meaning,
test-error heat maps, error against each rate, the memory's state, learned rate trajectories, and the
`degraded` threshold swept.

Each takes runs (the shape in store.py), and where outcomes show, `outcomes.measure`'s frame, or a
history of the rates, and returns a Figure. The rates are on numeric axes with ticks at the swept
values (log where they span decades, symlog where they also hold 0 or negatives), so the `decay` line
(delta = 1) and the eta = delta line fall where they belong; theta makes the panels of the maps. A mean
is drawn with its 95% Student t interval (uncertainty.t_interval), as in the tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stawm import schema

from . import style
from .outcomes import KINDS, outcome
from .stats import aggregate, learnable
from .uncertainty import t_interval

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


def placed_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """Where each run stands on a map: (delta, eta) as configured, or, for a run that learned its rates, the
    learned ones at its end (`final_delta`, `final_eta`): its conditions were checked on those too. Columns
    `x`, `y`, `start_x`, `start_y`, `learned` (the position differs from the start)."""
    delta, eta, _ = schema.RATE_METRICS
    x, y = runs[delta].astype(float), runs[eta].astype(float)
    learns = runs["learnable_rates"].fillna(False).astype(bool) if "learnable_rates" in runs else False
    if f"final_{delta}" in runs and f"final_{eta}" in runs:
        fx, fy = runs[f"final_{delta}"].astype(float), runs[f"final_{eta}"].astype(float)
        use = learns & np.isfinite(fx) & np.isfinite(fy)
        x, y = x.where(~use, fx), y.where(~use, fy)
    placed = pd.DataFrame({"x": x, "y": y, "start_x": runs[delta].astype(float),
                           "start_y": runs[eta].astype(float)}, index=runs.index)
    placed["learned"] = ~(np.isclose(placed["x"], placed["start_x"]) & np.isclose(placed["y"], placed["start_y"]))
    return placed


def _diagonal(ax, lo: float, hi: float) -> None:
    """eta = delta between lo and hi, drawn through many points so that it stays the diagonal on log axes."""
    if not lo < hi:
        return
    xs = np.linspace(lo, hi, 200)
    if lo > 0:
        xs = np.union1d(xs, np.geomspace(lo, hi, 200))
    ax.plot(xs, xs, color="grey", linestyle=":", linewidth=1, label="η = δ (informational)")


def _rate_map(runs: pd.DataFrame, colour: pd.Series, colours: dict, marker: pd.Series, markers: dict,
              title: str, legend_title: str) -> Figure:
    """Each run at (delta, eta), one panel per (configured) theta: `colour` and `marker` (by run) pick its look.

    Ticks sit at the swept values. Marker size and the number beside it count the runs at a point;
    different looks at one point are drawn side by side. A run that learned its rates stands at its learned
    (final) delta and eta, where its conditions were last checked, with a grey arrow from its start (a hollow
    ring at the configured rates). The lines are the derived `decay` condition's edge (delta = 1) and the
    informational reading eta = delta, drawn where they cross the panel.
    """
    from matplotlib.lines import Line2D

    delta, eta, theta = schema.RATE_METRICS  # the config fields of the rates, named as their metrics
    facets = _theta_facets(runs[theta])
    names = sorted(facets.unique(), key=lambda s: runs.loc[facets == s, theta].min())
    placed = placed_rates(runs)
    fig, axes = style.figure(len(names), width=4.6, height=3.8, sharey=True)
    looks = pd.DataFrame({"colour": colour.to_numpy(), "marker": marker.to_numpy()}, index=runs.index)
    where = placed.assign(x=placed["x"].round(6), y=placed["y"].round(6))  # one point per learned value, to 1e-6
    for ax, name in zip(axes, names):
        here = where.loc[facets == name].join(looks)
        for (x0, y0, x1, y1) in here.loc[here["learned"], ["start_x", "start_y", "x", "y"]].drop_duplicates() \
                .itertuples(index=False):
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=2,
                        arrowprops=dict(arrowstyle="->", color="0.55", linewidth=0.7, shrinkA=3, shrinkB=4))
            ax.scatter([x0], [y0], s=28, facecolor="none", edgecolor="0.45", linewidth=0.8, zorder=2)
        counts = here.groupby(["x", "y", "colour", "marker"]).size().reset_index(name="count")
        rank = counts.groupby(["x", "y"]).cumcount()  # looks at one point, side by side
        shift = 7 * (rank - (counts.groupby(["x", "y"])["count"].transform("size") - 1) / 2)
        for (d, e, c, m, n), pt in zip(counts.itertuples(index=False), shift):
            _dodged(fig, ax, [d], [e], pt, s=30 + 20 * n, color=colours[c], marker=markers[m], zorder=3,
                    edgecolor="white", linewidth=0.5)
            if n > 1:
                ax.annotate(str(n), (d, e), textcoords="offset points", xytext=(pt, 7), ha="center",
                            fontsize=6, color=colours[c])
        x_lo, x_hi = style.value_axis(ax, "x", runs[delta], extent=placed["x"])
        y_lo, y_hi = style.value_axis(ax, "y", runs[eta], extent=placed["y"])
        ax.tick_params(axis="x", labelsize=8)
        if x_lo <= 1.0 <= x_hi:
            ax.axvline(1.0, color="grey", linestyle="--", linewidth=1, label="δ = 1 (decay, derived)")
        _diagonal(ax, max(x_lo, y_lo), min(x_hi, y_hi))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("delta (δ)")
    axes[0].set_ylabel("eta (η)")
    handles = {f"c:{k}": Line2D([], [], marker="o", linestyle="none", color=v, label=k)
               for k, v in colours.items() if (colour == k).any()}  # one marker size: the size means a count
    if len(set(marker)) > 1:
        handles.update({f"m:{k}": Line2D([], [], marker=v, linestyle="none", color="0.3", label=f"conditions: {k}")
                        for k, v in markers.items() if (marker == k).any()})
    if placed["learned"].any():
        handles["start"] = Line2D([], [], marker="o", linestyle="none", markerfacecolor="none",
                                  markeredgecolor="0.45", label="start of learned rates (arrow: to the end)")
    for ax in axes:  # the reference lines, once each
        handles.update((lab, h) for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in handles)
    axes[-1].legend(handles=list(handles.values()), loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7,
                    title=legend_title, title_fontsize=7)
    learned = int(placed["learned"].sum())
    if learned:
        title += (f"; {learned} runs that learned their rates stand at their final δ, η (where their conditions were "
                  f"last checked), an arrow from their start; panels: the configured θ")
    style.title(axes[0], title, 10, suptitle=True)
    return style.finish(fig)


MARKERS = ("o", "X", "s", "D", "^", "v", "P", "*")


def plot_condition_map(runs: pd.DataFrame) -> Figure:
    """The predictions: each run at (delta, eta) (its learned ones when it learned them), one panel per theta,
    coloured by the flagging conditions it failed (before or during training), grey where it met them all."""
    sets = condition_sets(runs)
    colours = style.condition_colors(_ordered_sets(sets))
    return _rate_map(runs, sets, colours, sets.map(lambda _: "o"), {"o": "o"},
                     f"flagging conditions (paper, paper's reading, derived) failed by each of {len(runs)} runs "
                     f"(predictions; marker size and number: runs at a point)", "conditions failed")


def plot_outcome_map(runs: pd.DataFrame, measured: pd.DataFrame) -> Figure:
    """The outcomes: each run at (delta, eta) (its learned ones when it learned them), one panel per theta,
    coloured by what happened to it (`outcomes.outcome`), its marker the set of conditions it failed: where
    colour and marker disagree, the conditions mispredicted."""
    kinds = outcome(measured).reindex(runs["run_id"]).set_axis(runs.index)
    sets = condition_sets(runs)
    markers = dict(zip(_ordered_sets(sets), MARKERS * 2))
    return _rate_map(runs, kinds, style.outcome_colors(), sets, markers,
                     f"measured outcome of each of {len(runs)} runs (colour) and the conditions it failed (marker)",
                     "outcome")


def plot_rate_trajectories(history: pd.DataFrame, runs: pd.DataFrame | None = None,
                           measured: pd.DataFrame | None = None) -> Figure:
    """Learned delta, eta, theta per epoch, one line per run and a panel per rate, with the edges of the conditions
    on them: 0 in every panel (`rates`: delta > 0, eta >= 0, theta >= 0) and delta = 1 (`decay`, derived).

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
        # 0: the edge of `rates` (delta > 0, eta >= 0, theta >= 0), which learned rates can cross
        ax.axhline(0.0, color="0.2", linestyle=":", linewidth=1.2)
        ax.set_title(rate, fontsize=10)
        style.epochs_axis(ax, data["step"])
        ax.set_ylabel("rate" if ax is axes[0] else "")
    handles = [Line2D([], [], marker="o", markersize=4, color=colors[k], label=k) for k in present]
    axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    crossed = data[(data["metric"] == schema.RATE_METRICS[0]) & (data["value"] <= 0)]["run_id"].nunique()
    style.title(axes[0], f"learned memory rates of {data['run_id'].nunique()} runs (one line per run; dotted: 0, "
                         f"the edge of `rates`, crossed by δ in {crossed} runs; dashed: δ = 1, the edge of `decay`)",
                10, suptitle=True)
    return style.finish(fig)


def plot_error_heatmaps(runs: pd.DataFrame, metric: str | None = None, threshold: float | None = None) -> Figure:
    """Mean test error (%) over the seeds at each (delta, eta), one heat map per theta, each cell's mean with the
    half-width of its 95% t interval below it (mean ± t_{0.975, n-1} s/sqrt(n); none for one seed).

    Every run counts, flagged ones included (the map asks what happens at each setting). Each panel has
    its own linear colour scale (errors at theta = 0 sit near chance and would flatten every other
    panel's), with its bar. A cell reads "div" where every seed diverged (no error to average); a "*"
    marks a setting where some seed broke a flagging condition; with `threshold` (a fraction: the
    failure threshold, e.g. `degraded`'s), cells whose mean is at or above it (equality up to float rounding,
    as `outcomes.at_least`) are outlined in red and the bars
    show it as a line. Every panel has every swept delta and eta (a blank cell: not run).
    """
    import seaborn as sns
    from matplotlib.patches import Rectangle

    metric = metric or schema.TEST_ERROR
    delta, eta, theta = schema.RATE_METRICS
    agg = aggregate(runs, [delta, eta, theta], metric)
    diverged = runs.groupby([delta, eta, theta])["diverged"].agg(["sum", "size"]).reset_index()
    agg = agg.merge(diverged, on=[delta, eta, theta])
    agg = agg.assign(pct=100 * agg["mean"], half=100 * (agg["t_high"] - agg["mean"]), flagged_any=agg["flagged"] > 0,
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
        half = grid("half").astype(float).to_numpy()
        below = np.where(np.isfinite(half), np.char.add("\n±", np.char.mod("%.1f", np.nan_to_num(half))), "")
        text = np.where(np.isnan(pct), "", np.char.add(np.char.add(pct.map(lambda v: f"{v:.1f}").to_numpy().astype(str),
                                                                   np.where(flagged, "*", "")), below))
        low, high = np.nanmin(pct.to_numpy()), np.nanmax(pct.to_numpy())
        low, high = (low - 0.5, high + 0.5) if high - low < 0.1 else (low, high)  # one value: a scale around it
        sns.heatmap(pct, annot=text, fmt="", ax=ax, cmap="viridis_r", linewidths=0.5, linecolor="white",
                    vmin=low, vmax=high,
                    cbar_kws={"label": f"{label}, mean of seeds"}, annot_kws={"fontsize": 6.5})
        ax.grid(False)
        if threshold is not None:
            bar = ax.collections[0].colorbar
            if bar.vmin <= 100 * threshold <= bar.vmax:
                bar.ax.axhline(100 * threshold, color="red", linewidth=1.5)
            over = (pct >= 100 * threshold) | np.isclose(pct, 100 * threshold, rtol=1e-9, atol=0)
            for i, j in zip(*np.nonzero(over.to_numpy())):
                ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        for i, j in zip(*np.nonzero(grid("all_diverged").fillna(False).to_numpy(dtype=bool))):
            ax.text(j + 0.5, i + 0.5, "div", ha="center", va="center", fontsize=7, color="red")  # no mean to colour
        ax.set_title(f"θ = {t:g}", fontsize=10)
        ax.set_xlabel("delta (δ)")
        ax.set_ylabel("eta (η)" if k == 0 else "")
        ax.set_xticklabels([f"{c:g}" for c in columns], rotation=0)
        ax.set_yticklabels([f"{r:g}" for r in rows], rotation=0)
    n = int(agg["n"].max()) if len(agg) else 0
    over = ("one seed per cell" if n == 1 else
            f"mean over up to {n} seeds per cell, below it ± the half-width of its 95% t interval")
    marked = f"; red: at or above the failure threshold {100 * threshold:.2f}%" if threshold is not None else ""
    style.title(axes[0], f"{label}: {over}, every run counted; linear colour scale per panel; *: a seed failed "
                         f"a flagging condition; div: every seed diverged{marked}", 10, suptitle=True)
    return style.finish(fig)


def _mean_interval(values) -> tuple[float, float, float, int]:
    """(mean, t_low, t_high, n) of the finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    low, high = t_interval(v)
    return (float(v.mean()) if len(v) else np.nan), low, high, len(v)


def _median_quartiles(values) -> tuple[float, float, float, int]:
    """(median, 25th, 75th percentile, n) of the finite values (numpy's linear interpolation, as seaborn's)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return np.nan, np.nan, np.nan, 0
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return float(median), float(q1), float(q3), len(v)


def _dodged_series(fig, ax, data: pd.DataFrame, x: str, y: str, hue: str | None, levels: list, colors: list,
                   summary, floor: float | None = None, ceiling: float | None = None) -> pd.DataFrame:
    """One line per level of `hue` (or one line) of `summary`(y values) at each x on a numeric axis: the point and
    its bars, each line shifted sideways by a few typographic points so that bars at one x stay apart. With
    `floor` (a log axis' bottom), a lower end below it is drawn to the floor and marked with a "v"; with `ceiling`
    (the most the value can be, e.g. 100%), an upper end above it is drawn to it and marked with a "^". Returns
    the summaries drawn (x, level, point, low, high, n)."""
    from matplotlib.transforms import ScaledTranslation

    rows = []
    step = 4 if len(levels) > 1 else 0
    for j, level in enumerate(levels):
        part = data if hue is None else data[data[hue] == level]
        stats = [(xv, *summary(g[y])) for xv, g in part.groupby(x, sort=True)]
        if not stats:
            continue
        xs, point, low, high, n = (np.asarray(c, dtype=float) for c in zip(*stats))
        shift = ax.transData + ScaledTranslation(step * (j - (len(levels) - 1) / 2) / 72, 0, fig.dpi_scale_trans)
        clipped = np.isfinite(low) & (floor is not None) & (low <= (floor or 0))
        shown_low = np.where(clipped, floor or 0, low)
        capped = np.isfinite(high) & (ceiling is not None) & (high > (ceiling or 0))
        shown_high = np.where(capped, ceiling or 0, high)
        err = np.vstack([np.where(np.isfinite(low), point - shown_low, 0),
                         np.where(np.isfinite(high), shown_high - point, 0)])
        ax.errorbar(xs, point, yerr=err, color=colors[j], marker="o", markersize=4, linewidth=1, capsize=2.5,
                    elinewidth=1, transform=shift, label=level if hue is not None else None, zorder=3)
        if clipped.any():
            ax.scatter(xs[clipped], np.full(clipped.sum(), floor), marker="v", s=18, color=colors[j], transform=shift,
                       zorder=4, clip_on=False)
        if capped.any():
            ax.scatter(xs[capped], np.full(capped.sum(), ceiling), marker="^", s=18, color=colors[j], transform=shift,
                       zorder=4, clip_on=False)
        rows += [dict(x=a, level=level, point=b, low=c, high=d, n=int(e)) for a, b, c, d, e in stats]
        ends = np.column_stack([np.tile(xs, 3), np.concatenate([point, shown_low, shown_high])])
        ax.update_datalim(ends[np.isfinite(ends).all(axis=1)])  # drawn through a shifted transform: not autoscaled
    ax.autoscale_view()
    return pd.DataFrame(rows)


def plot_error_by_rate(runs: pd.DataFrame, metric: str | None = None) -> Figure:
    """Test error against each rate in turn, one panel per rate: the mean over every run at that value (seeds and
    the other rates pooled) with its 95% t interval, one line per theta in the delta and eta panels (theta
    decides more than the others: with ReLU6, theta = 0 writes nothing). Every run counts.

    The rates sit at their numeric positions (log where they span decades, symlog where 0 is among them), ticks
    at the values run. The error is on a log scale, so that both chance and a few percent read; a t interval's
    lower end can fall below 0 with few, spread runs: such an end is clipped to the axis' floor and marked with a
    "v", and an upper end above 100% is clipped there and marked with a "^" (the interval is the arithmetic mean's,
    as in the tables, not one computed in log space)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    metric = metric or schema.TEST_ERROR
    label, scale = style.metric_label(metric)
    delta, eta, theta = schema.RATE_METRICS
    data = runs.assign(y=runs[metric].astype(float) * scale, θ=runs[theta].map(lambda t: f"{t:g}"))
    # the floor: below every positive value and interval end, so that only ends at or below 0 are clipped
    ends = [data["y"]] + [data.groupby([rate, "θ"] if rate != theta else [rate])["y"].agg(
        lambda v: t_interval(v)[0]) for rate in (delta, eta, theta)]
    ends = pd.concat(ends, ignore_index=True).astype(float)
    ends = ends[np.isfinite(ends) & (ends > 0)]
    floor = float(ends.min()) / 1.5 if len(ends) else 0.1
    levels = [f"{t:g}" for t in sorted(runs[theta].unique())]
    fig, axes = style.figure(3, width=3.8, sharey=True, ratios=[2, 1, 1])  # delta: most values, widest
    clipped, capped = 0, 0
    ceiling = 100.0 if scale == 100 else None  # an error or accuracy is at most 100%
    for ax, rate in zip(axes, (delta, eta, theta)):
        by_theta = rate != theta
        drawn = _dodged_series(fig, ax, data, rate, "y", "θ" if by_theta else None, levels if by_theta else [None],
                               style.palette(len(levels)) if by_theta else style.palette(1), _mean_interval, floor,
                               ceiling)
        clipped += int((drawn["low"] <= floor).sum()) if len(drawn) else 0
        capped += int((drawn["high"] > ceiling).sum()) if len(drawn) and ceiling is not None else 0
        style.value_axis(ax, "x", runs[rate])
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel(f"{rate} (numeric axis)")
        ax.set_ylabel(label if ax is axes[0] else "")
        ax.set_yscale("log")  # a memory that writes nothing sits near chance, the rest at a few percent
        top = ceiling or (float(np.nanmax(drawn["high"])) * 1.1 if len(drawn) and drawn["high"].notna().any() else 100)
        ax.set_ylim(floor, top)
        ax.yaxis.set_major_locator(FixedLocator([t for t in (0.5, 1, 2, 5, 10, 20, 50, 90) if floor <= t <= top]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    axes[-1].legend(*axes[0].get_legend_handles_labels(), title="θ", fontsize=7, title_fontsize=7,
                    loc="upper left", bbox_to_anchor=(1.02, 1))
    missing = int((~np.isfinite(data["y"])).sum())
    left = f"; {missing} runs without a final error left out" if missing else ""
    cut = f"; v: {clipped} interval ends at or below 0, clipped to the axis' foot" if clipped else ""
    cut += f"; ^: {capped} ends above 100%, clipped" if capped else ""
    style.title(axes[0], f"{label} against each rate: mean [95% t interval] over every run at a value "
                         f"({len(runs)} runs, every run counted{left}; log scale{cut})", 10, suptitle=True)
    return style.finish(fig)


MEMORY_STATE = ("readout_dead", "readout_saturated", "max_abs_w")  # the last epoch's, logged by every run
POOLED = "θ > 0, pooled"  # memory_state's extra line: every run that writes


def plot_memory_state(runs: pd.DataFrame) -> Figure:
    """What the memory looked like at the end of training, against delta: the fraction of read-outs sigma(W q) at
    0 (dead units) and at Lambda (saturated), and the largest |W| (symlog scale). Each point is the median over
    every run at a delta (seeds and eta pooled) with its quartiles (25th-75th percentile) as bars, one line per
    theta and one, black, for every theta > 0 run pooled (the runs whose memory writes). Medians, since these
    fractions pile up at 0 or 100% and |W| spans orders of magnitude; every run counts. delta sits at its numeric
    position (log axis, ticks at the values run)."""
    delta, _, theta = schema.RATE_METRICS
    missing = [m for m in MEMORY_STATE if m not in runs]
    if missing:
        raise ValueError(f"the runs logged no {', '.join(missing)} (runs older than the memory statistics)")
    levels = [f"{t:g}" for t in sorted(runs[theta].unique())]
    data = runs.assign(θ=runs[theta].map(lambda t: f"{t:g}"))
    writing = data[data[theta].astype(float) > 0].assign(θ=POOLED)
    pooled = runs.loc[runs[theta].astype(float) > 0, theta].nunique() > 1  # one theta > 0: its own line says it
    if pooled:
        data = pd.concat([data, writing], ignore_index=True)
        levels = levels + [POOLED]
    colors = style.palette(len(levels) - bool(pooled)) + (["black"] if pooled else [])
    labels = {"readout_dead": "read-outs at 0 (%)", "readout_saturated": "read-outs at Λ (%)",
              "max_abs_w": "max |W|"}
    fig, axes = style.figure(3, width=4.8)
    for ax, metric in zip(axes, MEMORY_STATE):
        w_panel = metric == "max_abs_w"  # |W|: heavy-tailed, never negative
        values = data.assign(y=data[metric].astype(float) * (1 if w_panel else 100))
        _dodged_series(fig, ax, values, delta, "y", "θ", levels, colors, _median_quartiles)
        style.value_axis(ax, "x", runs[delta])
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("delta (δ, numeric axis)")
        ax.set_ylabel(labels[metric] + ": median, quartiles")
        if w_panel:
            ax.set_yscale("symlog", linthresh=1e-3)  # W = 0 exactly where nothing is written
            ax.set_ylim(bottom=0)
        else:
            ax.set_ylim(-3, 103)
    axes[-1].legend(title="θ", loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, title_fontsize=7)
    style.title(axes[0], f"the memory at the last epoch (each run's mean over its steps; max over them for |W|), "
                         f"{len(runs)} runs: median (point) and quartiles (bars) over every run at a δ, per θ"
                         + (" and for every θ > 0 run pooled (black)" if pooled else ""), 10, suptitle=True)
    return style.finish(fig)


CATEGORY_DASHES = {"could fail": "", "by construction": (4, 2), "informational": (1, 2), "verdict": (6, 2, 1, 2)}


def plot_degraded_sweep(sweep: pd.DataFrame) -> Figure:
    """`outcomes.degraded_sweep` drawn: against the factor (log axis, ticks at the factors swept), how many runs
    are degraded (all runs, no_learning and diverged ones included, and among the runs that trained alone), and
    each condition's precision and recall for `degraded` (line style: its category). The factors stand evenly
    spaced, in order (a categorical axis: 1.1, 1.25 and 1.5 would crowd on a numeric one)."""
    import seaborn as sns

    if sweep.empty:
        raise ValueError("an empty sweep: `degraded` is not measured without a paper-configuration reference")
    per_factor = sweep.drop_duplicates("factor").sort_values("factor")
    factors = per_factor["factor"].to_numpy(dtype=float)
    position = {f: i for i, f in enumerate(factors)}
    sweep = sweep.assign(at=sweep["factor"].map(position))
    per_factor = per_factor.assign(at=per_factor["factor"].map(position))
    counts = pd.concat([
        per_factor.assign(count=per_factor["degraded"], runs="all runs (no_learning, diverged too)"),
        per_factor.assign(count=per_factor["no_learning_degraded"] + per_factor["diverged_degraded"],
                          runs="of them no_learning or diverged"),
        per_factor.assign(count=per_factor["degraded_among_trained"],
                          runs=f"among the {int(per_factor['trained_runs'].iloc[0])} runs that trained"),
    ])
    long = sweep.melt(id_vars=["at", "condition", "category"], value_vars=["precision", "recall"],
                      var_name="measure", value_name="value")
    names = list(dict.fromkeys(sweep["condition"]))
    categories = [c for c in CATEGORY_DASHES if c in set(sweep["category"])]
    fig, axes = style.figure(3, width=3.9, height=3.6)
    sns.lineplot(data=counts, x="at", y="count", hue="runs", marker="o", markersize=5,
                 palette=["black", "0.55", style.palette(4)[3]], ax=axes[0])
    from matplotlib.ticker import MaxNLocator

    axes[0].set_ylabel("runs degraded")
    axes[0].set_ylim(bottom=0, top=max(1.0, float(counts["count"].max())) * 1.35)  # room for the legend on top
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    sns.move_legend(axes[0], "upper right", fontsize=6.5, title=None)
    for ax, measure in zip(axes[1:], ("precision", "recall")):
        part = long[long["measure"] == measure]
        sns.lineplot(data=part, x="at", y="value", hue="condition", hue_order=names, style="category",
                     style_order=categories, dashes=[CATEGORY_DASHES[c] for c in categories], marker="o",
                     markersize=4, palette=style.palette(len(names)), linewidth=1.2, legend=ax is axes[-1], ax=ax)
        ax.set_ylabel(f"{measure} for degraded")
        ax.set_ylim(-0.04, 1.04)
    sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), fontsize=7, title_fontsize=7)
    for ax in axes:
        ax.set_xticks(range(len(factors)), [f"{f:g}" for f in factors])
        ax.set_xlim(-0.3, len(factors) - 0.7)
        ax.set_xlabel("factor (categorical axis: the factors swept)")
    silent = [n for n in names if sweep.loc[sweep["condition"] == n, "precision"].isna().all()]
    none = f"; no precision where a condition flagged no run ({', '.join(silent)})" if silent else ""
    reference = per_factor["threshold"].iloc[0] / per_factor["factor"].iloc[0]
    style.title(axes[0], f"degraded: final error ≥ factor × {100 * reference:.2f}% (the mean at the paper's "
                         f"configuration), the factor swept: runs called degraded, and how well each condition (line "
                         f"style: its category) predicts it over all runs{none}", 10, suptitle=True)
    return style.finish(fig)
