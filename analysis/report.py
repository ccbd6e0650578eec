"""Report of one study: table (Markdown, LaTeX), summary CSV and plots, logged on the study's parent run.

    python -m analysis.report --study NAME --tracking-uri URI --out DIR

writes into DIR:
- table.md, table.tex: test error per configuration, mean ± std (ddof=1) over seeds, beside the
  paper's Table 1 when the study varies only what Table 1 varies (preset, task, glimpse_size,
  glimpses) or nothing but the seed;
- summary.csv: one row per configuration: the swept fields, n, test_error_mean, test_error_std
  (fractions as logged, ddof=1), flagged, complete; runs.csv: one row per trial;
- ablation_<field>.png/.svg for each swept field; curves_test_error.png/.svg (mean ± std band);
  for memory-rate studies stability_map.png/.svg, and rate_trajectories.png/.svg when some runs
  learned their rates;
then logs them under "report/" as artifacts of the study's parent run.
Swept fields are the parent's `swept` param, else the config fields that vary across trials.
An unknown or empty study prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TABLE1_FIELDS = {"preset", "task", "glimpse_size", "glimpses"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="study name (the MLflow experiment)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--out", required=True, type=Path, help="folder for the report files (created)")
    p.add_argument("--metric", default="test_error", help="metric to tabulate and plot, the final value of each run (default: test_error)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds each configuration should have (default: the parent run's `seeds` param)")
    p.add_argument("--include-flagged", action="store_true",
                   help="keep runs that broke the Appendix A conditions in the statistics (they are always counted)")
    p.add_argument("--baseline", default=None, metavar="FIELD=VALUE[,FIELD=VALUE]",
                   help="configuration the table's Welch t-test p-values compare against, e.g. learnable_rates=False")
    p.add_argument("--published", choices=("auto", "on", "off"), default="auto",
                   help="show the paper's Table 1 values; auto: when the study varies only preset, task, "
                        "glimpse_size, glimpses, or nothing but the seed (default: auto)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/mlflow-history"),
                   help="where finished runs' metric histories are cached as parquet (default: .cache/mlflow-history)")
    p.add_argument("--no-curves", action="store_true", help="skip the training curves (no history fetch)")
    p.add_argument("--no-log", action="store_true", help="write the files only; do not log them on the parent run")
    return p.parse_args(argv)


def _baseline(text: str | None) -> dict | None:
    from analysis.results import cast_param
    from stawm.config import field_types

    if not text:
        return None
    types, out = field_types(), {}
    for part in text.split(","):
        field, _, value = part.partition("=")
        field = field.strip()
        if field not in types:
            raise SystemExit(f"error: --baseline names {field!r}, not a config field")
        out[field] = cast_param(field, value.strip(), types[field])
    return out


def write_report(args: argparse.Namespace) -> list[Path]:
    """Every report file for the study, written into args.out; returns their paths."""
    from analysis import results as R

    runs, info = R.load_study(args.study, args.tracking_uri)
    swept = R.swept_fields(runs, info)
    seeds = args.seeds if args.seeds is not None else info["seeds"]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.study}: {len(runs)} trials, swept {swept or 'nothing but the seed'}, "
          f"{int(runs['flagged'].sum())} flagged", file=sys.stderr)

    published = args.published == "on" or (args.published == "auto" and (
        not swept or "preset" in swept or set(swept) <= TABLE1_FIELDS))
    by = list(swept)
    if published:  # also group by task, glimpse_size, glimpses where each configuration has one value of each
        per_config = runs.groupby(swept) if swept else runs.groupby(lambda _: 0)
        by += [f for f in R.MATCH_FIELDS if f not in by and per_config[f].nunique(dropna=False).max() == 1]
        published = set(R.MATCH_FIELDS) <= set(by)
    agg = R.aggregate(runs, by, args.metric, seeds, args.include_flagged)
    table = R.format_table(agg, swept or [f for f in by if f in R.MATCH_FIELDS] or None,
                           published=R.PUBLISHED if published else None, baseline=_baseline(args.baseline))
    paths = [out / "table.md", out / "table.tex", out / "summary.csv", out / "runs.csv"]
    paths[0].write_text(table.markdown)
    paths[1].write_text(table.latex)
    R.summary(R.aggregate(runs, swept, args.metric, seeds, args.include_flagged)).to_csv(paths[2], index=False)
    columns = ["run_id", "status", "seed", *swept, args.metric, "best_test_error", "stability_ok", "flags",
               "diverged"]
    runs[list(dict.fromkeys(c for c in columns if c in runs))].to_csv(paths[3], index=False)

    figures = R.ablation_figures(runs, swept, args.metric, seeds, args.include_flagged, swept=swept)
    if not args.no_curves:
        history = R.metric_history(runs, args.metric, args.tracking_uri, args.cache_dir)
        if len(history):
            figures[f"curves_{args.metric}"] = R.plot_curves(history, swept[0] if swept else None, runs,
                                                             args.include_flagged)
    if set(swept) & set(R.RATE_FIELDS):
        figures["stability_map"] = R.plot_stability_map(runs)
        if len(R.learnable(runs)):
            rates = R.metric_histories(R.learnable(runs), R.RATES, args.tracking_uri, args.cache_dir)
            if len(rates):
                figures["rate_trajectories"] = R.plot_rate_trajectories(rates, runs)
    for name, fig in figures.items():
        paths += R.save_figure(fig, out, name)

    if args.no_log:
        return paths
    if info["parent_run_id"] is None:
        print(f"warning: study {args.study!r} has no parent run (tag stawm.role=study); files not logged",
              file=sys.stderr)
        return paths
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    for path in paths:
        client.log_artifact(info["parent_run_id"], str(path), "report")
    print(f"wrote {len(paths)} files to {out} and logged them on run {info['parent_run_id']} under report/",
          file=sys.stderr)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    from analysis.results import StudyNotFound

    try:
        write_report(args)
    except StudyNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
