"""Analysis of STAWM studies, installed as `stawm.analysis`: from an MLflow store to tables and figures.

- store: a study's runs from MLflow in the one data shape (stated in its docstring), metric histories
- stats: aggregation over seeds (mean, 95% t interval, std, n); outcomes: what happened to each run and how
  the conditions predicted it; recheck: the conditions re-checked on recorded rates
- uncertainty: t interval, Welch's difference and test, Spearman's rho with its interval, bootstrap
- comparisons: two groups of runs compared (Welch), trends over a swept field (Spearman)
- tables: Markdown, LaTeX and CSV tables, the paper's Table 1
- plots: ablations, curves; stability_plots: the condition and outcome maps, error by rate, the memory's
  state, learned rates, the degraded sweep (style: how they look)
- files: writing files whole

`stawm-report` and the notebooks in this folder (run headless with
`stawm-notebook`) only call these. Nothing is imported here, so `--help` stays quick.
"""
