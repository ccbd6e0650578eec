"""What `pip install` gives a user: the layers as extras, the console scripts, the Ray the cluster runs."""

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment the tests run in, as `.ci/run` installed it


def requirements(extra: str | None = None) -> dict[str, str]:
    """{distribution name: its specifier} that the installed stawm asks for, for `extra` (None: the core)."""
    found = {}
    for line in metadata.requires("stawm"):
        spec, _, marker = line.partition(";")
        wants = re.search(r'extra\s*==\s*"([^"]+)"', marker)
        if (wants.group(1) if wants else None) == extra:
            name = re.match(r"[A-Za-z0-9_.-]+", spec.strip()).group(0).lower()
            found[name] = spec.strip()[len(name):]
    return found


def test_the_model_alone_pulls_neither_the_study_nor_the_analysis_stack():
    core = requirements()
    assert {"torch", "torchvision", "numpy"} <= set(core)
    assert not set(core) & {"ray", "mlflow", "optuna", "pandas", "seaborn", "matplotlib", "tabulate"}
    assert {"ray", "optuna", "mlflow"} <= set(requirements("studies"))
    assert {"mlflow", "pandas", "seaborn", "nbclient"} <= set(requirements("analysis"))


def test_ray_is_pinned_to_the_version_the_cluster_image_runs():
    image = re.search(r"rayproject/ray:([0-9.]+)-", (REPO / "cluster.yaml").read_text()).group(1)
    assert requirements("studies")["ray"] == f"[tune]=={image}"
    assert metadata.version("ray") == image


def test_no_generic_top_level_analysis_package_is_installed(tmp_path):
    probe = "import importlib.util, stawm.analysis; print(importlib.util.find_spec('analysis'))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr  # stawm.analysis is the name


@pytest.mark.parametrize("script, usage", [
    ("stawm-train", "usage: stawm-train"),
    ("stawm-report", "usage: stawm-report"),
    ("stawm-notebook", "usage: stawm-notebook"),
])
def test_console_scripts_run_from_the_installed_environment(tmp_path, script, usage):
    done = subprocess.run([str(BIN / script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(usage), done.stderr


def test_a_console_script_reports_bad_input_in_one_line_with_status_2(tmp_path):
    done = subprocess.run([str(BIN / "stawm-train"), "--preset", "tiny", "--set", "glimpses=many"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "stawm-train: error: glimpses='many' is not a valid int\n"
