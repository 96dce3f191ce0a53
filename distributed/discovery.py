"""Nodes find each other on the LAN: mDNS / DNS-SD ``_tars._tcp`` (python-zeroconf, lazily).

Each node that listens beyond loopback advertises one service record while it runs
(``Advertiser``, started in the app's lifespan when ``TARS_DISCOVERY=on``)::

    <cluster>-<node>._tars._tcp.local.   port = TARS_PORT, addresses = this host's
    TXT  cluster=<TARS_CLUSTER_NAME> node=<TARS_NODE_NAME> version=<tars version>
         planner=1|0 role=<role> scheme=http|https

and never the cluster token, nor anything derived from it. ``browse()`` lists what
answers in a few seconds; ``clusters()`` groups it by cluster, one per planning node,
which is what ``scripts/setup_pc2.sh --token T`` uses to find PC1 without an address
(``python -m distributed.discovery find``).

An answer is a hint, never trust: anyone on the LAN can advertise anything. What is
found is only an address to try; the node there still has to accept the cluster token
(a join, the setup script's ``/rpc`` check) before anything is sent to it or believed
from it, and addresses are checked like any peer URL (``peer_urls.check_url``).
mDNS often does not cross Wi-Fi client isolation or VLANs: ``TARS_PEERS`` stays the
static way in, and a node remembers the peers it has seen (``known_peers.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from . import __version__, peer_urls
from .errors import TarsError
from .logs import get_logger
from .optional import require

if TYPE_CHECKING:
    from .settings import Settings


class PlannerRole(Protocol):
    """What the advertiser reads of the cluster: whether this node plans, and its role."""

    @property
    def is_planner(self) -> bool: ...

    @property
    def role(self) -> str: ...

log = get_logger(__name__)

SERVICE = "_tars._tcp.local."
BROWSE_S = 3.0
REFRESH_S = 1.0  # how often the advertiser checks whether its record changed (the planner moved)
TXT_KEYS = ("cluster", "node", "version", "planner", "role", "scheme")


def _zeroconf() -> Any:
    return require("zeroconf", purpose="LAN discovery (TARS_DISCOVERY)")


def _zc_asyncio() -> Any:
    return require("zeroconf.asyncio", "zeroconf", purpose="LAN discovery (TARS_DISCOVERY)")


# ----------------------------------------------------------------------------- the record
def instance_name(cluster: str, node: str) -> str:
    """The DNS-SD instance label: ``<cluster>-<node>``, cut to DNS's 63 bytes."""
    return f"{cluster}-{node}"[:63]


def txt_record(settings: Any, *, planner: bool, role: str) -> dict[str, str]:
    """What a node says about itself (no secret: the token is never part of it)."""
    return {"cluster": settings.cluster_name, "node": settings.node_name, "version": __version__,
            "planner": "1" if planner else "0", "role": role,
            "scheme": "https" if settings.tls_cert else "http"}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def advertised_addresses(settings: Any) -> list[str] | None:
    """The addresses to announce: the node's own bind address when it is one, else the
    host of ``TARS_ADVERTISE_URL`` when that is an address; None = every address of
    this host (zeroconf's choice); [] = nothing to announce (a loopback-only node)."""
    host = settings.host
    if host not in ("0.0.0.0", "", "::"):
        return [] if host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback) else (
            [host] if _is_ip(host) else None)
    adv = urlsplit(settings.advertise_url).hostname if settings.advertise_url else None
    if adv and _is_ip(adv):  # peers are told to use this address: announce it (loopback: nobody on the LAN)
        return [] if ipaddress.ip_address(adv).is_loopback else [adv]
    return None


@dataclass(frozen=True)
class Found:
    """One advertised node (a hint: see the module's docstring)."""

    cluster: str
    node: str
    url: str
    version: str
    planner: bool
    role: str
    addresses: tuple[str, ...]

    def line(self) -> str:
        return (f"{self.cluster}\t{self.node}\t{self.url}\t{'planner' if self.planner else '-'}\t"
                f"{self.role}\t{self.version}")


