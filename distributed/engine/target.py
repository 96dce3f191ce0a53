"""A GGUF chat model served by its own supervised ``llama-server`` child.

``EngineTarget`` is a ``Target`` built from parts: a ``Served`` (targets/served.py: the
lifecycle, counters and ``info()`` shape every model computed here has, so the node, the
cluster and ``/health`` treat it like any local model), an ``EngineConfig``
(engine/config.py: its options, mapped once from the settings and the plan), a
``Supervisor`` for the child and a ``SlotQueue`` (engine/slots.py) for admission.
``start()`` resolves the GGUF and spawns ``llama-server`` on 127.0.0.1, a free port per
life and a random API key (passed in the child's environment, not on its command line),
with ``-np`` slots and ``-c slots × context`` (the context stays per request), ``--jinja
--slots --metrics``; the state is "loading" until the engine's own ``/health`` answers 200.

Requests: ``SlotQueue`` admits up to ``slots`` at once (the engine batches them itself,
continuously), the rest wait in the bounded queue, past it 429. Each admitted request is
pinned to a free slot (``id_slot``) whose last prompt shares its start (``prefix.SlotPins``).
Each request is one HTTP call to the engine (``wire.py`` maps it both ways). A refusal of the engine becomes
our error (context too long → 400 ``InputTooLong``); an engine that dies mid-request ends
the request with a 503 ``ModelFailed`` (the supervisor restarts the engine; meanwhile the
state is "loading"); a crash loop leaves the model "failed" with the engine's last lines.
A client that goes away closes the HTTP stream, which frees the engine's slot.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from ..domain import (Assignment, Completion, EmbedRequest, Embeddings, GenerateRequest, ModelSpec, Timings,
                      TokenChunk, Usage)
from ..errors import ModelFailed, RequestTimeout, TarsError, ToolsUnsupported, ValidationFailed
from ..logs import fields, get_logger
from ..metrics import Metrics
from ..prefix import SlotPins
from ..speculative import DraftStats
from ..targets.base import Target, TargetState
from ..targets.served import Served, clamp_notes, served_attr
from . import wire
from .config import EngineConfig
from .slots import SlotQueue
from .sse import EngineRefused, SseStream
from .supervisor import ChildState, Supervisor

log = get_logger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EngineTarget(Target):
    def __init__(self, spec: ModelSpec, assignment: Assignment, config: EngineConfig, *,
                 model_path: Callable[[], Path], node: str, metrics: Metrics | None = None) -> None:
        # backend "llama_cpp": llama.cpp, in another process
        self.served = Served(spec, assignment, node=node, metrics=metrics, sees_images=True)  # --mmproj
        self.model, self.kind, self.node, self.spec, self.assignment = spec.id, spec.kind, node, spec, assignment
        self.config = config
        self.metrics = metrics
        self._model_path = model_path
        self._key = secrets.token_urlsafe(24)
        self.port = 0  # the port of the engine's current life (a fresh one per start)
        self.slots = SlotQueue(config.slots, max_waiting=config.queue_size, timeout_s=config.timeout_s, name=spec.id,
                               max_wait_s=config.queue_max_wait_s, on_change=self._slots_changed)
        self.pins = SlotPins(config.slots, enabled=config.slot_affinity)  # which slot (id_slot) runs each request
        self.supervisor: Supervisor | None = None
        self._client: Any = None
        self._boot_task: asyncio.Task[None] | None = None
        self._ever_ready = False
        self.template_caps: dict[str, Any] | None = None  # /props chat_template_caps once ready
        self.drafts = DraftStats()  # speculative decoding: draft tokens proposed / accepted

    state = served_attr("state")
    error = served_attr("error")
    requests = served_attr("requests")
    progress = served_attr("progress")  # set by the loading thread while it pulls (deploy/pull.py)
    load_s = served_attr("load_s")

    # ----------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def argv(self, path: Path) -> list[str]:
        """The engine's command line for its next life, on a fresh free port."""
        self.port = free_port(self.config.host)
        return self.config.argv(path, self.port)

    def start(self) -> None:
        """Spawn the engine in the background; returns at once (call from the event loop)."""
        if self._boot_task is None:
            self._boot_task = asyncio.get_running_loop().create_task(self._boot(), name=f"engine-{self.model}")

    async def wait_loaded(self, timeout: float | None = None) -> TargetState:
        return await self.served.wait_loaded(timeout)

    async def _boot(self) -> None:
        import httpx

        t0 = time.monotonic()
        try:
            path = await asyncio.to_thread(self._model_path)
            self._client = httpx.AsyncClient(headers={"Authorization": f"Bearer {self._key}"}, trust_env=False,
                                             timeout=httpx.Timeout(self.config.timeout_s, connect=5.0),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
            env = {**_base_env(), "LLAMA_ARG_API_KEY": self._key}
            cfg = self.config
            self.supervisor = Supervisor(self.model, lambda: self.argv(path), health=self._healthy, env=env,
                                         start_timeout_s=cfg.start_timeout_s, max_failures=cfg.max_failures,
                                         on_state=self._on_child)
            if self.served.closed:
                return
            await self.supervisor.start()
            state = await self.supervisor.wait_ready()
            if state is ChildState.READY:
                await self._read_props()
                self.served.load_s = time.monotonic() - t0
                log.info("model %s ready in %.1f s (llama-server, %d slots × %d tokens)", self.model,
                         self.served.load_s, cfg.slots, cfg.context,
                         extra=fields(model=self.model, pid=self.supervisor.pid))
        except Exception as exc:  # noqa: BLE001 - the node stays up and reports the failure
            why = self.served.failed(exc)
            log.error("model %s failed to start its engine: %s", self.model, why, extra=fields(model=self.model))
        finally:
            self.served.loaded.set()

    def _on_child(self, state: ChildState) -> None:
        if self.served.closed:
            return
        if state is ChildState.READY:
            self._ever_ready = True
            self.served.ready()
        elif state is ChildState.FAILED:
            sup = self.supervisor
            self.served.failed(f"llama-server {sup.error}" if sup is not None and sup.error else "llama-server failed")
        elif state in (ChildState.STARTING, ChildState.RESTARTING):
            self.served.state = TargetState.LOADING

    async def _read_props(self) -> None:
        """What the GGUF's chat template can do (llama-server's /props ``chat_template_caps``)."""
        try:
            r = await self._client.get(self.base_url + "/props", timeout=5.0)
            props = r.json() if r.status_code == 200 else {}
        except Exception:  # noqa: BLE001 - unknown caps: the engine decides per request
            props = {}
        caps = props.get("chat_template_caps")
        self.template_caps = wire.template_caps(caps, props) if isinstance(caps, dict) else None

    async def _healthy(self) -> bool:
        r = await self._client.get(self.base_url + "/health", timeout=2.0)
        return r.status_code == 200

    async def close(self) -> None:
        self.served.close()
        task, self._boot_task = self._boot_task, None
        if task is not None and not task.done():
            task.cancel()
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self._client is not None:
            await self._client.aclose()
        self._slots_changed(0, 0)

    def _check_ready(self) -> None:
        self.served.check_ready(loading="restarting its engine" if self._ever_ready else "still loading",
                                failed="failed")

    # ----------------------------------------------------------------- requests
    def _validate(self, req: GenerateRequest) -> None:
        self._check_ready()
        if not req.messages and not (req.prompt or "").strip():
            raise ValidationFailed("the prompt is empty; send a non-empty 'prompt' or 'messages'", field="prompt")
        if req.logprobs and self.config.speculates:
            # llama-server leaves the probabilities of tokens it accepted from a draft unset
            # (logprob 0, no alternatives): refused by name rather than answered wrong
            raise ValidationFailed(f"'logprobs': model '{self.model}' on {self.node} runs speculative decoding "
                                   f"({self.config.speculation.kind}), and its engine does not report the "
                                   "log-probabilities of guessed tokens; set TARS_SPECULATIVE=off on that host to "
                                   "get them", field="logprobs", model=self.model)
        caps = self.template_caps
        if getattr(req, "tools", None) and caps is not None and not caps.get("supports_tool_calls"):
            raise ToolsUnsupported(f"model '{self.model}': its chat template cannot do tool calls; send the "
                                   "request without 'tools' or use a model whose template has them",
                                   model=self.model)

    def _gone(self, exc: Exception) -> ModelFailed:
        sup = self.supervisor
        if isinstance(exc, asyncio.IncompleteReadError):
            why = "the connection closed before the answer ended"
        else:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return ModelFailed(f"the engine of model '{self.model}' on {self.node} stopped answering mid-request "
                           f"({why}); it is being restarted, retry in a few seconds", model=self.model,
                           node=self.node, retry_after=2, engine_state=sup.state.value if sup else None)

    async def _refused(self, resp: Any, messages: bool) -> TarsError:
        return self._refusal(resp.status_code, await resp.aread(), messages)

    def _refusal(self, status: int, raw: bytes, messages: bool) -> TarsError:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        return wire.engine_error(status, body, self.model, self.node, messages=messages)

    def _notes(self, req: GenerateRequest, usage: Usage) -> list[str]:
        return clamp_notes(req.max_tokens, usage.prompt_tokens, self.config.context)

    async def generate(self, req: GenerateRequest) -> Completion:
        import httpx

        t0 = time.perf_counter()
        self._validate(req)
        path, body = wire.payload(req, self.model, self.template_caps)
        body["stream"] = False
        self.served.requests += 1
        async with self.slots.slot(bounded=not req.choice), self.pins.pin(req, body):
            try:
                resp = await self._client.post(self.base_url + path, content=orjson.dumps(body),
                                               headers={"Content-Type": "application/json"})
            except httpx.ReadTimeout:  # the engine is alive but slow: the request's deadline, not a failure
                raise RequestTimeout(f"model '{self.model}' on {self.node} gave no answer within "
                                     f"{self.config.timeout_s:g} s (TARS_REQUEST_TIMEOUT_S); ask for fewer tokens "
                                     "or retry", model=self.model, node=self.node) from None
            except httpx.TransportError as exc:
                raise self._gone(exc) from None
            if resp.status_code != 200:
                raise await self._refused(resp, req.messages is not None)
        text, finish, usage_d, timings_d, extra = wire.answer(orjson.loads(resp.content), req)
        self.drafts.add(timings_d)
        end = time.perf_counter()
        usage = Usage(prompt_tokens=int(usage_d.get("prompt_tokens") or 0),
                      completion_tokens=int(usage_d.get("completion_tokens") or 0))
        tps = float(timings_d.get("predicted_per_second") or 0.0)
        self.served.generated(usage.completion_tokens, None, tps)
        return Completion(model=self.model, node=self.node, text=text, finish_reason=finish, usage=usage,
                          timings=Timings(ttft_ms=round(float(timings_d.get("prompt_ms") or 0.0), 3),
                                          total_ms=round((end - t0) * 1000, 3), tokens_per_s=round(tps, 3)),
                          notes=self._notes(req, usage), **extra)

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]:
        t0 = time.perf_counter()
        self._validate(req)
        path, body = wire.payload(req, self.model, self.template_caps)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        self.served.requests += 1
        state = wire.StreamState(req)
        n = 0
        first: float | None = None
        try:
            async with self.slots.slot(bounded=not req.choice), self.pins.pin(req, body):
                try:
                    async with SseStream(self.config.host, self.port, path, orjson.dumps(body), self._key) as events:
                        async for data in events:
                            chunk = orjson.loads(data)
                            if "error" in chunk and "choices" not in chunk:
                                raise wire.engine_error(int(chunk["error"].get("code") or 500), chunk, self.model,
                                                        self.node, messages=req.messages is not None)
                            piece = state.feed(chunk)
                            if piece is not None:
                                if first is None:
                                    first = time.perf_counter()
                                n += 1
                                yield piece
                except EngineRefused as exc:
                    raise self._refusal(exc.status, exc.body, req.messages is not None) from None
                except (OSError, asyncio.IncompleteReadError) as exc:
                    raise self._gone(exc) from None
            tool_piece = state.tool_chunk()
            if tool_piece is not None:
                n += 1
                yield tool_piece
        finally:
            end = time.perf_counter()
            tokens = int(state.usage.get("completion_tokens") or n)
            ttft = (first - t0) if first is not None else None
            tps = float(state.timings.get("predicted_per_second") or 0.0)
            self.drafts.add(state.timings)
            if not tps and n > 1 and first is not None and end > first:
                tps = (n - 1) / (end - first)
            self.served.generated(tokens, ttft, tps)
        usage = Usage(prompt_tokens=int(state.usage.get("prompt_tokens") or 0), completion_tokens=tokens)
        yield Completion(model=self.model, node=self.node, text="", finish_reason=state.finish_reason or "stop",
                         usage=usage, timings=Timings(ttft_ms=round((ttft or 0.0) * 1000, 3),
                                                      total_ms=round((end - t0) * 1000, 3), tokens_per_s=round(tps, 3)),
                         notes=self._notes(req, usage), **state.extras())

    # ----------------------------------------------------------------- reporting
    def _slots_changed(self, busy: int, waiting: int) -> None:
        m = self.metrics
        if m is not None and hasattr(m, "observe_slots"):
            m.observe_slots(self.model, busy, self.config.slots)

    async def embed(self, req: EmbedRequest) -> Embeddings:
        self._check_ready()
        raise ValidationFailed(f"model '{self.model}' is a chat model; it cannot embed", field="model")

    @property
    def queue_depth(self) -> int:
        return self.slots.depth

    def tokens_per_s(self) -> float:
        return self.served.token_rate.per_s()

    def embeddings_per_s(self) -> float:
        return 0.0

    def info(self) -> dict[str, Any]:
        binary, sup = self.config.binary, self.supervisor
        extra: dict[str, Any] = {
            "context": self.config.context,
            "slots": {"busy": self.slots.busy, "total": self.config.slots, "waiting": self.slots.waiting},
            "engine": {"name": "llama-server", "binary": str(binary.server), "build": binary.build, "kind": binary.kind,
                       "pid": sup.pid if sup is not None and sup.running else None,
                       "state": sup.state.value if sup is not None else "stopped",
                       "restarts": max(0, sup.starts - 1) if sup is not None else 0,
                       "template_caps": self.template_caps},
            "speculative": {**self.config.speculation.info(), **self.drafts.info()}, "slot_affinity": self.pins.info()}
        if sup is not None and sup.running and sup.pid:
            try:
                import psutil

                extra["memory"] = {"ram_mb": round(psutil.Process(sup.pid).memory_info().rss / 2**20, 1)}
            except Exception:  # noqa: BLE001 - a best-effort figure
                pass
        return self.served.info(self.queue_depth, **extra)


def _base_env() -> dict[str, str]:
    import os

    # no proxies for a loopback child; nothing else of ours leaks into it
    return {k: v for k, v in os.environ.items() if not k.startswith("TARS_") and k.lower() not in
            ("http_proxy", "https_proxy", "all_proxy")}
