"""The service step of the setup scripts: the unit (scripts/lib/service_unit.py), checked by
systemd's own parser (``systemd-analyze verify``), and the shell logic of scripts/lib/service.sh
and scripts/lib/platform.sh run for real with ``systemctl`` replaced by a recorder (the same
steps against a real systemd: tests/e2e/test_service_unit.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("service_unit", ROOT / "scripts" / "lib" / "service_unit.py")
assert spec is not None and spec.loader is not None
service_unit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(service_unit)


def render(tmp: Path, mode: str = "system", **kw: str) -> str:
    args = {"name": "pc1", "role": "server", "root": str(tmp), "python": sys.executable,
            "env_file": "env/.env.pc1", "mode": mode, "user": "alice", "group": "alice",
            "models_dir": str(tmp / "models"), "script": "setup_pc1.sh", **kw}
    return service_unit.render(**args)


def keys(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


HOME_CHECKOUT = Path("/home/alice/tars")  # rendering reads no file: a path where a user keeps the checkout


def test_the_system_unit_is_a_notify_service_with_watchdog_restart_and_its_directories() -> None:
    tmp_path = HOME_CHECKOUT
    k = keys(render(tmp_path, nvidia_modprobe="/usr/bin/nvidia-modprobe"))
    assert k["Type"] == ["notify"] and k["NotifyAccess"] == ["main"]
    assert k["WatchdogSec"] == ["30"] and k["Restart"] == ["on-failure"] and k["RestartSec"] == ["5"]
    assert k["TimeoutStartSec"] == ["300"] and k["KillMode"] == ["mixed"]
    assert k["User"] == ["alice"] and k["Group"] == ["alice"]
    assert k["WorkingDirectory"] == [str(tmp_path)]
    assert k["RequiresMountsFor"] == [f"{tmp_path} {tmp_path / 'models'}"]
    assert k["ExecStart"] == [f"{sys.executable} -m distributed serve --env-file env/.env.pc1"]
    assert k["ExecStartPre"] == ["-+/usr/bin/nvidia-modprobe -u -c=0"]
    assert k["StandardOutput"] == ["journal"] and k["SyslogIdentifier"] == ["tars-pc1"]
    assert k["WantedBy"] == ["multi-user.target"] and "network-online.target" in k["After"][0]
    for opt in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelModules", "RestrictSUIDSGID", "LockPersonality"):
        assert k[opt] == ["yes"], opt
    assert k["ProtectSystem"] == ["full"]
    # what would hide or break the GPU is never set
    for opt in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute",
                "SystemCallFilter", "ProtectHome", "PrivateUsers"):
        assert opt not in k, opt


def test_the_user_unit_has_no_sandbox_no_user_and_starts_with_the_user_manager() -> None:
    unit = render(HOME_CHECKOUT, mode="user", nvidia_modprobe="/usr/bin/nvidia-modprobe")
    k = keys(unit)
    assert k["Type"] == ["notify"] and k["WatchdogSec"] == ["30"] and k["WantedBy"] == ["default.target"]
    for opt in ("User", "Group", "ExecStartPre", "NoNewPrivileges", "ProtectSystem", "PrivateTmp"):
        assert opt not in k, opt
    assert "systemctl --user status tars-pc1.service" in unit


def test_paths_with_spaces_and_percent_are_escaped_and_tmp_turns_private_tmp_off(tmp_path: Path) -> None:
    odd = tmp_path / "my 100% models"
    k = keys(render(tmp_path, python=str(odd / "bin" / "python")))
    assert k["ExecStart"][0].startswith(f'"{tmp_path}/my 100%% models/bin/python" -m distributed')
    assert service_unit.quote('a"b\\c') == '"a\\"b\\\\c"' and service_unit.quote("$HOME") == "$$HOME"
    with pytest.raises(ValueError):
        render(tmp_path, root=str(tmp_path / "a\nb"))
    unit = render(Path("/tmp/x"), models_dir="/srv/models")
    assert "PrivateTmp=yes" not in unit and "PrivateTmp= is off: /tmp/x" in unit
    assert "PrivateTmp=yes" in render(Path("/home/alice/tars"), models_dir="/srv/models")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("mode", ["system", "user"])
def test_systemd_itself_parses_the_unit_without_a_warning(mode: str, tmp_path: Path) -> None:
    folder = tmp_path / "odd 100% dir"
    folder.mkdir()
    unit = tmp_path / "tars-pc1.service"
    user = "root" if mode == "system" else ""
    modprobe = shutil.which("true") or "/bin/true"
    unit.write_text(render(folder, mode, user=user, group=user, nvidia_modprobe=modprobe))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "warning"}
    cmd = ["systemd-analyze", *(["--user"] if mode == "user" else []), "verify", str(unit)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    problems = [ln for ln in r.stderr.splitlines() if "tars-pc1.service" in ln]
    assert r.returncode == 0 and not problems, r.stderr


# ----------------------------------------------------------------------------- the shell side
FAKE_SYSTEMCTL = r"""#!/usr/bin/env bash
echo "systemctl $*" >> "__LOG__"
case " $* " in
  *" is-enabled "*) [ -f "__STATE__.enabled" ] ;;
  *" enable "*) touch "__STATE__.enabled"; echo "Created symlink ..." ;;
  *" is-active "*) [ -f "__STATE__.active" ] ;;
  *" restart "*) touch "__STATE__.active" ;;
  *" -p ActiveState "*) [ -f "__STATE__.active" ] && echo active || echo activating ;;
  *" -p StatusText "*) echo "serving 2 model(s) here: a, b" ;;
  *) : ;;
