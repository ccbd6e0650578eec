"""What computed a run, as tags a result read months later can answer from: the package versions, the lock file's
digest, and on a GPU the card, the CUDA build of torch and the NVIDIA driver. Plus MLflow's system metrics (CPU,
memory, disk, network and, through NVML, GPU utilisation and memory) on a trial's runs, behind --system-metrics.

The tags are rewritten on every attempt of a trial, like its placement: a retried trial may land on another node
with another card or driver. The parent run gets the driver process's versions (it trains nothing, so no device).
"""

from __future__ import annotations

import hashlib
import platform
from contextlib import ExitStack, contextmanager
from importlib import metadata

from .. import provenance, schema

LOCK_FILE = provenance.PROJECT_ROOT / "requirements" / "lock.txt"
PACKAGES = ("torch", "torchvision", "numpy", "ray", "mlflow", "optuna")  # each one's version: schema.env_tag(package)
SAMPLING_S = 10.0  # MLflow's default: one sample, logged at once, every 10 s (each sample asks the store one thing)


def package_versions() -> dict[str, str]:
    """{tag: version} of Python and the packages that decide a result, "absent" for one not installed."""
    versions = {schema.env_tag("python"): platform.python_version()}
    for package in PACKAGES:
        try:
            versions[schema.env_tag(package)] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[schema.env_tag(package)] = "absent"
    return versions


def lock_digest() -> str:
    """The first 16 hex digits of the lock file's SHA-256 ("" where the code runs without it: an installed wheel)."""
    try:
        return hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def device_tags(device: str) -> dict[str, str]:
    """On a CUDA device: the card's name, the CUDA version torch was built for, and the NVIDIA driver's version
    (NVML; "unknown" where it cannot be read). Nothing on a CPU."""
    if not device.startswith("cuda"):
        return {}
    import torch

    return {schema.ENV_DEVICE_NAME: torch.cuda.get_device_name(torch.device(device)),
            schema.ENV_CUDA: torch.version.cuda or "unknown", schema.ENV_DRIVER: nvidia_driver_version()}


def nvidia_driver_version() -> str:
    """The NVIDIA driver's version as `nvidia-smi` prints it (e.g. 580.95.05), or "unknown"."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver loaded, no permission: say unknown, never fail a trial on it
        return "unknown"
    return version.decode() if isinstance(version, bytes) else str(version)


def environment_tags(device: str | None = None) -> dict[str, str]:
    """Every environment tag of a run: versions and lock digest; a trial's device too (`device`: what it trains on)."""
    digest = lock_digest()
    return {**package_versions(), **({schema.ENV_LOCK: digest} if digest else {}),
            **(device_tags(device) if device else {})}


def system_metrics_on(choice: str, device: str) -> bool:
    """--system-metrics: on, off, or auto (on when the trial trains on a GPU, where utilisation shows a trial starved
    on a packed card; on a CPU the samples say little that Ray's dashboard does not)."""
    return choice == "on" or (choice == "auto" and device.startswith("cuda"))


@contextmanager
def system_metrics(run_ids: list[str], tracking_uri: str, resumed: bool, on: bool):
    """MLflow's system-metrics monitor on each run while the block runs (a thread each, sampling every SAMPLING_S),
    as `system/...` metrics; a resumed run goes on from its last step. Nothing when `on` is False."""
    if not on:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    with ExitStack() as monitors:
        for run_id in run_ids:
            monitor = SystemMetricsMonitor(run_id, sampling_interval=SAMPLING_S, resume_logging=resumed,
                                           tracking_uri=tracking_uri)
            monitor.start()
            monitors.callback(monitor.finish)
        yield
