"""The studies' quick modes (--quick), run end to end as their users run them, once per session, for the study,
packing, results and analysis tests to check: glimpse_size's on a Ray of its own (`run_quick_study`), every
other study's on the session's Ray cluster (`run_studies`)."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from background import QUICK_RAY_UP, QUICK_RAY_WAIT_S, RAY_NODE_STARTING, WALL_S, make_temp_dir
from processes import env_without
from ray_cluster import SESSION_RAY

REPO = Path(__file__).resolve().parents[1]


# --- glimpse_size's quick study, on a local Ray of its own --------------------------------------------------

def run_quick_study() -> dict:
    """A real `studies/glimpse_size.py --quick` run (2 epochs, 3 steps each), as its user runs it: Ray embedded
    in the study's process. RAY_TMPDIR gives that Ray a temp dir of its own, so that it does not join a cluster
    another test has running (a plain `ray.init()` joins the one named in /tmp/ray/ray_current_cluster).
    Its Ray starts holding RAY_NODE_STARTING; the rest of the background work waits for it (QUICK_RAY_UP)."""
    tmp = make_temp_dir("quick-study-")
    uri = f"sqlite:///{tmp}/mlflow.db"
    command = [sys.executable, "studies/glimpse_size.py", "--quick", "--tracking-uri", uri, "--storage",
               str(tmp / "ray"), "--name", "t", "--epochs", "2", "--set", "max_steps=3"]
    env = {**env_without("RAY_ADDRESS", "MLFLOW_TRACKING_URI"), "RAY_TMPDIR": str(make_temp_dir("rq"))}
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
        study = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + QUICK_RAY_WAIT_S
        with RAY_NODE_STARTING:
            while ("Started a local Ray instance" not in (tmp / "stderr").read_text(errors="replace")
                   and study.poll() is None and time.monotonic() < deadline):
                time.sleep(0.5)
        QUICK_RAY_UP.set()
        study.wait(timeout=600)
    finally:
        QUICK_RAY_UP.set()  # whatever happened: the rest of the background work waits no longer
        if study.poll() is None:
            study.kill()
    stdout, stderr = (tmp / "stdout").read_text(), (tmp / "stderr").read_text(errors="replace")
    assert study.returncode == 0, f"quick study failed ({study.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return {"tmp": tmp, "uri": uri, "name": "t", "stdout": stdout}


# --- every other study's quick mode, on the session's Ray cluster -------------------------------------------

# --quick trains whole epochs of the digit sample; 3 steps are enough here. One trial at a time per study: its
# trials run one after the other in one worker process (Tune reuses it), where two at once would start a second
# process importing torch, MLflow and the data (~8 s of CPU, which the suite is short of); the studies run at once.
STEP_CAP = ["--set", "max_steps=3", "--max-concurrent", "1"]
STUDIES = {  # label -> the script, its --name (MLflow experiment) and its flags, each as small as its tests allow
    "table1": ("table1.py", "table1", STEP_CAP),  # 2 seeds: each seed's self-supervised run on its own drawer
    "search": ("search.py", "search", STEP_CAP),  # 2 suggestions x 2 seeds, then the best over 2 fresh seeds
    "search --resume": ("search.py", "search", [*STEP_CAP, "--resume"]),  # again: nothing left, nothing doubled
    # 3 suggestions, each one trial of its 2 seeds fused, 2 epochs: ASHA's one rung is epoch 1, where a suggestion
    # whose seeds' mean is worse than the median of those before it stops; then the best over 2 fresh seeds
    "search --asha": ("search.py", "search-asha", [*STEP_CAP, "--asha", "--samples", "3", "--epochs", "2",
                                                   "--asha-reduction-factor", "2"]),
    "glimpse_count": ("glimpse_count.py", "glimpse_count", ["--seeds", "1", *STEP_CAP]),
    # the finished study given a second seed: only seed 1 of each N trains (test_glimpse_count_quick)
    "glimpse_count --seeds 2 --resume": ("glimpse_count.py", "glimpse_count", ["--seeds", "2", *STEP_CAP, "--resume"]),
    "learnable_rates": ("learnable_rates.py", "learnable_rates", ["--seeds", "1", *STEP_CAP]),
    "memory_rates": ("memory_rates.py", "memory_rates", ["--seeds", "1", *STEP_CAP]),
    "fused": ("glimpse_size.py", "fused", ["--fuse-seeds", "--gpus-per-trial", "auto", "--epochs", "2", *STEP_CAP]),
}


# Three lanes, balanced on their measured wall times (the suite's summary line, 2026-12-03: table1 99 s, search 41 + 14,
# fused 39, glimpse_count 35, memory_rates 28, learnable_rates 26; 2026-12-07, on a loaded machine: search --asha 100
# where search took 79, so about 50 here): most of a study's time is its driver importing and waiting on Ray, which
# another lane's trials fill. The searches share a lane: their Optuna studies share one SQLite file.
STUDY_LANES = (["table1", "learnable_rates"], ["search", "search --resume", "search --asha"],
               ["fused", "glimpse_count", "glimpse_count --seeds 2 --resume", "memory_rates"])
assert sorted(sum(STUDY_LANES, [])) == sorted(STUDIES)
# The report on a study's parent run at its end (~10 s each here) is written by glimpse_size's quick study and by the
# extended glimpse_count (a resume writes it again, over all its runs: test_parent_report); the others pass --no-report.
REPORTED = {"glimpse_count --seeds 2 --resume"}


@dataclass
class StudyRuns:
    """What `run_studies` ran: one MLflow store and Ray storage, one finished process per study."""

    uri: str
    storage: Path
    runs: dict[str, subprocess.CompletedProcess]

    def stdout(self, name: str) -> str:
        """The study's stdout, once it is known to have exited 0."""
        done = self.runs[name]
        assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done.stdout


def run_studies() -> StudyRuns:
    """Every study's --quick run but glimpse_size's plain one (`run_quick_study`), each a subprocess submitted
    to the session's Ray cluster (RAY_ADDRESS), all logging to one MLflow store. Each test checks its own
    study's run, so one study failing fails only its tests."""
    from mlflow import MlflowClient

    tmp = make_temp_dir("studies-")
    uri, storage = f"sqlite:///{tmp}/mlflow.db", tmp / "ray"
    runs = {}

    def run_lane(labels: list[str], env: dict) -> None:  # one after another: a --resume after its first run
        for label in labels:
            script, name, flags = STUDIES[label]
            command = [sys.executable, f"studies/{script}", "--quick", "--tracking-uri", uri, "--storage", str(storage),
                       "--name", name, *flags, *([] if label in REPORTED else ["--no-report"])]
            start = time.monotonic()
            # 600 s: a net, not a budget (on a loaded machine a study waits for CPU)
            runs[label] = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            WALL_S[f"studies: {label}"] = time.monotonic() - start  # in the summary, to balance the lanes

    MlflowClient(uri).search_experiments()  # the store's tables first: two drivers creating them at once collide
    with SESSION_RAY.held() as env, ThreadPoolExecutor(len(STUDY_LANES)) as pool:
        # lanes of studies at once: one study's driver imports (~9 s) while the others' trials run
        list(pool.map(run_lane, STUDY_LANES, [env] * len(STUDY_LANES)))
    return StudyRuns(uri, storage, runs)
