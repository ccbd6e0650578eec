"""The layers keep to their imports (../README.md's layout): each checked by importing every module of a
layer in a fresh Python where the packages it must not use are blocked (an import of one raises).

- config, schema, conditions, provenance, store_uri: plain values and helpers, no torch;
- model and train: torch, never Ray or MLflow;
- study: train, Ray and MLflow, never the benchmark or the analysis;
- bench: the loop, never Ray, MLflow or the study layer (its packed-trials variant's Tuner is in studies/throughput.py);
- analysis (the library, its notebooks and shipped-results scripts): never the study layer, the loop or Ray.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: a finder first on sys.meta_path refuses the blocked top-level packages (and
# dotted ones, e.g. stawm.study), then every module of the named packages is imported.
IMPORT_ALL = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys
    blocked, packages, modules = {blocked!r}, {packages!r}, {modules!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in blocked):
                raise ImportError(f"blocked: {{name}}")

    sys.meta_path.insert(0, Block())
    for package in packages:
        root = importlib.import_module(package)
        modules += [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")
                    if not m.name.endswith(".__main__")]  # a command: importing it runs it
    for name in modules:
        importlib.import_module(name)
    print(len(modules))
""")


def import_all(blocked: list[str], packages: list[str] = (), modules: list[str] = ()) -> int:
    """How many modules imported with `blocked` refused; fails the test with the import error otherwise."""
    code = IMPORT_ALL.format(blocked=list(blocked), packages=list(packages), modules=list(modules))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def test_the_blocker_blocks():
    """The check itself: a module that does import a blocked package fails it."""
    with pytest.raises(AssertionError, match="blocked: ray"):
        import_all(["ray"], modules=["stawm.study.runner"])


def test_config_schema_conditions_and_provenance_need_no_torch():
    assert import_all(["torch", "ray", "mlflow", "sqlalchemy"],
                      modules=["stawm", "stawm.config", "stawm.schema", "stawm.conditions", "stawm.provenance",
                               "stawm.store_uri"]) == 6  # store_uri imports SQLAlchemy only when it parses a URL


def test_model_and_train_never_import_ray_or_mlflow():
    count = import_all(["ray", "mlflow", "optuna", "stawm.study", "stawm.bench", "stawm.analysis"],
                       packages=["stawm.model", "stawm.train"])
    expected = {f"{p.parent.name}.{p.stem}" for folder in ("model", "train")
                for p in (REPO / "stawm" / folder).glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert count == len(expected)  # every module of both folders (but __main__, the command)


def test_bench_knows_the_loop_only():
    count = import_all(["ray", "mlflow", "optuna", "stawm.study", "stawm.analysis"], packages=["stawm.bench"])
    assert count == len(list((REPO / "stawm" / "bench").glob("*.py"))) - 1  # all but __init__, where the walk starts


def test_the_study_layer_never_imports_the_layers_above_it():
    count = import_all(["stawm.analysis", "stawm.bench"], packages=["stawm.study"])
    assert count == len(list((REPO / "stawm" / "study").glob("*.py"))) - 1  # all but __init__, where the walk starts


def test_analysis_never_imports_the_study_layer_or_the_loop():
    blocked = ["stawm.study", "stawm.train", "stawm.bench", "ray", "optuna"]
    count = import_all(blocked, packages=["stawm.analysis"])
    assert count == len(list((REPO / "analysis").glob("*.py"))) - 1  # all but __init__, which the walk starts from
    # the notebooks and the shipped-results scripts run as users run them: read their imports
    sources = {path: "\n".join(line for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"
                               for line in "".join(cell["source"]).splitlines() if not line.startswith(("%", "!")))
               for path in (REPO / "analysis").glob("*.ipynb")}
    sources.update({path: path.read_text() for path in (REPO / "analysis" / "results").rglob("*.py")})
    assert len(sources) >= 4
    for path, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not any(name == b or name.startswith(b + ".") for b in blocked), f"{path.name}: {name}"
