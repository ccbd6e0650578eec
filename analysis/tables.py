"""Tables in the paper's style: Markdown, LaTeX and CSV of an `aggregate` table, and Table 1.

The paper's own numbers (Table 1, MNIST test error) are kept here as `Published` rows, so a
reproduced row stands beside the value it reproduces. A reproduced cell is "mean [95% t interval]"
(Student's t over the seeds: uncertainty.t_interval), with the std (ddof=1) in a column of its own, as
the paper's "± std" is; every caption says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from stawm import schema

from .stats import STAT_COLUMNS, aggregate
from .uncertainty import CONFIDENCE, welch_p


@dataclass(frozen=True)
class Published:
    """One row of the paper's Table 1: MNIST test error in percent (std in percentage points)."""

    model: str
    table: str  # "1a" (supervised) or "1b" (self-supervised)
    error_pct: float
    std_pct: float | None = None  # None: the paper gives no spread
    task: str | None = None  # the Config.task a reproduced row must have to match
    glimpse_size: int | None = None  # S_g
    glimpses: int | None = None  # N
    note: str = ""


# Reproducible STAWM rows, keyed by (task, glimpse_size, glimpses) as a reproduced row is.
PUBLISHED: dict[tuple[str, int, int], Published] = {
    ("classify", 8, 8): Published("STAWM", "1a", 0.41, 0.03, "classify", 8, 8),
    ("classify", 28, 10): Published("STAWM", "1a", 0.35, 0.02, "classify", 28, 10,
                                    note="S_g=28, N=10: best of 5 runs 0.31%"),
    ("selfsup", 6, 12): Published("STAWM (self-supervised)", "1b", 0.77, None, "selfsup", 6, 12),
}
MATCH_FIELDS = ("task", "glimpse_size", "glimpses")  # the key of PUBLISHED

# Other models' results, quoted by the paper and by our tables as published rows.
BASELINES: dict[str, tuple[Published, ...]] = {
    "1a": (
        Published("RAM", "1a", 1.55, glimpse_size=8, glimpses=5),
        Published("RAM", "1a", 1.29, glimpse_size=8, glimpses=6),
        Published("RAM", "1a", 1.47, glimpse_size=8, glimpses=7),
    ),
    "1b": (
        Published("DBM", "1b", 0.79),
        Published("Adversarial", "1b", 0.78),
        Published("Virtual Adversarial", "1b", 0.64),
        Published("Ladder", "1b", 0.57),
    ),
}


class Table(NamedTuple):
    markdown: str
    latex: str


class BaselineError(ValueError):
    """The baseline configuration of a table's p-values matches no row, or several."""


# --- cells --------------------------------------------------------------------------------------


def is_percent(metric: str) -> bool:
    """Errors and accuracies are logged as fractions and shown in percent."""
    return metric.endswith("error") or metric.endswith("accuracy")


def cell_text(value) -> str:
    """A config value as a table cell or axis label: tuples as "[64, 128]", floats short, None as —."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def seeds_phrase(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


def interval_name(confidence: float = CONFIDENCE) -> str:
    """"95% t interval": the name every caption and header gives Student's t interval of a mean."""
    return f"{100 * confidence:g}% t interval"


def interval_phrase(agg: pd.DataFrame, where_fewer: str = "column n", formula: bool = True) -> str:
    """What the interval of an `aggregate` table or plot is, e.g. "mean [95% t interval: mean ± t_{0.975, n-1} ·
    s/√n, s the std (ddof=1)] over 5 seeds" (without `formula`: "mean [95% t interval] over 5 seeds"); when the
    number of seeds expected is unknown and rows differ, `where_fewer` says where n is shown."""
    expected = agg.attrs.get("seeds_expected")
    ns = sorted(set(agg["n"]))
    if expected == 1 or (expected is None and ns == [1]):
        return "1 seed, no interval"
    over = (f"{expected} seeds" if expected is not None else
            f"{ns[0]} seeds" if len(ns) == 1 else f"up to {ns[-1]} seeds ({where_fewer})")
    confidence = agg.attrs.get("confidence", CONFIDENCE)
    how = f": mean ± t_{{{(1 + confidence) / 2:g}, n−1}} · s/√n, s the std (ddof=1)" if formula else ""
    return f"mean [{interval_name(confidence)}{how}] over {over}"


