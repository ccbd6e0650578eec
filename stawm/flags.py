"""Every flag of every command, declared once: a documented dataclass field, parsed by tyro.

tyro, because it reads a field's comment as its --help line, so the ~80 `Config` fields get typed flags with the
docs they already have (no second copy), and it shows nested dataclasses as groups of --help; CleanRL, whose
experiment files the studies imitate, uses it too.

The groups several commands share, each a dataclass whose field comments are the help:
- `ConfigFlags` ("config options"): the preset, the shortcuts --authors-code, --epochs, --max-steps, --dataset,
  a typed `--config.FIELD VALUE` for every other Config field (`ConfigOverrides`, generated from `Config` with its
  comments) and `--set FIELD=VALUE`, the older spelling of the same, kept because the commands recorded with the
  shipped results use it;
- `DataFlags` (--data-root, --device), `TrackingFlags` (--tracking-uri) and `StoreFlags` (it and --cache-dir).
A command nests them in its own dataclass (`flat` lets it read them as `args.data_root`; a command's own default,
such as stawm-train's preset, is the group's default_factory) and calls `parse`, which
keeps the project's contract: a bad value, an unknown flag or a failed check is ONE line on stderr,
`PROG: error: MESSAGE`, and exit status 2; --help prints the grouped help and exits 0.

Plain values only (no torch, no Ray): the analysis commands import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, NoReturn, Optional, TypeVar

import tyro
from tyro.constructors import PrimitiveConstructorSpec

from . import schema
from .config import CHOICES, DATASETS, PRESETS, Config, field_types, preset
from .provenance import redact

T = TypeVar("T")

# --- kinds of value --------------------------------------------------------------------------------


def value_type(kind: type, parse: Callable[[str], Any], metavar: str, choices: tuple[str, ...] | None = None,
               show: Callable[[Any], str] = str):
    """A flag's type: `parse` turns its text into the value or raises ValueError, whose message is the
    reason on the error line (`--seeds: must be at least 1, got 0`); `choices` are offered and checked by tyro;
    `show` writes a value as --help shows a default."""
    spec = PrimitiveConstructorSpec(nargs=1, metavar=metavar, instance_from_str=lambda args: parse(args[0]),
                                    is_instance=lambda value: isinstance(value, kind),
                                    str_from_instance=lambda value: [show(value)], choices=choices)
    return Annotated[kind, spec]


def at_least(kind: type, low: float, *, above: bool = False):
    """An int or float flag refusing values below `low` (with above=True: not above it)."""
    def parse(text: str):
        value = kind(text)
        if value < low or (above and value == low):
            raise ValueError(f"must be {'greater than' if above else 'at least'} {low}, got {text}")
        return value
    return value_type(kind, parse, kind.__name__.upper())


def one_of(names: tuple[str, ...]):
    """A flag taking one of `names`."""
    return value_type(str, str, "{" + ",".join(names) + "}", choices=tuple(names))


PositiveInt = at_least(int, 1)
NaturalInt = at_least(int, 0)
NaturalFloat = at_least(float, 0)
PositiveFloat = at_least(float, 0, above=True)
PresetName = one_of(tuple(sorted(PRESETS)))
DatasetName = one_of(DATASETS)


def unset_means(meaning: str):
    """--help's "(default: ...)" of a flag whose empty value ("", 0) stands for `meaning`; a command that gives
    it a default of its own shows that one instead."""
    def hint(shown: str) -> str:
        return f"(default: {meaning if shown in EMPTY else shown})"
    return hint


EMPTY = ("", "''", "0", "0.0", "None")  # how --help shows an empty default


def flag(*, unset: str | None = None, top: bool = False, **options) -> Any:
    """tyro's per-field options: `unset`, what the empty default means; `top`, no group prefix (--preset, not
    --config.preset); `options`, tyro.conf.arg's own (help, metavar, aliases, name)."""
    if unset is not None:
        options["help_behavior_hint"] = unset_means(unset)
    return tyro.conf.arg(**options, **({"prefix_name": False} if top else {}))


Group = tyro.conf.OmitArgPrefixes  # a nested dataclass shown under its own heading of --help, its flags unprefixed


