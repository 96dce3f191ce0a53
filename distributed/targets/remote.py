"""``RemoteTarget``: a model computed on a peer, as the node sees it.

The node routes to it like to any ``Target``; it forwards over the peer's
``PeerClient``. What makes it more than a forwarder:

* **Liveness.** Its state follows the peer (``peers.Peer``): a dead or departed peer
  makes the model "unavailable". While a request is in flight, the peer being
  declared dead ends it at once with ``PeerUnavailable`` (a peer that hangs without
  closing its socket never hangs our client).
* **Stand-in.** It may hold a local copy of the model (``standin``): a fallback while
  the peer is down, or the handoff copy that keeps serving while the peer loads a
  model the plan moved to it. While it holds a ready stand-in every request goes
  there. It never installs or drops a stand-in itself: ``routes.Routes`` (the one
  owner of target swaps) does, through ``hold``, ``release_standin`` and
  ``drop_standin``.
* **Failover.** After the first failure of its peer (the peer declared dead, or a
  call that failed on the link — refused, not connected within TARS_CONNECT_TIMEOUT_S, or
  never acknowledged — which marks the peer unreachable until it answers again) a
  request does not go to the peer: it asks its ``failover`` callback (the cluster,
  which asks ``Routes.fallback``) for the one stand-in of the model; the callback
  raises ``PeerUnavailable`` naming the peer when fallback is off or the model does
  not fit. A call that fails on the link fails over at once.
* **Draining.** A dropped stand-in, and the target itself when it is replaced,
  finish the requests they are computing (up to ``DRAIN_S``) before unloading.
* **Embedding coalescing.** Concurrent embedding requests share channel calls
  (``rpc/coalescer.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from ..domain import Completion, EmbedRequest, Embeddings, GenerateRequest, ModelKind, Timings, TokenChunk
from ..errors import PeerUnavailable
from ..logs import fields, get_logger
from ..rpc.coalescer import Coalescer
from ..tasks import TaskSet
from .base import Target, TargetState
from .watch import GoneWatch, PeerGone

if TYPE_CHECKING:
    from ..rpc.client import PeerClient

log = get_logger(__name__)

DOWN = ("dead", "left")
DRAIN_S = 10.0  # how long a retired stand-in or target waits for its requests in flight
_R = TypeVar("_R")  # what a call answered at once returns (Completion, Embeddings)


class PeerView(Protocol):
    """What a RemoteTarget (and ``Routes``) needs to know about its peer (``peers.Peer``)."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> str:  # PeerState: "alive" | "suspect" | "dead" | "left"
        ...

    @property
    def client(self) -> "PeerClient": ...

    @property
    def gone(self) -> asyncio.Event:  # set while the peer is dead or has left
        ...

    @property
    def reachable(self) -> bool:  # False from a refused connection until it answers again
        ...

    def model_info(self, model: str) -> dict[str, Any] | None: ...

    def failed(self, why: str) -> None: ...


Failover = Callable[["RemoteTarget", PeerUnavailable], Awaitable[Target]]


