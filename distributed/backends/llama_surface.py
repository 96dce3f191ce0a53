"""The OpenAI chat parameters on the in-process engine (llama-cpp-python): grammars for
``response_format`` and forced tool calls, the chat template's tool support, tool-call
parsing, and the decode loop that reports logprobs.

- ``response_format`` json_object → llama-cpp-python's JSON grammar; json_schema → its
  JSON-schema-to-GBNF converter. The grammar is built and parsed by llama.cpp when the
  request is checked, so a schema it cannot take is a 400 with the reason, before the
  request is queued (a grammar that fails to parse inside the sampler would crash).
- Tools go through the GGUF's own chat template (``tools=`` is passed to it). A template
  that does not render the tools cannot do tools → 400 saying so. Of the templates that
  do, this engine reads the ``<tool_call>{json}</tool_call>`` call format (Hermes, Qwen
  2.5/3, SmolLM3 and others); another call format → 400 naming the server engine.
  ``tool_choice`` "required" or a named function forces the call by grammar; "auto"
  lets the model choose and reads the calls from its text; "none" keeps the text.
- logprobs: llama-cpp-python computes them only for a model created with
  ``logits_all=True`` (a vocabulary-sized row kept per context position: 2 GB for Gemma 3
  at 2048 tokens). ``LogprobDecoder`` reads the logits of the one position being sampled
  instead (log-softmax of the raw logits, as llama-server reports them by default) in its
  own loop over ``Llama.generate``, with the stop strings and UTF-8 boundaries handled as
  in ``create_completion``.
"""

from __future__ import annotations

import codecs
import json
import random
import re
import threading
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import sampling
from ..domain import GenerateRequest, TokenChunk
from ..errors import ToolsUnsupported, ValidationFailed

_PROBE_TOOL = "tars_probe_tool_7f3a"
_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


@dataclass
class Plan:
    """What one request needs from the engine, worked out once when it is checked."""

    grammar: str | None = None  # GBNF, already parsed once by llama.cpp
    tools: list[dict[str, Any]] | None = None  # passed to the chat template
    tool_choice: Any = None
    parse_calls: bool = False  # read <tool_call> blocks out of the answer