# --- the configuration -----------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in `cls`'s source: the one ending its line, else the comment lines right above it.

    This is what tyro shows as a field's help when it reads a class's source; `ConfigOverrides` is generated,
    has no source, and is given `Config`'s this way."""
    source = textwrap.dedent(inspect.getsource(cls))
    rows = source.splitlines()
    comments = {token.start[0] - 1: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    names, docs = {f.name for f in dataclasses.fields(cls)}, {}
    for i, row in enumerate(rows):
        declared = re.match(r"\s+(\w+)\s*:", row)
        if declared is None or declared[1] not in names or declared[1] in docs:
            continue
        above = i
        while above > 0 and rows[above - 1].lstrip().startswith("#") and "---" not in rows[above - 1]:
            above -= 1  # a block of comment lines right above, not a section's heading
        docs[declared[1]] = comments.get(i) or " ".join(comments[j] for j in range(above, i))
    return docs


# ConfigFlags' own flags (unprefixed); the seed is each command's (stawm-train --seed, a study's --seeds)
SHORTCUTS = ("preset", "authors_code", "epochs", "max_steps", "dataset")
NOT_OVERRIDDEN = (*SHORTCUTS, "seed")


def _override(name: str, kind: type, doc: str) -> tuple:
    """`--config.NAME VALUE`, None when not given. Typed by `schema.parse_value`, as --set's text and MLflow's
    params are, so that a bad value reads the same whichever way it came (`memory_size='x' is not a valid int`);
    a tuple field takes its numbers as separate words (none: the empty tuple)."""
    many = kind is tuple
    choices = CHOICES.get(name)
    metavar = ("INT ..." if many else "{" + ",".join(choices) + "}" if choices else
               "{true,false}" if kind is bool else kind.__name__.upper())
    spec = PrimitiveConstructorSpec(
        nargs="*" if many else 1, metavar=metavar, choices=choices,
        instance_from_str=lambda args: schema.parse_value(name, " ".join(args), kind),
        is_instance=lambda value: value is None or isinstance(value, kind), str_from_instance=lambda v: [str(v)])
    typed = Optional[tuple[int, ...]] if many else Optional[kind]
    return name, Annotated[typed, spec, tyro.conf.FlagConversionOff,  # a bool takes its value: --config.x false
                           flag(help=doc, unset="the preset's")], field(default=None)


_DOCS = field_comments(Config)
ConfigOverrides = dataclasses.make_dataclass(
    "ConfigOverrides",
    [_override(name, kind, _DOCS[name]) for name, kind in field_types().items() if name not in NOT_OVERRIDDEN],
    namespace={"__doc__": "Any Config field; one left out keeps the preset's value.", "__module__": __name__})


@dataclass
class ConfigFlags:
    """The configuration: an Appendix D preset, then what these flags change in it; a later one wins, in the
    order --authors-code, --epochs, --max-steps, --dataset, each --config.FIELD, each --set."""

    preset: Annotated[PresetName, flag(top=True, unset="the command's")] = ""  # the configuration to start from
    # start from the authors' script for the preset instead of the paper (README's table)
    authors_code: Annotated[bool, flag(top=True)] = False
    # passes over the training set
    epochs: Annotated[PositiveInt, flag(top=True, unset="the preset's, i.e. the paper's")] = 0
    # stop each epoch after this many steps (0: the whole epoch); for benchmarks and smoke tests
    max_steps: Annotated[NaturalInt, flag(top=True)] = 0
    dataset: Annotated[DatasetName, flag(top=True, unset="the preset's")] = ""  # the dataset to train on
    # any config field as FIELD=VALUE: --set memory_size=128 is --config.memory-size 128 (the older
    # spelling, which the commands recorded with shipped results use); applied last
    set: Annotated[list[str], tyro.conf.UseAppendAction, flag(top=True, metavar="FIELD=VALUE")] = field(
        default_factory=list)
    overrides: Annotated[ConfigOverrides, flag(name="")] = field(default_factory=ConfigOverrides)  # --config.FIELD

    def changes(self) -> dict:
        """What these flags change in any preset: {field: value}, a --set value still text for Config to type.
        schema.ParamError when a --set is not FIELD=VALUE."""
        changes = {"authors_code": True} if self.authors_code else {}
        given = {name: getattr(self, name) for name in ("epochs", "max_steps", "dataset")}
        changes.update({name: value for name, value in given.items() if value})
        changes.update({name: value for name, value in vars(self.overrides).items() if value is not None})
        return {**changes, **schema.parse_pairs(self.set)}

    def config(self, default_preset: str = "", **base) -> Config:
        """--preset (else `default_preset`) with `base` (a command's own choices) and then these flags' changes;
        ConfigError naming a bad field or value."""
        return preset(self.preset or default_preset, **{**base, **self.changes()})


ConfigGroup = Annotated[ConfigFlags, flag(name="config")]  # --help's "config options"; --config.FIELD


# --- data, device, tracking --------------------------------------------------------------------------


@dataclass
class DataFlags:
    """Where the dataset is, and what trains on it."""

    # the dataset folder (None: the loaders' default)
    data_root: Annotated[Optional[str], flag(unset="$STAWM_DATA or ~/.cache/stawm", metavar="DIR")] = None
    # auto: CUDA when a GPU is visible (to a study's trial: as it starts), else the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI if set, else mlflow.db in the working folder (absolute: Ray workers start elsewhere)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(os.getcwd(), "mlflow.db")


@dataclass
class TrackingFlags:
    """The MLflow store."""

    # the MLflow tracking URI
    tracking_uri: Annotated[str, flag(unset="$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")] = ""


@dataclass
class StoreFlags(TrackingFlags):
    """The MLflow store a study is read from, and the cache of its finished runs' metric histories."""

    cache_dir: Path = Path(".cache/mlflow-history")  # where the histories are cached as parquet


def flat(*groups: str):
    """Class decorator: a property per flag of each named group (a field holding a nested dataclass), so that
    `args.data_root` reads and sets `args.data.data_root`: --help shows groups, the code reads flags flat."""
    def expose(cls):
        for outer in dataclasses.fields(cls):
            if outer.name not in groups:
                continue
            for inner in dataclasses.fields(outer.default_factory()):
                if dataclasses.is_dataclass(inner.default_factory):  # a group inside (--config.FIELD): by its path
                    continue
                assert not hasattr(cls, inner.name), f"{cls.__name__}.{inner.name} is two flags"
                setattr(cls, inner.name, property(
                    lambda self, g=outer.name, n=inner.name: getattr(getattr(self, g), n),
                    lambda self, value, g=outer.name, n=inner.name: setattr(getattr(self, g), n, value)))
        return cls
    return expose


# --- parsing -------------------------------------------------------------------------------------------

MARKERS = (tyro.conf.FlagCreatePairsOff,  # --quick, not also --no-quick: every switch is off unless given
           tyro.conf.DisallowNone)  # None is what a flag left out holds, not a value to type


def parse(cls: type[T], argv: list[str] | None = None, *, prog: str, description: str = "") -> T:
    """`tyro.cli(cls)` under the project's contract: --help prints the grouped help and exits 0; a bad value, an
    unknown or missing flag prints one line, `PROG: error: MESSAGE`, and exits 2.

    tyro draws its errors as a box of several lines: it is captured, drawn without wrapping (it wraps mid-word
    at the terminal's width) and its message kept (`error_message`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    run = dict(args=argv, prog=prog, description=description, config=MARKERS)
    if "-h" in argv or "--help" in argv:
        return tyro.cli(cls, **run)  # the help, at the terminal's width
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box), _unwrapped():
            parsed = tyro.cli(cls, **run)
    except SystemExit as stop:
        if stop.code:
            fail(prog, error_message(box.getvalue()))
        raise
    sys.stderr.write(box.getvalue())  # tyro's warnings, if it had any
    return parsed


@contextlib.contextmanager
def _unwrapped():
    """A terminal wide enough (for tyro, which asks $COLUMNS first) that no line of an error box wraps."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100000"
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TYPE = re.compile(r"^- (<class '[^']+'>|[\w.]+(\[[^\]]*\])?): ")  # "- <class 'int'>: " before a reason


def _is_rule(row: str) -> bool:
    return bool(row) and set(row) <= {"-"}


def error_message(box: str) -> str:
    """The message of tyro's error box, in one line: its text up to the first rule (what follows is the flag's
    help and a pointer to --help), its title when there is no text; `Error parsing --x:` shortened to `--x:`.

    tyro draws the box in UTF-8 lines when stdout's encoding is utf-8, else in ASCII (its title on a line of
    its own, a rule of dashes under it): both are read, as rows with the borders taken off."""
    rows = [_ANSI.sub("", row).strip().strip("│╭╮╰╯").replace("─", "-").strip() for row in box.splitlines()]
    titles = [i for i, row in enumerate(rows) if row.startswith("- ") and row.endswith("-")  # UTF-8: - Title ---
              or (row and not _is_rule(row) and i + 1 < len(rows) and _is_rule(rows[i + 1]))]  # ASCII
    if not titles:
        return " ".join(row for row in rows if row) or "invalid arguments; see --help"
    title, parts = rows[titles[0]].strip("- "), []
    body = rows[titles[0] + 1:]
    for row in body[1:] if body and _is_rule(body[0]) else body:
        if _is_rule(row):  # the rule under the message, or the box's bottom
            break
        if row and row != "Got errors:":
            parts.append(_TYPE.sub("", row))
    if title == "Required options":  # "Missing from PROG:", then a row per argument and one of its help
        missing = [part for part in parts if not part.startswith("Missing from")][::2]
        return "the following arguments are required: " + ", ".join(part.split()[0] for part in missing)
    return re.sub(r"^Error parsing (\S+):", r"\1:", " ".join(parts) or title)


def error_line(prog: str, message) -> str:
    """`PROG: error: MESSAGE`, one line, passwords in URIs masked."""
    return f"{prog}: error: {redact(' '.join(str(message).split()))}\n"


def fail(prog: str, message) -> NoReturn:
    """A command's bad input, before it does anything: one line on stderr, exit status 2."""
    sys.stderr.write(error_line(prog, message))
    sys.exit(2)
