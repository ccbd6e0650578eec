"""Kill a study's driver mid-study, `--resume` it, and count what MLflow holds after each step.

    python analysis/results/kill_resume.py --after 190 --json runs/kill/kill_resume.json -- \
        studies/glimpse_size.py --preset cpu-small --seeds 3 \
        --tracking-uri sqlite:///runs/kill/mlflow.db --storage runs/kill/ray --name glimpse_size

runs the study command, sends SIGKILL to the driver (the `python` running the study, as a crash or an
out-of-memory kill would; no handler runs) `--after` seconds in, lets Ray's workers notice their
driver is gone, counts the study's trial runs by status, then runs the same command with `--resume`
and counts again: after the resume every trial should hold exactly one FINISHED run.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import subprocess
import sys
import time

from mlflow import MlflowClient

from stawm import schema
from stawm.provenance import git_commit


def count_runs(tracking_uri: str, study: str) -> dict:
    """The study's trial runs: by status, and how many runs each trial id holds."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return {"runs": 0, "statuses": {}, "trials": 0, "runs_per_trial": []}
    runs = client.search_runs([experiment.experiment_id], schema.tag_filter({schema.ROLE: schema.ROLE_TRIAL}),
                              max_results=10000)
    per_trial = collections.Counter(r.data.tags.get(schema.TRIAL_ID) for r in runs)
    return {"runs": len(runs), "statuses": dict(collections.Counter(r.info.status for r in runs)),
            "trials": len(per_trial), "runs_per_trial": sorted(set(per_trial.values()))}


def flag_value(command: list[str], flag: str) -> str:
    if flag not in command:
        sys.exit(f"the study command needs {flag} (the counts read it)")
    return command[command.index(flag) + 1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--after", type=float, required=True, help="seconds before the driver is killed")
    p.add_argument("--settle", type=float, default=15.0, help="seconds for Ray's workers to wind down")
    p.add_argument("--json", help="write the counts here")
    p.add_argument("command", nargs="+", help="the study script and its flags (after --)")
    args = p.parse_args(argv)
    uri, study = flag_value(args.command, "--tracking-uri"), flag_value(args.command, "--name")
    started = time.time()
    driver = subprocess.Popen([sys.executable, *args.command])
    try:
        driver.wait(timeout=args.after)
        sys.exit(f"the study ended (exit {driver.returncode}) before {args.after} s: nothing to kill")
    except subprocess.TimeoutExpired:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    killed_at = time.time() - started
    time.sleep(args.settle)
    at_kill = count_runs(uri, study)
    print(f"killed after {killed_at:.1f} s: {at_kill}", flush=True)
    resumed = time.time()
    code = subprocess.call([sys.executable, *args.command, "--resume"])
    after = count_runs(uri, study)
    result = {"command": args.command, "commit": git_commit(), "killed_after_s": round(killed_at, 1),
              "at_kill": at_kill,
              "resume_exit": code, "resume_s": round(time.time() - resumed, 1), "after_resume": after}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
