"""TARS nodes on a ``tests.netns.Lan``, and what the partition tests and
benchmarks/bench_netns.py measure there.

    node = node_on(host, "pc1", env={...}, log_dir=tmp)   # ServerProcess inside the namespace
    start(node, host)                                     # waits for /health 200 from inside
    traffic = Traffic(client_host, node.url).start()      # a chat request every 0.25 s, overlapping
    lan.link_down(h1); ...; traffic.first_ok_after(t)     # seconds until served again
    events(node.log_text())                               # re-plans, planner moves, fallbacks, liveness moves
    control(host, node)                                   # planner, term, plan id, routing as it sees them
"""

from __future__ import annotations

import concurrent.futures
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from tests.netns import Host
from tests.support import ServerProcess

NODE_PORT = 8000  # a namespace has every port to itself
CHAT = "gemma-3-270m"

# What the nodes log when the cluster changes course (counted per minute under a flapping link)
EVENTS = {
    "replan": re.compile(r"planned term \d+ plan \d+"),  # a plan made (by whichever host plans)
    "planner_moved": re.compile(r"planner: \S+ \(rule"),  # a host's view of who plans changed
    "fallback": re.compile(r"fallback: loading"),
    "standin_dropped": re.compile(r"dropping the local (?:fallback|handoff) copy"),
    "liveness": re.compile(r"peer \S+ is (?:alive|suspect|dead|left) \(was"),
}


def node_on(host: Host, name: str, *, env: dict[str, str], log_dir: Any, args: tuple[str, ...] = (),
            grace_s: float = 15.0, cwd: Any = None) -> ServerProcess:
    """``python -m distributed serve`` inside ``host``'s namespace, bound to its address."""
    kw = {"cwd": cwd} if cwd is not None else {}
    return ServerProcess(name, host.ip, port=NODE_PORT,
                         command=host.command(sys.executable, "-m", "distributed", "serve", *args),
                         address_env=True, env=env, log_dir=log_dir, grace_s=grace_s, **kw)


def pair(lan: Any, log_dir: Any, env: dict[str, str]) -> tuple[Host, Host, ServerProcess, ServerProcess]:
    """PC1 (simulated RTX 3060, the planner) and PC2 (simulated GTX 1660 SUPER, TARS_PEERS=PC1)
    on two new hosts of ``lan``, not started; ``env`` for both (each gets its own models dir)."""
    h1, h2 = lan.add_host("pc1"), lan.add_host("pc2")
    pc1 = node_on(h1, "pc1", log_dir=log_dir, env={**env, "TARS_GPU_PROFILE": "rtx3060-12gb",
                                                   "TARS_MODELS_DIR": str(log_dir / "m1")})
    pc2 = node_on(h2, "pc2", log_dir=log_dir, env={**env, "TARS_GPU_PROFILE": "gtx1660s-6gb",
                                                   "TARS_MODELS_DIR": str(log_dir / "m2"),
                                                   "TARS_PEERS": f"http://{h1.ip}:{NODE_PORT}"})
    return h1, h2, pc1, pc2


def get(host: Host, url: str, timeout: float = 5.0, **kw: Any) -> httpx.Response:
    """``httpx.get`` from inside ``host``'s namespace."""
    return host.call(lambda: httpx.get(url, timeout=timeout, **kw), timeout=timeout + 5)


def post(host: Host, url: str, timeout: float = 5.0, **kw: Any) -> httpx.Response:
    """``httpx.post`` from inside ``host``'s namespace."""
    return host.call(lambda: httpx.post(url, timeout=timeout, **kw), timeout=timeout + 5)


def delete(host: Host, url: str, timeout: float = 5.0, **kw: Any) -> httpx.Response:
    """``httpx.delete`` from inside ``host``'s namespace."""
    return host.call(lambda: httpx.delete(url, timeout=timeout, **kw), timeout=timeout + 5)


def control(host: Host, node: ServerProcess) -> dict[str, Any]:
    """``node``'s /status: its control plane (``"cluster"``) and routing, as it sees them."""
    s = get(host, node.url + "/status").json()
    return {**s["cluster"], "routes": {m["id"]: m["node"] for m in s["models"]},
            "placed": sorted({a["model"] for a in s["plan"]["assignments"]})}


def one_placement(*pairs: tuple[Host, ServerProcess]) -> bool:
    """Every node names the same planner, holds the same plan and state, and routes every model alike."""
    views = [control(h, n) for h, n in pairs]
    keys = ("planner", "plan_id", "routes", "state_digest")
    return all(v[k] == views[0][k] for v in views for k in keys)


def start(node: ServerProcess, host: Host, timeout: float = 120.0) -> ServerProcess:
    """Start ``node``; wait until its /health answers 200 inside ``host``'s namespace."""
    return node.start(timeout=timeout, ready=lambda: get(host, node.url + "/health", 2).status_code == 200)


def chat(host: Host, url: str, timeout: float = 10.0) -> httpx.Response:
    return post(host, url + "/inference", timeout=timeout, json={"model": CHAT, "prompt": "hello", "max_tokens": 4})


def events(log_text: str) -> dict[str, int]:
    return {k: len(rx.findall(log_text)) for k, rx in EVENTS.items()}


@dataclass
class Outcome:
    sent: float
    done: float
    status: int  # 0: no answer (timeout, connection error)
    node: str = ""  # which host computed it
    fallback: bool = False


class Traffic:
    """A chat request to ``url`` every ``every`` seconds from inside ``host``, each in its
    own thread (a request hanging on a lost host does not hold back the next ones)."""

    def __init__(self, host: Host, url: str, *, every: float = 0.25, timeout: float = 30.0) -> None:
        self.host, self.url, self.every, self.timeout = host, url, every, timeout
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=int(timeout / every) + 8)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Traffic":
        self._thread.start()
        return self

    def _one(self) -> None:
        sent = time.monotonic()
        try:
            r = chat(self.host, self.url, self.timeout)
            body = r.json() if r.status_code == 200 else {}
            self.outcomes.append(Outcome(sent, time.monotonic(), r.status_code, body.get("node", ""),
                                         bool(body.get("fallback"))))
        except (httpx.HTTPError, TimeoutError, concurrent.futures.TimeoutError, ValueError):
            self.outcomes.append(Outcome(sent, time.monotonic(), 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._pool.submit(self._one)
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def first_ok_after(self, t: float, node: str | None = None) -> float | None:
        """Seconds from ``t`` to the first 200 answer of a request sent after ``t``
        (computed on ``node`` when given)."""
        done = [o.done for o in list(self.outcomes)
                if o.sent >= t and o.status == 200 and (node is None or o.node == node)]
        return min(done) - t if done else None

    def failed_between(self, a: float, b: float) -> int:
        return sum(1 for o in list(self.outcomes) if a <= o.sent < b and o.status != 200)
