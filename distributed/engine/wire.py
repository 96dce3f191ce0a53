"""Our domain request/answers ⇄ llama-server's OpenAI-compatible JSON.

``payload(req, alias)`` → (path, body) for ``/v1/chat/completions`` (messages) or
``/v1/completions`` (prompt). The OpenAI parameters beyond the basic ones
(``presence_penalty``, ``frequency_penalty``, ``response_format``, ``tools``,
``tool_choice``, ``logprobs``, ``top_logprobs``, ``n``) are forwarded when the request
carries them, and so are llama.cpp's sampler extras (``req.sampling``, under
llama-server's own names: ``distributed/sampling.py``). llama-server does grammars / JSON
schema, tool calls through the GGUF's template (``--jinja``) and logprobs itself.
``answer(body)`` maps a whole answer, ``StreamState.feed(chunk)`` maps stream chunks,
``engine_error(...)`` maps a refusal to our exception tree (context too long → ``InputTooLong``; other 400s → ``ValidationFailed``
with the engine's reason).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..domain import Completion, GenerateRequest, TokenChunk
from ..errors import InputTooLong, ModelFailed, ModelLoading, Overloaded, TarsError, ValidationFailed

# Forwarded as-is when the request carries them at other than their defaults (the API
# surface validates them). ``n`` is not: the API fans n > 1 out into requests of n = 1.
OPTIONAL = ("presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
            "parallel_tool_calls", "logprobs", "top_logprobs", "reasoning_effort", "chat_template_kwargs")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerateRequest)}
_COMPLETION_FIELDS = {f.name for f in dataclasses.fields(Completion)}
_CHUNK_FIELDS = {f.name for f in dataclasses.fields(TokenChunk)}


def template_caps(caps: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
    """llama-server's ``chat_template_caps`` plus ``tool_call_start``: the text that opens a
    tool call when the template writes calls in the Hermes format (``<tool_call>\n{json}``),
    else None. ``payload`` prefills it for a forced call."""
    source = str(props.get("chat_template_tool_use") or props.get("chat_template") or "")
    hermes = "<tool_call>" in source and "<function=" not in source and "<arg_key>" not in source
    return {**caps, "tool_call_start": "<tool_call>\n" if hermes and caps.get("supports_tool_calls") else None}


def _forced_call(req: GenerateRequest, body: dict[str, Any], caps: dict[str, Any] | None) -> None:
    """``tool_choice`` "required" or a named tool on llama-server.

    llama-server takes no named ``tool_choice`` (it warns and uses "auto"): the named tool is
    sent alone, with "required". Its "required" grammar lets the model write free text before
    the call, and a small model may never get to it; where the template writes Hermes calls
    the answer is prefilled with the call's opening (llama-server continues a final
    assistant message), so the grammar holds it to a call of the tools from the first token
    and llama-server still parses it."""
    choice = req.tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        body["tools"] = [t for t in req.tools or () if (t.get("function") or {}).get("name") == name]
        body["tool_choice"] = "required"
    start = (caps or {}).get("tool_call_start")
    messages = req.messages or []
    if body.get("tool_choice") == "required" and start and messages and messages[-1].get("role") != "assistant":
        body["messages"] = [*messages, {"role": "assistant", "content": start}]


def payload(req: GenerateRequest, alias: str, caps: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(path, body) for llama-server; ``caps`` = ``template_caps(...)`` of its model, when known."""
    body: dict[str, Any] = {"model": alias, "max_tokens": req.max_tokens, "temperature": req.temperature,
                            "top_p": req.top_p, "stream": bool(req.stream)}
    if req.stop:
        body["stop"] = list(req.stop)
    if req.seed is not None:
        body["seed"] = req.seed
    for name in OPTIONAL:
        value = getattr(req, name, None)
        if value is not None and value != _DEFAULTS.get(name):
            body[name] = value
    sampling = getattr(req, "sampling", None)
    if sampling:  # llama-server's own names (distributed/sampling.py), validated on the way in
        body.update(sampling)
    if body.get("top_logprobs") and not body.get("logprobs"):
        body.pop("top_logprobs")
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if req.messages is not None:
        body["messages"] = req.messages
        if req.tools and req.tool_choice not in (None, "none", "auto"):
            _forced_call(req, body, caps)
        return "/v1/chat/completions", body
    body["prompt"] = req.prompt or ""
    if body.get("logprobs"):  # llama-server's /v1/completions takes logprobs as the number of alternatives
        body["logprobs"] = max(1, int(body.pop("top_logprobs", 0) or 0))
    return "/v1/completions", body


def _choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices") or []
    return choices[0] if choices else {}


def whole_calls(calls: list[dict[str, Any]], finish: str | None, one: bool = False) -> list[dict[str, Any]]:
    """The tool calls of an answer, less a last one that ``max_tokens`` cut off (its
    arguments are not whole JSON): a truncated call is not a call. ``one``
    (``parallel_tool_calls`` false): the first call only — llama-server's grammar for a
    template without a calls section repeats calls whatever that flag says."""
    if one:
        calls = calls[:1]
    if finish != "length" or not calls:
        return calls
    try:
        json.loads((calls[-1].get("function") or {}).get("arguments") or "")
    except ValueError:
        return calls[:-1]
    return calls


def _one_call(req: GenerateRequest | None) -> bool:
    return req is not None and getattr(req, "parallel_tool_calls", True) is False


