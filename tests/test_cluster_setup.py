"""cluster.yaml's setup commands, run for real on a stand-in for the head node: they install the study stack at the
lock's versions and start an MLflow server that answers, or they fail loudly.

The nodes run the image `rayproject/ray:2.60.0-py311-gpu`: Python 3.11 and pip, Ray 2.60.0 and the packages of its
extras (the image installs `ray[all]`), and no torch, MLflow or Optuna. Its stand-in here is a fresh venv
(`python -m venv`, not --system-site-packages) whose bin comes first on PATH, as the image's Python and pip do, with

- pip: IMAGE_PIP, a current release, as the image's;
- the image's Python packages: `ray[all]` and everything it requires, as far as this suite's environment has them
  (Ray's [default] and [tune] extras whole, parts of the others);
- a stand-in for what the image lacks: torch, torchvision and everything they require. Their CUDA build is 5.5 GB,
  minutes to install; on a real node the command under test installs them, from the same lock.

The last two are the suite's own distributions (installed at the lock's versions by .ci/run), as a folder of
symlinks to their files and .dist-info, found from their `importlib.metadata` requirements, outside the venv and on
its sys.path by a .pth file: pip sees them as installed. It must take them as they are: the test fails if pip
installs any of them into the venv (it cannot uninstall them: they lie outside its environment). Everything else
(MLflow, Optuna, boto3, optuna-dashboard, mlxtend, the project itself, ...) the command under test installs from
the package index, at the lock's versions.

The commands are cluster.yaml's own text, each entry run by bash as Ray's command runner wraps it (less its login
shell and ~/.bashrc), in Ray's order on the head: initialization_commands, setup_commands, head_setup_commands.
HOME is a temporary home whose ~/stawm is a copy of the checkout (what file_mounts and its rsync filter copy: the
files git tracks or would track). The only edits to the commands' text are SUBSTITUTIONS; the only change to the
node's environment is NODE_SETTINGS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import psutil
import pytest
import yaml
from packaging.requirements import Requirement

from background import early_result
from processes import free_port, stop_group

REPO = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
LOCK = REPO / "requirements" / "lock.txt"

# The only edits to cluster.yaml's commands: {disk}, {artifacts} and {port} are this test's own.
SUBSTITUTIONS = {
    "/home/ubuntu/mlflow": "{disk}",  # the head's disk, mounted into its container
    "s3://YOUR-BUCKET/mlflow": "{artifacts}",  # MLflow's artifacts, a local folder instead of S3
    "127.0.0.1:5000": "127.0.0.1:{port}",  # a free port instead of 5000
    "--port 5000": "--port {port}",
}
IMAGE = ["ray[all]"]  # the image's Python packages: what of them this environment has too
STAND_IN = ["torch", "torchvision"]  # not in the image: the setup command installs them there
IMAGE_PIP = "pip==26.3"  # a current pip as the image's; the one a venv comes with (23.2 here) takes ~20 s longer
# The node's environment, but for this: the server's job runners (eight more processes, for MLflow's own server-side
# jobs only) stay off, or on these 2 cores the server takes 30-55 s to answer instead of ~20. On the head they run.
# And pip does not compile the installed packages' bytecode (CPU only, ~10 s here, while the suite's other
# tests run; what is installed is the same; Python compiles what it imports anyway).
NODE_SETTINGS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PIP_NO_COMPILE": "1"}
SETUP_TIMEOUT_S = 900  # the pip install: 27-60 s here, with the stand-in
SERVER_WAIT_S = 120  # the head command's own wait for /health


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, str]:
    found = {}
    for line in LOCK.read_text().splitlines():
        if match := re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line):
            found[normalize(match.group(1))] = match.group(2)
    return found


def closure(roots: list[str]) -> dict[str, metadata.Distribution]:
    """The distributions installed here that `roots` (requirement strings) need, themselves included, by their
    requirements; a requirement not installed here is left out with what it would need."""
    installed = {normalize(d.metadata["Name"]): d for d in metadata.distributions()}
    wanted: dict[str, set[str]] = {}
    todo = [Requirement(root) for root in roots]
    while todo:
        requirement = todo.pop()
        name, extras = normalize(requirement.name), set(requirement.extras)
        if name not in installed or name in wanted and extras <= wanted[name]:
            continue
        wanted[name] = wanted.get(name, set()) | extras
        for line in installed[name].requires or []:
            needed = Requirement(line)
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in wanted[name] | {""}):
                todo.append(needed)
    return {name: installed[name] for name in wanted}


def link_distributions(distributions: dict[str, metadata.Distribution], folder: Path) -> None:
    """A site folder of symlinks to exactly these distributions' files: a top-level entry (package, module,
    .dist-info) whole where it belongs to them alone, else file by file (namespaces shared with others)."""
    site = Path(sysconfig.get_path("purelib"))
    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions(path=[str(site)]):
        name = normalize(dist.metadata["Name"])
        for file in dist.files or []:
            if not str(file).startswith(".."):  # ../../bin/...: console scripts, not on sys.path
                owners.setdefault(file.parts[0], set()).add(name)
    folder.mkdir()
    for dist in distributions.values():
        assert Path(dist.locate_file("")) == site, f"{dist.metadata['Name']} is not installed in {site}"
        for file in dist.files or []:
            if str(file).startswith("..") or not (site / file).exists():
                continue
            top = file.parts[0]
            whole = owners[top] <= set(distributions)
            target = folder / (top if whole else file)
            if not target.is_symlink():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(site / (top if whole else file))


def copy_checkout(to: Path) -> None:
    """What file_mounts copies to ~/stawm: the files git tracks, or would (rsync_filter: .gitignore)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, to / name)


