"""A real systemd, as PID 1 of namespaces of its own, for testing the node's unit for real.

    with SystemdNamespace(work_dir) as sd:     # boots /usr/lib/systemd/systemd, waits for "running"
        sd.run("bash", "scripts/setup_pc1.sh", "--service", env={...}, cwd=repo)
        sd.systemctl("show", "-p", "ActiveState", "tars-pc1.service")

What it shares with the machine, and what it does not (it must never touch the host):

* new pid, mount, network (loopback only), uts, ipc and cgroup namespaces (``unshare``);
  a cgroup of its own (``<cgroup2 mount>/tars-systemd-<id>``), removed afterwards;
* private tmpfs over every place a booting systemd writes: /run, /tmp, /var/tmp,
  /var/log, /var/lib/systemd, /etc/systemd/system (the units the test installs live
  there and vanish with it). ``work_dir`` alone is bound back in, read-write;
* nothing of early boot runs: it boots into an empty ``tars-test.target``, and
  sysinit.target, basic.target and the units that act on the whole machine
  (tmpfiles — it empties /tmp —, sysctl, udev, modules, sysusers, ldconfig, random seed)
  are masked; a drop-in gives ``tars-*.service`` ``DefaultDependencies=no``, so starting
  the unit under test pulls in none of them. journald is started alone (``journal()``).

``close()`` sends SIGKILL to its PID 1 (the kernel then ends every process of the pid
namespace) and removes its cgroup. ``available()`` says why not where this cannot run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

SYSTEMD = "/usr/lib/systemd/systemd"
MASKED = ("sysinit.target", "basic.target", "systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
          "systemd-tmpfiles-clean.service", "systemd-tmpfiles-clean.timer", "systemd-sysctl.service",
          "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-modules-load.service",
          "systemd-sysusers.service", "ldconfig.service", "systemd-random-seed.service",
          "systemd-update-utmp.service", "systemd-journal-flush.service", "systemd-remount-fs.service",
          "systemd-machine-id-commit.service", "systemd-hwdb-update.service", "systemd-firstboot.service")
PRIVATE = ("/run", "/tmp", "/var/tmp", "/var/log", "/var/lib/systemd", "/etc/systemd/system")

BOOT = r"""
set -eu
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mkdir -p /run/tars-keep
mount --bind "$WORK" /run/tars-keep
for d in $PRIVATE; do
  [ "$d" = /run ] && continue
  [ -d "$d" ] || continue
  mount -t tmpfs tmpfs "$d"
done
mkdir -p "$WORK"
mount --move /run/tars-keep "$WORK"
mount -t tmpfs tmpfs /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for u in $MASKED; do ln -s /dev/null "/etc/systemd/system/$u"; done
cat > /etc/systemd/system/tars-test.target <<'EOF'
[Unit]
Description=TARS tests: an empty boot target
DefaultDependencies=no
EOF
mkdir -p /etc/systemd/system/tars-.service.d
cat > /etc/systemd/system/tars-.service.d/test.conf <<EOF
[Unit]
DefaultDependencies=no
$DROPIN
EOF
exec env container=tars-test "$SYSTEMD" --unit=tars-test.target
"""


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None


def available() -> str | None:
    """None when a SystemdNamespace can run here, else why not."""
    if os.geteuid() != 0:
        return "booting systemd in namespaces needs root"
    if not Path(SYSTEMD).exists():
        return f"no systemd at {SYSTEMD} (Debian: apt-get install systemd)"
    for tool in ("unshare", "nsenter", "systemctl"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed"
    if _cgroup2_root() is None:
        return "no cgroup2 file system is mounted"
    return None


class SystemdNamespace:
    def __init__(self, work: Path, *, dropin: str = "", boot_timeout: float = 60.0) -> None:
        """``work``: the one host folder visible (read-write) inside. ``dropin``: extra
        lines for the ``tars-*.service`` drop-in (e.g. a shorter ``WatchdogSec=`` in [Service])."""
        self.work = Path(work).resolve()
        root = _cgroup2_root()
        assert root is not None
        self.cgroup = root / f"tars-systemd-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.cgroup.mkdir()
        self.log = self.work / "systemd-boot.log"
        env = {**os.environ, "WORK": str(self.work), "PRIVATE": " ".join(PRIVATE), "MASKED": " ".join(MASKED),
               "SYSTEMD": SYSTEMD, "DROPIN": dropin}
        cg = self.cgroup / "cgroup.procs"

        def enter_cgroup() -> None:  # in the child, before unshare: its cgroup becomes the namespace's root
            cg.write_text(str(os.getpid()))

        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--net", "--cgroup", "--mount-proc",
                 "bash", "-c", BOOT], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=enter_cgroup)
        self.pid = 0
        try:
            self._wait_booted(boot_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_booted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd did not boot: {self.log.read_text(errors='replace')[-2000:]}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            kids = children.read_text().split() if children.exists() else []
            if kids and Path(f"/proc/{kids[0]}/exe").resolve() == Path(SYSTEMD).resolve():
                self.pid = int(kids[0])
                r = self.systemctl("is-system-running", check=False)
                if r.stdout.strip() in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"systemd did not reach 'running' in {timeout:g} s")

    def run(self, *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``argv`` inside every namespace of the booted systemd."""
        cmd = ["nsenter", "-t", str(self.pid), "-a"]
        if cwd is not None:
            cmd.append(f"--wd={cwd}")
        if env is not None:
            cmd += ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
        r = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=60)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def journal(self) -> None:
        """Start journald alone (the unit logs to it)."""
        self.systemctl("start", "systemd-journald.socket", "systemd-journald.service")

    def jobs(self) -> list[str]:
        return [ln.split()[1] for ln in self.systemctl("list-jobs", "--no-legend").stdout.splitlines() if ln.split()]

    def close(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of its namespace: everything in it goes too
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        deadline = time.monotonic() + 10
        while self.cgroup.exists() and time.monotonic() < deadline:
            for d in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                self.cgroup.rmdir()
            except OSError:
                time.sleep(0.2)

    def __enter__(self) -> "SystemdNamespace":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
