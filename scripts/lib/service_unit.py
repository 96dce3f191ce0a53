"""The systemd unit of a TARS node, as the setup scripts write it (standard library only).

    service_unit.py render --name pc1 --role server --root DIR --python PY --env-file env/.env.pc1
                           --mode system|user [--user U --group G] [--models-dir DIR]
                           [--nvidia-modprobe PATH] [--script setup_pc1.sh]

prints the unit (``tars-<name>.service``). What it says, and why:

* ``Type=notify`` + ``NotifyAccess=main``: the node itself says READY=1 once /health would
  answer 200, STATUS= lines while it loads and pulls, and EXTEND_TIMEOUT_USEC while a
  model is still loading (distributed/sdnotify.py) — so ``TimeoutStartSec`` bounds a start
  that makes no progress, not a first start that pulls gigabytes.
* ``WatchdogSec=30``: the node pings every 15 s from its event loop; a wedged loop is
  restarted. ``Restart=on-failure`` with ``RestartSec=5``, at most 5 starts in 10 minutes.
* ``KillMode=mixed``: SIGTERM to the node alone, which stops its llama-server and RPC
  worker children itself (they die with it in any case); SIGKILL to what is left after
  ``TimeoutStopSec``.
* Its own directories: the checkout is the ``WorkingDirectory`` (env file, TLS files,
  venv), the models folder is waited for (``RequiresMountsFor``: a second disk is mounted
  first) and written there (the node keeps its state files in it too).
* Logs: stdout/stderr to journald under ``SyslogIdentifier=tars-<name>``.
* Hardening that leaves the GPU alone (system units): NoNewPrivileges, ProtectSystem=full,
  PrivateTmp (unless the checkout or the models live under /tmp), ProtectKernelTunables/Modules, ProtectControlGroups, RestrictSUIDSGID,
  RestrictRealtime, RestrictNamespaces, LockPersonality, RestrictAddressFamilies
  (UNIX, INET, INET6, NETLINK). Left out on purpose: PrivateDevices and DevicePolicy/
  DeviceAllow (they hide /dev/nvidia*), ProtectClock (it implies a DeviceAllow= list, which
  closes every other device), MemoryDenyWriteExecute (CUDA's PTX JIT and libffi need
  W+X memory), SystemCallFilter (the CUDA driver's ioctls), ProtectHome (the checkout and
  the models usually live in a home folder). Under NoNewPrivileges the setuid
  nvidia-modprobe cannot create /dev/nvidia-uvm on the first CUDA call after boot, so a
  system unit runs it first with full privileges (``ExecStartPre=-+``) where it exists.
* User units (``systemctl --user``, the fallback without root) carry no sandboxing: in a
  user manager those options need unprivileged user namespaces (the unit fails to start
  where they are off), and NoNewPrivileges would block nvidia-modprobe as above.
"""

from __future__ import annotations

import argparse
import datetime
import sys

WATCHDOG_S = 30
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 45

SYSTEM_HARDENING = """\
# Hardening that leaves the GPU alone (see scripts/lib/service_unit.py for what is left out and why)
NoNewPrivileges=yes
ProtectSystem=full
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK"""


def unit_name(node: str) -> str:
    return f"tars-{node}.service"


def quote(arg: str) -> str:
    """One ExecStart= argument: specifiers (%) and variables ($) escaped, quoted when it
    holds a space, a quote or a backslash (systemd.service(5), "Command lines")."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in " \t\"'\\;"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def path_value(path: str) -> str:
    """A path in a setting that takes the rest of the line as one path (WorkingDirectory=)."""
    if any(c in path for c in "\n\r"):
        raise ValueError(f"a path with a line break cannot go into a unit: {path!r}")
    return path.replace("%", "%%")


def path_item(path: str) -> str:
    """A path in a space-separated list of paths (RequiresMountsFor=): quoted when needed."""
    path = path_value(path)
    if any(c in path for c in " \t\"'\\"):
        return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return path


def file_url(path: str) -> str:
    """file:// URL of a path (Documentation=), percent-encoded, specifiers escaped."""
    from urllib.parse import quote as urlquote

    return "file://" + path_value(urlquote(path_value(path).replace("%%", "%")))