class Inflight:
    """A count of requests in flight with a wait for zero (no polling)."""

    def __init__(self) -> None:
        self.n = 0
        self._zero = asyncio.Event()
        self._zero.set()

    def __enter__(self) -> "Inflight":
        self.n += 1
        self._zero.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.n -= 1
        if self.n <= 0:
            self.n = 0
            self._zero.set()

    async def idle(self, timeout: float, unless: asyncio.Event | None = None) -> None:
        """Until nothing is in flight, ``unless`` is set, or ``timeout`` passed."""
        if self.n == 0:
            return
        waits = {asyncio.ensure_future(self._zero.wait())}
        if unless is not None:
            waits.add(asyncio.ensure_future(unless.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


class _Refused(Exception):
    """The peer refused a stream before its first token: serve it elsewhere."""

    def __init__(self, exc: PeerUnavailable) -> None:
        self.exc = exc


class RemoteTarget(Target):
    """One model assigned to a peer. ``failover`` is called when the peer is down."""

    local: ClassVar[bool] = False

    def __init__(self, model: str, kind: ModelKind, peer: PeerView, *, failover: Failover | None = None,
                 assignment: dict[str, Any] | None = None, max_batch: int = 256, max_inflight: int = 2,
                 handoff: Target | None = None) -> None:
        """``handoff``: the copy of the model this host has been serving, kept as the
        stand-in until the peer reports the model ready (Routes.route_to_peer)."""
        self.model = model
        self.kind = kind
        self.peer = peer
        self.failover = failover
        self.assignment = dict(assignment or {})
        self.standin: Target | None = handoff
        self.handoff = handoff is not None  # False: the stand-in is a fallback (answers say so)
        self._using: dict[int, Inflight] = {}  # id(stand-in) -> its requests in flight
        self._active = Inflight()  # requests in flight through this target
        self._tasks = TaskSet(f"remote-{model}")
        self.requests = 0
        self.forwarded = 0
        self._coalescer = Coalescer(self._send_embed, max_items=max_batch, max_inflight=max_inflight)

    @property
    def node(self) -> str:  # type: ignore[override]
        return self.peer.name

    # ------------------------------------------------------------ state and routing
    @property
    def remote_state(self) -> TargetState:
        info = self.peer.model_info(self.model)
        try:
            return TargetState(str(info.get("state", "loading"))) if info else TargetState.LOADING
        except ValueError:  # a state this version does not know
            return TargetState.LOADING

    @property
    def peer_down(self) -> bool:
        """Dead, gone, or it refused a connection since it last answered."""
        return self.peer.state in DOWN or not self.peer.reachable

    @property
    def state(self) -> TargetState:
        """The model's state on its peer; while the peer is down, the local stand-in's.
        (During a handoff this says "loading" while the copy here serves: ``info()``
        shows that copy under "handoff".)"""
        if self.peer_down:
            return self.standin.state if self.standin is not None else TargetState.UNAVAILABLE
        return self.remote_state

    @property
    def serves_here(self) -> bool:
        """Is the next request computed by the stand-in on this host? (The RPC server then
        accepts a call for this model forwarded by the peer: the peer is taking the model
        over and still routes to the copy here.)"""
        standin = self.standin
        return standin is not None and standin.state == TargetState.READY

    async def _route(self) -> Target | None:
        """None → forward to the peer; a Target → serve with this local stand-in."""
        if self.peer_down:  # the one stand-in (Routes.fallback reuses the copy held, if any)
            why = self.peer.state if self.peer.state in DOWN else "unreachable"
            return await self._failover(PeerUnavailable(
                f"model '{self.model}' runs on {self.peer.name}, which is {why}", peer=self.peer.name,
                model=self.model))
        standin = self.standin
        if standin is not None and standin.state == TargetState.READY:
            return standin  # kept until Routes.settle drops it (peer back, answered, ready)
        return None  # up (the peer answers why when it is loading or failed)

    def _refused(self, exc: PeerUnavailable) -> bool:
        """Did the call fail before reaching the peer (refused, not connected in time, never
        acknowledged: phase "connect" or "link")? Then the peer is unreachable until it
        answers again, and this request (and the next ones) go elsewhere."""
        if exc.details.get("phase") not in ("connect", "link"):
            return False
        self.peer.failed(exc.message)
        return True

    async def _failover(self, exc: PeerUnavailable) -> Target:
        if self.failover is None:
            raise exc
        return await self.failover(self, exc)  # Routes.fallback installs the stand-in (hold)

    # ------------------------------------------------------------ stand-in (changed by Routes only)
    def hold(self, standin: Target, *, handoff: bool) -> None:
        """Serve with ``standin`` (handoff copy or fallback) until it is dropped."""
        self.standin = standin
        self.handoff = handoff

    def drop_standin(self, why: str) -> Target | None:
        """Route to the peer from now on; unload the stand-in once its requests in flight
        are done (at most ``DRAIN_S``). Returns the stand-in dropped, if any."""
        standin, self.standin = self.standin, None
        if standin is not None:
            log.info("dropping the local %s copy of %s: %s", "handoff" if self.handoff else "fallback",
                     self.model, why, extra=fields(model=self.model, peer=self.peer.name))
            self._tasks.spawn(self._retire(standin))
        return standin

    def release_standin(self) -> Target | None:
        """Hand the stand-in over to the caller (who keeps it loaded) and forget it."""
        standin, self.standin = self.standin, None
        return standin

    async def _retire(self, standin: Target) -> None:
        using = self._using.get(id(standin))
        try:
            if using is not None:
                await using.idle(DRAIN_S)
        finally:  # unloaded even when the node stops meanwhile (this task cancelled)
            self._using.pop(id(standin), None)
            await standin.close()

    def _use(self, standin: Target) -> Inflight:
        return self._using.setdefault(id(standin), Inflight())

    async def _on_standin(self, standin: Target, call: Awaitable[Any]) -> Any:
        """Await a one-shot call (generate/embed) on the copy here, counted as in use so a
        handoff does not unload it mid-request; a fallback answer is marked as one."""
        fallback = not self.handoff
        with self._use(standin):
            result = await call
        result.fallback = fallback
        return result

    async def _watch(self, aw: Awaitable[Any]) -> Any:
        """Await ``aw`` unless the peer is declared dead first (``GoneWatch``, as a stream's steps)."""
        gone = GoneWatch(self.peer.gone)
        try:
            return await gone.step(aw)
        except PeerGone:
            raise self._gone() from None
        finally:
            gone.close()

    def _gone(self) -> PeerUnavailable:
        return PeerUnavailable(f"peer {self.peer.name} stopped answering while computing '{self.model}'",
                               peer=self.peer.name, model=self.model, phase="answer")

    # ------------------------------------------------------------ chat
    @staticmethod
    def _params(req: GenerateRequest) -> dict[str, Any]:
        d = req.to_rpc()
        d.pop("stream", None)
        return d

    async def _one_call(self, forward: Callable[[], Awaitable[_R]], here: Callable[[Target], Awaitable[_R]],
                        *, down_too: bool = False) -> _R:
        """A call answered at once: ``forward()`` on the peer, or ``here(standin)`` when the
        peer is routed around or refuses the connection (with ``down_too``, also when any
        failure finds the peer down)."""
        self.requests += 1
        with self._active:
            standin = await self._route()
            if standin is None:
                try:
                    self.forwarded += 1
                    return await forward()
                except PeerUnavailable as exc:
                    if not self._refused(exc) and not (down_too and self.peer.state in DOWN):
                        raise
                    standin = await self._failover(exc)
            result: _R = await self._on_standin(standin, here(standin))
            return result

    async def generate(self, req: GenerateRequest) -> Completion:
        async def forward() -> Completion:
            return Completion.from_dict(
                await self._watch(self.peer.client.call("inference.generate", self._params(req))))

        return await self._one_call(forward, lambda standin: standin.generate(req))

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]:
        self.requests += 1
        with self._active:
            standin = await self._route()
            if standin is None:
                forward = self._forward_stream(req)
                try:
                    async for item in forward:
                        yield item
                    return
                except _Refused as refused:
                    standin = await self._failover(refused.exc)
                finally:
                    await forward.aclose()  # our caller left: the peer's stream closes now, not at GC
            here = self._standin_stream(standin, req)
            try:
                async for item in here:
                    yield item
            finally:
                await here.aclose()

    async def _forward_stream(self, req: GenerateRequest) -> AsyncGenerator[TokenChunk | Completion, None]:
        """The peer's stream; ``_Refused`` when its connection is refused before any token.
        Each message is read in the caller's own task (``GoneWatch``: no task per token)."""
        self.forwarded += 1
        agen = self.peer.client.stream(self._params(req))
        gone = GoneWatch(self.peer.gone)
        started = False
        try:
            while True:
                try:
                    msg = await gone.step(agen.__anext__())
                except PeerGone:
                    raise self._gone() from None
                except StopAsyncIteration:
                    raise PeerUnavailable(f"peer {self.peer.name} ended the stream early",
                                          peer=self.peer.name) from None
                except PeerUnavailable as exc:
                    if not started and self._refused(exc):
                        raise _Refused(exc) from None
                    raise
                if "result" in msg:
                    yield Completion.from_dict(msg["result"])
                    return
                started = True
                yield TokenChunk(text=msg.get("text", ""), finish_reason=msg.get("finish_reason"),
                                 logprobs=msg.get("logprobs"), tool_calls=msg.get("tool_calls"),
                                 reasoning=msg.get("reasoning"))
        finally:
            gone.close()
            try:
                await agen.aclose()  # our caller left: closing the connection stops the peer
            except RuntimeError:  # still unwinding from a cancellation
                pass

    async def _standin_stream(self, standin: Target,
                              req: GenerateRequest) -> AsyncGenerator[TokenChunk | Completion, None]:
        fallback = not self.handoff
        local = standin.stream(req)
        with self._use(standin):
            try:
                async for item in local:
                    if isinstance(item, Completion):
                        item.fallback = fallback
                    yield item
            finally:
                aclose = getattr(local, "aclose", None)
                if aclose is not None:
                    await aclose()  # our caller left: stop the local generation now, not at GC

    # ------------------------------------------------------------ embeddings
    async def _send_embed(self, texts: list[str], normalize: bool, groups: list[int]) -> dict[str, Any]:
        return await self._watch(self.peer.client.embed(texts, self.model, normalize, groups=groups))

    async def embed(self, req: EmbedRequest) -> Embeddings:
        t0 = time.perf_counter()

        async def forward() -> Embeddings:
            vectors, tokens, node = await self._coalescer.submit(list(req.input), req.normalize)
            return Embeddings(model=self.model, node=node or self.peer.name, vectors=vectors, prompt_tokens=tokens,
                              timings=Timings(total_ms=round((time.perf_counter() - t0) * 1000, 3)))

        return await self._one_call(forward, lambda standin: standin.embed(req), down_too=True)

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
        for key in ("embeddings", "dim", "context", "error", "split", "split_mode", "missing", "progress",
                    "runtime", "speculative", "vision"):
            if key in remote:
                out[key] = remote[key]
        if remote.get("state") == "pulling" and out["state"] == TargetState.LOADING:
            out["state"] = "pulling"  # its host is downloading it (deploy/pull.py), percent in "progress"
        if "split" not in out and a.get("split"):  # pooled VRAM: the hosts it runs on, as planned
            out["split"] = a["split"]
        if self.standin is not None:
            out["handoff" if self.handoff else "fallback"] = {"node": self.standin.node, "state": self.standin.state}
        return out

    async def close(self) -> None:
        """Finish the requests in flight (at most ``DRAIN_S``; a peer that dies ends its
        calls sooner), then drop the coalescer's leftovers and unload the stand-in."""
        await self._active.idle(DRAIN_S, unless=self.peer.gone)
        await self._coalescer.close()
        standin, self.standin = self.standin, None
        if standin is not None:
            await standin.close()