def _number(value: float, percent: bool) -> str:
    return f"{value * 100:.2f}" if percent else f"{value:.4f}"


def _mean_cell(mean: float, low: float, high: float, percent: bool) -> str:
    """"4.27% [3.98, 4.56]": the mean and its interval (n = 1: the mean alone)."""
    if mean is None or math.isnan(mean):
        return "—"
    text = _number(mean, percent) + ("%" if percent else "")
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{_number(low, percent)}, {_number(high, percent)}]"
    return text


def _std_cell(std: float, percent: bool) -> str:
    return "—" if std is None or math.isnan(std) else _number(std, percent)


def _published_cell(p: Published) -> str:
    return f"{p.error_pct:.2f}%" + (f" ± {p.std_pct:.2f}" if p.std_pct is not None else "")


def _p_cell(p: float) -> str:
    if math.isnan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _baseline_row(agg: pd.DataFrame, baseline) -> int:
    if isinstance(baseline, int):
        return baseline
    match = np.ones(len(agg), dtype=bool)
    for name, value in baseline.items():
        if name not in agg:
            raise BaselineError(f"baseline field {name!r} is not a column of the table "
                                f"({list(agg.attrs.get('by', []))})")
        match &= np.array([v == value for v in agg[name]])
    if match.sum() != 1:
        raise BaselineError(f"baseline {baseline} matches {int(match.sum())} rows of the table, not one")
    return int(np.flatnonzero(match)[0])


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                   "±": r"$\pm$", "Δ": r"$\Delta$", "−": r"$-$", "—": "---", "<": r"$<$", ">": r"$>$"}


def _latex(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(c, c) for c in text)


# --- tables -------------------------------------------------------------------------------------


