"""scripts/setup_pc1.sh and scripts/setup_pc2.sh, run for real in a scratch copy of the repo.

CPU mode, non-interactive (CI=1, stdin closed). The scripts reuse the virtual
environment running these tests (TARS_VENV) so llama-cpp-python is not compiled
again, and TARS_SETUP_SKIP_INSTALL=1 keeps them from pointing that shared venv's
editable install at the scratch copy; every other step runs as on a user's
machine: Python check, build detection, the "already installed" checks, the
profiler and planner, the env files, the launchers and the self-checks (PC1: a
real node with the embedded models starts and answers /health; PC2: a real PC1
node accepts the token on /rpc). The pip commands themselves are checked from
what the scripts print in the CUDA / CPU / fresh-venv cases.
"""

from __future__ import annotations

import http.server
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support import ServerProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
PC1_HOST, PC2_HOST = "127.0.0.2", "127.0.0.3"
PORTS = range(18630, 18650)  # this file's share of 18600-18699
_taken: set[int] = set()

if sys.prefix == sys.base_prefix:
    pytest.skip("the setup-script tests reuse the virtual environment running them; run them from .venv",
                allow_module_level=True)


def copy_repo(dest: Path) -> Path:
    """The working tree (tracked + untracked, not ignored) copied to a scratch folder."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, files):
        src = ROOT / os.fsdecode(rel)
        if not src.is_file():
            continue  # deleted in the working tree
        target = dest / os.fsdecode(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
        target.chmod(src.stat().st_mode)
    return dest


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The scratch copy the PC1 → PC2 sequence of tests shares."""
    return copy_repo(tmp_path_factory.mktemp("setup") / "repo")


@pytest.fixture
def fresh_repo(tmp_path: Path) -> Path:
    """A scratch copy of its own, for tests that must not touch the shared one."""
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"pc1": free_port(PC1_HOST, PORTS, _taken), "pc2": free_port(PC2_HOST, PORTS, _taken)}


