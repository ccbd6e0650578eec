"""`python -m stawm.train` end to end on the no-network digit sample, and its usage errors."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stawm.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_one_run_writes_json_and_checkpoint_then_resumes(tmp_path):
    out = tmp_path / "out.json"
    args = ["--preset", "tiny", "--epochs", "1", "--seed", "0", "--set", "max_steps=3", "--set", "glimpses=2",
            "--checkpoint-dir", str(tmp_path / "run"), "--json", str(out)]
    done = run(*args, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "epoch   1" in done.stdout and "test error" in done.stdout and "stable" in done.stdout
    result = json.loads(out.read_text())
    assert 0 <= result["test_error"] <= 1  # a fraction, at the top level
    assert result["config"]["glimpses"] == 2 and result["config"]["max_steps"] == 3
    assert result["stability"]["ok"] is True
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    again = run(*args, cwd=REPO)  # would overwrite: refused, pointing at --resume
    assert again.returncode == 2 and "--resume" in again.stderr
    more = run("--preset", "tiny", "--epochs", "2", "--set", "max_steps=3", "--set", "glimpses=2",
               "--resume", str(tmp_path / "run"), cwd=REPO)
    assert more.returncode == 0, more.stderr
    assert "epoch   2" in more.stdout and "epoch   1" not in more.stdout


def test_bad_arguments_are_usage_errors_naming_them(tmp_path):
    unknown = run("--preset", "mnist-9", cwd=tmp_path)
    assert unknown.returncode == 2 and "mnist-9" in unknown.stderr
    bad_field = run("--preset", "tiny", "--set", "glimpse=3", cwd=REPO)
    assert bad_field.returncode == 2 and "unknown config field(s) ['glimpse']" in bad_field.stderr
    bad_value = run("--preset", "tiny", "--set", "glimpse_size=40", cwd=REPO)
    assert bad_value.returncode == 2 and "glimpse_size=40" in bad_value.stderr
    not_pair = run("--preset", "tiny", "--set", "glimpses", cwd=REPO)
    assert not_pair.returncode == 2 and "FIELD=VALUE" in not_pair.stderr
    no_checkpoint = run("--preset", "tiny", "--resume", str(tmp_path / "nothing"), cwd=REPO)
    assert no_checkpoint.returncode == 2 and "no checkpoint.pt" in no_checkpoint.stderr


def test_missing_data_stops_before_training(tmp_path):
    done = run("--preset", "tiny", "--dataset", "mnist", "--data-root", str(tmp_path / "empty"), "--epochs", "1",
               "--checkpoint-dir", str(tmp_path / "run"), cwd=REPO)
    assert done.returncode == 1
    assert "train-images-idx3-ubyte" in done.stderr and "epoch" not in done.stdout