def commands(key: str, **places) -> list[str]:
    """cluster.yaml's commands under `key`, with SUBSTITUTIONS filled in from `places`."""
    found = []
    for command in CLUSTER.get(key, []):
        for text, replacement in SUBSTITUTIONS.items():
            command = command.replace(text, replacement.format(**places))
        found.append(command)
    return found


def as_ray_runs(command: str) -> list[str]:
    """`bash -c` with the wrapping of ray.autoscaler's command runner (_with_interactive): a subshell per entry."""
    return ["bash", "-c", f"export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ({command})"]


def node_environment(home: Path, bin_dir: Path) -> dict[str, str]:
    """The process environment on the node: this machine's, less this suite's venv, MLflow and Ray settings, with
    the image's bin first on PATH and HOME the node's home. pip keeps this machine's cache and configuration."""
    ours = {str(Path(sys.executable).parent), str(Path(sys.prefix) / "bin")}
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and p not in ours]
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("MLFLOW_", "RAY_", "PYTHON", "VIRTUAL_ENV", "CONDA"))}
    pip_cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    if pip_cache.returncode == 0 and pip_cache.stdout.strip():
        environment["PIP_CACHE_DIR"] = pip_cache.stdout.strip()
    environment.setdefault("XDG_CONFIG_HOME", str(Path.home() / ".config"))  # pip's user configuration
    environment.update(HOME=str(home), PATH=os.pathsep.join([str(bin_dir), *path]), **NODE_SETTINGS)
    return environment


def health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3) as response:
            return response.status
    except OSError:
        return None


def processes_under(root: Path) -> list[psutil.Process]:
    """Running processes whose command line names a path under `root` (the server's database and log do)."""
    this = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid not in this and str(root) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def stop_everything(port: int, root: Path, groups: list[subprocess.Popen]) -> list[str]:
    """Stops the process groups the commands ran in, then anything still serving `port` or naming `root`, with
    their children; returns what was still running after that (empty when all is gone)."""
    for group in groups:
        stop_group(group, grace_s=10)
    left = set(processes_under(root))
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.pid:
            try:
                left.add(psutil.Process(connection.pid))
            except psutil.NoSuchProcess:
                pass
    for process in list(left):
        try:
            left.update(process.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(left), timeout=10)
    return [" ".join(p.cmdline()) for p in alive if p.is_running()]


def run_checks(home: Path, root: Path, env: dict) -> dict[str, tuple[str, str, int]]:
    """What a user of the node runs first, at once (each imports much of the stack; none depends on another):
    name -> (stdout, stderr, status)."""
    probe = ("import stawm.study.runner, optuna, mlflow, ray.tune, boto3\n"
             "import optuna_dashboard, stawm, torch\n"
             "from importlib import metadata\n"
             "print(stawm.__file__)\n"
             "print(*(f'{d} {metadata.version(d)}' for d in ('mlflow', 'optuna', 'boto3', 'ray', 'torch')))")
    elsewhere = root  # not ~, where the directory ~/stawm would import as a namespace package `stawm`
    checks = {
        "mlflow --version": (["mlflow", "--version"], elsewhere),
        "imports": (["python", "-c", probe], elsewhere),
        "study --help": (["python", "studies/glimpse_size.py", "--help"], home / "stawm"),
    }
    running = {name: subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, (args, cwd) in checks.items()}
    return {name: (*process.communicate(timeout=300), process.returncode) for name, process in running.items()}


