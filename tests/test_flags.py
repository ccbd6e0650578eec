"""Every flag declared once (`stawm.flags`): one declaration serves several commands, a typed --config.FIELD reaches
the config, bad input is one line and exit status 2, and a study's --help shows its groups.

In-process, through each command's own parse (no Python start-up each); the studies' scripts run end to end in
test_studies.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from stawm import flags
from stawm.config import Config, field_types
from stawm.study import runner, tracking
from stawm.train import cli


@dataclass
class Own:
    """A study's own flags, as a study file declares them."""

    samples: int = 3  # configurations to try


def study_argv(tmp_path, *extra: str) -> list[str]:
    return ["--quick", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "ray"), *extra]


def stopped(parse, capsys) -> tuple[int, list[str]]:
    """The exit status of `parse()` and the lines it wrote on stderr."""
    with pytest.raises(SystemExit) as stop:
        parse()
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_one_declaration_serves_stawm_train_and_a_study(tmp_path):
    data = str(tmp_path / "data")
    shared = ["--data-root", data, "--epochs", "3", "--config.glimpses", "2"]
    trained = cli.parse_args(shared)
    studied = runner.parse_args("a study", preset="mnist-class-8", argv=study_argv(tmp_path, *shared))
    assert trained.data_root == studied.data_root == data  # the study makes it absolute: it is already
    assert isinstance(trained.data, flags.DataFlags) and isinstance(studied.cluster, flags.DataFlags)
    assert trained.configuration.changes() == {"epochs": 3, "glimpses": 2}  # ConfigFlags: one class, both commands
    assert studied.changes == {"dataset": "mnist-sample", "epochs": 3, "glimpses": 2}  # --quick's, then the flags'


def test_a_typed_config_override_reaches_the_config(tmp_path):
    argv = ["--preset", "tiny", "--config.memory-size", "128", "--config.glimpse-channels", "8", "16",
            "--config.learnable-rates", "true", "--config.lr-schedule", "exponential", "--config.context-padding"]
    cfg = cli.parse_args(argv).configuration.config()
    assert (cfg.memory_size, cfg.glimpse_channels, cfg.learnable_rates, cfg.lr_schedule) == (
        128, (8, 16), True, "exponential")
    assert cfg.hidden_size == 64 and cfg.context_padding == ()  # the tiny preset's, and the empty tuple
    args = runner.parse_args("a study", preset="mnist-class-8", argv=study_argv(tmp_path, "--config.memory-size", "16"))
    assert args.config["memory_size"] == 16 and args.changes["memory_size"] == 16
    later = cli.parse_args(["--config.glimpses", "2", "--set", "glimpses=3"]).configuration.config()
    assert later.glimpses == 3  # --set, the older spelling, is applied last


@pytest.mark.parametrize("argv, line", [
    (["--config.memory-size", "x"], "stawm-train: error: --config.memory-size: memory_size='x' is not a valid int"),
    (["--config.learnable-rates", "maybe"], "learnable_rates='maybe' is not a valid bool"),
    (["--config.task", "paint"], "invalid choice 'paint' for argument '--config.task'"),
    (["--epochs", "0"], "stawm-train: error: --epochs: must be at least 1, got 0"),
    (["--config.memory", "128"], "Unrecognized options: --config.memory, 128"),
])
def test_a_bad_flag_is_one_line_and_status_2(argv, line, capsys):
    status, lines = stopped(lambda: cli.parse_args(argv), capsys)
    assert status == 2 and len(lines) == 1 and line in lines[0], lines


def test_a_wrong_type_in_a_study_is_one_line_before_anything_starts(tmp_path, capsys):
    status, lines = stopped(lambda: runner.parse_args(
        "a study", preset="mnist-class-8", argv=study_argv(tmp_path, "--config.glimpses", "2.5")), capsys)
    assert status == 2 and len(lines) == 1 and lines[0].endswith(
        "error: --config.glimpses: glimpses='2.5' is not a valid int")
    assert not (tmp_path / "ray").exists()


def test_a_study_help_shows_its_own_flags_then_the_three_groups(capsys):
    with pytest.raises(SystemExit) as stop:
        runner.parse_args("A study that answers a question.", preset="mnist-class-8", argv=["--help"], own=Own)
    out = capsys.readouterr().out
    assert stop.value.code == 0
    heads = [out.find(f"{group} options") for group in ("study", "config", "cluster")]  # the groups' headings
    assert -1 not in heads and heads == sorted(heads), out
    assert out.index("--samples") < out.index("study options") < out.index("--seeds") < out.index("config options")
    assert out.index("--config.memory-size") < out.index("cluster options") < out.index("--gpus-per-trial")
    assert "M: W is M x M per image" in " ".join(out.split())  # Config's own comment is the help line


def test_the_parent_run_records_every_flag_the_study_own_and_the_overrides(tmp_path):
    args = runner.parse_args("a study", preset="mnist-class-8", own=Own,
                             argv=study_argv(tmp_path, "--samples", "7", "--config.memory-size", "16",
                                             "--set", "glimpses=2"))
    assert args.own.samples == 7
    params = tracking.study_params(args, ["glimpse_size"])
    assert params["samples"] == 7 and params["config.memory_size"] == 16 and params["set"] == "glimpses=2"
    assert params["preset"] == "tiny" and params["max_failures"] == 2 and "config.glimpses" not in params


def test_config_help_comes_from_the_comments_of_config():
    docs = flags.field_comments(Config)
    assert docs["memory_size"] == "M: W is M x M per image"  # the comment ending the line
    assert docs["where_source"].startswith('"pose": where = Linear(6 -> M)(A)')  # the comment above the field
    assert set(docs) == set(field_types())
    overrides = {f for f in flags.ConfigOverrides.__dataclass_fields__}
    assert overrides == set(field_types()) - set(flags.NOT_OVERRIDDEN)  # every other field has its flag


BOXES = {  # what tyro 1.0 draws on stderr, with UTF-8 on stdout and without
    "utf-8": "╭─ Value error ──────────────────────────╮\n"
             "│ Error parsing --seeds: must be at least 1, got 0 │\n"
             "│ ──────────────────────────────────────── │\n"
             "│ Argument helptext:                     │\n"
             "│     --seeds INT                        │\n"
             "╰────────────────────────────────────────╯\n",
    "ascii": " Value error                              \n"
             " ---------------------------------------- \n"
             "  Error parsing --seeds: must be at least 1, got 0\n"
             "  ----------------------------------------\n"
             "  Argument helptext:\n"
             "      --seeds INT\n",
}


@pytest.mark.parametrize("drawn", list(BOXES))
def test_the_error_box_becomes_its_message(drawn):
    assert flags.error_message(BOXES[drawn]) == "--seeds: must be at least 1, got 0"


def test_the_shared_flags_need_no_torch_ray_or_mlflow():
    # the analysis commands import stawm.flags (tests/test_layers.py: analysis never imports the loop or Ray)
    code = "import sys, stawm.flags; print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
