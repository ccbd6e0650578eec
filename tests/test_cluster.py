"""The cluster path as users run it: a study submitted with `ray job submit --working-dir .` to an autoscaling
Ray cluster built from cluster.yaml's own node types, on this machine.

The cluster is Ray's fake multi-node autoscaler (`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`):
the real autoscaler and its bin-packing, with worker nodes that are local raylets and GPUs that are resource
counts only. It starts as the head alone, as a `ray up` cluster does, and adds GPU workers when trials ask
for GPUs. Its own port, temp dir and HOME (holding a `~/.ray/auth_token`, which would switch a `ray start`
into token auth; RAY_AUTH_MODE=disabled keeps this cluster without it); stopped by its process group and
the processes that name its temp dir, never by `ray stop` (which ends every Ray process on the machine).

What a real cluster does differently, and how the tests stand in for it:
- the fake GPUs cannot run CUDA: trials use `--device auto`, which trains on the CPU when the trial sees no
  CUDA device and records it (the `stawm.device` tag), and the `--gpus-per-trial auto` probe must fail in
  one line naming the node;
- every node is this machine: the storage is a local folder, truly shared here, said with STAWM_SHARED_STORAGE=1;
  the tracking server is the suite's `mlflow server` (http), as the head's is on a cluster;
- the fake provider's nodes share one session folder, where each node's runtime-env agent unpacks a job's
  `--working-dir` package afresh the first time that node needs it, deleting the folder first: a GPU worker
  joining mid-study would delete the folder the job's driver and the other trials run in (seen: Tune failing on
  a vanished working directory, torch failing to load). The test's provider (tests/fake_provider.py) gives each
  worker node its own runtime-resources folder, as its own disk would, and the two jobs run one after the other
  (the refused one ends before the study is submitted), so no folder is unpacked under a running process; what
  is asserted (placement on GPU workers, runs, commit) does not depend on that folder beyond the job running.

The cluster starts, and both jobs run, in the background as soon as the tests are collected (conftest's
`start_early`): most of that minute is waiting for nodes and drivers, which the rest of the suite overlaps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import yaml
from mlflow import MlflowClient

from stawm import schema
from stawm.study import cluster, flags, gpu_share, preflight

from background import RAY_NODE_STARTING, early_result
from processes import env_without, stop_processes_naming
from processes import free_port, stop_group, wait_until_answers
from tracking_server import SESSION_SERVER

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # ray, python: the suite's environment, as a cluster image has them on PATH
FAKE_WORKERS = 2  # cluster.yaml allows 4 GPU workers; here 2 trials at half a GPU each need 1
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider names its head node type so, whatever the config says
START_S = 90


@dataclass
class FakeCluster:
    gcs: str  # 127.0.0.1:PORT, for ray.init
    dashboard: str  # http://127.0.0.1:PORT, for `ray job submit --address`
    env: dict  # what the cluster and its clients run with
    temp_dir: Path
    head: subprocess.Popen  # `ray start --head --block`, leader of its process group
    shape: dict = field(default_factory=dict)  # cluster.shape() seen by a driver while only the head was up
    refused: subprocess.CompletedProcess | None = None  # a study job with the defaults: refused
    study: subprocess.CompletedProcess | None = None  # the README's study job
    tracking_uri: str = ""  # the suite's MLflow server, as the head's on a cluster

    def stop(self) -> None:
        stop_group(self.head, grace_s=1)  # nothing to flush: a fake cluster's state dies with it
        stop_processes_naming(str(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def fake_autoscaling_config(gcs: str) -> dict:
    """cluster.yaml's node types (their resources, worker limits, idle timeout) for Ray's fake provider.

    Changed, each for the fake provider: the head type's name (the provider fixes it), no node_config or
    commands (nothing to launch or install: nodes are local raylets), and at most FAKE_WORKERS workers."""
    real = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = real["available_node_types"]
    nodes = {FAKE_HEAD_TYPE: {"resources": types[real["head_node_type"]]["resources"], "node_config": {},
                              "max_workers": 0}}
    for name, node_type in types.items():
        if name != real["head_node_type"]:
            nodes[name] = {"resources": node_type["resources"], "node_config": {},
                           "min_workers": node_type["min_workers"],
                           "max_workers": min(node_type["max_workers"], FAKE_WORKERS)}
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")
    return {"cluster_name": real["cluster_name"], "max_workers": min(real["max_workers"], FAKE_WORKERS),
            "idle_timeout_minutes": real["idle_timeout_minutes"], "upscaling_speed": 1.0,
            "provider": {"type": "external", "module": "fake_provider.OwnFolderPerNode", "gcs_address": gcs,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": nodes, "head_node_type": FAKE_HEAD_TYPE, "auth": {"ssh_user": "ubuntu"},
            "file_mounts": {}, "file_mounts_sync_continuously": False, **{key: [] for key in empty}}


def start_fake_cluster() -> FakeCluster:
    """The fake autoscaling cluster, head only until trials ask for GPUs."""
    temp_dir = Path(tempfile.mkdtemp(prefix="sfc", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    home = temp_dir / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-token-that-must-not-matter\n")
    gcs, dashboard = f"127.0.0.1:{free_port()}", free_port()
    config = temp_dir / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_autoscaling_config(gcs)))
    head_cpus = yaml.safe_load(config.read_text())["available_node_types"][FAKE_HEAD_TYPE]["resources"]["CPU"]
    env = {**env_without("RAY_ADDRESS", "MLFLOW_TRACKING_URI"),
           "HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)}
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--autoscaling-config={config}",
               f"--port={gcs.rsplit(':', 1)[1]}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir / 'ray'}",
               f"--num-cpus={int(head_cpus)}", "--num-gpus=0", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}"]
    with RAY_NODE_STARTING:  # one Ray node starting at a time in the suite's background work (conftest)
        with open(temp_dir / "head.log", "wb") as log:
            head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        cluster = FakeCluster(gcs, f"http://127.0.0.1:{dashboard}", env, temp_dir, head)
        try:
            wait_until_answers(f"{cluster.dashboard}/api/jobs/", head, temp_dir / "head.log", START_S,
                                "the fake cluster's head (ray start)")
        except BaseException:
            cluster.stop()
            raise
    return cluster


# What a study's driver makes of the cluster: its shape as `stawm.study.cluster` reads it, as JSON.
SHAPE_SCRIPT = """
import dataclasses, json, sys
import ray
from stawm.study import cluster
ray.init(address=sys.argv[1], logging_level="ERROR")
shape = cluster.shape()
print(json.dumps({**dataclasses.asdict(shape), "multi_node": shape.multi_node, "gpu_node_types": shape.gpu_node_types,
                  "describe": shape.describe()}))
