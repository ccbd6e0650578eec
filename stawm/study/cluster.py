"""The shape of the Ray cluster a study runs on: what it can grow to, not only what is alive now.

An autoscaling cluster (`ray up cluster.yaml`) is the head alone when a study is submitted; its GPU
workers start only once trials ask for GPUs. Counting live nodes (`ray.nodes()`,
`ray.cluster_resources()`) then says "one machine, no GPU", and every guard built on it is wrong.
So the shape is read from the autoscaler's own configuration:

1. the cluster config the autoscaler reports to Ray's GCS (autoscaler v2 and KubeRay publish it);
2. else the autoscaling config file of the running v1 autoscaler (`ray up` writes it to
   ~/ray_bootstrap_config.yaml on the head; the monitor's command line names it), found through the
   monitor's pid that the autoscaler's status in Ray's key-value store records. This needs the
   driver on the head, which is where `ray job submit` and `ray submit` run it;
3. else only the live nodes, plus whether an autoscaler runs at all (then the cluster is taken as
   multi-node, and its GPU worker types as unknown).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml

HEAD_BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where `ray up` puts the autoscaler's config
_CONFIG_FLAG = "--autoscaling-config="  # how `ray start --head` passes it on to the monitor process


@dataclass
class ClusterShape:
    live_nodes: int
    autoscaling: bool  # an autoscaler runs: nodes may be added
    max_nodes: int | None = None  # head included; None: unknown (an autoscaler whose config is not readable here)
    node_types: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> resources, what may be started
    live_gpus: float = 0.0
    source: str = "live nodes"  # where the shape was read from

    @property
    def multi_node(self) -> bool:
        """Trials may run on another machine than the driver's: now, or once the autoscaler adds one."""
        return self.live_nodes > 1 or (self.autoscaling and (self.max_nodes is None or self.max_nodes > 1))

    @property
    def gpu_node_types(self) -> dict[str, float]:
        """The node types with GPUs the autoscaler can start: name -> GPUs per node."""
        return {name: res["GPU"] for name, res in self.node_types.items() if res.get("GPU", 0) > 0}

    @property
    def gpus_known(self) -> bool:
        """Whether "does this cluster have GPUs" can be answered: yes when some are alive or the types are read."""
        return self.live_gpus > 0 or not self.autoscaling or bool(self.node_types)

    def describe(self) -> str:
        """One phrase for messages, e.g. 'the Ray cluster (2 nodes)' or 'the autoscaling Ray cluster (1 node now,
        up to 3: worker.gpu (CPU 4, GPU 1); read from ...)'."""
        nodes = f"{self.live_nodes} node{'s' if self.live_nodes != 1 else ''}"
        if not self.autoscaling:
            return f"the Ray cluster ({nodes})"
        most = "an unknown number" if self.max_nodes is None else str(self.max_nodes)
        types = ", ".join(f"{name} {_resources(res)}" for name, res in self.node_types.items())
        return (f"the autoscaling Ray cluster ({nodes} now, "
                f"up to {most}{': ' + types if types else ''}; read from {self.source})")


def shape() -> ClusterShape:
    """The shape of the cluster this process is connected to (ray.init first)."""
    alive = [node for node in ray.nodes() if node["Alive"]]
    live = ClusterShape(live_nodes=len(alive), autoscaling=False,
                        live_gpus=sum(node["Resources"].get("GPU", 0) for node in alive))
    status = _autoscaler_status()
    if status is None:
        return live
    config, source = _reported_config()
    if config is None:
        argv = _process_argv(status.get("monitor_pid"))
        if argv is not None and not any(arg.startswith(_CONFIG_FLAG) for arg in argv):
            return live  # a monitor without an autoscaling config: a fixed set of nodes (ray.init(), plain ray start)
        config, source = _monitor_config(argv or [])
    live.autoscaling = True
    if config is None:
        live.source = "live nodes: an autoscaler runs, but its configuration is not readable from this machine"
        return live
    live.max_nodes, live.node_types, live.source = *config, source
    return live


def _autoscaler_status() -> dict | None:
    """The v1 autoscaler's last status report (it holds the monitor's pid), {} for a v2 autoscaler, None if none."""
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if raw:
        return json.loads(raw)
    from ray.autoscaler.v2.utils import is_autoscaler_v2  # asks the GCS

    try:
        return {} if is_autoscaler_v2(fetch_from_server=True) else None
    except Exception:  # an old GCS without the flag: no v2 autoscaler
        return None


def _reported_config() -> tuple[tuple[int | None, dict] | None, str]:
    """(max nodes, node types) from the cluster config the autoscaler reported to the GCS, if any."""
    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None, ""
    types = {group.name: dict(group.resources) for group in config.node_group_configs}
    counts = [group.max_count for group in config.node_group_configs]
    most = None if any(count < 0 for count in counts) else sum(counts)
    return (most, types), "the cluster config in Ray's GCS"


def _monitor_config(argv: list[str]) -> tuple[tuple[int | None, dict] | None, str]:
    """(max nodes, node types) from the autoscaling config file the v1 monitor process was started with
    (`argv`, its command line), else from the file `ray up` leaves on the head."""
    named = [Path(os.path.expanduser(arg[len(_CONFIG_FLAG):])) for arg in argv if arg.startswith(_CONFIG_FLAG)]
    candidates = [*named, HEAD_BOOTSTRAP_CONFIG.expanduser()]
    path = next((path for path in candidates if path.is_file()), None)
    if path is None:
        return None, ""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None, ""
    return autoscaling_limits(config), f"the autoscaler's config {path}"


def autoscaling_limits(config: dict) -> tuple[int, dict[str, dict[str, float]]]:
    """(most nodes, node types with their resources) of a cluster launcher / autoscaling config.

    Most nodes = the head + min(max_workers, the sum of each worker type's max_workers): Ray caps the
    workers at the top-level max_workers whatever the types allow."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    per_type = sum(int(t.get("max_workers", 0)) for name, t in types.items() if name != head)
    workers = min(int(config.get("max_workers", per_type)), per_type)
    return 1 + workers, {name: {k: float(v) for k, v in (t.get("resources") or {}).items()} for name, t in types.items()
                         if name == head or int(t.get("max_workers", 0)) > 0}


def _process_argv(pid) -> list[str] | None:
    """The command line of process `pid` when it runs on this machine and can be read, else None."""
    if not pid:
        return None
    try:
        raw = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _resources(resources: dict[str, float]) -> str:
    return "(" + ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) + ")"
