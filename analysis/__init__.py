"""Analysis of STAWM studies, installed as `stawm.analysis`: from an MLflow store to tables and figures.

- store: a study's runs from MLflow in the one data shape (stated in its docstring), metric histories
- stats: aggregation over seeds, Appendix A outcomes
- uncertainty: standard error, bootstrap interval, Welch's t-test
- tables: Markdown, LaTeX and CSV tables, the paper's Table 1
- plots: ablations, curves, the stability map, learned rates (style: how they look)
- files: writing files whole

`stawm-report` and the notebooks in this folder (run headless with
`stawm-notebook`) only call these. Nothing is imported here, so `--help` stays quick.
"""
