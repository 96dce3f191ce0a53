"""``setup_pc1.sh --service`` against a real systemd (tests/systemd_ns.py: systemd 252 booted as
PID 1 of namespaces of its own, nothing of the host's boot run, /tmp and /run private).

As root where systemd runs, the script installs, enables and starts the unit it wrote and
waits for the node's READY=1; then the node is a real ``Type=notify`` service: systemd
shows its STATUS= line, restarts it when it stops pinging the watchdog (the test freezes
it with SIGSTOP; a drop-in shortens WatchdogSec to 3 s so the test does not wait 30 s),
stops it cleanly, and ``--remove-service`` takes it out. The node runs the fake backend.

Not proven here (no such machine in CI): the same unit on a host with an NVIDIA GPU —
that the hardening options leave CUDA/NVML working (see scripts/lib/service_unit.py for
the options left out and why), and a user unit under ``systemctl --user`` with linger.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import systemd_ns
from tests.e2e.test_setup_scripts import copy_repo

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REASON = systemd_ns.available()
if REASON is None and sys.prefix.startswith(("/tmp/", "/var/tmp/")):  # the booted systemd mounts its own /tmp
    REASON = f"the test's virtual environment ({sys.prefix}) lives under /tmp, which the namespace hides"
if REASON is not None:
    pytest.skip(f"cannot boot a systemd here: {REASON}", allow_module_level=True)

UNIT = "tars-pc1.service"


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[systemd_ns.SystemdNamespace, Path]]:
    work = tmp_path_factory.mktemp("systemd")
    repo = copy_repo(work / "repo")
    (repo / "env").mkdir(exist_ok=True)
    env_file = repo / "env" / ".env.pc1"
    env_file.write_text("\n".join([
        "TARS_NODE_NAME=pc1", "TARS_ROLE=server", "TARS_HOST=127.0.0.1", "TARS_PORT=8000",
        "TARS_CLUSTER_TOKEN=systemd-test-token", "TARS_BACKEND_OVERRIDE=fake",
        f"TARS_MODELS_DIR={work / 'models'}", "TARS_GPU_PROFILE=cpu", ""]))
    env_file.chmod(0o600)
    dropin = "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=3s\nRestartSec=1s"
    with systemd_ns.SystemdNamespace(work, dropin=dropin) as sd:
        sd.journal()
        yield sd, repo


def script_env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "CI": "1",
            "PYTHON": sys.executable, "TARS_VENV": sys.prefix, "TARS_SETUP_SKIP_INSTALL": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TARS_SETUP_SELFCHECK_TIMEOUT": "120"}


def until(cond, timeout: float, what: str, sd: systemd_ns.SystemdNamespace) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            journal = sd.run("journalctl", "-u", UNIT, "-n", "40", "--no-pager", check=False).stdout
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{journal}")
        time.sleep(0.2)


def test_setup_installs_enables_and_starts_a_notify_service(booted) -> None:  # noqa: ANN001
    sd, repo = booted
    r = sd.run("bash", "scripts/setup_pc1.sh", "--service", env=script_env(), cwd=repo, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for n in range(1, 12):
        assert f"[{n}/11]" in r.stdout
    assert f"installed /etc/systemd/system/{UNIT}" in out and f"enabled {UNIT}" in out
    # the script waited for READY=1 and shows the node's own STATUS= line (the fake backend loads at
    # once: the "starting: ..." lines of a real load are in tests/e2e/test_sdnotify_serve.py)
    assert f"{UNIT} is active after" in out and "serving 2 model(s) here" in out
    assert "a TARS node already listens on http://127.0.0.1:8000" in out and "self-check passed" in out

    installed = sd.run("cat", f"/etc/systemd/system/{UNIT}").stdout
    assert installed.splitlines()[3:] == (repo / "env" / UNIT).read_text().splitlines()[3:]
    assert sd.show(UNIT, "Type") == "notify" and sd.show(UNIT, "NotifyAccess") == "main"
    assert sd.show(UNIT, "ActiveState") == "active" and sd.show(UNIT, "UnitFileState") == "enabled"
    assert sd.show(UNIT, "Restart") == "on-failure" and sd.show(UNIT, "WatchdogUSec") == "3s"
    assert sd.show(UNIT, "StatusText").startswith("serving 2 model(s) here")
    assert sd.show(UNIT, "WorkingDirectory") == str(repo)
    assert sd.show(UNIT, "ProtectSystem") == "full" and sd.show(UNIT, "NoNewPrivileges") == "yes"
    assert sd.show(UNIT, "PrivateDevices") == "no" and sd.show(UNIT, "DevicePolicy") == "auto"
    health = sd.run("python3", "-c", "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/health').read().decode())")
    assert '"status":"ok"' in health.stdout.replace(" ", "")
    journal = sd.run("journalctl", "-u", UNIT, "--no-pager").stdout
    assert "tars-pc1[" in journal and "ready: told the service manager" in journal  # logs in journald, tagged


def test_a_second_run_changes_nothing_and_keeps_the_service(booted) -> None:  # noqa: ANN001
    sd, repo = booted
    pid = sd.show(UNIT, "MainPID")
    r = sd.run("bash", "scripts/setup_pc1.sh", "--service", env=script_env(), cwd=repo, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Nothing changed" in r.stdout and f"{UNIT} is running" in r.stdout
    assert sd.show(UNIT, "MainPID") == pid


def test_a_frozen_node_misses_the_watchdog_and_is_restarted(booted) -> None:  # noqa: ANN001
    sd, _ = booted
    pid = int(sd.show(UNIT, "MainPID"))
    assert pid > 0, f"{UNIT} is not running (MainPID 0): nothing to freeze"  # kill -STOP 0 would stop us
    before = int(sd.show(UNIT, "NRestarts"))
    sd.run("kill", "-STOP", str(pid))  # a wedged process: no more WATCHDOG=1
    until(lambda: int(sd.show(UNIT, "NRestarts")) == before + 1, 60, "the watchdog restart", sd)
    until(lambda: sd.show(UNIT, "ActiveState") == "active", 120, "READY=1 of the new process", sd)
    assert int(sd.show(UNIT, "MainPID")) != pid
    journal = sd.run("journalctl", "-u", UNIT, "--no-pager").stdout
    assert "Watchdog timeout" in journal


def test_stop_is_clean_and_remove_service_takes_it_out(booted) -> None:  # noqa: ANN001
    sd, repo = booted
    sd.systemctl("stop", UNIT)
    assert sd.show(UNIT, "ActiveState") == "inactive" and sd.show(UNIT, "Result") == "success"
    journal = sd.run("journalctl", "-u", UNIT, "--no-pager").stdout
    assert "unloaded model" in journal or "left" in journal or "Deactivated successfully" in journal
    sd.systemctl("start", UNIT)
    r = sd.run("bash", "scripts/setup_pc1.sh", "--remove-service", env=script_env(), cwd=repo, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"stopped, disabled and removed /etc/systemd/system/{UNIT}" in r.stdout
    assert sd.run("test", "-e", f"/etc/systemd/system/{UNIT}", check=False).returncode == 1
    assert sd.show(UNIT, "LoadState") == "not-found" and sd.show(UNIT, "ActiveState") == "inactive"
    assert not (repo / "env" / UNIT).exists() and not (repo / "env" / "tars-pc1-user.service").exists()
    assert sd.run("pgrep", "-f", "distributed serve", check=False).returncode == 1  # nothing left running
    _ = signal