def _env(models_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TARS_", "PYTHON", "CUDA_HOME"))}
    env.update({"CI": "1", "PYTHON": sys.executable, "TARS_VENV": sys.prefix, "TARS_SETUP_SKIP_INSTALL": "1",
                "TARS_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1", "TARS_SETUP_SELFCHECK_TIMEOUT": "240",
                "TARS_WHEEL_CACHE": str(models_dir.parent / "setup-test-wheels")})
    env.update(extra)
    return env


def run(repo: Path, script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["bash", f"scripts/{script}", *args], cwd=repo, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=600)
    r.all = r.stdout + r.stderr  # type: ignore[attr-defined]
    return r


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


# ----------------------------------------------------------------------------- PC1
@pytest.fixture(scope="module")
def pc1_first(repo: Path, ports: dict[str, int], models_dir: Path, gemma_gguf: Path):  # noqa: ANN201
    env = _env(models_dir, TARS_HOST=PC1_HOST, TARS_PORT=str(ports["pc1"]))
    return run(repo, "setup_pc1.sh", env=env), env


def test_pc1_setup_writes_env_file_launcher_and_passes_the_self_check(repo: Path, pc1_first, ports) -> None:  # noqa: ANN001
    r, _ = pc1_first
    assert r.returncode == 0, r.all
    for n in range(1, 11):
        assert f"[{n}/10]" in r.stdout
    assert "build: cpu" in r.stdout
    assert "torch 2.13.0" in r.stdout and "llama-cpp-python" in r.stdout
    assert "TARS_SETUP_SKIP_INSTALL=1, not running: pip install -e" in r.stdout
    assert "smollm2-135m-instruct" in r.stdout and "all-MiniLM-L6-v2" in r.stdout  # the plan was printed
    assert re.search(r"^ pc1 ", r.stdout, re.M)  # ... for this host under the name it will have

    path = repo / "env" / ".env.pc1"
    values = env_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds a secret
    token = values["TARS_CLUSTER_TOKEN"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)  # secrets.token_urlsafe(32)
    assert values["TARS_ROLE"] == "server" and values["TARS_NODE_NAME"] == "pc1"
    assert values["TARS_HOST"] == PC1_HOST and values["TARS_PORT"] == str(ports["pc1"])
    assert values["TARS_ADVERTISE_URL"] == f"http://{PC1_HOST}:{ports['pc1']}"
    assert f"Cluster token for PC2: {token}" in r.stdout
    assert f"bash scripts/setup_pc2.sh {PC1_HOST}:{ports['pc1']} --token {token}" in r.stdout

    from distributed.settings import load_settings  # the file is valid settings

    s = load_settings(path)
    assert s.cluster_token.get_secret_value() == token and s.effective_role == "server"

    launcher = repo / "run_pc1.sh"
    assert launcher.stat().st_mode & stat.S_IXUSR
    text = launcher.read_text()
    assert f"exec {sys.prefix}/bin/python -m distributed serve --env-file env/.env.pc1" in text
    assert re.search(r"self-check passed: http://127\.0\.0\.2:\d+/health answered 200", r.stdout)
    assert "Changed 2 thing(s)" in r.stdout


def test_pc1_second_run_changes_nothing_and_keeps_the_token(repo: Path, pc1_first) -> None:  # noqa: ANN001
    _, env = pc1_first
    before = {p: (repo / p).read_bytes() for p in ("env/.env.pc1", "run_pc1.sh")}
    r = run(repo, "setup_pc1.sh", env=env)
    assert r.returncode == 0, r.all
    assert "Nothing changed: everything was already set up." in r.stdout
    unchanged = [line for line in r.stdout.splitlines() if "already done, unchanged" in line]
    for step in ("virtual environment exists", "torch ", "llama-cpp-python ", ".env.pc1 exists", "run_pc1.sh is up"):
        assert any(step in line for line in unchanged), (step, unchanged)  # each step said so by name
    assert {p: (repo / p).read_bytes() for p in before} == before
    assert "self-check passed" in r.stdout


def test_pc1_port_held_by_another_program_is_a_clear_error(repo: Path, pc1_first, models_dir: Path) -> None:  # noqa: ANN001
    port = free_port(PC1_HOST, PORTS, _taken)

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"some other web server")

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((PC1_HOST, port), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = run(repo, "setup_pc1.sh", env=_env(models_dir, TARS_HOST=PC1_HOST, TARS_PORT=str(port)))
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 1
    assert f"port {port} on {PC1_HOST} is already in use" in r.stderr
    assert "fix:" in r.stderr and "TARS_PORT" in r.stderr and "ss -ltnp" in r.stderr


# ----------------------------------------------------------------------------- PC1 running, PC2
@pytest.fixture(scope="module")
def pc1_node(repo: Path, pc1_first, tmp_path_factory):  # noqa: ANN001, ANN201
    """./run_pc1.sh, started the way a user starts it, serving the embedded models."""
    r, env = pc1_first
    assert r.returncode == 0, r.all
    values = env_file(repo / "env" / ".env.pc1")
    node = ServerProcess("pc1", values["TARS_HOST"], port=int(values["TARS_PORT"]), command=["./run_pc1.sh"],
                         cwd=repo, log_dir=tmp_path_factory.mktemp("pc1"), grace_s=20,
                         env={"TARS_MODELS_DIR": env["TARS_MODELS_DIR"]})
    with node:
        node.start(timeout=240)
        yield {"url": node.url, "token": values["TARS_CLUSTER_TOKEN"], "port": values["TARS_PORT"]}


def test_pc1_rerun_while_the_node_runs_checks_that_node(repo: Path, pc1_first, pc1_node) -> None:  # noqa: ANN001
    _, env = pc1_first
    r = run(repo, "setup_pc1.sh", env=env)
    assert r.returncode == 0, r.all
    assert "a TARS node already listens on" in r.stdout and "self-check passed" in r.stdout
    assert "Nothing changed" in r.stdout


def test_pc2_without_a_token_says_where_to_find_it(repo: Path, pc1_node, ports, models_dir: Path) -> None:  # noqa: ANN001
    assert not (repo / "env" / ".env.pc2").exists()
    env = _env(models_dir, TARS_HOST=PC2_HOST, TARS_PORT=str(ports["pc2"]), TARS_PC1_PORT=pc1_node["port"])
    r = run(repo, "setup_pc2.sh", PC1_HOST, env=env)
    assert r.returncode == 1
    assert "no cluster token" in r.stderr and "--token" in r.stderr and "TARS_CLUSTER_TOKEN" in r.stderr
    assert not (repo / "env" / ".env.pc2").exists()


@pytest.fixture(scope="module")
def pc2_first(repo: Path, pc1_node, ports, models_dir: Path):  # noqa: ANN001, ANN201
    env = _env(models_dir, TARS_HOST=PC2_HOST, TARS_PORT=str(ports["pc2"]), TARS_PC1_PORT=pc1_node["port"])
    return run(repo, "setup_pc2.sh", PC1_HOST, "--token", pc1_node["token"], env=env), env


def test_pc2_setup_joins_pc1_and_the_token_is_accepted(repo: Path, pc1_node, pc2_first, ports) -> None:  # noqa: ANN001
    r, _ = pc2_first
    assert r.returncode == 0, r.all
    assert f"PC1 answers at {pc1_node['url']}/health" in r.stdout
    assert "PC1 accepted the cluster token on /rpc" in r.stdout
    assert "plan of PC2 alone" in r.stdout and re.search(r"^ pc2 ", r.stdout, re.M)
    values = env_file(repo / "env" / ".env.pc2")
    assert values["TARS_PEERS"] == pc1_node["url"]
    assert values["TARS_CLUSTER_TOKEN"] == pc1_node["token"]
    assert values["TARS_ROLE"] == "worker" and values["TARS_NODE_NAME"] == "pc2"
    assert values["TARS_HOST"] == PC2_HOST and values["TARS_PORT"] == str(ports["pc2"])
    assert stat.S_IMODE((repo / "env" / ".env.pc2").stat().st_mode) == 0o600
    launcher = repo / "run_pc2.sh"
    assert launcher.stat().st_mode & stat.S_IXUSR
    assert "-m distributed serve --env-file env/.env.pc2" in launcher.read_text()

    from distributed.settings import load_settings

    s = load_settings(repo / "env" / ".env.pc2")
    s.check_for_serving()  # peers + token: a worker that may start
    assert s.peers == [pc1_node["url"]] and s.effective_role == "worker"


def test_pc2_second_run_changes_nothing(repo: Path, pc1_node, pc2_first) -> None:  # noqa: ANN001
    _, env = pc2_first
    before = (repo / "env" / ".env.pc2").read_bytes()
    r = run(repo, "setup_pc2.sh", PC1_HOST, "--token", pc1_node["token"], env=env)
    assert r.returncode == 0, r.all
    assert "Nothing changed" in r.stdout and "already joins" in r.stdout
    assert (repo / "env" / ".env.pc2").read_bytes() == before
    # and with no arguments at all it reuses what env/.env.pc2 says
    r = run(repo, "setup_pc2.sh", env=env)
    assert r.returncode == 0, r.all
    assert "Nothing changed" in r.stdout and "PC1 accepted the cluster token" in r.stdout


def test_pc2_unreachable_pc1_is_a_clear_error(repo: Path, pc2_first, ports, models_dir: Path) -> None:  # noqa: ANN001
    _, env = pc2_first
    closed = free_port(PC1_HOST, PORTS, _taken)
    r = run(repo, "setup_pc2.sh", f"{PC1_HOST}:{closed}", "--token", "whatever", env=env)
    assert r.returncode == 1
    assert f"PC1 is unreachable at http://{PC1_HOST}:{closed}" in r.stderr
    assert "fix:" in r.stderr and "./run_pc1.sh" in r.stderr and "firewall" in r.stderr


def test_pc2_wrong_token_is_rejected_with_the_fix(repo: Path, pc1_node, pc2_first) -> None:  # noqa: ANN001
    _, env = pc2_first
    r = run(repo, "setup_pc2.sh", PC1_HOST, "--token", "not-the-token", env=env)
    assert r.returncode == 1
    assert "token rejected" in r.stderr and "401" in r.stderr
    assert "grep TARS_CLUSTER_TOKEN env/.env.pc1" in r.stderr and "--token" in r.stderr
    # the right token again repairs the env file
    r = run(repo, "setup_pc2.sh", PC1_HOST, "--token", pc1_node["token"], env=env)
    assert r.returncode == 0, r.all
    assert "updated TARS_PEERS / TARS_CLUSTER_TOKEN" in r.stdout
    assert env_file(repo / "env" / ".env.pc2")["TARS_CLUSTER_TOKEN"] == pc1_node["token"]


# ----------------------------------------------------------------------------- Python and builds
def test_no_suitable_python_names_the_fix(fresh_repo: Path, tmp_path: Path, models_dir: Path) -> None:
    old = tmp_path / "python3.8"
    old.write_text("#!/bin/sh\ncase \"$2\" in *SystemExit*) exit 1 ;; *) echo 3.8.18 ;; esac\n")
    old.chmod(0o755)
    r = run(fresh_repo, "setup_pc1.sh", env=_env(models_dir, PYTHON=str(old)))
    assert r.returncode == 1
    assert f"PYTHON={old} is Python 3.8.18; TARS Distributed needs 3.10 or newer" in r.stderr
    assert "fix:" in r.stderr and "python3.11" in r.stderr


def _pc1_with_a_driver(repo: Path, tmp_path: Path, models_dir: Path, nvcc: bool) -> subprocess.CompletedProcess[str]:
    """setup_pc1.sh where nvidia-smi shows an RTX 3060 and the CUDA toolkit (nvcc) is there
    only when ``nvcc``: a stand-in for each, ahead of a PATH without any real nvcc, no
    CUDA_HOME, and the self-check skipped."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA GeForce RTX 3060 (UUID: GPU-fake-0)'\n")
    if nvcc:
        (bin_dir / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    dirs = [d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "nvcc").exists()]
    env = _env(models_dir, PATH=os.pathsep.join([str(bin_dir), *dirs]), TARS_SETUP_SELFCHECK="0",
               CUDA_HOME=str(tmp_path / "no-cuda"))
    return run(repo, "setup_pc1.sh", env=env)


def test_cuda_builds_are_chosen_with_a_driver_and_the_toolkit(fresh_repo: Path, tmp_path: Path, models_dir: Path) -> None:
    r = _pc1_with_a_driver(fresh_repo, tmp_path, models_dir, nvcc=True)
    assert r.returncode == 0, r.all
    assert "GPU 0: NVIDIA GeForce RTX 3060" in r.stdout and "release 12.4" in r.stdout
    assert "build: cuda" in r.stdout
    # the installed torch and llama-cpp-python are CPU builds: the CUDA ones replace them. torch 2.13.0+cpu
    # satisfies "torch==2.13.0", so it is uninstalled first; llama-cpp-python is built with CUDA outside
    # pip's cache (which ignores CMAKE_ARGS) into a wheel cache of its own per build kind
    assert "not running: pip uninstall -y torch\n" in r.stdout
    assert "not running: pip install torch==2.13.0\n" in r.stdout
    assert re.search(r"not running: CMAKE_ARGS=-DGGML_CUDA=on FORCE_CMAKE=1 pip wheel --no-cache-dir --no-deps "
                     r"--no-binary llama-cpp-python -w \S+/llama-cpp-python-cuda12\.4-py3\.\d+ llama-cpp-python>=0\.3\.8",
                     r.stdout)
    assert "not running: pip uninstall -y llama-cpp-python\n" in r.stdout
    assert re.search(r"not running: pip install --no-cache-dir \S+/llama-cpp-python-cuda12\.4-py3\.\d+/"
                     r"llama_cpp_python-\*\.whl", r.stdout)
    assert "TARS_SETUP_SELFCHECK=0: skipped" in r.stdout


def test_cpu_builds_when_the_driver_has_no_toolkit(fresh_repo: Path, tmp_path: Path, models_dir: Path) -> None:
    r = _pc1_with_a_driver(fresh_repo, tmp_path, models_dir, nvcc=False)
    assert r.returncode == 0, r.all
    assert "CUDA toolkit (nvcc) is missing: building for CPU" in r.stdout and "build: cpu" in r.stdout
    assert "torch 2.13.0 cpu installed — already done, unchanged" in r.stdout


def test_fresh_venv_is_created_and_the_cpu_install_commands_are_the_right_ones(fresh_repo: Path, tmp_path: Path,
                                                                              models_dir: Path) -> None:
    venv = tmp_path / "fresh-venv"
    env = _env(models_dir, TARS_VENV=str(venv), TARS_SETUP_BUILD="cpu", TARS_SETUP_SELFCHECK="0")
    r = run(fresh_repo, "setup_pc1.sh", env=env)
    assert (venv / "bin" / "python").exists()
    assert f"created virtual environment {venv}" in r.stdout
    assert ("not running: pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu"
            in r.stdout)
    assert re.search(r"not running: CMAKE_ARGS=-DGGML_NATIVE=OFF FORCE_CMAKE=1 pip wheel --no-cache-dir --no-deps "
                     r"--no-binary llama-cpp-python -w \S+/llama-cpp-python-cpu-py3\.\d+ llama-cpp-python>=0\.3\.8",
                     r.stdout)
    assert "pip uninstall" not in r.stdout  # nothing was installed in the fresh venv
    assert f"not running: pip install -e {fresh_repo}" in r.stdout
    # with the installs skipped the new venv is empty, so the profiler cannot run: a clear stop
    assert r.returncode == 1 and "the hardware profiler failed" in r.stderr and "fix:" in r.stderr


# ----------------------------------------------------------------------------- PC2 finds PC1 on the LAN
def _lan_reason() -> str | None:
    from tests import netns

    return netns.available()


@pytest.fixture(scope="module")
def lan_pc1(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A Lan (tests/netns.py: namespaces on a bridge, mDNS crosses it) with PC1 of cluster
    'home' running (fake backend) and an empty host for PC2's setup."""
    reason = _lan_reason()
    if reason is not None:
        pytest.skip(f"no network namespaces: {reason}")
    from tests import netns
    from tests import netns_cluster as nc

    logs = tmp_path_factory.mktemp("lan")
    with netns.Lan("s") as lan:
        h1, h2 = lan.add_host("pc1"), lan.add_host("pc2")
        env = {"TARS_BACKEND_OVERRIDE": "fake", "TARS_CLUSTER_TOKEN": "home-token", "TARS_CLUSTER_NAME": "home",
               "TARS_MODELS_DIR": str(logs / "m1"), "TARS_GPU_PROFILE": "cpu"}
        with nc.node_on(h1, "pc1", env=env, log_dir=logs) as pc1:
            nc.start(pc1, h1)
            yield {"lan": lan, "h1": h1, "h2": h2, "pc1": pc1, "logs": logs}


def run_in(host, repo: Path, script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    r = subprocess.run(host.command("bash", f"scripts/{script}", *args), cwd=repo, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    r.all = r.stdout + r.stderr  # type: ignore[attr-defined]
    return r


def test_pc2_without_an_address_finds_the_one_cluster_and_still_proves_the_token(lan_pc1, fresh_repo: Path,
                                                                                 models_dir: Path) -> None:
    h1, h2 = lan_pc1["h1"], lan_pc1["h2"]
    env = _env(models_dir, TARS_HOST=h2.ip, TARS_PORT="8001")
    r = run_in(h2, fresh_repo, "setup_pc2.sh", "--token", "not-the-token", env=env)
    assert r.returncode == 1  # found by mDNS, but a hint is no trust: the token is checked
    assert f"found cluster 'home' on the LAN: its planner pc1 at http://{h1.ip}:8000" in r.stdout
    assert "token rejected" in r.stderr
    assert "looking for PC1 on the LAN" in r.stdout
    (fresh_repo / "env" / ".env.pc2").unlink()  # (the run above wrote it, as with an address given)
    r = run_in(h2, fresh_repo, "setup_pc2.sh", "--token", "home-token", env=env)
    assert r.returncode == 0, r.all
    assert "found cluster 'home' on the LAN" in r.stdout and "PC1 accepted the cluster token" in r.stdout
    values = env_file(fresh_repo / "env" / ".env.pc2")
    assert values["TARS_PEERS"] == f"http://{h1.ip}:8000" and values["TARS_CLUSTER_NAME"] == "home"
    # a re-run reads PC1 from the env file: no discovery, nothing changed
    r = run_in(h2, fresh_repo, "setup_pc2.sh", "--token", "home-token", env=env)
    assert r.returncode == 0 and "Nothing changed" in r.stdout and "looking for PC1" not in r.stdout, r.all


def test_pc2_with_two_clusters_visible_lists_them_and_picks_by_name(lan_pc1, fresh_repo: Path,
                                                                     models_dir: Path) -> None:
    from tests import netns_cluster as nc

    lan, h2, logs = lan_pc1["lan"], lan_pc1["h2"], lan_pc1["logs"]
    h3 = lan.add_host("lab")
    env3 = {"TARS_BACKEND_OVERRIDE": "fake", "TARS_CLUSTER_TOKEN": "lab-token", "TARS_CLUSTER_NAME": "lab",
            "TARS_MODELS_DIR": str(logs / "m3"), "TARS_GPU_PROFILE": "cpu"}
    with nc.node_on(h3, "lab1", env=env3, log_dir=logs) as lab:
        nc.start(lab, h3)
        env = _env(models_dir, TARS_HOST=h2.ip, TARS_PORT="8001")
        r = run_in(h2, fresh_repo, "setup_pc2.sh", "--token", "home-token", env=env)
        assert r.returncode == 1
        assert "several TARS clusters answer on the LAN" in r.all
        assert f"cluster home: pc1 at http://{lan_pc1['h1'].ip}:8000" in r.all
        assert f"cluster lab: lab1 at http://{h3.ip}:8000" in r.all
        assert "TARS_CLUSTER_NAME=<cluster>" in r.stderr
        assert not (fresh_repo / "env" / ".env.pc2").exists()
        r = run_in(h2, fresh_repo, "setup_pc2.sh", "--token", "lab-token", env={**env, "TARS_CLUSTER_NAME": "lab"})
        assert r.returncode == 0, r.all
        assert env_file(fresh_repo / "env" / ".env.pc2")["TARS_PEERS"] == f"http://{h3.ip}:8000"


def test_pc2_with_no_cluster_visible_says_to_give_the_address(fresh_repo: Path, models_dir: Path) -> None:
    reason = _lan_reason()
    if reason is not None:
        pytest.skip(f"no network namespaces: {reason}")
    from tests import netns

    with netns.Lan("n") as lan:
        h = lan.add_host("pc2")
        r = run_in(h, fresh_repo, "setup_pc2.sh", "--token", "t",
                   env=_env(models_dir, TARS_HOST=h.ip, TARS_PORT="8001", TARS_DISCOVERY_TIMEOUT="2"))
    assert r.returncode == 1
    assert "no TARS cluster answered on the LAN" in r.stderr and "<PC1 address>" in r.stderr
    assert "client isolation" in r.stderr
