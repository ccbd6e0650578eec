"""Report of one study: table (Markdown, LaTeX), summary CSV and plots, logged on the study's parent run.

    stawm-report --study NAME --tracking-uri URI --out DIR
    stawm-report --from analysis/results/NAME --out DIR      # from shipped results (export.py), no MLflow

writes into DIR:
- table.md, table.tex: test error per configuration, mean [95% Student t interval] over seeds, std (ddof=1)
  and n, beside the paper's Table 1 when the study varies only what Table 1 varies (preset, task,
  glimpse_size, glimpses) or nothing but the seed;
- summary.csv: one row per configuration: the swept fields, n, test_error_mean, test_error_t95_low,
  test_error_t95_high, test_error_std (fractions as logged, ddof=1), flagged, complete; runs.csv: one row per trial;
- comparisons.md/.csv, where one applies: trends as Spearman's rho [95% Fisher-z interval] with p (error
  against N, S_g, or delta among theta > 0 runs), and differences of means [95% Welch interval] with Welch's
  p and both n's (the best N or S_g against the paper's, delta > 1 against delta <= 0.2 among theta > 0 runs,
  learnable against fixed rates), every run of a group counted, left-out runs counted with why;
- ablation_<field>.png/.svg for each swept field; curves_test_error.png/.svg (mean, 95% t interval band);
- predictions.md/.csv (for each condition, its category and source and, for each measured outcome, the 2x2
  counts with precision and recall; the rules in analysis/outcomes.py); degraded_sweep.csv and
  degraded_sweep.png/.svg (the `degraded` factor swept: runs degraded, all and among those that trained, and
  each condition's precision and recall), where the study has runs at the paper's configuration;
- for memory-rate studies: condition_map and outcome_map (learned rates at their final values, arrows from
  the start), error_heatmaps (linear per theta, the `degraded` threshold marked), error_by_rate, memory_state
  (read-outs at 0 and at Lambda, max |W|: medians and quartiles), and rate_trajectories when some runs
  learned their rates (.png/.svg each);
every mean counts every run, flagged ones included, unless --exclude-flagged (the captions say which);
then logs them under "report/" as artifacts of the study's parent run (not from shipped results).
Swept fields are the parent's swept param, else the config fields that vary across trials.
Everything is computed before the first file is written, and each file is written whole, so a
failed report leaves no half-written folder. Bad input (an unknown or empty study, a folder that
cannot be written, a malformed --baseline, a metric no run logged) prints one line on stderr and
exits with status 2.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

from stawm.flags import Group, StoreFlags, default_tracking_uri, flag, flat, parse


class BadInput(ValueError):
    """A flag's value the report cannot use; the message names the flag and the fix."""


@flat("store")  # args.tracking_uri, args.cache_dir: see stawm.flags.flat
@dataclass
class ReportArgs:
    """stawm-report's own flags, and the MLflow store it reads (the group stawm-export shares)."""

    out: Path  # folder for the report files (created)
    # study name (the MLflow experiment); not with --from
    study: Annotated[Optional[str], flag(unset="none: --from")] = None
    # a folder of shipped results (stawm-export) to read instead of MLflow
    results: Annotated[Optional[Path], flag(name="from", metavar="FOLDER", unset="none: --study")] = None
    # metric to tabulate and plot, the final value of each run
    metric: Annotated[Optional[str], flag(unset="the test error")] = None
    # seeds each configuration should have
    seeds: Annotated[Optional[int], flag(unset="the parent run's seeds param")] = None
    # leave runs that failed a flagging condition out of the means (else every run counts; the flagged column
    # counts them either way, and the captions say which was used)
    exclude_flagged: bool = False
    # a run is `degraded` when its final error is at least X times the mean of the study's runs at the paper's
    # configuration (the report also sweeps X over outcomes.py's DEGRADED_FACTORS)
    degraded_factor: Annotated[Optional[float], flag(metavar="X", unset="outcomes.py's DEGRADED_FACTOR")] = None
    # configuration the table's Welch t-test p-values compare against, e.g. learnable_rates=False
    baseline: Annotated[Optional[str], flag(metavar="FIELD=VALUE[,FIELD=VALUE]", unset="none")] = None
    # show the paper's Table 1 values; auto: when the runs are on full MNIST and the study varies only preset,
    # task, glimpse_size, glimpses, or nothing but the seed
    published: Literal["auto", "on", "off"] = "auto"
    no_curves: bool = False  # skip the training curves (no history fetch)
    no_log: bool = False  # write the files only; do not log them on the parent run
    store: Group[StoreFlags] = field(default_factory=StoreFlags)


