"""``RemoteTarget``: a model computed on a peer, as the node sees it.

The node routes to it like to any ``Target``; it forwards over the peer's
``PeerClient``. Three things make it more than a forwarder:

* **Liveness.** Its state follows the peer (the cluster's ``Peer``): a dead or
  departed peer makes the model "unavailable". While a request is in flight,
  the peer being declared dead ends it at once with ``PeerUnavailable`` (a peer
  that hangs without closing its socket never hangs our client).
* **Failover.** When the peer is down (known dead, or the connection is refused
  before the request reached it), the target asks its ``failover`` callback
  (the cluster) for a local stand-in: the model loaded here, answers marked
  ``fallback: true``; the callback raises ``PeerUnavailable`` naming the peer
  when fallback is off or the model does not fit. The stand-in is dropped once
  the peer is back and reports the model ready (make before break).
* **Handoff.** When a new plan moves a model from this host to the peer, the
  copy already loaded here becomes the stand-in (``handoff``): it keeps serving
  (answers computed here, not marked fallback) while the peer loads the model,
  and is dropped once the peer reports it ready — no "loading" gap. Meanwhile the
  peer may forward requests for the model back here (``serves_here``).
* **Draining.** A dropped stand-in, and the target itself when it is replaced,
  finish the requests they are computing (up to ``DRAIN_S``) before unloading.
* **Embedding coalescing.** A channel call costs about as much CPU as a small
  encode, so one call per client request would halve throughput on a small
  machine. ``Coalescer`` (coalescer.py) sends a lone request at once; while a call is in
  flight, the next requests wait and go together as one ``embed.encode`` with
  ``groups`` (one group per request), pipelined so the peer's encoder always
  has the next batch (see ``coalescer.py``), and the answer is split back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from ..domain import Completion, EmbedRequest, Embeddings, GenerateRequest, ModelKind, Timings, TokenChunk
from ..errors import PeerUnavailable
from ..logs import get_logger
from ..targets import Target
from .client import PeerClient
from .coalescer import Coalescer

_Coalescer = Coalescer  # the name the unit tests (and older code) import from here

log = get_logger(__name__)

DOWN = ("dead", "left")
DRAIN_S = 10.0  # how long a retired stand-in or target waits for its requests in flight


class PeerView(Protocol):
    """What a RemoteTarget needs to know about its peer (cluster.Peer provides it)."""

    name: str
    state: str  # "alive" | "suspect" | "dead" | "left"
    client: PeerClient
    gone: asyncio.Event  # set while the peer is dead or has left

    def model_info(self, model: str) -> dict[str, Any] | None: ...


Failover = Callable[["RemoteTarget", PeerUnavailable], Awaitable[Target]]


def _reached(exc: PeerUnavailable) -> bool:
    return exc.details.get("phase") != "connect"


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel and give it a moment to unwind (closing its connection), without
    letting its CancelledError pass for ours."""
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: no "never retrieved" warning