def format_table(agg: pd.DataFrame, columns: Sequence[str] | None = None, *,
                 published: dict | None = None, quoted: Sequence[Published] = (),
                 bold_best: bool = True, baseline: dict | int | None = None,
                 label: str | None = None, caption: str | None = None) -> Table:
    """Markdown and LaTeX of an `aggregate` table in the paper's style.

    Each reproduced row shows its configuration (`columns`, default all `by` fields), the metric
    as "0.41% [0.38, 0.44]" (mean in percent and its 95% t interval), the std (ddof=1, in percentage
    points: the paper's ±), `n` ("3/5 (incomplete)" when short of the expected seeds) and the flagged
    runs. With `published` (e.g. PUBLISHED, keyed by task, glimpse_size, glimpses, which `agg` must
    then hold), the matching published value and
    the difference (pp) stand beside each row. `quoted` rows (e.g. BASELINES["1a"]) are other
    models' published results, listed first with a `model` column. The lowest mean is bold.
    `baseline` (a {field: value} dict matching one row, or a row position) adds the p-value of
    Welch's t-test of each row's seeds against the baseline's. The caption says what ± means.
    """
    metric = agg.attrs.get("metric") or schema.TEST_ERROR
    by = agg.attrs.get("by", [c for c in agg.columns if c not in STAT_COLUMNS])
    columns = list(by if columns is None else columns)
    expected = agg.attrs.get("seeds_expected")
    percent = is_percent(metric)
    if published is not None and not set(MATCH_FIELDS) <= set(agg.columns):
        raise ValueError(f"to compare with published rows, group by {list(MATCH_FIELDS)}")
    show_model = bool(quoted) or label is not None
    show_published = published is not None or bool(quoted)
    published = published or {}
    label = label or "STAWM (reproduced)"
    base = _baseline_row(agg, baseline) if baseline is not None and len(agg) else None

    confidence = agg.attrs.get("confidence", CONFIDENCE)
    header = (["model"] if show_model else []) + columns + [
        f"{metric.replace('_', ' ')}" + (" (%)" if percent else "") + f": mean [{interval_name(confidence)}]",
        "std (pp)" if percent else "std", "n", "flagged"]
    if show_published:
        header += ["published", "Δ (pp)"]
    if baseline is not None:
        header += ["p (Welch)"]
    n_label = len(columns) + show_model

    rows: list[tuple[list[str], set[int]]] = []  # cells, indices of bold cells
    for p in quoted:
        cells = ([p.model] if show_model else []) + [
            cell_text(getattr(p, c, None)) if c in MATCH_FIELDS else "—" for c in columns] + ["—", "—", "—", "—"]
        if show_published:
            cells += [_published_cell(p), "—"]
        if baseline is not None:
            cells += ["—"]
        rows.append((cells, set()))

    means = agg["mean"].to_numpy(dtype=float)
    best = np.nanmin(means) if bold_best and np.isfinite(means).any() else None
    notes = [p.note for p in quoted if p.note]
    for i, r in enumerate(agg.to_dict("records")):
        cells = ([label] if show_model else []) + [cell_text(r[c]) for c in columns]
        cells.append(_mean_cell(r["mean"], r["t_low"], r["t_high"], percent))
        cells.append(_std_cell(r["std"], percent))
        complete = bool(r["complete"])
        left_out = f", {r['unfinished']} unfinished" if r.get("unfinished") else ""  # failed or running
        cells.append(str(r["n"]) if complete else
                     f"{r['n']}{'' if expected is None else f'/{expected}'} (incomplete{left_out})")
        cells.append(str(r["flagged"]))
        if show_published:
            p = published.get(tuple(r[k] for k in MATCH_FIELDS)) if published else None
            if p is None:
                cells += ["—", "—"]
            else:
                diff = r["mean"] * 100 - p.error_pct
                cells += [_published_cell(p), "—" if math.isnan(diff) else f"{diff:+.2f}"]
                notes += [p.note] if p.note else []
        if base is not None:
            cells.append("baseline" if i == base else
                         _p_cell(welch_p(r["values"], agg.iloc[base]["values"])))
        bold = {n_label} if best is not None and r["mean"] == best else set()
        rows.append((cells, bold))

    flagged = ("flagged runs (a flagging condition failed) left out of the statistics, counted in `flagged`"
               if agg.attrs.get("exclude_flagged") else
               "flagged runs (a flagging condition failed) included in the statistics")
    text = caption or (
        f"{metric}" + (" in %" if percent else "") + f": {interval_phrase(agg)}; std (ddof=1)"
        + (" in percentage points" if percent else "") + f"; {flagged}"
        + (f"; rows short of {seeds_phrase(expected)} are marked incomplete" if expected is not None else "")
        + ("; a t interval's lower end below 0 (few seeds, a wide spread) is shown as computed"
           if percent and (agg["t_low"] < 0).any() else "")
        + ("; unfinished runs (failed or still running) are left out"
           if "unfinished" in agg and agg["unfinished"].any() else "")
        + ("; published: the paper's Table 1 (mean ± std), Δ = reproduced − published mean in percentage points"
           if show_published else "")
        + ("; rows without a reproduced value are quoted from the paper" if quoted else "")
        + (f"; p: Welch's t-test against {_describe(agg, columns, base)}" if base is not None else "")
        + "".join(f"; {n}" for n in dict.fromkeys(notes)) + ".")

    def line(cells, bold, wrap):
        return [wrap(c) if j in bold else c for j, c in enumerate(cells)]

    align = ["l" if j < n_label else "r" for j in range(len(header))]
    md = [f"Table: {text}", "", "| " + " | ".join(header) + " |",
          "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    md += ["| " + " | ".join(line([x.replace("|", "\\|") for x in c], b, lambda s: f"**{s}**")) + " |"
           for c, b in rows]
    tex = ["% requires \\usepackage{booktabs}", "\\begin{table}[t]", "\\centering",
           f"\\caption{{{_latex(text)}}}", f"\\begin{{tabular}}{{{''.join(align)}}}", "\\toprule",
           " & ".join(_latex(h) for h in header) + " \\\\", "\\midrule"]
    tex += [" & ".join(line([_latex(x) for x in c], b, lambda s: f"\\textbf{{{s}}}")) + " \\\\"
            for c, b in rows]
    tex += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return Table("\n".join(md) + "\n", "\n".join(tex) + "\n")


def _describe(agg: pd.DataFrame, columns: Sequence[str], row: int) -> str:
    r = agg.iloc[row]
    return ", ".join(f"{c}={cell_text(r[c])}" for c in columns) or f"row {row}"


