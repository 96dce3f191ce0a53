"""Ollama's answers on the wire: the whole answer of /api/chat and /api/generate, the NDJSON
chunks of a streamed one (``Chunks``, a ``streams.WireFormat``), and the error body.

Durations are nanoseconds, as Ollama's. Final objects also carry ``node`` (the host that
computed the answer), ``via`` (the host that received it) and any ``notes``, which Ollama's
clients ignore. A streamed answer is one JSON object a line, the last with ``"done": true``
and the counts; a failure after the first line ends it with an ``{"error": ...}`` line,
which the official client raises. Errors are ``{"error": "..."}`` (``ollama_error``;
registered for every path under ``/api/`` in api/error_shapes.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson

from ..domain import Completion, TokenChunk
from ..errors import TarsError


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Stamps:
    """``created_at`` for every streamed line, cheaply: the date and time to the second are
    formatted once a second, the microseconds appended (RFC 3339, UTC, as ``timestamp``)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def now(self) -> bytes:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return self._prefix + b".%06dZ" % int((t - second) * 1e6)


def done_reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def stats(c: Completion, total_ns: int) -> dict[str, int]:
    """Ollama's counts and durations (ns) of one answer. eval_count / eval_duration is the
    decode rate the computing host measured."""
    t = c.timings
    evals = c.usage.completion_tokens
    prompt_ns = int(t.ttft_ms * 1e6)
    if t.tokens_per_s > 0 and evals:
        eval_ns = int(evals / t.tokens_per_s * 1e9)
    else:
        eval_ns = max(0, int((t.total_ms - t.ttft_ms) * 1e6))
    return {"total_duration": max(total_ns, prompt_ns + eval_ns), "load_duration": 0,
            "prompt_eval_count": c.usage.prompt_tokens, "prompt_eval_duration": prompt_ns,
            "eval_count": evals, "eval_duration": eval_ns}


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's calls (arguments as JSON text) → Ollama's (arguments as an object). Text that
    is not a JSON object is kept under ``"_raw"`` (the client's model needs an object)."""
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        text = fn.get("arguments") or ""
        try:
            args = orjson.loads(text) if text.strip() else {}
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            args = {"_raw": text}
        out.append({"id": call.get("id") or f"call_{i}", "function": {"index": i, "name": fn.get("name", ""),
                                                                     "arguments": args}})
    return out


def chat_body(name: str, c: Completion, total_ns: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    if c.reasoning:
        message["thinking"] = c.reasoning
    if c.tool_calls:
        message["tool_calls"] = tool_calls(c.tool_calls)
    return _final({"model": name, "created_at": timestamp(), "message": message}, c, total_ns)


def generate_body(name: str, c: Completion, total_ns: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "created_at": timestamp(), "response": c.text}
    if c.reasoning:
        out["thinking"] = c.reasoning
    return _final(out, c, total_ns)


def _final(out: dict[str, Any], c: Completion, total_ns: int) -> dict[str, Any]:
    out.update(done=True, done_reason=done_reason(c), **stats(c, total_ns), node=c.node, via=c.via)
    if c.logprobs is not None:
        out["logprobs"] = c.logprobs
    if c.notes:  # e.g. the tools dropped, max_tokens clamped: clients ignore it, people read it
        out["notes"] = c.notes
    return out


def loaded_body(name: str, chat: bool) -> dict[str, Any]:
    """The answer to a request with nothing to generate (Ollama: load the model)."""
    head: dict[str, Any] = {"model": name, "created_at": timestamp()}
    body = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return {**head, **body, "done": True, "done_reason": "load"}


class Chunks:
    """One answer streamed as NDJSON (``streams.drain`` runs the loop): a line per piece,
    then the ``done`` line with the counts; a failure ends it with an ``error`` line."""

    def __init__(self, name: str, chat: bool, t0_ns: int, clock: Callable[[], int],
                 on_done: Callable[[Completion], None] | None = None) -> None:
        self.chat, self.t0, self.clock, self.on_done = chat, t0_ns, clock, on_done
        self.name = name
        head = b'{"model":' + orjson.dumps(name) + b',"created_at":"'
        self._head = head
        self._mid = b'","message":{"role":"assistant","content":' if chat else b'","response":'
        self._tail = b'},"done":false}\n' if chat else b',"done":false}\n'
        self._stamps = Stamps()

    def start(self) -> bytes | None:
        return None

    def token(self, chunk: TokenChunk) -> bytes:
        if chunk.tool_calls:
            return self._line({"role": "assistant", "content": "", "tool_calls": tool_calls(chunk.tool_calls)})
        if chunk.reasoning:  # a thinking model's reasoning, apart from its answer
            if self.chat:
                return self._line({"role": "assistant", "content": "", "thinking": chunk.reasoning})
            return self._line("", thinking=chunk.reasoning)
        if chunk.logprobs:
            piece = {"role": "assistant", "content": chunk.text} if self.chat else chunk.text
            return self._line(piece, logprobs=chunk.logprobs)
        if not chunk.text:
            return b""
        return self._head + self._stamps.now() + self._mid + orjson.dumps(chunk.text) + self._tail

    def _line(self, piece: Any, **more: Any) -> bytes:
        key = "message" if self.chat else "response"
        return orjson.dumps({"model": self.name, "created_at": timestamp(), key: piece, "done": False, **more}) + b"\n"

    def done(self, c: Completion) -> bytes:
        c.text = ""  # streamed already: the done line carries the counts
        c.tool_calls = None  # sent in their own line
        c.logprobs = None
        c.reasoning = None
        if self.on_done is not None:
            self.on_done(c)  # e.g. a note that the tools were dropped
        body = chat_body(self.name, c, self.clock() - self.t0) if self.chat else \
            generate_body(self.name, c, self.clock() - self.t0)
        return orjson.dumps(body) + b"\n"

    def error(self, exc: TarsError | None) -> bytes:
        return error_json(exc or TarsError("internal error during generation; see the node's log")) + b"\n"


def ollama_error(exc: TarsError, node: str | None = None) -> dict[str, Any]:
    """Ollama's error shape: ``{"error": "<message>"}`` (api/error_shapes.py uses it for ``/api/*``)."""
    return {"error": exc.message}


def error_json(exc: TarsError) -> bytes:
    return orjson.dumps(ollama_error(exc))