# --------------------------------------------------------------------------- target
class RemoteTarget(Target):
    """One model assigned to a peer. ``failover`` is called when the peer is down."""

    def __init__(self, model: str, kind: ModelKind, peer: PeerView, *, failover: Failover | None = None,
                 assignment: dict[str, Any] | None = None, max_batch: int = 256, max_inflight: int = 2,
                 handoff: Target | None = None) -> None:
        """``handoff``: the copy of the model this host has been serving, kept as the
        stand-in until the peer reports the model ready (see the module docstring)."""
        self.model = model
        self.kind = kind
        self.peer = peer
        self.failover = failover
        self.assignment = dict(assignment or {})
        # The local copy serving here: a fallback while the peer is down, or the handoff
        # copy while the peer loads the model the plan moved to it.
        self.standin: Target | None = handoff
        self.handoff = handoff is not None  # False: the stand-in is a fallback (answers say so)
        self._using: dict[int, int] = {}  # id(stand-in) -> requests it is computing
        self._active = 0  # requests in flight through this target
        self._closing: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.forwarded = 0
        self._coalescer = Coalescer(self._send_embed, max_items=max_batch, max_inflight=max_inflight)

    @property
    def node(self) -> str:  # type: ignore[override]
        return self.peer.name

    # ------------------------------------------------------------ state and routing
    @property
    def remote_state(self) -> str:
        info = self.peer.model_info(self.model)
        return str(info.get("state", "loading")) if info else "loading"

    @property
    def state(self) -> str:
        """The model's state on its peer; while the peer is down, the local stand-in's.
        (During a handoff this says "loading" while the copy here serves: ``info()``
        shows that copy under "handoff".)"""
        if self.peer.state in DOWN:
            if self.standin is not None:
                return self.standin.state
            return "unavailable"
        return self.remote_state

    @property
    def serves_here(self) -> bool:
        """Would the next request be computed by the stand-in on this host? (The RPC
        server then accepts a call for this model forwarded by the peer: the peer is
        taking the model over and still routes to the copy here.)"""
        standin = self.standin
        if standin is None or standin.state != "ready":
            return False
        return self.peer.state in DOWN or self.remote_state != "ready"

    async def _route(self) -> Target | None:
        """None → forward to the peer; a Target → serve with this local stand-in."""
        up = self.peer.state not in DOWN
        if up and self.remote_state == "ready":
            if self.standin is not None:
                self.drop_standin(f"{self.peer.name} reports it ready")
            return None
        if not up:  # the failover callback reuses (and waits for) an existing stand-in
            return await self._failover(PeerUnavailable(
                f"model '{self.model}' runs on {self.peer.name}, which is {self.peer.state}",
                peer=self.peer.name, model=self.model))
        if self.standin is not None and self.standin.state == "ready":
            return self.standin  # the peer is back but still loading it: keep serving here
        return None  # up but not ready there: the peer answers why (loading, failed)

    async def _failover(self, exc: PeerUnavailable) -> Target:
        if self.failover is None:
            raise exc
        target = await self.failover(self, exc)
        self.standin = target
        self.handoff = False  # served here because the peer is down: a fallback now
        return target

    def drop_standin(self, why: str) -> Target | None:
        """Route to the peer from now on; unload the stand-in once its requests in flight
        are done (at most ``DRAIN_S``). Returns the stand-in dropped, if any."""
        standin, self.standin = self.standin, None
        if standin is not None:
            log.info("dropping the local %s copy of %s: %s", "handoff" if self.handoff else "fallback",
                     self.model, why)
            self._spawn(self._retire(standin))
        return standin

    def release_standin(self) -> Target | None:
        """Hand the stand-in over to the caller (who keeps it loaded) and forget it."""
        standin, self.standin = self.standin, None
        return standin

    async def _retire(self, standin: Target) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_S
        while self._using.get(id(standin)) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await standin.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._closing.add(task)  # keep a reference until it is done
        task.add_done_callback(self._closing.discard)

    def _use(self, standin: Target, delta: int) -> None:
        key = id(standin)
        left = self._using.get(key, 0) + delta
        if left > 0:
            self._using[key] = left
        else:
            self._using.pop(key, None)

    async def _on_standin(self, standin: Target, call: Awaitable[Any]) -> Any:
        """Await a one-shot call (generate/embed) on the copy here, counted as in use so a
        handoff does not unload it mid-request; a fallback answer is marked as one."""
        fallback = not self.handoff
        self._use(standin, 1)
        try:
            result = await call
        finally:
            self._use(standin, -1)
        result.fallback = fallback
        return result

    async def _watch(self, aw: Awaitable[Any], gone: asyncio.Future[Any] | None = None) -> Any:
        """Await ``aw`` unless the peer is declared dead first. A stream passes one
        ``gone`` waiter for all its tokens instead of making one per token."""
        task = asyncio.ensure_future(aw)
        if self.peer.gone.is_set():
            await _cancel(task)
            raise self._gone()
        own = gone is None
        waiter = asyncio.ensure_future(self.peer.gone.wait()) if gone is None else gone
        try:
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await _cancel(task)
            raise
        finally:
            if own:
                waiter.cancel()
        if task in done:
            return task.result()
        await _cancel(task)
        raise self._gone()

    def _gone(self) -> PeerUnavailable:
        return PeerUnavailable(f"peer {self.peer.name} stopped answering while computing '{self.model}'",
                               peer=self.peer.name, model=self.model, phase="answer")

    # ------------------------------------------------------------ chat
    @staticmethod
    def _params(req: GenerateRequest) -> dict[str, Any]:
        d = req.to_rpc()
        d.pop("stream", None)
        return d

    async def generate(self, req: GenerateRequest) -> Completion:
        self.requests += 1
        self._active += 1
        try:
            standin = await self._route()
            if standin is None:
                try:
                    self.forwarded += 1
                    result = await self._watch(self.peer.client.call("inference.generate", self._params(req)))
                    return Completion.from_dict(result)
                except PeerUnavailable as exc:
                    if _reached(exc):
                        raise
                    standin = await self._failover(exc)
            return await self._on_standin(standin, standin.generate(req))
        finally:
            self._active -= 1

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]:
        self.requests += 1
        self._active += 1
        try:
            standin = await self._route()
            if standin is None:
                self.forwarded += 1
                agen = self.peer.client.stream(self._params(req)).__aiter__()
                gone = asyncio.ensure_future(self.peer.gone.wait())
                started = False
                try:
                    while True:
                        try:
                            msg = await self._watch(agen.__anext__(), gone)
                        except StopAsyncIteration:
                            raise PeerUnavailable(f"peer {self.peer.name} ended the stream early",
                                                  peer=self.peer.name) from None
                        except PeerUnavailable as exc:
                            if started or _reached(exc):
                                raise
                            standin = await self._failover(exc)
                            break
                        if "result" in msg:
                            yield Completion.from_dict(msg["result"])
                            return
                        started = True
                        yield TokenChunk(text=msg.get("text", ""), finish_reason=msg.get("finish_reason"),
                                         logprobs=msg.get("logprobs"), tool_calls=msg.get("tool_calls"))
                finally:
                    gone.cancel()
                    try:
                        await agen.aclose()  # our caller left: closing the connection stops the peer
                    except RuntimeError:  # still unwinding from a cancellation
                        pass
            fallback = not self.handoff
            self._use(standin, 1)
            local = standin.stream(req)
            try:
                async for item in local:
                    if isinstance(item, Completion):
                        item.fallback = fallback
                    yield item
            finally:
                self._use(standin, -1)
                aclose = getattr(local, "aclose", None)
                if aclose is not None:
                    await aclose()  # our caller left: stop the local generation now, not at GC
        finally:
            self._active -= 1

    # ------------------------------------------------------------ embeddings
    async def _send_embed(self, texts: list[str], normalize: bool, groups: list[int]) -> dict[str, Any]:
        return await self._watch(self.peer.client.embed(texts, self.model, normalize, groups=groups))

    async def embed(self, req: EmbedRequest) -> Embeddings:
        t0 = time.perf_counter()
        self.requests += 1
        self._active += 1
        try:
            standin = await self._route()
            if standin is None:
                try:
                    self.forwarded += 1
                    vectors, tokens, node = await self._coalescer.submit(list(req.input), req.normalize)
                    return Embeddings(model=self.model, node=node or self.peer.name, vectors=vectors,
                                      prompt_tokens=tokens,
                                      timings=Timings(total_ms=round((time.perf_counter() - t0) * 1000, 3)))
                except PeerUnavailable as exc:
                    if _reached(exc) and self.peer.state not in DOWN:
                        raise
                    standin = await self._failover(exc)
            return await self._on_standin(standin, standin.embed(req))
        finally:
            self._active -= 1

    # ------------------------------------------------------------ reporting
    @property
    def queue_depth(self) -> int:
        info = self.peer.model_info(self.model) or {}
        return int(info.get("queue_depth", 0) or 0)

    def info(self) -> dict[str, Any]:
        remote = self.peer.model_info(self.model) or {}
        a = self.assignment
        out: dict[str, Any] = {
            "id": self.model, "kind": self.kind,
            "backend": remote.get("backend") or a.get("backend", ""),
            "quant": remote.get("quant") or a.get("quant", ""),
            "node": self.peer.name, "state": self.state, "local": False, "peer_state": self.peer.state,
            "device": remote.get("device") or a.get("device"),
            "queue_depth": self.queue_depth, "requests": remote.get("requests", 0),
            "tokens_generated": remote.get("tokens_generated", 0),
            "last_tokens_per_s": remote.get("last_tokens_per_s", 0.0),
            "forwarded": self.forwarded,
        }
        if self.kind == "embed":
            out["channel_calls"] = self._coalescer.calls  # < forwarded: requests were coalesced
        for key in ("embeddings", "dim", "context", "error"):
            if key in remote:
                out[key] = remote[key]
        if self.standin is not None:
            out["handoff" if self.handoff else "fallback"] = {"node": self.standin.node, "state": self.standin.state}
        return out

    async def close(self) -> None:
        """Finish the requests in flight (at most ``DRAIN_S``; a peer that dies ends its
        calls sooner), then drop the coalescer's leftovers and unload the stand-in."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_S
        while (self._active or self._coalescer.busy) and loop.time() < deadline and not self.peer.gone.is_set():
            await asyncio.sleep(0.02)
        await self._coalescer.close()
        standin, self.standin = self.standin, None
        if standin is not None:
            await standin.close()
