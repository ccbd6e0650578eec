"""Where a result came from, fit to record: the commit of the code, the command line, secrets taken out.

Plain Python (no torch, Ray or MLflow), so the analysis and the study layer both use it.

The commit: a study submitted with `ray job submit --working-dir .` runs from a copy of the checkout
without `.git` (Ray leaves it out), so git cannot be asked there. The submitting shell then passes it:

    STAWM_GIT_COMMIT=$(git describe --always --dirty --abbrev=40 --exclude='*') python studies/...

which is the full commit, with `-dirty` after it when the tree had changes that are not committed.
`git_commit()` reads that variable first, then asks git, then says "unknown".

Secrets: a URI such as postgresql://user:PASSWORD@host/db or s3://KEY:SECRET@bucket, or a query
parameter such as ?secret_key=..., is written with the secret replaced by `***` (`redact`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

COMMIT_ENV = "STAWM_GIT_COMMIT"
UNKNOWN = "unknown"
DIRTY_SUFFIX = "-dirty"  # what `git describe --dirty` appends
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MASK = "***"

# user:password@ in any scheme://... ; the user stays (it says which account), the password goes. A secret
# may hold "/" (AWS secret keys do), so it runs to the "@": a path with an "@" in it is masked too, which is safe.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@\s]+)@")
# query or option values whose name says they are secret: ?secret_key=..., &password=..., token=...
_SECRET_PARAM = re.compile(r"(?P<name>\b[A-Za-z_]*(?:secret|password|passwd|token|access_key|session_key|"
                           r"credential)[A-Za-z_]*=)(?P<value>[^&\s'\"]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every password in a URI and every secret-named parameter value replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['name']}{MASK}", text)


def git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the code this process runs: from $STAWM_GIT_COMMIT if set, else from git.

    dirty is None when it cannot be known (no git, no variable): the commit is then "unknown".
    """
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        dirty = given.endswith(DIRTY_SUFFIX)
        return (given[: -len(DIRTY_SUFFIX)] if dirty else given), dirty
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return UNKNOWN, None
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(changed) if changed is not None else None)


def git_commit() -> str:
    """The commit of the code this process runs, "unknown" when neither $STAWM_GIT_COMMIT nor git can say."""
    return git_state()[0]


def command_line() -> str:
    """The exact command that started this process (the interpreter and its own flags included), redacted."""
    return redact(shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