def parse(name: str, port: int | None, addresses: list[str], properties: dict[Any, Any]) -> Found | None:
    """A resolved service record → ``Found``, or None when it is not a usable TARS record
    (names and the URL are checked like any peer's: a record is untrusted input)."""
    txt: dict[str, str] = {}
    for k, v in (properties or {}).items():
        key = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
        if key in TXT_KEYS and v is not None:
            txt[key] = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    usable = [a for a in addresses if _is_ip(a) and not ipaddress.ip_address(a).is_loopback]
    if not port or not usable or "cluster" not in txt or "node" not in txt:
        return None
    usable.sort(key=lambda a: (ipaddress.ip_address(a).version, a))  # IPv4 first
    host = usable[0] if ipaddress.ip_address(usable[0]).version == 4 else f"[{usable[0]}]"
    scheme = "https" if txt.get("scheme") == "https" else "http"
    try:
        cluster = peer_urls.check_name(txt["cluster"], "cluster")
        node = peer_urls.check_name(txt["node"], "node")
        url = peer_urls.check_url(f"{scheme}://{host}:{port}")
    except TarsError:
        log.debug("ignoring the mDNS record %s: not a TARS record", peer_urls.safe(name))
        return None
    return Found(cluster, node, url, peer_urls.safe(txt.get("version", "?"), 40), txt.get("planner") == "1",
                 peer_urls.safe(txt.get("role", "?"), 20), tuple(usable))


