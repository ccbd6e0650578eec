"""Run the analysis notebooks headless, with parameters, as papermill does.

    stawm-notebook analysis/table1.ipynb --out run.ipynb -p study=table1 -p tracking_uri=...

Each notebook's first cell is tagged `parameters` and holds the defaults; `run_notebook` injects a
cell tagged `injected-parameters` right after it (papermill's convention, so papermill can run the
same notebooks) and executes everything with nbclient on the `python3` kernel, which must be this
interpreter (ipykernel installed in the venv provides that kernel spec). Parameters are strings.
Bad input (a -p without NAME=, a missing notebook or one without a parameters cell, an --out that
cannot be written) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import nbformat
import tyro

from stawm.flags import PositiveInt, flag, parse

KERNEL_START_S = 300  # how long the kernel may take to answer (nbclient's default is 60 s)


def inject_parameters(nb: nbformat.NotebookNode, parameters: dict) -> nbformat.NotebookNode:
    """A copy of the notebook with `name = repr(value)` lines in a cell after the parameters cell."""
    nb = nbformat.from_dict(nb)  # deep copy
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    source = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, cell)
    return nb


def check_kernel() -> None:
    """Fail unless the `python3` kernel spec runs this interpreter (jupyter_client swaps a bare
    `python` for sys.executable; an absolute path must be this interpreter)."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    exe = spec.argv[0]
    bare = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
    if exe not in bare and Path(exe).resolve() != Path(sys.executable).resolve():
        raise RuntimeError(f"the python3 kernel spec in {spec.resource_dir} runs {exe}, not {sys.executable}; "
                           f"run `{sys.executable} -m ipykernel install --sys-prefix`")


def run_notebook(path: str | Path, parameters: dict, out_path: str | Path | None = None,
                 timeout: int = 600, cwd: str | Path | None = None) -> nbformat.NotebookNode:
    """Execute the notebook at `path` with `parameters` injected; write it to `out_path` if given.

    The kernel starts in `cwd` (default: the current folder, so relative paths in the parameters,
    such as sqlite:///mlflow.db, mean what they mean on the command line) and imports the
    installed `stawm.analysis`. A failing cell raises nbclient's CellExecutionError after the
    partly executed notebook is written to `out_path`.
    """
    from nbclient import NotebookClient

    check_kernel()
    nb = inject_parameters(nbformat.read(str(path), as_version=4), parameters)
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    # startup_timeout: nbclient's 60 s for the kernel to answer was missed on a loaded 2-core machine
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, startup_timeout=KERNEL_START_S,
                            resources={"metadata": {"path": str(cwd)}})
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: a loop of our own, closed afterwards (threads included)
            asyncio.run(client.async_execute())
        else:  # called from inside a running loop (e.g. a notebook): nbclient nests its own
            client.execute()
    finally:
        if out_path is not None:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, str(out_path))
    return nb


@dataclass
class NotebookArgs:
    """stawm-notebook's flags."""

    notebook: tyro.conf.Positional[Path]  # the notebook to run
    out: Path  # where to write the executed notebook
    # a parameter (a string value), repeatable
    parameter: Annotated[list[str], tyro.conf.UseAppendAction, flag(aliases=("-p",), metavar="NAME=VALUE")] = field(
        default_factory=list)
    timeout: PositiveInt = 600  # seconds allowed per cell


def main(argv=None) -> int:
    """`python -m stawm.analysis.notebooks`; the exit status (2: bad input, told in one line on stderr)."""
    from stawm import schema

    from .files import NotWritable, check_writable

    args = parse(NotebookArgs, argv, prog="stawm-notebook", description=__doc__.split("\n\n")[0])
    try:
        params = schema.parse_pairs(args.parameter, "-p")
        if not args.notebook.is_file():
            raise FileNotFoundError(f"no notebook at {args.notebook}; pass the path of an .ipynb file")
        inject_parameters(nbformat.read(str(args.notebook), as_version=4), params)  # has a parameters cell
        check_writable(args.out.parent, "--out")
    except schema.ParamError as err:
        print(f"error: {err}; write -p NAME=VALUE, e.g. -p study=table1", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotWritable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # no parameters cell, or not a notebook (nbformat's NotJSONError)
        fix = "tag its cell of defaults `parameters`" if "parameters" in str(err) else "pass an .ipynb notebook"
        print(f"error: {args.notebook}: {str(err).splitlines()[0]}; {fix}", file=sys.stderr)
        return 2
    run_notebook(args.notebook, params, args.out, timeout=args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
