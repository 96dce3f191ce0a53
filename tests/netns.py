"""A real network for tests: hosts in network namespaces of their own on one bridge.

    with Lan("t") as lan:                      # a switch namespace holding bridge br0
        pc1 = lan.add_host("pc1")              # namespace + veth pair, 10.213.0.1/24, tbf 1 Gbit/s
        pc2 = lan.add_host("pc2")
        node = ServerProcess("pc1", pc1.ip, port=8000, command=pc1.command(sys.executable, "-m", ...))
        pc2.call(lambda: httpx.get(f"http://{pc1.ip}:8000/health"))   # from inside pc2's namespace
        lan.link_down(pc1)                     # the cable pulled: pc1 loses carrier, packets vanish
        lan.link_up(pc1)

Each host gets its own namespace with loopback up (the node's engine children listen on
127.0.0.1 there), ``eth0`` with its address, a multicast route (mDNS crosses the bridge)
and a ``tbf`` rate limit on both ends of its link (``RATE``, 1 Gbit/s; netem is not
available on these machines, so no added delay or loss). The bridge lives in a
namespace of its own, so nothing is added to the machine's own network: the only
addresses in play are the hosts' (``SUBNET``) and loopback.

``Host.call(fn)`` runs ``fn`` in a thread that entered the host's namespace (``setns``
is per thread), so the test process talks to the hosts without joining their network.
``Host.command(...)`` prefixes ``ip netns exec <ns>`` for processes (``ServerProcess``).

``Lan.close()`` (also on an exception, and at exit) kills what still runs in its
namespaces — only processes in namespaces this object created — and deletes them; the
veth pairs go with them. ``available()`` says why not where namespaces cannot be made
(not root, no ``ip``/``tc``, no tbf); the ``lan`` fixture then skips with that reason.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

RATE = "1gbit"
BURST = "256kb"  # >= rate / HZ, so the bucket never limits below the rate
SUBNET = "10.213.0"  # hosts are .1, .2, ...; the bridge has no address
CLONE_NEWNET = 0x40000000
_OPEN: list["Lan"] = []


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _in(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=check,
                          timeout=30)


def available() -> str | None:
    """None when this machine can run a Lan, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"tars-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    try:
        steps = [["ip", "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
                 ["tc", "qdisc", "add", "dev", "p0", "root", "tbf", "rate", RATE, "burst", BURST, "latency", "10ms"]]
        for argv in steps:
            r = _in(probe, *argv, check=False)
            if r.returncode != 0:
                return f"'{' '.join(argv)}' fails in a namespace: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    port: str  # the switch-side end of its link (in the switch namespace)
    _pool: concurrent.futures.ThreadPoolExecutor | None = field(default=None, repr=False)

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _in(self.ns, *argv, check=check)

    def enter(self) -> None:
        """Move the calling thread into this host's namespace (sockets it opens from now on
        are there; e.g. an event loop's thread, so a relay or tunnel lives on this host)."""
        _setns(f"/var/run/netns/{self.ns}")

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """``fn()`` in a thread inside this host's namespace (sockets it opens are there)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=f"ns-{self.name}", initializer=_setns,
                initargs=(f"/var/run/netns/{self.ns}",))
        return self._pool.submit(fn).result(timeout)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Lan:
    """One switch (a bridge in its own namespace) and the hosts plugged into it."""

    def __init__(self, tag: str = "t", *, rate: str = RATE, subnet: str = SUBNET) -> None:
        self.prefix = f"tars{tag}{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
        self.rate, self.subnet = rate, subnet
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        _ip("netns", "add", self.switch)
        self._namespaces.append(self.switch)
        _OPEN.append(self)
        try:
            _in(self.switch, "ip", "link", "set", "lo", "up")
            _in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
            _in(self.switch, "ip", "link", "set", "br0", "up")
        except subprocess.CalledProcessError:
            self.close()
            raise

    def _limit(self, ns: str, dev: str) -> None:
        _in(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", self.rate, "burst", BURST,
            "latency", "10ms")

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        ns = f"{self.prefix}-{name}"
        port = f"p{index}"
        host = Host(name, ns, f"{self.subnet}.{index}", port)
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        # both ends made from the switch namespace: nothing passes through the machine's own
        _in(self.switch, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _in(self.switch, "ip", "link", "set", port, "master", "br0")
        _in(self.switch, "ip", "link", "set", port, "up")
        self._limit(self.switch, port)
        _in(ns, "ip", "link", "set", "lo", "up")
        _in(ns, "ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _in(ns, "ip", "link", "set", "eth0", "up")
        _in(ns, "ip", "route", "add", "224.0.0.0/4", "dev", "eth0")  # mDNS (224.0.0.251) goes out eth0
        self._limit(ns, "eth0")
        self.hosts[name] = host
        return host

    # ----------------------------------------------------------------- faults
    def link_down(self, host: Host) -> None:
        """The cable pulled: the switch port goes down, the host's eth0 loses carrier;
        packets either way vanish (a connect times out, nothing refuses it)."""
        _in(self.switch, "ip", "link", "set", host.port, "down")

    def link_up(self, host: Host) -> None:
        _in(self.switch, "ip", "link", "set", host.port, "up")

    def isolate(self, host: Host) -> None:
        """Cut the host off further away (its switch port leaves the bridge): the host keeps
        its carrier and sends into the void — a dead uplink, an access point gone."""
        _in(self.switch, "ip", "link", "set", host.port, "nomaster")

    def rejoin(self, host: Host) -> None:
        _in(self.switch, "ip", "link", "set", host.port, "master", "br0")

    def carrier(self, host: Host) -> bool:
        out = host.run("cat", "/sys/class/net/eth0/carrier", check=False).stdout.strip()
        return out == "1"

    def qdisc(self, host: Host) -> str:
        """The host's eth0 queueing discipline (``tc qdisc show``), e.g. to check the rate."""
        return host.run("tc", "qdisc", "show", "dev", "eth0").stdout

    # ----------------------------------------------------------------- teardown
    def pids(self) -> list[int]:
        out: list[int] = []
        for ns in self._namespaces:
            r = _ip("netns", "pids", ns, check=False)
            out += [int(p) for p in r.stdout.split() if p.isdigit()]
        return out

    def close(self) -> None:
        """Kill what still runs in these namespaces (ours alone), then delete them."""
        for host in self.hosts.values():
            host.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline and self.pids():
                time.sleep(0.1)
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
        self._namespaces.clear()
        if self in _OPEN:
            _OPEN.remove(self)

    def __enter__(self) -> "Lan":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@atexit.register
def _close_all() -> None:  # a test run that dies half-way still removes its namespaces
    for lan in list(_OPEN):
        lan.close()