esac
"""


def shell(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``script`` after sourcing setup_common.sh, in a scratch 'checkout' with a fake systemctl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL.replace("__LOG__", str(tmp_path / "calls")).replace("__STATE__",
                                                                                          str(tmp_path / "svc")))
    fake.chmod(0o755)
    repo = tmp_path / "repo"
    (repo / "scripts" / "lib").mkdir(parents=True, exist_ok=True)
    for f in ("setup_common.sh", "builds.sh", "service.sh", "platform.sh", "service_unit.py", "probe.py"):
        shutil.copy(ROOT / "scripts" / "lib" / f, repo / "scripts" / "lib" / f)
    (repo / "env").mkdir(exist_ok=True)
    full = (f"source scripts/lib/setup_common.sh; VPY={sys.executable}; ENV_FILE=env/.env.pc1\n"
            f"{script}")
    base = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    base.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
                 "PYTHONPATH": str(ROOT), "TARS_SYSTEMD_UNIT_DIR": str(tmp_path / "units"), **env})
    (tmp_path / "units").mkdir(exist_ok=True)
    return subprocess.run(["bash", "-c", full], cwd=repo, env=base, capture_output=True, text=True, timeout=120)


def calls(tmp_path: Path) -> list[str]:
    f = tmp_path / "calls"
    return f.read_text().splitlines() if f.exists() else []


def test_root_with_systemd_installs_enables_starts_and_waits_then_a_rerun_changes_nothing(tmp_path: Path) -> None:
    r = shell(tmp_path, "setup_service pc1 server; summary", TARS_SYSTEMD_RUNNING="1")
    assert r.returncode == 0, r.stdout + r.stderr
    unit = tmp_path / "units" / "tars-pc1.service"
    assert unit.exists() and (tmp_path / "repo" / "env" / "tars-pc1.service").exists()
    assert (tmp_path / "repo" / "env" / "tars-pc1-user.service").exists()
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    assert ["systemctl daemon-reload", "systemctl is-enabled --quiet tars-pc1.service",
            "systemctl enable tars-pc1.service", "systemctl restart --no-block tars-pc1.service"] == \
        [c for c in calls(tmp_path) if "show" not in c]
    assert "tars-pc1.service is active after" in r.stdout and "serving 2 model(s) here" in r.stdout
    assert "Changed 5 thing(s)" in r.stdout
    (tmp_path / "calls").unlink()
    r = shell(tmp_path, "setup_service pc1 server; summary", TARS_SYSTEMD_RUNNING="1")
    assert r.returncode == 0 and "Nothing changed" in r.stdout, r.stdout + r.stderr
    assert "restart" not in " ".join(calls(tmp_path)) and "tars-pc1.service is running" in r.stdout


def test_without_systemd_the_exact_commands_are_printed_system_and_user(tmp_path: Path) -> None:
    r = shell(tmp_path, "setup_service pc1 server", TARS_SYSTEMD_RUNNING="0")
    assert r.returncode == 0, r.stderr
    assert "systemd is not running here, so nothing was installed" in r.stdout
    repo = tmp_path / "repo"
    assert f"sudo install -m 0644 {repo}/env/tars-pc1.service {tmp_path}/units/tars-pc1.service" in r.stdout
    assert "sudo systemctl daemon-reload && sudo systemctl enable --now tars-pc1.service" in r.stdout
    assert f"install -m 0644 {repo}/env/tars-pc1-user.service ~/.config/systemd/user/tars-pc1.service" in r.stdout
    assert "systemctl --user daemon-reload && systemctl --user enable --now tars-pc1.service" in r.stdout
    assert "loginctl enable-linger" in r.stdout
    assert calls(tmp_path) == [] and not (tmp_path / "units" / "tars-pc1.service").exists()


def test_not_root_where_systemd_runs_prints_the_commands(tmp_path: Path) -> None:
    r = shell(tmp_path, "is_root() { false; }; setup_service pc1 server", TARS_SYSTEMD_RUNNING="1")
    assert r.returncode == 0, r.stderr
    assert "To run it as a system service" in r.stdout and "as a user service" in r.stdout
    assert "restart" not in " ".join(calls(tmp_path))


def test_remove_service_takes_out_the_system_and_user_units_and_the_copies(tmp_path: Path) -> None:
    assert shell(tmp_path, "setup_service pc1 server", TARS_SYSTEMD_RUNNING="1").returncode == 0
    user_unit = tmp_path / "home" / ".config" / "systemd" / "user" / "tars-pc1.service"
    user_unit.parent.mkdir(parents=True)
    user_unit.write_text("[Service]\n")
    (tmp_path / "calls").unlink()
    r = shell(tmp_path, "SERVICE_SCRIPT=setup_pc1.sh; remove_service pc1", TARS_SYSTEMD_RUNNING="1")
    assert r.returncode == 0, r.stderr
    assert "systemctl disable --now tars-pc1.service" in calls(tmp_path)
    assert "systemctl --user disable --now tars-pc1.service" in calls(tmp_path)
    assert not (tmp_path / "units" / "tars-pc1.service").exists() and not user_unit.exists()
    assert not list((tmp_path / "repo" / "env").glob("tars-pc1*.service"))
    assert "Changed 4 thing(s)" in r.stdout


def test_the_node_name_of_the_env_file_names_the_unit(tmp_path: Path) -> None:
    r = shell(tmp_path, "printf 'TARS_NODE_NAME=desk-3060\\n' > env/.env.pc1; setup_service pc1 server",
              TARS_SYSTEMD_RUNNING="0")
    assert r.returncode == 0 and "tars-desk-3060.service" in r.stdout, r.stderr
    assert (tmp_path / "repo" / "env" / "tars-desk-3060.service").exists()


# ----------------------------------------------------------------------------- WSL
def test_wsl_is_detected_and_the_windows_side_settings_are_named(tmp_path: Path) -> None:
    osrelease = tmp_path / "osrelease"
    osrelease.write_text("5.15.153.1-microsoft-standard-WSL2\n")
    r = shell(tmp_path, "is_wsl && echo WSL; wsl_advice 8000 http://192.168.1.20:8000",
              TARS_OSRELEASE_FILE=str(osrelease), TARS_WSL_CONF=str(tmp_path / "no-wsl.conf"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("WSL") and "networkingMode=mirrored" in out and "wsl --shutdown" in out
    assert "http://192.168.1.20:8000" in out and "TARS_ADVERTISE_URL" in out
    assert "-LocalPort 8000,8001" in out and "New-NetFirewallHyperVRule" in out
    assert "{40E0AC32-46A5-438A-A0B2-2B479E8F2E90}" in out and "5353" in out
    assert "[boot] systemd=true" in out
    conf = tmp_path / "wsl.conf"
    conf.write_text("[boot]\nsystemd=true\n")
    r = shell(tmp_path, "wsl_advice 8000 x", TARS_OSRELEASE_FILE=str(osrelease), TARS_WSL_CONF=str(conf))
    assert "systemd=true, then --service" not in r.stdout


def test_not_wsl_says_nothing(tmp_path: Path) -> None:
    osrelease = tmp_path / "osrelease"
    osrelease.write_text("6.8.0-45-generic\n")
    r = shell(tmp_path, "wsl_advice 8000 x; is_wsl || echo no-wsl", TARS_OSRELEASE_FILE=str(osrelease))
    assert r.stdout.strip() == "no-wsl"


def test_a_file_system_that_ignores_chmod_is_said_not_hidden(tmp_path: Path) -> None:
    """drvfs (/mnt/c under WSL) accepts chmod and changes nothing: the secrets stay readable."""
    r = shell(tmp_path, "printf 'TARS_CLUSTER_TOKEN=x\\n' > env/.env.pc1; chmod 644 env/.env.pc1; "
                        "chmod() { :; }; ensure_private \"$ROOT/env/.env.pc1\"; summary")
    assert r.returncode == 0, r.stderr
    assert "stays mode 644" in r.stdout and "ignores chmod" in r.stdout and "Nothing changed" in r.stdout
    r = shell(tmp_path, "on_windows_drive /mnt/c/Users/me/tars && echo windows; on_windows_drive \"$ROOT\" || echo linux")
    assert r.stdout.split() == ["windows", "linux"]
