"""A GGUF chat model served by its own supervised ``llama-server`` child.

``EngineTarget`` has LocalTarget's lifecycle and ``info()`` shape (the node, the cluster
and ``/health`` treat it like any local model): ``start()`` resolves the GGUF and spawns
``llama-server`` on 127.0.0.1, a free port and a random API key (passed in the child's
environment, not on its command line), with ``-np`` slots and ``-c slots × context`` (the
context stays per request), ``--jinja --slots --metrics``; the state is "loading" until
the engine's own ``/health`` answers 200.

Requests: ``SlotQueue`` admits up to ``slots`` at once (the engine batches them itself,
continuously), the rest wait in the bounded queue, past it 429. Each request is one
HTTP call to the engine (``wire.py`` maps it both ways). A refusal of the engine becomes
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

from .. import templates
from ..batching import SlotQueue
from ..domain import Assignment, Completion, GenerateRequest, ModelSpec, Timings, TokenChunk, Usage
from ..errors import ModelFailed, ModelLoading, TarsError, ValidationFailed
from ..logs import fields, get_logger
from ..metrics import Metrics
from ..store import projector_path
from ..targets import LocalTarget

try:
    from ..targets.base import TargetState as _S
except ImportError:  # the single-module targets.py layout: plain strings
    class _S:  # type: ignore[no-redef]
        LOADING, READY, FAILED, UNAVAILABLE = "loading", "ready", "failed", "unavailable"
from . import wire
from .binary import EngineBinary
from .sse import EngineRefused, SseStream
from .supervisor import ChildState, Supervisor

log = get_logger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _no_backend() -> Any:
    raise AssertionError("an EngineTarget has no in-process backend")


class EngineTarget(LocalTarget):
    sees_images = True  # a model with a projector gets --mmproj (info()["vision"])

    def __init__(self, spec: ModelSpec, assignment: Assignment, *, binary: EngineBinary,
                 model_path: Callable[[], Path], node: str, parallel: int = 4, context: int = 2048,
                 threads: int | None = None, queue_size: int = 16, timeout_s: float = 300.0,
                 queue_max_wait_s: float = 0.0, cache_mb: int = 0,
                 metrics: Metrics | None = None, start_timeout_s: float = 300.0, max_failures: int = 3,
                 extra_args: tuple[str, ...] = (), host: str = "127.0.0.1") -> None:
        super().__init__(spec, assignment, _no_backend, node=node, queue_size=queue_size, timeout_s=timeout_s,
                         metrics=metrics)  # backend stays "llama_cpp": llama.cpp, in another process
        if self.queue is not None:  # the in-process generation queue is not used here
            self.queue.close()
            self.queue = None
        self.binary = binary
        self.parallel = max(1, int(parallel))
        self.context = int(context)
        self.threads = threads
        self.timeout_s = timeout_s
        self.host = host
        self.extra_args = tuple(extra_args)
        self.cache_mb = int(cache_mb)
        self._model_path = model_path
        self._key = secrets.token_urlsafe(24)
        self._port = 0
        self.slots = SlotQueue(self.parallel, max_waiting=queue_size, timeout_s=timeout_s, name=spec.id,
                               max_wait_s=queue_max_wait_s,
                               on_change=self._slots_changed)
        self.supervisor: Supervisor | None = None
        self._client: Any = None
        self._boot_task: asyncio.Task[None] | None = None
        self._start_timeout_s = start_timeout_s
        self._max_failures = max_failures
        self._ever_ready = False
        self.template_caps: dict[str, Any] | None = None  # /props chat_template_caps once ready

    # ----------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def argv(self, path: Path) -> list[str]:
        """The engine's command line for one life (a fresh free port each time)."""
        self._port = free_port(self.host)
        a = self.assignment
        argv = [str(self.binary.server), "-m", str(path), "-a", self.model, "--host", self.host,
                "--port", str(self._port), "-np", str(self.parallel), "-c", str(self.parallel * self.context),
                "-ngl", str(a.n_gpu_layers if a.n_gpu_layers >= 0 else 999), "--jinja", "--slots", "--metrics",
                "--cache-ram", str(self.cache_mb)]  # bounded: llama.cpp's own default is 8 GB of RAM
        if self.spec.mmproj:  # a vision model: its projector (store.projector_path), on the GPU only with layers
            argv += ["--mmproj", str(projector_path(self.spec, path))]
            argv += ["--no-mmproj-offload"] if a.n_gpu_layers == 0 else []
        if self.threads:
            argv += ["-t", str(self.threads)]
        template = templates.path_for(self.spec)  # the catalog's chat template in place of the GGUF's
        if template is not None:
            argv += ["--chat-template-file", str(template)]
        if a.device.startswith("cuda:") and a.n_gpu_layers != 0:  # the planned GPU only, no split
            argv += ["-sm", "none", "-mg", a.device.split(":", 1)[1]]
        return argv + list(self.extra_args)

    def start(self) -> None:
        """Spawn the engine in the background; returns at once (call from the event loop)."""
        if self._boot_task is None:
            self._boot_task = asyncio.get_running_loop().create_task(self._boot(), name=f"engine-{self.model}")

    async def _boot(self) -> None:
        import httpx

        t0 = time.monotonic()
        try:
            path = await asyncio.to_thread(self._model_path)
            self._client = httpx.AsyncClient(headers={"Authorization": f"Bearer {self._key}"}, trust_env=False,
                                             timeout=httpx.Timeout(self.timeout_s, connect=5.0),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
            env = {**_base_env(), "LLAMA_ARG_API_KEY": self._key}
            self.supervisor = Supervisor(self.model, lambda: self.argv(path), health=self._healthy, env=env,
                                         start_timeout_s=self._start_timeout_s, max_failures=self._max_failures,
                                         on_state=self._on_child)
            if self._closed:
                return
            await self.supervisor.start()
            state = await self.supervisor.wait_ready()
            if state is ChildState.READY:
                await self._read_props()
                self.load_s = time.monotonic() - t0
                log.info("model %s ready in %.1f s (llama-server, %d slots × %d tokens)", self.model, self.load_s,
                         self.parallel, self.context, extra=fields(model=self.model, pid=self.supervisor.pid))
        except Exception as exc:  # noqa: BLE001 - the node stays up and reports the failure
            self.error = exc.message if isinstance(exc, TarsError) else f"{type(exc).__name__}: {exc}"
            self._state = _S.FAILED
            log.error("model %s failed to start its engine: %s", self.model, self.error, extra=fields(model=self.model))
        finally:
            self._loaded.set()

    def _on_child(self, state: ChildState) -> None:
        if self._closed:
            return
        if state is ChildState.READY:
            self._ever_ready = True
            self._state = _S.READY
            self.error = None
        elif state is ChildState.FAILED:
            self._state = _S.FAILED
            sup = self.supervisor
            self.error = f"llama-server {sup.error}" if sup is not None and sup.error else "llama-server failed"
        elif state in (ChildState.STARTING, ChildState.RESTARTING):
            self._state = _S.LOADING

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
        self._closed = True
        if self._state != _S.FAILED:
            self._state = _S.UNAVAILABLE
        task, self._boot_task = self._boot_task, None
        if task is not None and not task.done():
            task.cancel()
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self._client is not None:
            await self._client.aclose()
        self._slots_changed(0, 0)

    def _check_ready(self) -> Any:
        if self._state == _S.READY:
            return None
        if self._state == _S.FAILED:
            raise ModelFailed(f"model '{self.model}' failed on {self.node}: {self.error}", model=self.model,
                              node=self.node)
        if self._state == _S.LOADING:
            what = "restarting its engine" if self._ever_ready else "still loading"
            raise ModelLoading(f"model '{self.model}' is {what} on {self.node}; retry in a few seconds",
                               model=self.model, node=self.node, retry_after=2)
        raise ModelFailed(f"model '{self.model}' is not available on {self.node} ({self._state})",
                          model=self.model, node=self.node)

    # ----------------------------------------------------------------- requests
    def _validate(self, req: GenerateRequest) -> None:
        self._check_ready()
        if not req.messages and not (req.prompt or "").strip():
            raise ValidationFailed("the prompt is empty; send a non-empty 'prompt' or 'messages'", field="prompt")
        caps = self.template_caps
        if getattr(req, "tools", None) and caps is not None and not caps.get("supports_tool_calls"):
            raise ValidationFailed(f"model '{self.model}': its chat template cannot do tool calls; send the "
                                   "request without 'tools' or use a model whose template has them", field="tools",
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
        if usage.prompt_tokens + req.max_tokens > self.context:
            room = max(0, self.context - usage.prompt_tokens)
            return [f"max_tokens clamped from {req.max_tokens} to {room}: the prompt ({usage.prompt_tokens} tokens) "
                    f"plus max_tokens must fit the context of {self.context} tokens"]
        return []

    def _account(self, n: int, ttft: float | None, tps: float) -> None:
        self.tokens_generated += n
        self._token_rate.add(n)
        if n:
            self.last_tokens_per_s = tps
        if self.metrics is not None:
            self.metrics.observe_generation(self.model, n, ttft)

    async def generate(self, req: GenerateRequest) -> Completion:
        import httpx

        t0 = time.perf_counter()
        self._validate(req)
        path, body = wire.payload(req, self.model, self.template_caps)
        body["stream"] = False
        self.requests += 1
        async with self.slots.slot(bounded=not req.choice):
            try:
                resp = await self._client.post(self.base_url + path, content=orjson.dumps(body),
                                               headers={"Content-Type": "application/json"})
            except httpx.TransportError as exc:
                raise self._gone(exc) from None
            if resp.status_code != 200:
                raise await self._refused(resp, req.messages is not None)
        text, finish, usage_d, timings_d, extra = wire.answer(orjson.loads(resp.content))
        end = time.perf_counter()
        usage = Usage(prompt_tokens=int(usage_d.get("prompt_tokens") or 0),
                      completion_tokens=int(usage_d.get("completion_tokens") or 0))
        tps = float(timings_d.get("predicted_per_second") or 0.0)
        self._account(usage.completion_tokens, None, tps)
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
        self.requests += 1
        state = wire.StreamState()
        n = 0
        first: float | None = None
        try:
            async with self.slots.slot(bounded=not req.choice):
                try:
                    async with SseStream(self.host, self._port, path, orjson.dumps(body), self._key) as events:
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
            if not tps and n > 1 and first is not None and end > first:
                tps = (n - 1) / (end - first)
            self._account(tokens, ttft, tps)
        usage = Usage(prompt_tokens=int(state.usage.get("prompt_tokens") or 0), completion_tokens=tokens)
        yield Completion(model=self.model, node=self.node, text="", finish_reason=state.finish_reason or "stop",
                         usage=usage, timings=Timings(ttft_ms=round((ttft or 0.0) * 1000, 3),
                                                      total_ms=round((end - t0) * 1000, 3), tokens_per_s=round(tps, 3)),
                         notes=self._notes(req, usage), **state.extras())

    # ----------------------------------------------------------------- reporting
    def _slots_changed(self, busy: int, waiting: int) -> None:
        m = self.metrics
        if m is not None and hasattr(m, "observe_slots"):
            m.observe_slots(self.model, busy, self.parallel)

    @property
    def queue_depth(self) -> int:
        return self.slots.depth

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["context"] = self.context
        out["slots"] = {"busy": self.slots.busy, "total": self.parallel, "waiting": self.slots.waiting}
        sup = self.supervisor
        out["engine"] = {"name": "llama-server", "binary": str(self.binary.server), "build": self.binary.build, "kind": self.binary.kind,
                         "pid": sup.pid if sup is not None and sup.running else None,
                         "state": sup.state.value if sup is not None else "stopped",
                         "restarts": max(0, sup.starts - 1) if sup is not None else 0,
                         "template_caps": self.template_caps}
        if sup is not None and sup.running and sup.pid:
            try:
                import psutil

                out["memory"] = {"ram_mb": round(psutil.Process(sup.pid).memory_info().rss / 2**20, 1)}
            except Exception:  # noqa: BLE001 - a best-effort figure
                pass
        return out


def _base_env() -> dict[str, str]:
    import os

    # no proxies for a loopback child; nothing else of ours leaks into it
    return {k: v for k, v in os.environ.items() if not k.startswith("TARS_") and k.lower() not in
            ("http_proxy", "https_proxy", "all_proxy")}