"""


def start_early() -> FakeCluster:
    """The cluster, what a driver sees of it while only the head is up, then two jobs submitted as the README
    says, one after the other: a study on the defaults (refused), and a study that scales up GPU workers. Run in
    the background as soon as the tests are collected (conftest): most of it is waiting for nodes and drivers."""
    cluster = start_fake_cluster()
    try:
        seen = subprocess.run([sys.executable, "-c", SHAPE_SCRIPT, cluster.gcs], env=cluster.env, capture_output=True,
                              text=True, timeout=120)
        assert seen.returncode == 0, seen.stderr[-3000:]
        cluster.shape = json.loads(seen.stdout.strip().splitlines()[-1])
        cluster.refused = submit(cluster, "python studies/glimpse_size.py --quick --name refused")
        cluster.tracking_uri = SESSION_SERVER.uri()
        storage = cluster.temp_dir / "storage"  # one machine: shared by every fake node, as STAWM_SHARED_STORAGE=1 says
        cluster.study = submit(cluster, f"STAWM_SHARED_STORAGE=1 python studies/glimpse_size.py --quick --seeds 1"
                                        f" --set max_steps=3 --name on-cluster --storage {storage} --tracking-uri"
                                        f" {cluster.tracking_uri} --gpus-per-trial 0.5 --cpus-per-trial 1 --no-report")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def fake_cluster():
    """The cluster `start_early` made and the jobs it ran; stopped after the module."""
    cluster = early_result(__name__, start_early)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def connected(fake_cluster, monkeypatch):
    """This process as a driver of the fake cluster (as a study's driver is), disconnected afterwards."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address=fake_cluster.gcs, logging_level="ERROR")
    try:
        yield fake_cluster
    finally:
        ray.shutdown()


def gpu_nodes(fake_cluster: FakeCluster) -> dict[str, dict]:
    """The cluster's GPU worker nodes so far, alive or gone: node id -> its record (Ray's state API)."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=fake_cluster.dashboard, detail=True, limit=100)
    return {n.node_id: n for n in nodes if n.resources_total.get("GPU", 0) > 0}


def submit(fake_cluster: FakeCluster, study_command: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`ray job submit` as the README writes it: the commit from the submitting checkout, the study's command."""
    command = (f"ray job submit --address {fake_cluster.dashboard} --working-dir . -- "
               f"STAWM_GIT_COMMIT=$(git describe --always --dirty --abbrev=40 --exclude='*') {study_command}")
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=fake_cluster.env, capture_output=True, text=True,
                          timeout=400)


# --- the cluster's shape: read from the autoscaler, not from the nodes alive ----------------------------


