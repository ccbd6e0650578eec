"""`python -m stawm.train` end to end on the no-network digit sample, and its usage errors.

The first run goes through the command itself (a subprocess); the refusal, the resume and the usage
errors call `stawm.train.main(argv)` in-process: the same code, without a Python start-up each.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stawm import schema
from stawm.train.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stawm.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def exit_status(argv: list[str]) -> int:
    """main's return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_one_run_writes_json_and_checkpoint_then_resumes(tmp_path, capsys):
    out = tmp_path / "out.json"
    args = ["--preset", "tiny", "--epochs", "1", "--seed", "0", "--set", "max_steps=3", "--set", "glimpses=2",
            "--checkpoint-dir", str(tmp_path / "run"), "--json", str(out)]
    done = run(*args, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "epoch   1" in done.stdout and "test error" in done.stdout and "conditions met" in done.stdout
    result = json.loads(out.read_text())
    assert 0 <= result[schema.TEST_ERROR] <= 1  # a fraction, at the top level
    assert result["config"]["glimpses"] == 2 and result["config"]["max_steps"] == 3
    assert result["stability"]["ok"] is True
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert exit_status(args) == 2 and "--resume" in capsys.readouterr().err  # would overwrite: refused
    more = ["--preset", "tiny", "--epochs", "2", "--set", "max_steps=3", "--set", "glimpses=2",
            "--resume", str(tmp_path / "run")]
    assert exit_status(more) == 0
    printed = capsys.readouterr().out
    assert "epoch   2" in printed and "epoch   1" not in printed


@pytest.mark.parametrize("argv, expected", [
    (["--preset", "mnist-9"], "mnist-9"),
    (["--preset", "tiny", "--set", "glimpse=3"], "unknown config field(s) ['glimpse']"),
    (["--preset", "tiny", "--set", "glimpse_size=40"], "glimpse_size=40"),
    (["--preset", "tiny", "--set", "glimpses"], "FIELD=VALUE"),
    (["--preset", "tiny", "--resume", "{tmp}/nothing"], "no checkpoint.pt"),
])
def test_bad_arguments_are_usage_errors_naming_them(tmp_path, capsys, argv, expected):
    assert exit_status([a.format(tmp=tmp_path) for a in argv]) == 2
    assert expected in capsys.readouterr().err


def test_missing_data_stops_before_training(tmp_path, capsys):
    status = exit_status(["--preset", "tiny", "--dataset", "mnist", "--data-root", str(tmp_path / "empty"),
                          "--epochs", "1", "--checkpoint-dir", str(tmp_path / "run")])
    printed = capsys.readouterr()
    assert status == 2
    assert "train-images-idx3-ubyte" in printed.err and "epoch" not in printed.out


def test_a_corrupt_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a torch file")
    status = exit_status(["--preset", "tiny", "--epochs", "1", "--resume", str(run)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("stawm-train: error: ") and f"{run / 'checkpoint.pt'} is not a readable checkpoint" in err


def test_damaged_mnist_is_one_line_and_status_2(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00" * 20)  # as if a download had been cut off after 20 bytes
    status = exit_status(["--preset", "tiny", "--dataset", "mnist", "--data-root", str(tmp_path), "--epochs", "1",
                          "--checkpoint-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "train-images-idx3-ubyte is not an MNIST IDX file" in err and "put the original" in err
