"""Nodes in one process, joined through an in-process "network" of httpx.ASGITransport links.

The apps, nodes, clusters, planner and /rpc are the real ones; only the sockets (and, with
``backend_override="fake"``, the models) are not. ``Net.up[url] = False`` cuts a node off:
every call to or from it fails like a refused connection (a crash).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from contextlib import AsyncExitStack
from typing import Any

import httpx

from distributed.api.app import create_app
from distributed.cluster import Cluster
from distributed.deploy.manager import Deployer
from distributed.node import Node
from distributed.profiler import profile_host
from distributed.rpc.client import PeerClient
from distributed.service import build
from distributed.settings import load_settings

TOKEN = "cluster-secret"


class Net:
    def __init__(self) -> None:
        self.apps: dict[str, Any] = {}
        self.up: dict[str, bool] = {}

    def link(self, src: str, dst: str) -> httpx.AsyncBaseTransport:
        return _Link(self, src, dst)


class _Link(httpx.AsyncBaseTransport):
    def __init__(self, net: Net, src: str, dst: str) -> None:
        self.net, self.src, self.dst = net, src, dst

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not (self.net.up.get(self.src) and self.net.up.get(self.dst)):
            raise httpx.ConnectError("[Errno 111] Connection refused (simulated)", request=request)
        return await httpx.ASGITransport(self.net.apps[self.dst]).handle_async_request(request)


class Host:
    """One node: settings, its service (``service.build``: Node, Cluster with peer clients
    over the Net, Deployer, split service) and its app."""

    def __init__(self, net: Net, name: str, url: str, preset: str, peers: tuple[str, ...] = (),
                 extra: dict[str, Any] | None = None, **overrides: Any) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.net, self.name, self.url = net, name, url
        # its own models folder (the cluster state, known peers), unless the test shares one
        self._tmp = None if "models_dir" in overrides else tempfile.mkdtemp(prefix=f"tars-{name}-")
        if self._tmp is not None:
            overrides["models_dir"] = self._tmp
        self.settings = load_settings(**{"node_name": name, "host": host, "port": int(port),
                                         "peers": ",".join(peers) or None, "cluster_token": TOKEN,
                                         "backend_override": "fake", "heartbeat_s": 0.1, "rpc_timeout_s": 1.0,
                                         **overrides})
        self.service = build(self.settings, profile=profile_host(preset, name), backend_extra=dict(extra or {}),
                             clients=lambda url: self._client(url))  # late-bound: a test may swap _client
        self.app = create_app(self.service)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url=url, timeout=10)
        self._stack = AsyncExitStack()

    @property
    def node(self) -> Node:
        return self.service.node

    @property
    def cluster(self) -> Cluster:
        return self.service.cluster

    @property
    def deployer(self) -> Deployer:
        return self.service.deployer

    def _client(self, url: str) -> PeerClient:
        return PeerClient(url, TOKEN, transport=self.net.link(self.url, url), timeout=1.0, backoff_s=0.01)

    async def start(self) -> "Host":
        self.net.apps[self.url] = self.app
        self.net.up[self.url] = True
        await self._stack.enter_async_context(self.app.router.lifespan_context(self.app))
        return self

    async def crash(self) -> None:
        """As if the process died: unreachable at once, no goodbye."""
        self.net.up[self.url] = False
        await self._stack.aclose()

    async def stop(self) -> None:
        if self.net.up.get(self.url):
            await self._stack.aclose()
        self.net.up[self.url] = False
        await self.http.aclose()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


async def until(cond: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
