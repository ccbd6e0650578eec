"""cluster.yaml passes the validation `ray up` runs, offline, and keeps the choices it documents."""

from __future__ import annotations

import copy
import socket
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

# Private API: what `ray up` runs before it talks to AWS (ray.autoscaler._private.commands
# .create_or_update_cluster -> prepare_config, validate_config). It may move between Ray versions.
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
# The study stack at the lock's versions (`[cluster]`: studies, boto3, optuna-dashboard); tests/test_cluster_setup.py
# runs it for real. "$HOME": bash expands no ~ inside quotes, and the brackets need them.
LOCKED_INSTALL = 'pip install -c ~/stawm/requirements/lock.txt -e "$HOME/stawm[cluster]"'


@pytest.fixture
def cluster() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def validate(config: dict) -> dict:
    """prepare_config merges ray/autoscaler/aws/defaults.yaml and fills per-type worker counts;
    validate_config checks the result against ray/autoscaler/ray-schema.json. For AWS neither
    imports boto3 or calls AWS: that happens later, in the provider's bootstrap_config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during validation: {args}")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_passes_rays_schema_validation_offline(cluster, no_network):
    prepared = validate(cluster)
    # The merge keeps our commands rather than defaults.yaml's (which install a nightly Ray wheel) and puts
    # setup_commands first in each node type's list, which is what the nodes run: the same locked set everywhere,
    # once, and on the head before its MLflow server.
    assert prepared["setup_commands"] == [LOCKED_INSTALL]
    assert prepared["worker_setup_commands"] == [LOCKED_INSTALL]
    head = prepared["head_setup_commands"]
    assert head[0] == LOCKED_INSTALL and head.count(LOCKED_INSTALL) == 1
    assert [c for c in head if "mlflow server" in c] == head[1:]


@pytest.mark.parametrize("where, key", [("top level", "max_wrokers"), ("node type", "min_worker")])
def test_unknown_key_is_rejected(cluster, where, key):
    broken = copy.deepcopy(cluster)
    section = broken if where == "top level" else broken["available_node_types"]["worker.gpu"]
    section[key] = 1
    with pytest.raises(jsonschema.ValidationError, match=f"'{key}' was unexpected"):
        validate(broken)


def test_gpu_workers_declare_gpus_and_the_head_none(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no node type declares a GPU"
    for node_type in gpu_types:
        assert node_type["resources"]["CPU"] >= 1
        assert node_type["min_workers"] == 0 and 1 <= node_type["max_workers"] <= cluster["max_workers"]


def test_every_node_type_pins_its_machine_image(cluster):
    # Ray's built-in default AMI for AWS is years old.
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"].get("ImageId", "").startswith("ami-"), name


def test_docker_image_is_pinned_to_the_installed_ray(cluster):
    docker = cluster["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [t["docker"]["worker_image"] for t in cluster["available_node_types"].values()
               if "worker_image" in t.get("docker", {})]
    assert images
    for image in images:
        repository, _, tag = image.partition(":")
        assert repository == "rayproject/ray", image  # not rayproject/ray-ml: discontinued
        assert tag.startswith(f"{ray.__version__}-"), image  # the Ray this project runs here
        parts = tag.split("-")
        assert "gpu" in parts or any(p.startswith("cu") for p in parts), image  # CUDA build
        assert "latest" not in tag and "nightly" not in tag, image


def test_nodes_install_this_project_and_the_head_runs_mlflow_on_a_database(cluster):
    assert cluster["file_mounts"] == {"~/stawm": "."}  # relative to the repository root
    assert cluster["setup_commands"] == [LOCKED_INSTALL]
    assert not [c for c in cluster["head_setup_commands"] if "pip install" in c]  # nothing unpinned on top
    server = [c for c in cluster["head_setup_commands"] if "mlflow server" in c]
    assert len(server) == 1
    assert "--backend-store-uri sqlite:////" in server[0] or "--backend-store-uri postgresql" in server[0]
    assert "--host 0.0.0.0" in server[0] and "nohup" in server[0]


def test_commands_are_valid_shell(cluster):
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for command in (c for key in keys for c in cluster.get(key, [])):
        checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert checked.returncode == 0, f"{command}: {checked.stderr}"


def test_the_locked_install_names_the_repository_copy_and_its_lock(tmp_path):
    # What bash makes of the command's words on a node whose home holds the copy (file_mounts: ~/stawm).
    words = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + LOCKED_INSTALL.removeprefix("pip install ")],
                           env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert words.stdout.splitlines() == ["-c", f"{tmp_path}/stawm/requirements/lock.txt", "-e",
                                         f"{tmp_path}/stawm[cluster]"]
    assert (REPO / "requirements" / "lock.txt").is_file()  # tracked by git, so file_mounts copies it