# --------------------------------------------------------------------------- samplers
# llama-cpp-python's own defaults, which are llama.cpp's (top_k 40, min_p 0.05, ...)
_SAMPLER_DEFAULTS = {"top_k": 40, "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.0}


def sampler_kwargs(req: GenerateRequest) -> dict[str, Any]:
    """The keywords of ``Llama.create_completion`` / ``Llama.generate`` for the request's
    sampler extras (``repeat_last_n`` is not one: see ``last_n``)."""
    out = dict(_SAMPLER_DEFAULTS)
    for name, value in (getattr(req, "sampling", None) or {}).items():
        keyword = sampling.INPROCESS.get(name)
        if keyword is not None and name != "repeat_last_n":
            out[keyword] = value
    return out


def last_n(req: GenerateRequest, default: int) -> int:
    """Tokens the repetition penalties look back over (llama-cpp-python reads it from the model)."""
    return int((getattr(req, "sampling", None) or {}).get("repeat_last_n", default))


# --------------------------------------------------------------------------- template inputs
def template_inputs(req: GenerateRequest) -> dict[str, Any]:
    """What llama-server hands its chat template for ``chat_template_kwargs`` and
    ``reasoning_effort`` ("none" → ``enable_thinking`` false, else the effort itself)."""
    out = dict(getattr(req, "chat_template_kwargs", None) or {})
    effort = getattr(req, "reasoning_effort", None)
    if effort == "none":
        out["enable_thinking"] = False
        out.pop("reasoning_effort", None)
    elif effort:
        out["reasoning_effort"] = effort
    return out


def check_template_inputs(req: GenerateRequest, formatter: Any, model: str) -> None:
    """Template inputs need a Jinja template to reach: a built-in chat format has none."""
    if template_source(formatter) is not None:
        return
    for name in ("reasoning_effort", "chat_template_kwargs"):
        if getattr(req, name, None):
            raise ValidationFailed(f"model '{model}' has a built-in chat format, not a Jinja chat template, on the "
                                   f"in-process engine: '{name}' has nothing to reach; leave it out", field=name)


# --------------------------------------------------------------------------- grammars
def _schema_grammar(llama_cpp: Any, schema: dict[str, Any], field: str) -> str:
    try:
        return str(llama_cpp.llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions for what it cannot take
        raise ValidationFailed(f"'{field}' cannot be turned into a grammar: {exc}", field=field) from None


def response_grammar(llama_cpp: Any, fmt: dict[str, Any] | None) -> str | None:
    if not fmt or fmt.get("type", "text") == "text":
        return None
    if fmt["type"] == "json_object":
        return str(llama_cpp.llama_grammar.JSON_GBNF)
    if fmt["type"] == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValidationFailed("'response_format.json_schema.schema' must be a JSON Schema object",
                                   field="response_format.json_schema.schema")
        return _schema_grammar(llama_cpp, schema, "response_format.json_schema.schema")
    raise ValidationFailed(f"response_format type '{fmt['type']}' is not supported", field="response_format.type")


def tool_call_grammar(llama_cpp: Any, tools: list[dict[str, Any]], choice: Any, parallel: bool) -> str:
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, once or repeated,
    for the named tool or any of them, arguments matching each tool's parameters."""
    funcs = [t["function"] for t in tools]
    if isinstance(choice, dict):
        funcs = [f for f in funcs if f["name"] == choice["function"]["name"]]
    options = [{"type": "object",
                "properties": {"name": {"const": f["name"]},
                               "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for f in funcs]
    schema = options[0] if len(options) == 1 else {"oneOf": options}
    body = _schema_grammar(llama_cpp, schema, "tools")
    body = re.sub(r"^root ::=", "tool-json ::=", body, count=1, flags=re.MULTILINE)
    call = r'"<tool_call>\n" tool-json "\n</tool_call>"'
    root = f"root ::= {call} (\"\\n\" {call})*" if parallel else f"root ::= {call}"
    return root + "\n" + body


def check_grammar(llama_cpp: Any, llm: Any, grammar: str, field: str) -> None:
    """Let llama.cpp parse the grammar now: a grammar that fails inside the sampler chain
    would take the process down, here it is a 400."""
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise ValidationFailed(f"'{field}' gives a grammar llama.cpp cannot parse (see the node's log for "
                               "the parser's message)", field=field)
    llama_cpp.llama_sampler_free(sampler)


# --------------------------------------------------------------------------- tools
def template_source(formatter: Any) -> str | None:
    """The Jinja source of a GGUF chat template formatter, else None (a built-in format)."""
    return getattr(formatter, "template", None) if hasattr(formatter, "_environment") else None


def tool_support(formatter: Any, model: str) -> None:
    """Raise ValidationFailed(field="tools") unless this template renders tools in the
    one call format this engine reads."""
    source = template_source(formatter)
    why = None
    if source is None:
        why = "its chat format is a built-in one without tools"
    else:
        probe = [{"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            rendered = formatter(messages=[{"role": "user", "content": "hi"}], tools=probe).prompt
        except Exception:  # noqa: BLE001 - a template that rejects the probe cannot do tools
            rendered = ""
        if _PROBE_TOOL not in rendered:
            why = "its chat template does not render tools"
        elif "<tool_call>" not in source:
            why = ("its chat template uses a tool-call format the in-process engine does not read "
                   "(it reads <tool_call>{json}</tool_call>); the server engine (TARS_CHAT_ENGINE=server) reads more")
    if why:
        raise ToolsUnsupported(f"model '{model}' cannot use tools on the in-process engine: {why}")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages for a Jinja chat template: tool-call arguments as objects (templates
    write them with ``tojson``), as transformers' templates expect."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass
                fixed.append({**c, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def parse_tool_calls(text: str, names: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """(content left, OpenAI tool_calls) from the model's text. A block that is not a JSON
    call of a known tool stays in the content."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = 0
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("name") not in names:
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args)}})
        kept.append(text[pos:m.start()])
        pos = m.end()
    kept.append(text[pos:])
    return "".join(kept).strip(), calls


def tool_answer(pieces: Iterator[tuple[str, Any] | str], plan: Plan) -> Iterator[TokenChunk]:
    """Tools in play: the answer is read whole, then its calls go out as one piece."""
    texts: list[str] = []
    entries: list[dict[str, Any]] = []
    count, finish = 0, "stop"
    for piece in pieces:
        if isinstance(piece, str):
            finish = piece
            break
        texts.append(piece[0])
        entries.extend(piece[1] or ())
        count += 1
    names = {t["function"]["name"] for t in plan.tools or ()}
    content, calls = parse_tool_calls("".join(texts), names)
    lp = entries or None
    if not calls:
        if content:
            yield TokenChunk(content, logprobs=lp)
        yield TokenChunk("", finish)
        return
    if content:
        yield TokenChunk(content, logprobs=lp)
        lp, count = None, count - 1
    yield TokenChunk("", "tool_calls", logprobs=lp, tool_calls=calls, tokens=max(count, 1))


# --------------------------------------------------------------------------- logprobs
class LogprobDecoder:
    """Decode with ``Llama.generate``, yielding (text, logprob entries) pieces and then
    the finish reason as a str."""

    def __init__(self, llama_cpp: Any, llm: Any, req: GenerateRequest, tokens: list[int], stop: list[str],
                 grammar: Any, cancel: threading.Event) -> None:
        self.lc, self.llm, self.req, self.tokens, self.stop = llama_cpp, llm, req, tokens, stop
        self.grammar, self.cancel = grammar, cancel
        self.k = max(0, int(req.top_logprobs))

    def _entry(self, token: int, prev: list[int]) -> dict[str, Any]:
        llm = self.llm
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).astype(np.float64)
        top = logits.max()
        logp = logits - top - np.log(np.exp(logits - top).sum())
        raw = llm.detokenize([token], prev_tokens=prev)
        entry: dict[str, Any] = {"token": raw.decode("utf-8", "replace"), "logprob": float(logp[token]),
                                 "bytes": list(raw), "top_logprobs": []}
        if self.k:
            idx = np.argpartition(-logp, self.k)[:self.k]
            for alt in idx[np.argsort(-logp[idx])]:
                b = llm.detokenize([int(alt)], prev_tokens=prev)
                entry["top_logprobs"].append({"token": b.decode("utf-8", "replace"),
                                              "logprob": float(logp[alt]), "bytes": list(b)})
        return entry

    def run(self) -> Generator[tuple[str, list[dict[str, Any]]] | str, None, None]:
        llm, req = self.llm, self.req
        llm.set_seed(req.seed if req.seed is not None else random.randint(0, 2**31))
        gen = llm.generate(self.tokens, top_p=req.top_p, temp=req.temperature, presence_penalty=req.presence_penalty,
                           frequency_penalty=req.frequency_penalty, grammar=self.grammar, **sampler_kwargs(req))
        vocab = llm._model.vocab
        n_ctx = llm.n_ctx()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        generated: list[int] = []
        held = ""  # decoded text not yet sent: it may be the start of a stop string
        sent = 0  # characters sent so far
        pending: list[tuple[int, dict[str, Any]]] = []  # (start offset, entry) not yet sent
        longest_stop = max((len(s) for s in self.stop), default=0)
        finish = "length"
        flushed = False
        try:
            for token in gen:
                if self.lc.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                entry = self._entry(token, self.tokens + generated)
                generated.append(token)
                pending.append((sent + len(held), entry))
                held += decoder.decode(bytes(entry["bytes"]))
                cut = min((i for i in (held.find(s) for s in self.stop if s) if i >= 0), default=-1)
                if cut >= 0:
                    text = held[:cut]
                    out = [e for start, e in pending if start < sent + cut]
                    if text:
                        yield text, out
                    finish, flushed = "stop", True
                    break
                keep = 0
                for n in range(min(len(held), longest_stop - 1), 0, -1):
                    if any(s.startswith(held[-n:]) for s in self.stop if s):
                        keep = n
                        break
                if len(held) > keep:
                    text, held = held[:len(held) - keep], held[len(held) - keep:]
                    limit = sent + len(text)
                    out = [e for start, e in pending if start < limit]
                    pending = [(start, e) for start, e in pending if start >= limit]
                    sent = limit
                    yield text, out
                if len(generated) >= req.max_tokens or len(self.tokens) + len(generated) >= n_ctx:
                    finish = "length"
                    break
                if self.cancel.is_set():
                    finish = "cancelled"
                    break
            else:
                finish = "stop"
            if not flushed:
                tail = held + decoder.decode(b"", final=True)
                if tail or pending:
                    yield tail, [e for _, e in pending]
        finally:
            gen.close()
        yield finish