# ----------------------------------------------------------------------------- advertising
class Advertiser:
    """This node's record on the LAN while it runs. ``planner`` is read again every
    ``REFRESH_S`` (the planner role can move), and the record updated when it changed."""

    def __init__(self, settings: Settings, cluster: PlannerRole) -> None:
        self.settings = settings
        self.cluster = cluster
        self._zc: Any = None
        self._info: Any = None
        self._task: asyncio.Task[None] | None = None
        self._txt: dict[str, str] = {}

    def _state(self) -> tuple[bool, str]:
        return bool(self.cluster.is_planner), str(self.cluster.role)

    def _service_info(self, txt: dict[str, str]) -> Any:
        zc = _zc_asyncio()
        label = instance_name(self.settings.cluster_name, self.settings.node_name)
        addrs = advertised_addresses(self.settings)
        kw: dict[str, Any] = {"parsed_addresses": addrs} if addrs else {}
        if not addrs:  # every IPv4 address of this host but loopback
            kw["parsed_addresses"] = [a for a in _zeroconf().get_all_addresses() if not a.startswith("127.")]
        return zc.AsyncServiceInfo(SERVICE, f"{label}.{SERVICE}", port=self.settings.port, properties=txt,
                                   server=f"{label}.local.", **kw)

    async def start(self) -> bool:
        """Start announcing the record in the background (mDNS probes for a free name
        first, which takes about a second: the node does not wait for it). False, logged,
        when there is nothing to announce or mDNS cannot start here; the node serves on
        regardless."""
        s = self.settings
        if advertised_addresses(s) == []:
            log.info("LAN discovery: not advertising, the node is reached over loopback only (%s)", s.base_url)
            return False
        try:
            zc = _zc_asyncio()
            planner, role = self._state()
            self._txt = txt_record(s, planner=planner, role=role)
            self._info = self._service_info(self._txt)
            if not self._info.parsed_addresses():
                log.info("LAN discovery: not advertising, this host has no LAN address")
                return False
            addrs = advertised_addresses(s)
            self._zc = zc.AsyncZeroconf(interfaces=addrs if addrs else _zeroconf().InterfaceChoice.All)
        except Exception as exc:  # noqa: BLE001 - mDNS is a convenience, never fatal (MissingDependency too)
            self._failed(exc)
            await self.close()
            return False
        self._task = asyncio.get_running_loop().create_task(self._announce(), name="mdns-advertise")
        return True

    def _failed(self, exc: BaseException) -> None:
        log.warning("LAN discovery: could not advertise %s (%s); peers can still use TARS_PEERS", SERVICE,
                    getattr(exc, "message", None) or exc)

    async def _announce(self) -> None:
        try:
            sent = await self._zc.async_register_service(self._info, allow_name_change=True)
            await sent
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - see start()
            self._failed(exc)
            return
        expected = f"{instance_name(self.settings.cluster_name, self.settings.node_name)}.{SERVICE}"
        if self._info.name != expected:
            log.warning("LAN discovery: another host already advertises %s (the same TARS_NODE_NAME in cluster %s?); "
                        "advertising as %s", expected, self.settings.cluster_name, self._info.name)
        log.info("LAN discovery: advertising %s on %s", self._info.name, ", ".join(self._info.parsed_addresses()))
        await self._refresh()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            planner, role = self._state()
            txt = txt_record(self.settings, planner=planner, role=role)
            if txt == self._txt or self._zc is None:
                continue
            self._txt = txt
            name = self._info.name
            self._info = self._service_info(txt)
            self._info.name = name  # keep a name zeroconf changed on a conflict
            try:
                await self._zc.async_update_service(self._info)
            except Exception as exc:  # noqa: BLE001 - keep serving; the next round retries
                log.warning("LAN discovery: could not update the record: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._zc is not None:
            try:
                if self._info is not None:
                    await self._zc.async_unregister_service(self._info)
                await self._zc.async_close()
            except Exception as exc:  # noqa: BLE001 - best effort on the way down
                log.debug("LAN discovery: closing: %s", exc)
            self._zc = None


async def advertise(settings: Settings, cluster: PlannerRole) -> Advertiser:
    """Start advertising when ``TARS_DISCOVERY`` is on (``Service.start`` calls this)."""
    adv = Advertiser(settings, cluster)
    if settings.discovery == "on":
        await adv.start()
    return adv


# ----------------------------------------------------------------------------- browsing
def browse(timeout: float = BROWSE_S, cluster: str | None = None) -> list[Found]:
    """Every TARS node that answers within ``timeout`` seconds (blocking; for the CLI and
    the setup scripts), optionally of one cluster only, sorted by cluster and node."""
    zc_mod = _zeroconf()
    zc = zc_mod.Zeroconf(interfaces=zc_mod.InterfaceChoice.All)
    names: set[str] = set()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is zc_mod.ServiceStateChange.Added:
            names.add(name)

    found: dict[str, Found] = {}
    try:
        browser = zc_mod.ServiceBrowser(zc, SERVICE, handlers=[on_change])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.1)
        browser.cancel()
        for name in sorted(names):
            info = zc.get_service_info(SERVICE, name, timeout=1000)
            if info is None:
                continue
            f = parse(name, info.port, info.parsed_addresses(), info.properties)
            if f is not None and (cluster is None or f.cluster == cluster):
                found[f.url] = f
    finally:
        zc.close()
    return sorted(found.values(), key=lambda f: (f.cluster, not f.planner, f.node))


def clusters(found: list[Found]) -> list[Found]:
    """The clusters visible: one entry per planning node (the node a new host joins)."""
    return [f for f in found if f.planner]


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m distributed.discovery browse|find [--cluster NAME] [--timeout S] [--json]``

    browse: every node that answers, one tab-separated line each
            (cluster, node, url, planner|-, role, version);
    find:   the planner to join: exit 0 and its line when exactly one cluster answers;
            exit 3 when none does; exit 4 and one line per cluster when several do.
    """
    ap = argparse.ArgumentParser(prog="python -m distributed.discovery", description=main.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("browse", "find"))
    ap.add_argument("--cluster", default=None, help="only this cluster (TARS_CLUSTER_NAME)")
    ap.add_argument("--timeout", type=float, default=BROWSE_S, help="seconds to listen (default 3)")
    ap.add_argument("--json", action="store_true", help="one JSON object a line")
    args = ap.parse_args(argv)
    try:
        found = browse(args.timeout, args.cluster)
    except TarsError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: mDNS cannot run here: {exc}", file=sys.stderr)
        return 2
    rows = found if args.command == "browse" else clusters(found)
    for f in rows:
        print(json.dumps(asdict(f)) if args.json else f.line())
    if args.command == "find":
        return 0 if len(rows) == 1 else 3 if not rows else 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