def table1(runs: pd.DataFrame, seeds_expected: int | None = None, exclude_flagged: bool = False,
           baseline: dict | None = None) -> dict[str, Table]:
    """Table 1(a) (classification) and 1(b) (self-supervised) from the runs, beside the paper.

    Rows are grouped by task, glimpse_size and glimpses. Other models' results (RAM; DBM,
    Adversarial, Virtual Adversarial, Ladder) and the paper's STAWM rows that the runs do not
    reproduce are quoted as published rows.
    """
    agg = aggregate(runs, list(MATCH_FIELDS), seeds_expected=seeds_expected, exclude_flagged=exclude_flagged)
    tables = {}
    for name, task in (("1a", "classify"), ("1b", "selfsup")):
        part = agg[agg["task"] == task].reset_index(drop=True)
        part.attrs = dict(agg.attrs)
        have = {tuple(r) for r in part[list(MATCH_FIELDS)].itertuples(index=False)}
        missing = [p for k, p in PUBLISHED.items() if p.table == name and k not in have]
        tables[name] = format_table(part, ["glimpse_size", "glimpses"], published=PUBLISHED,
                                    quoted=(*BASELINES[name], *missing),
                                    baseline=baseline if len(part) else None)
    return tables


def summary(agg: pd.DataFrame) -> pd.DataFrame:
    """The CSV form of an `aggregate` table: by fields (tuples as "[64, 128]"), n,
    <metric>_mean, <metric>_t95_low, <metric>_t95_high (its 95% Student t interval), <metric>_std
    (fractions as logged, ddof=1), flagged, complete, and flagged_in_statistics (whether n and the
    mean count the flagged runs: the default)."""
    metric = agg.attrs.get("metric") or schema.TEST_ERROR
    by = agg.attrs.get("by", [])
    out = agg[by].copy()
    for c in by:
        if out[c].map(lambda v: isinstance(v, tuple)).any():
            out[c] = out[c].map(cell_text)
    out["n"] = agg["n"]
    out[f"{metric}_mean"] = agg["mean"]
    level = f"t{100 * agg.attrs.get('confidence', CONFIDENCE):g}"
    out[f"{metric}_{level}_low"], out[f"{metric}_{level}_high"] = agg["t_low"], agg["t_high"]
    out[f"{metric}_std"] = agg["std"]
    out["flagged"], out["complete"] = agg["flagged"], agg["complete"]
    out["flagged_in_statistics"] = not agg.attrs.get("exclude_flagged", False)  # what n and the mean hold
    return out


CATEGORY_NOTE = ("category: `by construction` holds or fails by how a run is built (`writes`: with ReLU6 and W = 0 "
                 "at the start, theta = 0 writes nothing and the run cannot learn through its memory, so writes -> "
                 "no_learning checks the implementation, it predicts nothing; `activation`: the config admits only "
                 "bounded, nonnegative activations), `could fail` can be broken by the rates chosen or learned "
                 "(`flags` says in how many runs it was), `informational` never flags a run; `any flag` is the run's "
                 "verdict")


def format_predictions(predictions: pd.DataFrame, rules: str) -> str:
    """Markdown of `outcomes.prediction_table`: per condition (its category, source and the runs it flagged) and
    outcome, the 2x2 counts, precision and recall; `rules` (`outcomes.rules`) is the caption's second half."""
    header = ["condition", "category", "source", "flags", "outcome", "flagged & outcome", "flagged, no outcome",
              "outcome, not flagged", "neither", "precision", "recall"]
    lines = [f"Table: how well each condition (a prediction: from Appendix A, from Section 3.1 read as a requirement, "
             f"or derived here, as `source` says) foretells each measured outcome: 2x2 counts of runs, precision = "
             f"outcome among flagged, recall = flagged among outcome (— where nothing to divide); flags: runs the "
             f"condition flagged (for an informational one: runs where it did not hold); {CATEGORY_NOTE}; {rules}.",
             "", "| " + " | ".join(header) + " |", "|---|---|---|---:|---|" + "---:|" * 6]
    for r in predictions.to_dict("records"):
        name = f"{r['condition']} (informational)" if r["informational"] else r["condition"]
        flags = r["flagged_and_outcome"] + r["flagged_no_outcome"]
        cells = [name, r.get("category", "—"), r["source"], str(flags), r["outcome"],
                 *(str(r[k]) for k in ("flagged_and_outcome", "flagged_no_outcome", "outcome_not_flagged", "neither")),
                 *("—" if math.isnan(r[k]) else f"{r[k]:.2f}" for k in ("precision", "recall"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
