"""Where a result came from: the commit (from the submitting shell or from git), the command line, no secrets."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from stawm import provenance
from stawm.study import tracking
from stawm.study.flags import ClusterFlags, StudyArgs, StudyFlags

REPO = provenance.PROJECT_ROOT


@pytest.mark.parametrize("text, shown", [
    ("postgresql+psycopg://stawm:hunter2@db.internal:5432/mlflow", "postgresql+psycopg://stawm:***@db.internal:5432/mlflow"),
    ("s3://AKIAXYZ:abc/def+ghi@bucket/ray", "s3://AKIAXYZ:***@bucket/ray"),
    ("http://user:p%40ss@10.0.1.23:5000", "http://user:***@10.0.1.23:5000"),
    ("s3://bucket/ray?region=us-west-2&secret_key=abc&access_key=AKIA", "s3://bucket/ray?region=us-west-2&secret_key=***&access_key=***"),
    ("--tracking-uri http://10.0.1.23:5000 --storage s3://bucket/ray", "--tracking-uri http://10.0.1.23:5000 --storage s3://bucket/ray"),
    ("x.py --optuna-storage 'postgresql://a:b@h/db' -v", "x.py --optuna-storage 'postgresql://a:***@h/db' -v"),
    ("sqlite:////home/ubuntu/mlflow/mlflow.db", "sqlite:////home/ubuntu/mlflow/mlflow.db"),
])
def test_redact_hides_passwords_and_secret_parameters_only(text, shown):
    assert provenance.redact(text) == shown


def test_commit_comes_from_the_submitting_shell_first(monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv(provenance.COMMIT_ENV, f"{sha}-dirty")
    assert provenance.git_state() == (sha, True)
    monkeypatch.setenv(provenance.COMMIT_ENV, sha)
    assert provenance.git_state() == (sha, False)


def test_commit_from_git_matches_git_and_the_readme_submit_command(monkeypatch):
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    commit, dirty = provenance.git_state()
    assert commit == head
    assert described == head + ("-dirty" if dirty else "")  # what the README's `ray job submit` passes
    monkeypatch.setenv(provenance.COMMIT_ENV, described)
    assert provenance.git_state() == (commit, dirty)  # the job reads back what git said here


def test_without_git_or_the_variable_the_commit_is_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    monkeypatch.setattr(provenance, "PROJECT_ROOT", tmp_path)  # a copy without .git, as a Ray job's
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.git_state() == (provenance.UNKNOWN, None)


def test_the_parent_runs_params_and_description_carry_no_password(monkeypatch):
    @dataclasses.dataclass
    class Own:  # a study's own flags (studies/search.py's)
        optuna_storage: str = "postgresql://o:pw@db/optuna"

    args = StudyArgs(StudyFlags(name="s", seeds=1, tracking_uri="postgresql://stawm:hunter2@db/mlflow"),
                     cluster=ClusterFlags(storage="s3://KEY:SECRET@bucket/ray"), own=Own(), config={"epochs": 1})
    params = tracking.study_params(args, ["glimpse_size"])
    shown = " ".join(str(v) for v in params.values())
    assert "hunter2" not in shown and "SECRET" not in shown and ":pw@" not in shown
    assert params["tracking_uri"] == "postgresql://stawm:***@db/mlflow" and params["storage"] == "s3://KEY:***@bucket/ray"
    monkeypatch.setattr(sys, "orig_argv", ["python", "studies/x.py", "--tracking-uri", "http://u:hunter2@h:5000"])
    assert provenance.command_line() == "python studies/x.py --tracking-uri http://u:***@h:5000"