def extras(choice: dict[str, Any], message: dict[str, Any], req: GenerateRequest | None = None) -> dict[str, Any]:
    """Fields the Completion may carry (tool calls, logprobs) when the domain has them."""
    out: dict[str, Any] = {}
    calls = whole_calls(message.get("tool_calls") or [], choice.get("finish_reason"), _one_call(req))
    if calls and "tool_calls" in _COMPLETION_FIELDS:
        out["tool_calls"] = calls
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else lp
    if content and "logprobs" in _COMPLETION_FIELDS:
        out["logprobs"] = content
    if message.get("reasoning_content") and "reasoning" in _COMPLETION_FIELDS:
        out["reasoning"] = message["reasoning_content"]  # llama-server's --reasoning-format (deepseek by default)
    return out


def answer(body: dict[str, Any], req: GenerateRequest | None = None,
           ) -> tuple[str, str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A whole (non-streamed) answer → (text, finish_reason, usage, timings, extras)."""
    choice = _choice(body)
    message = choice.get("message") or {}
    text = message.get("content") if "message" in choice else choice.get("text")
    return (text or "", choice.get("finish_reason") or "stop", body.get("usage") or {},
            body.get("timings") or {}, extras(choice, message, req))


class StreamState:
    """Folds the chunks of one stream: the text pieces go out as TokenChunks, tool-call
    deltas are joined, usage/timings/finish_reason are kept for the final Completion."""

    def __init__(self, req: GenerateRequest | None = None) -> None:
        self.one_call = _one_call(req)
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.tool_calls: list[dict[str, Any]] = []
        self.logprobs: list[Any] = []
        self.tool_pieces = 0  # stream chunks that carried tool-call deltas (~ tokens)

    def feed(self, chunk: dict[str, Any]) -> TokenChunk | None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("timings"):
            self.timings = chunk["timings"]
        choice = _choice(chunk)
        if not choice:
            return None
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        text = (delta.get("content") if delta is not None else choice.get("text")) or ""
        for call in (delta or {}).get("tool_calls") or []:
            self._add_call(call)
            self.tool_pieces += 1
        lp = choice.get("logprobs")
        content_lp = lp.get("content") if isinstance(lp, dict) else None
        if content_lp:
            self.logprobs.extend(content_lp)
        thought = (delta or {}).get("reasoning_content") if "reasoning" in _CHUNK_FIELDS else None
        if not text and not thought:
            return None
        piece = TokenChunk(text)
        if thought:  # llama-server's --reasoning-format (deepseek by default) keeps it apart from the answer
            piece.reasoning = thought  # type: ignore[attr-defined]
        if content_lp and "logprobs" in _CHUNK_FIELDS:
            piece.logprobs = content_lp  # type: ignore[attr-defined]
        return piece

    def _add_call(self, delta: dict[str, Any]) -> None:
        i = int(delta.get("index", len(self.tool_calls)))
        while len(self.tool_calls) <= i:
            self.tool_calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = self.tool_calls[i]
        if delta.get("id"):
            call["id"] = delta["id"]
        fn = delta.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            call["function"]["arguments"] += fn["arguments"]

    def tool_chunk(self) -> TokenChunk | None:
        """The piece that completes the tool calls (text ""), when the answer made any."""
        self.tool_calls = whole_calls(self.tool_calls, self.finish_reason, self.one_call)
        if not self.tool_calls:
            return None
        piece = TokenChunk("")
        if "tool_calls" in _CHUNK_FIELDS:
            piece.tool_calls = self.tool_calls  # type: ignore[attr-defined]
        if "tokens" in _CHUNK_FIELDS:
            piece.tokens = self.tool_pieces  # type: ignore[attr-defined]
        return piece

    def extras(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tool_calls and "tool_calls" in _COMPLETION_FIELDS:
            out["tool_calls"] = self.tool_calls
        if self.logprobs and "logprobs" in _COMPLETION_FIELDS:
            out["logprobs"] = self.logprobs
        return out


# 401/403/404: our own wiring to the engine is wrong (its key, a path), not the request
_WIRING = (401, 403, 404)
# 5xx the engine answers for a request it could not parse or render (llama-server's
# exception handler) or does not implement
_REFUSALS = (500, 501)


def _field_of(message: str) -> str | None:
    low = message.lower()
    for words, field in ((("grammar", "schema", "json"), "response_format"), (("tool",), "tools"),
                         (("logprob",), "logprobs"), (("n_probs",), "top_logprobs"),
                         (("message", "role", "content", "template", "alternate"), "messages")):
        if any(w in low for w in words):
            return field
    return None


def engine_error(status: int, body: Any, model: str, node: str, *, messages: bool) -> TarsError:
    """The engine refused a request: map its answer to our exception tree by status and type."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body)[:500]}
    msg = str(err.get("message") or "no reason given")
    if err.get("type") == "exceed_context_size_error" or "exceeds the available context" in msg:
        n_ctx = int(err.get("n_ctx") or 0)
        got = err.get("n_prompt_tokens")
        return InputTooLong(f"the prompt is {got} tokens but model '{model}' has a context of {n_ctx} tokens; "
                            f"shorten it to fewer than {n_ctx} tokens", limit=n_ctx, got=got,
                            field="messages" if messages else "prompt")
    if status == 503:
        return ModelLoading(f"model '{model}' is not ready on {node}: {msg}", model=model, node=node, retry_after=2)
    if status == 429:
        return Overloaded(f"model '{model}' is busy on {node}: {msg}", retry_after=2, model=model)
    if status in _REFUSALS or 400 <= status < 500 and status not in _WIRING:
        # the engine answered (it is alive) and would not do this request: the request is the
        # cause (llama-server answers 500 for a template that raises or JSON it cannot take,
        # 400 for the rest). A 400 to the client; the model stays ready.
        return ValidationFailed(f"model '{model}' refused the request: {msg}", field=_field_of(msg), model=model)
    return ModelFailed(f"the engine of model '{model}' on {node} failed the request (HTTP {status}): {msg}",
                       model=model, node=node)