def start_early() -> dict:
    """A head node set up by cluster.yaml's commands, its MLflow server running (conftest starts this in the
    background as soon as the tests are collected: most of it is pip downloading)."""
    root = Path(tempfile.mkdtemp(prefix="head-"))
    home, disk, artifacts, image = root / "home", root / "disk", root / "artifacts", root / "image"
    port = free_port()
    places = {"disk": disk, "artifacts": artifacts, "port": port}
    seconds: dict[str, float] = {}
    clock = time.monotonic()
    started: list[subprocess.Popen] = []
    try:
        image_packages = closure(IMAGE + STAND_IN)
        locked = locked_versions()
        drift = {name: (d.version, locked[name]) for name, d in image_packages.items()
                 if name in locked and locked[name] != d.version}
        assert not drift, (f"this environment is not requirements/lock.txt's (installed, locked): {drift}; install "
                           f"it as README.md says, with -c requirements/lock.txt")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(image)], check=True, timeout=120)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(image / "bin" / "python"), "install", "-q",
                        IMAGE_PIP], check=True, capture_output=True, timeout=300)
        site = Path(subprocess.run([str(image / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path("
                                    "'purelib'))"], capture_output=True, text=True, check=True).stdout.strip())
        link_distributions(image_packages, root / "image-packages")
        (site / "image-packages.pth").write_text(f"{root / 'image-packages'}\n")
        home.mkdir()
        (home / "stawm").mkdir()
        copy_checkout(home / "stawm")
        environment = node_environment(home, image / "bin")
        seconds["image"] = time.monotonic() - clock

        def run(command: str, timeout: float) -> subprocess.CompletedProcess:
            # A session of its own, as over SSH: what it leaves running (the server) is stopped as a group.
            process = subprocess.Popen(as_ray_runs(command), cwd=home, env=environment, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, start_new_session=True)
            started.append(process)
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_group(process, grace_s=5)
                raise
            return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

        runs = {}
        for key in ("initialization_commands", "setup_commands", "head_setup_commands"):
            clock = time.monotonic()
            runs[key] = [run(command, SETUP_TIMEOUT_S) for command in commands(key, **places)]
            seconds[key] = time.monotonic() - clock
            failed = [done for done in runs[key] if done.returncode != 0]
            assert not failed, (f"{key} failed ({failed[0].returncode}): {failed[0].args[-1]}\n"
                                f"{failed[0].stdout[-3000:]}\n{failed[0].stderr[-5000:]}")
        clock = time.monotonic()
        checks = run_checks(home, root, environment)
        seconds["checks"] = time.monotonic() - clock
        (root / "seconds.json").write_text(json.dumps(seconds, indent=1))
    except BaseException:
        stop_everything(port, root, started)
        shutil.rmtree(root, ignore_errors=True)
        raise
    return {"root": root, "home": home, "disk": disk, "port": port, "places": places, "site": site,
            "image_packages": image_packages, "env": environment, "runs": runs, "seconds": seconds, "run": run,
            "checks": checks, "started": started,
            "stop": lambda: (stop_everything(port, root, started), shutil.rmtree(root, True))}


@pytest.fixture(scope="module")
def head():
    """The head node `start_early` set up; its MLflow server stopped after the module."""
    node = early_result(__name__, start_early)
    try:
        yield node
    finally:
        left = stop_everything(node["port"], node["root"], node["started"])
        shutil.rmtree(node["root"], ignore_errors=True)
        assert not left, f"still running after the test: {left}"


@pytest.mark.slow
def test_setup_installs_the_locked_study_stack_beside_the_images_packages(head):
    env, home = head["env"], head["home"]
    assert shutil.which("mlflow", path=env["PATH"]) == str(head["root"] / "image" / "bin" / "mlflow")
    done = head["checks"]
    for name, (stdout, stderr, status) in done.items():
        assert status == 0, f"{name} failed ({status}):\n{stdout[-2000:]}\n{stderr[-5000:]}"
    assert done["mlflow --version"][0].startswith("mlflow, version")
    assert done["study --help"][0].startswith("usage:")
    where, installed = done["imports"][0].splitlines()[-2:]
    assert Path(where).is_relative_to(home / "stawm")  # the node's copy, editable
    locked = locked_versions()
    for name, version in zip(installed.split()[::2], installed.split()[1::2]):
        assert version == locked[name], name


@pytest.mark.slow
def test_pip_took_the_images_packages_as_they_were(head):
    # None of them installed again in the venv itself: pip found the image's Ray (and the torch stand-in) right.
    own = {normalize(d.metadata["Name"]) for d in metadata.distributions(path=[str(head["site"])])}
    assert not own & set(head["image_packages"])
    assert {"mlflow", "optuna", "boto3", "optuna-dashboard", "stawm"} <= own  # the command's own part
    assert "Not uninstalling" not in head["runs"]["setup_commands"][0].stdout


@pytest.mark.slow
def test_the_head_serves_mlflow_and_a_rerun_starts_no_second_server(head):
    port, disk = head["port"], head["disk"]
    assert health(port) == 200
    servers = {p.pid for p in processes_under(disk)}
    assert servers, "no process runs on the head's database"
    log = (disk / "server.log").read_text()

    start = time.monotonic()
    again = [head["run"](command, 120) for command in commands("head_setup_commands", **head["places"])]
    assert [done.returncode for done in again] == [0] * len(again), [done.stderr for done in again]
    assert time.monotonic() - start < 20  # it saw the server answer and waited for nothing
    assert {p.pid for p in processes_under(disk)} == servers
    # Nothing more in the server's log than the rerun's requests to /health: no second server tried to start.
    added = (disk / "server.log").read_text().removeprefix(log).splitlines()
    assert added and all('"GET /health HTTP/1.1" 200' in line for line in added), added
    assert health(port) == 200


def test_the_head_fails_loudly_when_mlflow_cannot_start(tmp_path):
    """Without mlflow on PATH, as on a node whose setup installed none, the server command fails with the reason."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)  # the image's python, for the command's /health check
    environment = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    assert shutil.which("mlflow", path=environment["PATH"]) is None
    disk = tmp_path / "disk"
    places = {"disk": disk, "artifacts": tmp_path / "artifacts", "port": free_port()}
    disk.mkdir()  # initialization_commands

    server = [c for c in commands("head_setup_commands", **places) if "mlflow server" in c]
    assert len(server) == 1
    start = time.monotonic()
    done = subprocess.run(as_ray_runs(server[0]), cwd=tmp_path, env=environment, capture_output=True, text=True,
                          timeout=SERVER_WAIT_S + 60)
    assert done.returncode != 0
    reason, *log = done.stderr.splitlines()
    assert "mlflow server does not answer" in reason  # the command's own line, then the end of server.log
    assert any("failed to run command 'mlflow'" in line for line in log), done.stderr
    assert time.monotonic() - start < 15  # it stopped waiting when the server exited


def test_the_substitutions_find_their_text_and_leave_none_of_the_heads_places():
    text = "\n".join(c for key in ("initialization_commands", "setup_commands", "head_setup_commands")
                     for c in CLUSTER.get(key, []))
    assert all(original in text for original in SUBSTITUTIONS)
    places = {"disk": "/tmp/disk", "artifacts": "/tmp/artifacts", "port": 5999}
    replaced = "\n".join(c for key in ("initialization_commands", "setup_commands", "head_setup_commands")
                         for c in commands(key, **places))
    assert not re.search(r"/home/ubuntu|s3://|\b5000\b", replaced), replaced


def test_the_lock_pins_every_requirement_of_what_nodes_and_ci_install():
    """A requirement added to pyproject.toml without regenerating requirements/lock.txt (requirements/README.md)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = locked_versions()
    todo, seen, unlocked = ["stawm[test,cluster]"], set(), []
    while todo:
        requirement = Requirement(todo.pop())
        if normalize(requirement.name) == "stawm":  # the project's own extras, and its core
            for extra in [None, *sorted(requirement.extras)]:
                if extra not in seen:
                    seen.add(extra)
                    todo += project["dependencies"] if extra is None else project["optional-dependencies"][extra]
            continue
        environment = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
        if requirement.marker is None or requirement.marker.evaluate(environment):
            version = locked.get(normalize(requirement.name))
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                unlocked.append(f"{requirement} (locked: {version})")
    assert not unlocked, f"requirements/lock.txt does not satisfy: {unlocked}"
    assert seen >= {"studies", "analysis", "test", "cluster"}