@pytest.mark.slow
def test_shape_is_what_the_autoscaler_can_start_while_only_the_head_is_alive(fake_cluster, tmp_path, monkeypatch):
    shape = fake_cluster.shape  # a driver's view before any job: today's live-node count would see one CPU node
    assert shape["live_nodes"] == 1 and shape["live_gpus"] == 0
    assert shape["autoscaling"] and shape["multi_node"]
    assert shape["max_nodes"] == 1 + FAKE_WORKERS
    assert shape["gpu_node_types"] == {"worker.gpu": 1.0}
    assert "autoscaling.yaml" in shape["source"]
    monkeypatch.delenv("STAWM_SHARED_STORAGE", raising=False)
    with pytest.raises(preflight.PreflightError, match=r"storage .* on this machine only.* s3://"):
        preflight.check_for_cluster(str(tmp_path), "http://127.0.0.1:5000", shape["describe"])
    monkeypatch.setenv("STAWM_SHARED_STORAGE", "1")  # the storage is a shared mount: the SQLite store still is not
    with pytest.raises(preflight.PreflightError, match=r"tracking URI sqlite:.* --tracking-uri http://"):
        preflight.check_for_cluster(str(tmp_path), f"sqlite:///{tmp_path}/mlflow.db", shape["describe"])
    preflight.check_for_cluster(str(tmp_path), "http://127.0.0.1:5000", shape["describe"])


# --- a study submitted as the README says --------------------------------------------------------------


@pytest.mark.slow
def test_defaults_inside_the_jobs_temporary_folder_are_refused(fake_cluster):
    done = fake_cluster.refused  # `python studies/glimpse_size.py --quick`: no --storage, no --tracking-uri
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    errors = sorted({line for line in out.splitlines() if "glimpse_size.py: error:" in line})  # the CLI shows it twice
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert "--storage" in errors[0] and "temporary copy" in errors[0] and "s3://" in errors[0]
    assert "working_dir_files" in errors[0]  # names the folder Ray made


@pytest.mark.slow
def test_study_job_scales_up_gpu_workers_and_lands_one_finished_run_per_trial(fake_cluster):
    done = fake_cluster.study  # --seeds 1 --gpus-per-trial 0.5 --cpus-per-trial 1, the server as --tracking-uri
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "on-cluster: 2 trials" in out and "ERROR" not in out.split("on-cluster: 2 trials")[1], out[-3000:]

    workers = gpu_nodes(fake_cluster)
    assert workers, "no GPU worker was started"
    client = MlflowClient(fake_cluster.tracking_uri)
    experiment = client.get_experiment_by_name("on-cluster")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_STUDY]
    trials = [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_TRIAL]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 2 and len({r.data.tags[schema.TRIAL_ID] for r in trials}) == 2
    assert {r.info.status for r in trials} == {"FINISHED"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    for run in [*parents, *trials]:
        assert run.data.tags[schema.GIT_COMMIT] == head  # the submitting checkout's, though the job has no .git
        assert run.data.tags[schema.GIT_DIRTY] == schema.tag_bool(dirty)
    for run in trials:
        assert run.data.tags[schema.NODE] in workers  # placed on an autoscaled GPU worker, never the head
        assert run.data.tags[schema.DEVICE] == "cpu"  # --device auto: the fake GPU has no CUDA behind it
        assert run.data.tags[schema.PARENT_RUN_ID] == parents[0].info.run_id
    assert parents[0].data.params["gpus_per_trial"] == "0.5"


@pytest.mark.slow
def test_gpus_auto_probes_on_a_gpu_worker_type_and_fails_in_one_line_naming_the_node(connected, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", connected.gcs)  # as in a job: the driver's data check is left to the nodes
    args = flags.parse_args("probe", preset="tiny", argv=[
        "--quick", "--gpus-per-trial", "auto", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--storage", str(tmp_path / "ray")])
    shape = cluster.shape()
    with pytest.raises(preflight.PreflightError) as err:
        gpu_share.choose(args, {}, [0], shape)
    message = str(err.value)
    assert "\n" not in message and "the probe on node" in message and "sees no CUDA device" in message
    node = message.split("the probe on node ")[1].split()[0]
    assert node in gpu_nodes(connected)  # it ran on a GPU worker (one the autoscaler started for it, or the study's)
    assert "worker.gpu" in message


def test_autoscaling_limits_of_cluster_yaml_as_written():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    most, types = cluster.autoscaling_limits(config)
    assert most == 1 + 4  # the head and max_workers: 4 GPU workers
    assert types["worker.gpu"] == {"CPU": 4.0, "GPU": 1.0} and types["head.cpu"] == {"CPU": 6.0}
    capped = {**config, "max_workers": 2}  # the top-level cap wins over the types' sum
    assert cluster.autoscaling_limits(capped)[0] == 3
    json.dumps(types)  # plain values: fit for a message or a param
