"""A trial's checkpoints on Ray Tune's storage: the runner state beside the loop's, resuming from the
newest complete one, and emptying the older ones.

Each epoch a trial reports a folder holding the loop's checkpoint (`stawm.train.CHECKPOINT`, all its
members), RUNNER_STATE: the epoch, the checkpoint's size (a copy cut short by a kill is told by it)
and each member's state (its stability report, best test error, whether it stopped), and once a test error was
measured BEST_WEIGHTS: each member's weights at its lowest test error so far (`stawm.study.models.keep_best`).

Tune is told to delete no checkpoint (`runner.run_config`): with num_to_keep=1 it deletes checkpoint
k-1 as soon as k is registered, while the experiment state on storage still names k-1 until its next
snapshot, and a driver killed in between leaves a study that cannot resume. Instead the trial empties
older folders itself (`keep_only`, `drop_payload`), keeping the folders Tune's saved state may name,
and a resumed trial takes the newest complete one (`restore_newest`), whichever Tune names.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from pathlib import Path

import pyarrow.fs
from ray import tune

from ..config import Config
from ..train import CHECKPOINT

URI_SCHEMES = {"gcs": "gs"}  # pyarrow filesystem type -> URI scheme, where they differ (s3 is s3)
RUNNER_STATE = "runner_state.json"  # beside the loop's checkpoint.pt: epoch, its size, best_test_error, the report
BEST_WEIGHTS = "best.pt"  # beside them: each member's epoch, test error and weights at its best (stawm.study.models)


def checkpoint_uri(checkpoint: tune.Checkpoint, filename: str) -> str:
    """The file `filename` inside a Tune checkpoint as a path (local storage) or a URI (s3://, gs://...)."""
    kind = checkpoint.filesystem.type_name if checkpoint.filesystem is not None else "local"  # pyarrow's name
    path = f"{checkpoint.path}/{filename}"
    if kind == "local":
        return path
    return f"{URI_SCHEMES.get(kind, kind)}://{path}"


def save_state(workdir: Path, epoch: int, members: list[dict], tracking_down_since: float | None = None) -> None:
    """The runner state beside the epoch's checkpoint: its size (to tell a whole copy), each member's state, and
    since when the tracking server has not answered (None: it answers), so that a retry goes on counting; the best
    weights' size, when there are any (to tell a whole copy of them too)."""
    best = workdir / BEST_WEIGHTS
    state = {"epoch": epoch, "checkpoint_bytes": (workdir / CHECKPOINT).stat().st_size, "members": members,
             "tracking_down_since": tracking_down_since, "best_bytes": best.stat().st_size if best.exists() else None}
    (workdir / RUNNER_STATE).write_text(json.dumps(state))


def read_state(folder: Path) -> dict:
    """The runner state in a checkpoint folder ({} if it has none)."""
    path = folder / RUNNER_STATE
    return json.loads(path.read_text()) if path.exists() else {}


def newest_state(checkpoint: tune.Checkpoint) -> tuple[str, dict, list[str]]:
    """The trial's newest complete checkpoint folder (the one Tune names may be older or emptied), its runner
    state, and every checkpoint folder of the trial."""
    fs, folder = checkpoint.filesystem, posixpath.dirname(checkpoint.path)
    folders = [info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(folder))
               if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")]
    complete = {path: state for path in folders if (state := _complete_state(fs, path)) is not None}
    if not complete:
        raise RuntimeError(f"no complete checkpoint left in {folder} to resume this trial from")
    newest = max(complete, key=lambda path: complete[path]["epoch"])
    return newest, complete[newest], folders


def restore_newest(checkpoint: tune.Checkpoint, workdir: Path) -> tuple[tune.Checkpoint, dict]:
    """Copy the trial's newest complete checkpoint into workdir, empty the others; return it and its runner state."""
    newest, state, folders = newest_state(checkpoint)
    restored = tune.Checkpoint(newest, filesystem=checkpoint.filesystem)
    restored.to_directory(str(workdir))
    for path in folders:
        if path != newest:
            drop_payload(checkpoint.filesystem, path)
    return restored, state


def _complete_state(fs, path: str) -> dict | None:
    """The runner state of a checkpoint folder whose checkpoint file (and best weights) are whole (a copy cut short
    is not)."""
    try:
        with fs.open_input_stream(f"{path}/{RUNNER_STATE}") as stream:
            state = json.loads(stream.read())
        size = fs.get_file_info(f"{path}/{CHECKPOINT}").size
        best = fs.get_file_info(f"{path}/{BEST_WEIGHTS}").size if state.get("best_bytes") is not None else None
    except (OSError, ValueError):
        return None
    whole = size is not None and size == state.get("checkpoint_bytes") and best == state.get("best_bytes")
    return state if whole else None


def keep_only(latest: tune.Checkpoint, previous: tune.Checkpoint | None) -> tune.Checkpoint:
    """Empty the previous checkpoint once the latest is stored: one full checkpoint per trial."""
    if previous is not None and previous.path != latest.path:
        drop_payload(previous.filesystem, previous.path)
    return latest


def drop_payload(fs, path: str) -> None:
    """Empty an older checkpoint folder, keeping the folder: Tune's saved state may still name it."""
    for name in (RUNNER_STATE, CHECKPOINT, BEST_WEIGHTS):
        try:
            fs.delete_file(f"{path}/{name}")
        except FileNotFoundError:
            pass


def local_pretrained(cfg: Config) -> Config:
    """A `pretrained` checkpoint on remote storage (s3://, gs://...) copied to a fixed local path once.

    The path depends only on the URI, so a retried trial (even on another node) resumes with the same config."""
    if "://" not in cfg.pretrained:
        return cfg
    local = Path(tempfile.gettempdir()) / "stawm-pretrained" / hashlib.sha1(cfg.pretrained.encode()).hexdigest()[:16]
    if not (local / CHECKPOINT).exists():
        local.mkdir(parents=True, exist_ok=True)
        filesystem, path = pyarrow.fs.FileSystem.from_uri(cfg.pretrained)
        pyarrow.fs.copy_files(path, str(local / (CHECKPOINT + ".part")), source_filesystem=filesystem)
        os.replace(local / (CHECKPOINT + ".part"), local / CHECKPOINT)
    return cfg.replace(pretrained=str(local / CHECKPOINT))