def parse_args(argv=None) -> ReportArgs:
    # the summary and the two commands: tyro reflows the rest of the docstring's lists into one paragraph
    args = parse(ReportArgs, argv, prog="stawm-report", description="\n\n".join(__doc__.split("\n\n")[:2]))
    args.tracking_uri = args.tracking_uri or default_tracking_uri()
    return args


def parse_baseline(text: str | None) -> dict | None:
    """--baseline "delta=0.2,learnable_rates=False" -> {"delta": 0.2, "learnable_rates": False},
    typed by the config fields. A comma starts a new pair only before NAME=, so a tuple field's
    value keeps its commas (glimpse_channels=64,128)."""
    from stawm import schema
    from stawm.config import field_types

    if not text:
        return None
    example = "e.g. --baseline learnable_rates=False"
    try:
        pairs = schema.parse_pairs(re.split(r",(?=\s*\w+\s*=)", text), "--baseline")
        types = field_types()
        unknown = [name for name in pairs if name not in types]
        if unknown:
            raise BadInput(f"--baseline names {unknown[0]!r}, not a config field; {example}")
        return {name: schema.parse_value(name, value, types[name]) for name, value in pairs.items()}
    except schema.ParamError as err:
        message = str(err) if str(err).startswith("--baseline") else f"--baseline {err}"
        raise BadInput(f"{message}; {example}") from None


def build_report(args: ReportArgs, baseline: dict | None) -> tuple[dict, str | None]:
    """Every report file of the study, computed, none written: ({file name: content}, parent run id).

    Contents are text, DataFrames (CSV) or Figures.
    """
    from stawm import schema
    from stawm.config import field_types

    from . import comparisons, outcomes, plots, recheck, source, stability_plots, stats, store, tables

    study = source.open_study(args.study, args.tracking_uri, results=args.results, cache_dir=args.cache_dir)
    runs, info = study.runs, study.info
    metric = args.metric or schema.TEST_ERROR
    if metric not in runs:
        config = set(field_types())
        logged = sorted(c for c in runs.columns
                        if c not in config and c not in store.META + store.STABILITY and runs[c].dtype.kind == "f")
        raise BadInput(f"--metric {metric}: no run of study {info.study!r} logged it; pass one of {logged}")
    swept = store.swept_fields(runs, info)
    seeds = args.seeds if args.seeds is not None else info.seeds
    print(f"{info.study}: {len(runs)} trials, swept {swept or 'nothing but the seed'}, "
          f"{int(runs['flagged'].sum())} flagged", file=sys.stderr)

    table1_fields = {"preset", *tables.MATCH_FIELDS}
    on_mnist = "dataset" in runs and (runs["dataset"] == "mnist").all()  # Table 1 is full MNIST, not the sample
    published = args.published == "on" or (args.published == "auto" and on_mnist and (
        not swept or "preset" in swept or set(swept) <= table1_fields))
    by = list(swept)
    if published:  # also group by task, glimpse_size, glimpses where each configuration has one value of each
        per_config = runs.groupby(swept) if swept else runs.groupby(lambda _: 0)
        by += [f for f in tables.MATCH_FIELDS if f not in by and per_config[f].nunique(dropna=False).max() == 1]
        published = set(tables.MATCH_FIELDS) <= set(by)
    agg = stats.aggregate(runs, by, metric, seeds, args.exclude_flagged)
    try:
        table = tables.format_table(agg, swept or [f for f in by if f in tables.MATCH_FIELDS] or None,
                                    published=tables.PUBLISHED if published else None, baseline=baseline)
    except tables.BaselineError as err:
        raise BadInput(f"--baseline: {err}; name values of the swept fields {swept}") from None
    columns = ["run_id", "status", "seed", *swept, metric, schema.BEST_TEST_ERROR, "stability_ok", "flags", "diverged"]
    files = {"table.md": table.markdown, "table.tex": table.latex,
             "summary.csv": tables.summary(stats.aggregate(runs, swept, metric, seeds, args.exclude_flagged)),
             "runs.csv": runs[list(dict.fromkeys(c for c in columns if c in runs))]}

    compared = comparisons.study_comparisons(runs, swept, metric)
    if len(compared):
        files["comparisons.csv"] = compared
        files["comparisons.md"] = comparisons.format_comparisons(compared)

    figures = plots.ablation_figures(runs, swept, metric, seeds, args.exclude_flagged, swept=swept)
    if not args.no_curves:
        history = study.history([metric])
        if len(history):
            figures[f"curves_{metric}"] = plots.plot_curves(history, swept, runs, args.exclude_flagged)
    rate_history = study.history(schema.RATE_METRICS)
    runs = recheck.with_rate_divergence(runs, rate_history)  # a non-finite learned rate: diverged, an outcome
    factor = outcomes.DEGRADED_FACTOR if args.degraded_factor is None else args.degraded_factor
    measured = outcomes.measure(runs, factor, metric=metric)
    first = recheck.condition_epochs(runs, study.stability(), rate_history)
    flagged = runs.set_index("run_id")["flagged"]
    predictions = outcomes.prediction_table(first, measured, flagged)
    reference = outcomes.paper_reference(runs, metric)
    files["predictions.csv"] = predictions
    files["predictions.md"] = tables.format_predictions(predictions, outcomes.rules(runs, factor, reference))
    sweep = outcomes.degraded_sweep(runs, first, outcomes.DEGRADED_FACTORS, flagged, metric=metric)
    if len(sweep):
        files["degraded_sweep.csv"] = sweep
        figures["degraded_sweep"] = stability_plots.plot_degraded_sweep(sweep)
    if set(swept) & set(stats.rate_fields()):
        figures["condition_map"] = stability_plots.plot_condition_map(runs)
        figures["outcome_map"] = stability_plots.plot_outcome_map(runs, measured)
        figures["error_heatmaps"] = stability_plots.plot_error_heatmaps(
            runs, metric, factor * reference if math.isfinite(reference) else None)  # NaN: no paper-rate runs
        figures["error_by_rate"] = stability_plots.plot_error_by_rate(runs, metric)
        if set(stability_plots.MEMORY_STATE) <= set(runs.columns):
            figures["memory_state"] = stability_plots.plot_memory_state(runs)
        trained = stats.learnable(runs)
        if len(trained):
            rates = rate_history[rate_history["run_id"].isin(trained["run_id"])]
            if len(rates):
                figures["rate_trajectories"] = stability_plots.plot_rate_trajectories(rates, runs, measured)
    files.update(figures)
    return files, info.parent_run_id


