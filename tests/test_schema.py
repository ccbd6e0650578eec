"""The MLflow schema (stawm/schema.py) is the only place an MLflow name is spelled.

- no module of the runner, the engine, the studies or the analysis spells one of its names by hand
  (a string literal equal to one: found with `ast`, named file:line);
- renaming a tag in the schema renames what the tracking module writes and what the analysis reads:
  a trial run written through `stawm.study.tracking` into a real SQLite store, read back by `load_runs`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stawm import schema
from stawm.study import tracking
from stawm.study.context import TrialContext
from stawm.config import preset

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("stawm", "analysis", "studies")
# Values that may stand in code as plain words, and why each is left to them:
IGNORED = {
    schema.TRUE: "how any boolean is written, not only a tag's (e.g. an environment flag)",
    schema.FALSE: "the same",
    schema.ROLE_STUDY: "a generic word; only a value of the ROLE tag",
    schema.ROLE_TRIAL: "the same",
    schema.REPORT_ARTIFACT_DIR: "a generic word: also the key of a queued epoch's stability report (outbox.py)",
    schema.SEEDS: "the parent's param is named after the --seeds flag: the flag, StudyArgs.seeds and "
                  "flags.seeds() spell it as a name in their own right",
    **{rate: "the rate metrics are named after the config fields delta, eta, theta (one name per concept): "
             "the config, the memory and every study's grid spell those" for rate in schema.RATE_METRICS},
}


def schema_names() -> dict[str, str]:
    """value -> the schema constant that holds it (tuples of names count name by name)."""
    names = {}
    for constant, value in vars(schema).items():
        if constant.isupper():
            for name in value if isinstance(value, tuple) else (value,):
                if isinstance(name, str):
                    names.setdefault(name, constant)
    return names


def test_no_module_spells_an_mlflow_name_by_hand():
    names = {value: constant for value, constant in schema_names().items() if value not in IGNORED}
    assert len(names) >= 20  # the scan looks for something: tags, params, metrics, artifacts
    found = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "stawm" / "schema.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    where = f"{path.relative_to(REPO)}:{node.lineno}"
                    found.append(f"{where}: {node.value!r} is schema.{names[node.value]}")
    assert not found, "spelled by hand instead of read from stawm.schema:\n" + "\n".join(sorted(set(found)))


def test_a_renamed_tag_is_what_the_runner_writes_and_the_analysis_reads(tmp_path, monkeypatch):
    from stawm.analysis.store import load_runs

    renamed = {"STUDY": "house.study", "SEED": "house.seed", "ROLE": "house.role", "TRIAL_ID": "house.trial",
               "STABILITY_OK": "house.stable"}
    old = {constant: getattr(schema, constant) for constant in renamed}
    for constant, name in renamed.items():
        monkeypatch.setattr(schema, constant, name)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = tracking.experiment(client, "renamed", uri)
    parent = tracking.create_study_run(client, experiment_id, "renamed", {schema.SEEDS: 1}, "studies/x.py", "abc",
                                       False)
    context = TrialContext(study="renamed", experiment_id=experiment_id, parent_run_id=parent, tracking_uri=uri)
    cfg = preset("tiny", seed=3)
    run_id, continued = tracking.open_trial_run(client, context, cfg, "t0001", "trainable_t0001", {schema.GPU: "cpu"})
    report = {"ok": False, "failed": ["decay"], "static_ok": False, "diverged": False}
    tracking.close_run(client, run_id, report, "FINISHED")

    tags = client.get_run(run_id).data.tags
    assert not continued
    assert (tags["house.study"], tags["house.seed"], tags["house.role"], tags["house.trial"], tags["house.stable"]) == (
        "renamed", "3", schema.ROLE_TRIAL, "t0001", "false")
    assert not set(old.values()) & set(tags)  # the old names are gone from what was written
    assert client.get_run(parent).data.tags["house.role"] == schema.ROLE_STUDY

    runs = load_runs("renamed", uri)  # found through the renamed role tag
    assert list(runs["run_id"]) == [run_id]
    row = runs.iloc[0]
    assert (row["trial_id"], row["seed"], row["stability_ok"], row["flagged"]) == ("t0001", 3, False, True)

    monkeypatch.setattr(schema, "ROLE", old["ROLE"])  # a reader that spells the old name finds nothing
    with pytest.raises(LookupError):
        load_runs("renamed", uri)
