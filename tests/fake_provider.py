"""Ray's fake multi-node provider, with a runtime-resources folder of its own for each fake node (tests only).

Ray's fake nodes are raylets on one machine sharing one session folder. A job's `--working-dir` package
is unpacked by each node's runtime-env agent into `SESSION/runtime_resources/working_dir_files/...`, and
each agent unpacks it afresh (`overwrite=True`: it deletes the folder first) the first time that node
needs it. On a real cluster every machine has its own folder; here they are one folder, so a GPU worker
joining mid-study deletes the folder the job's driver and the other nodes' trials are running in (seen:
Tune failing at the end on a vanished working directory, torch failing to load in a trial started in it).

This provider gives each worker node its own `runtime_resources_<node>` folder, as its own disk would:
nothing else of the fake provider changes. The autoscaling config names it with
`provider: {type: external, module: fake_provider.OwnFolderPerNode}`; the head's PYTHONPATH has tests/.
"""

from __future__ import annotations

import contextlib

from ray._private import parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class OwnFolderPerNode(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock, _runtime_env_dir_name(f"runtime_resources_{self._next_node_id + 1:05d}"):
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)


@contextlib.contextmanager
def _runtime_env_dir_name(name: str):
    """RayParams made meanwhile (the fake provider makes one per node) name `name` as their runtime-env folder."""
    original = parameter.RayParams

    def with_own_folder(*args, **kwargs):
        return original(*args, **{**kwargs, "runtime_env_dir_name": name})

    parameter.RayParams = with_own_folder
    try:
        yield
    finally:
        parameter.RayParams = original
