"""Analysis of STAWM studies: runs from MLflow, aggregation over seeds, tables, plots, notebooks.

`analysis.results` holds every function (the data shape is stated once in its docstring);
`python -m analysis.report` and the notebooks in this folder only call them.
Nothing is imported here, so `python -m analysis.report --help` stays quick.
"""