def write_files(files: dict, out: Path) -> list[Path]:
    """Each file whole into `out` (created): text as UTF-8, DataFrames as CSV, Figures as PNG and SVG."""
    import pandas as pd

    from .files import write_whole
    from .plots import save_figure

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in files.items():
        if isinstance(content, str):
            paths.append(write_whole(out / name, lambda tmp, text=content: tmp.write_text(text, encoding="utf-8")))
        elif isinstance(content, pd.DataFrame):
            paths.append(write_whole(out / name, lambda tmp, frame=content: frame.to_csv(tmp, index=False)))
        else:
            paths += save_figure(content, out, name)
    return paths


def log_files(paths: list[Path], parent_run_id: str | None, args: ReportArgs) -> None:
    from stawm import schema

    if parent_run_id is None:
        print(f"warning: study {args.study!r} has no parent run (tag {schema.ROLE}={schema.ROLE_STUDY}); "
              f"files not logged", file=sys.stderr)
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    for path in paths:
        client.log_artifact(parent_run_id, str(path), schema.REPORT_ARTIFACT_DIR)
    print(f"wrote {len(paths)} files to {args.out} and logged them on run {parent_run_id} under "
          f"{schema.REPORT_ARTIFACT_DIR}/", file=sys.stderr)


def main(argv=None) -> int:
    """`python -m stawm.analysis.report`; the exit status (2: bad input, told in one line on stderr)."""
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    from .files import NotWritable, check_writable
    from .store import StudyNotFound

    try:
        if (args.results is None) == (args.study is None):
            raise BadInput("give --study (with --tracking-uri) or --from FOLDER of shipped results, one of them")
        baseline = parse_baseline(args.baseline)
        if args.degraded_factor is not None and not args.degraded_factor > 0:
            raise BadInput(f"--degraded-factor {args.degraded_factor:g}: give a factor above 0, e.g. 2 (twice the "
                           f"paper-rate runs' error)")
        check_writable(args.out, "--out")  # before any work: a mistyped folder costs nothing
        if not args.no_curves:
            check_writable(args.cache_dir, "--cache-dir")
        files, parent_run_id = build_report(args, baseline)
    except (StudyNotFound, BadInput, NotWritable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        paths = write_files(files, args.out)
    except OSError as err:  # the folder passed the check but writing failed (a full disk, a race)
        print(f"error: --out {args.out}: writing the report failed ({err}); free space or pass another folder",
              file=sys.stderr)
        return 2
    if not args.no_log and args.results is None:
        log_files(paths, parent_run_id, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