def render(*, name: str, role: str, root: str, python: str, env_file: str, mode: str, user: str = "",
           group: str = "", models_dir: str = "", nvidia_modprobe: str = "", script: str = "",
           now: datetime.datetime | None = None) -> str:
    if mode not in ("system", "user"):
        raise ValueError("mode is system or user")
    stamp = (now or datetime.datetime.now()).strftime("%Y-%m-%d %H:%M")
    unit = unit_name(name)
    system = mode == "system"
    ctl = "systemctl" if system else "systemctl --user"
    journal = f"journalctl -u {unit} -f" if system else f"journalctl --user -u {unit} -f"
    mounts = " ".join(path_item(p) for p in dict.fromkeys([root, models_dir]) if p)
    lines = [
        f"# TARS Distributed: node {name} ({role}) as a {'system' if system else 'user'} service.",
        f"# Written by scripts/{script or 'setup'} --service on {stamp}; re-run it to regenerate,",
        f"# --remove-service to take it out. Status: {ctl} status {unit}   Logs: {journal}",
        "[Unit]",
        f"Description=TARS Distributed node {name} ({role})",
        f"Documentation={file_url(root.rstrip('/') + '/README.md')}",
        "Wants=network-online.target",
        "After=network-online.target nvidia-persistenced.service",
        f"RequiresMountsFor={mounts}",
        "StartLimitIntervalSec=600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
    ]
    if system and user and user != "root":
        lines.append(f"User={user}")
        if group:
            lines.append(f"Group={group}")
    lines.append(f"WorkingDirectory={path_value(root)}")
    if system and nvidia_modprobe:
        lines.append(f"# /dev/nvidia-uvm for the first CUDA call after boot (NoNewPrivileges blocks the setuid helper)")
        lines.append(f"ExecStartPre=-+{quote(nvidia_modprobe)} -u -c=0")
    lines += [
        f"ExecStart={quote(python)} -m distributed serve --env-file {quote(env_file)}",
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        "RestartSec=5",
        f"TimeoutStartSec={START_TIMEOUT_S}",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        f"WatchdogSec={WATCHDOG_S}",
        "KillMode=mixed",
        "LimitNOFILE=65536",
        "StandardOutput=journal",
        "StandardError=journal",
        f"SyslogIdentifier=tars-{name}",
    ]
    if system:
        hardening = SYSTEM_HARDENING.splitlines()
        in_tmp = [p for p in (root, models_dir) if p and p.rstrip("/").startswith(("/tmp/", "/var/tmp/"))]
        if in_tmp:  # a private /tmp would hide them from the node
            hardening = [ln for ln in hardening if ln != "PrivateTmp=yes"]
            hardening.append(f"# PrivateTmp= is off: {' and '.join(in_tmp)} live(s) under /tmp")
        lines += hardening
    else:
        lines.append("# No sandboxing in a user unit: see scripts/lib/service_unit.py")
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if system else 'default.target'}", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="service_unit.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    for opt in ("name", "role", "root", "python", "env-file", "mode"):
        r.add_argument(f"--{opt}", required=True)
    for opt in ("user", "group", "models-dir", "nvidia-modprobe", "script"):
        r.add_argument(f"--{opt}", default="")
    sub.add_parser("name").add_argument("node")
    args = ap.parse_args(argv)
    if args.cmd == "name":
        print(unit_name(args.node))
        return 0
    try:
        sys.stdout.write(render(name=args.name, role=args.role, root=args.root, python=args.python,
                                env_file=args.env_file, mode=args.mode, user=args.user, group=args.group,
                                models_dir=args.models_dir, nvidia_modprobe=args.nvidia_modprobe,
                                script=args.script))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
