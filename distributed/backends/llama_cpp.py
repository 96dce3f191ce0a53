"""GGUF chat and completion through llama-cpp-python.

Why this module is thin on purpose: the decode loop, the stop-string handling and the
UTF-8-safe piece splitting are llama-cpp-python's own ``create_completion(stream=True)``.
The benchmark compares our whole HTTP stack against that very call in process, so the
backend adds one dataclass and one ``Event.is_set()`` per token and nothing else.

Chat requests are formatted *once* with llama-cpp-python's formatter for the configured
chat format (or the GGUF's own template), tokenized, and those exact tokens are both
counted (``prompt_tokens``) and generated from (``stream``) — counting and generation can
never disagree.

GPU offload: ``n_gpu_layers`` comes from the plan. It only has effect with a CUDA build of
llama-cpp-python, installed with ``CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python
--no-binary llama-cpp-python --force-reinstall``. A CPU-only build ignores the setting;
``load()`` detects that (``llama_supports_gpu_offload()``), logs a warning and records a
note, and the model runs on the CPU.

llama.cpp's own output: llama-cpp-python quiets a ``verbose=False`` model by pointing file
descriptors 1 and 2 at /dev/null around the model load (``suppress_stdout_stderr``). Those
are the *process's* stdout and stderr, so every other thread's output — the cluster's
"peer joined", uvicorn, a stack trace — vanished for as long as a model loaded, and two
overlapping loads could leave stderr pointing at /dev/null for good. We keep
``verbose=False`` (it also switches off llama-cpp-python's Python prints: system info, a
metadata dump per load, a line per request), make that helper redirect nothing, and route
llama.cpp's native log through ``llama_log_set`` into our logger instead (logger
``distributed.backends.llama_cpp.native``): errors at WARNING (a failed load says why
there), all else at DEBUG, so an info-level console stays quiet and a debug log level
shows everything.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Callable

from .. import sampling, templates
from ..cpus import physical_cores
from ..domain import GenerateRequest, TokenChunk
from ..errors import ConfigError, InputTooLong, ModelFailed, TarsError, ValidationFailed
from ..logs import fields, get_logger
from ..optional import require
from . import llama_surface as surface
from .base import ChatBackend

log = get_logger(__name__)

_PURPOSE = "GGUF chat models (llama_cpp backend)"


def _import_llama_cpp() -> Any:
    llama_cpp = require("llama_cpp", "llama-cpp-python", _PURPOSE)
    _route_native_output(llama_cpp)
    return llama_cpp


# --------------------------------------------------------------------------- native output
_native_log = get_logger(__name__ + ".native")
# ggml_log_level of the bundled llama.cpp: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 cont.
# (llama-cpp-python's own _logger.py still assumes the older order with error = 3, which
# is why its default callback printed warnings such as "using full-size SWA cache" raw
# even with verbose=False.) Warnings here are per-load notes about the model file.
_GGML_ERROR, _GGML_CONT = 4, 5
# Per OS thread: the level and the unfinished line of the message llama.cpp is writing.
_pending: dict[int, tuple[int, str]] = {}
_callback: list[Any] = []  # the ctypes callback; llama.cpp holds a raw pointer to it
_install_lock = threading.Lock()
# The modules that bound llama-cpp-python's fd-redirecting helper by name at import.
_REDIRECTING_MODULES = ("llama_cpp.llama", "llama_cpp._internals", "llama_cpp.llama_chat_format")


class _KeepStdStreams:
    """Takes the place of llama-cpp-python's ``suppress_stdout_stderr`` (same call
    shape) and redirects nothing: the output it hid now goes through ``_on_native_log``."""

    def __init__(self, disable: bool = True) -> None:
        self.disable = disable

    def __enter__(self) -> "_KeepStdStreams":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _emit(level: int, text: str) -> None:
    py_level = logging.WARNING if level == _GGML_ERROR else logging.DEBUG
    if not _native_log.isEnabledFor(py_level):
        return
    for line in text.splitlines():
        if line.strip(". "):  # a line of progress dots says nothing in a log
            _native_log.log(py_level, line.rstrip())


def _on_native_log(level: int, text: bytes | None, _user_data: Any) -> None:
    """llama.cpp's (and ggml's) log callback: one record per line. llama.cpp writes a
    line in pieces at times (CONT continues the previous message at its level), so a
    piece without a newline waits for the rest. Runs inside C: it must never raise."""
    try:
        tid = threading.get_ident()
        prev_level, buf = _pending.pop(tid, (level, ""))
        if level != _GGML_CONT:
            if buf:
                _emit(prev_level, buf)
            prev_level, buf = level, ""
        buf += (text or b"").decode("utf-8", "replace")
        if buf.endswith("\n"):
            _emit(prev_level, buf)
        elif buf:
            _pending[tid] = (prev_level, buf)
    except Exception:  # noqa: BLE001 - an exception cannot cross back into C
        pass


def _route_native_output(llama_cpp: Any) -> None:
    """Once per process: llama.cpp logs into ``_on_native_log``, and llama-cpp-python's
    ``suppress_stdout_stderr`` never again repoints fd 1 and 2 (see the module docstring)."""
    with _install_lock:
        if _callback:
            return
        callback = llama_cpp.llama_log_callback(_on_native_log)
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        _callback.append(callback)
        for name in _REDIRECTING_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "suppress_stdout_stderr"):
                setattr(module, "suppress_stdout_stderr", _KeepStdStreams)


def _formatter_of(handler: Callable[..., Any]) -> Callable[..., Any] | None:
    """The prompt formatter inside a llama-cpp-python chat handler.

    llama-cpp-python registers chat formats as *handlers* (format + generate), built by
    ``chat_formatter_to_chat_completion_handler(formatter)``; the formatter itself is
    only reachable as that closure's ``chat_formatter`` cell. We need the formatter alone
    so that we tokenize once and drive generation ourselves. Custom handlers (function
    calling, llava) have no such cell and are not usable for plain chat here.
    """
    code = getattr(handler, "__code__", None)
    cells = getattr(handler, "__closure__", None)
    if code is None or not cells:
        return None
    found = dict(zip(code.co_freevars, cells)).get("chat_formatter")
    return found.cell_contents if found is not None else None


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gemma has no system role: its official template prepends the system text to the
    first user turn. llama-cpp-python's "gemma" format drops system messages instead, so
    we fold them in first rather than lose the user's instructions."""
    system = "\n\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
    rest = [m for m in messages if m.get("role") != "system"]
    if not system:
        return rest
    for i, m in enumerate(rest):
        if m.get("role") == "user":
            rest[i] = {**m, "content": f"{system}\n\n{m.get('content') or ''}"}
            return rest
    return [{"role": "user", "content": system}, *rest]


class LlamaCppBackend(ChatBackend):
    """One GGUF model in one ``llama_cpp.Llama``. Not thread-safe: the node runs one
    generation at a time per instance (``prompt_tokens`` may run beside it: it only
    reads the vocabulary)."""

    name = "llama_cpp"
    features = frozenset({"penalties", "response_format", "tools", "logprobs", "template_inputs"})
    sampling_knobs = frozenset(sampling.INPROCESS)  # top_k, min_p, typical_p, repeat_*, mirostat*

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._llm: Any = None
        self._formatter: Callable[..., Any] | None = None
        self._chat_format: str = ""
        self._gpu_offload = False
        # (request, tokens, stops): prompt_tokens() then stream() of the same request
        # tokenizes once. Identity, not equality: we hold the request, so no id reuse.
        self._last: tuple[GenerateRequest, list[int], list[str]] | None = None
        self._plan: tuple[GenerateRequest, surface.Plan] | None = None  # check_request() then stream()

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        llama_cpp = _import_llama_cpp()
        if self.model_path is None:
            raise ModelFailed(f"model '{self.spec.id}': no GGUF file given to the llama_cpp backend")
        path = Path(self.model_path)
        if not path.is_file():
            raise ModelFailed(f"model '{self.spec.id}': GGUF file not found: {path}", path=str(path))
        n_gpu_layers = int(self.assignment.n_gpu_layers)
        self._gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        if n_gpu_layers != 0 and not self._gpu_offload:
            note = (f"n_gpu_layers={n_gpu_layers} requested but this llama-cpp-python build has no GPU "
                    "offload; running on CPU (reinstall with CMAKE_ARGS=-DGGML_CUDA=on)")
            self.notes.append(note)
            log.warning(note, extra=fields(model=self.spec.id))
        context = int(self.options.context)
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=context,
                n_batch=min(512, context),
                n_gpu_layers=n_gpu_layers,
                n_threads=self.threads,
                chat_format=self.spec.chat_format,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelFailed(f"model '{self.spec.id}' failed to load from {path}: {exc}", path=str(path)) from exc
        self._bind_formatter(llama_cpp)
        log.info("loaded GGUF", extra=fields(model=self.spec.id, n_ctx=context, n_gpu_layers=n_gpu_layers,
                                             threads=self.threads, gpu_offload=self._gpu_offload,
                                             chat_format=self._chat_format))

    @property
    def threads(self) -> int:
        """CPU threads: the setting (TARS_THREADS), else llama.cpp's own default — the
        physical cores this process may use (``cpus.physical_cores``), not
        llama-cpp-python's ``cpu_count() // 2``, which on a VM with one thread per core
        leaves half the cores idle (on the 2-core dev VM the node decoded at 0.71× of
        llama.cpp's own default; docs/BENCHMARKS.md has the figures). On a machine shared with
        other busy processes, a lower TARS_THREADS can be steadier: llama.cpp's threads
        wait for each other at every layer, so one preempted thread stalls them all."""
        return self.options.threads or physical_cores()

    def _bind_formatter(self, llama_cpp: Any) -> None:
        """Find the prompt formatter for the chat format the Llama settled on (the one we
        asked for, else the GGUF's template, else llama-cpp-python's fallback)."""
        # a Jinja chat template in place of the GGUF's: backend_extra "chat_template", else the catalog's
        template = self.options.extra.get("chat_template") or templates.source_for(self.spec)
        if template:
            model, llm = self._llm._model, self._llm
            eos, bos = llm.token_eos(), llm.token_bos()
            self._formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
                template=str(template), eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "", stop_token_ids=[eos])
            self._chat_format = "chat_template.override"
            return
        chat_format = self._llm.chat_format or ""
        handler = self._llm._chat_handlers.get(chat_format)
        if handler is None:
            try:
                handler = llama_cpp.llama_chat_format.get_chat_completion_handler(chat_format)
            except Exception as exc:  # LlamaChatCompletionHandlerNotFoundException lists valid names
                self.unload()
                raise ConfigError(f"model '{self.spec.id}': unknown chat_format '{chat_format}': {exc}") from exc
        formatter = _formatter_of(handler)
        if formatter is None:
            self.unload()
            raise ConfigError(f"model '{self.spec.id}': chat_format '{chat_format}' is a custom llama-cpp-python "
                              "handler without a plain prompt formatter; pick a template format such as "
                              "'gemma', 'chatml' or 'llama-3'")
        self._formatter = formatter
        self._chat_format = chat_format

    def warmup(self) -> None:
        # two greedy tokens, as hf8bit.py's warm-up: alike by design (`duplicates` pairs them); not a
        # ChatBackend default, because the fake engine must not generate at load
        for _ in self.stream(GenerateRequest(prompt="Hello", max_tokens=2, temperature=0.0), threading.Event()):
            pass

    def unload(self) -> None:
        llm, self._llm = self._llm, None
        self._last = None
        if llm is not None and hasattr(llm, "close"):
            llm.close()

    def memory_mb(self) -> dict[str, float]:
        """Weights only, split by the offloaded share of the layers (the KV cache and the
        compute buffers come on top). Layers a CPU-only build was asked to offload stay in RAM."""
        llm = self._llm
        if llm is None or self.model_path is None:
            return {"vram_mb": 0.0, "ram_mb": 0.0}
        size_mb = os.path.getsize(self.model_path) / 2**20
        frac = 0.0
        wanted = int(self.assignment.n_gpu_layers)
        if self._gpu_offload and wanted != 0:
            arch = llm.metadata.get("general.architecture", "")
            n_layers = int(llm.metadata.get(f"{arch}.block_count", 0) or 0)
            frac = 1.0 if wanted < 0 or n_layers <= 0 else min(1.0, wanted / n_layers)
        return {"vram_mb": round(size_mb * frac, 1), "ram_mb": round(size_mb * (1 - frac), 1)}

    # ------------------------------------------------------------------ requests
    @property
    def context_length(self) -> int:
        return int(self._require_llm().n_ctx())

    def format_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    tool_choice: Any = None, inputs: dict[str, Any] | None = None) -> tuple[str, list[str], bool]:
        """Prompt text, the format's own stop strings, and whether the text already
        carries its special tokens (then no BOS is added). ``tools`` and ``inputs``
        (``surface.template_inputs``) go to the template."""
        if self._formatter is None:
            raise ModelFailed(f"model '{self.spec.id}' is not loaded")
        msgs = _fold_system(messages) if self._chat_format == "gemma" else messages
        extra: dict[str, Any] = dict(inputs or {})
        if tools:
            msgs = surface.template_messages(msgs)
            extra.update(tools=tools, tool_choice=tool_choice)
        try:
            result = self._formatter(messages=msgs, **extra)
        except Exception as exc:  # a jinja template may reject roles or orderings
            raise ValidationFailed(f"messages do not fit the '{self._chat_format}' chat template: {exc}",
                                   field="messages") from exc
        stop = result.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return result.prompt, stops, bool(result.added_special)

    def _encode(self, req: GenerateRequest) -> tuple[list[int], list[str]]:
        last = self._last
        if last is not None and last[0] is req:
            return last[1], last[2]
        llm = self._require_llm()
        if req.messages is not None:
            plan = self._plan_for(req)
            text, stops, added_special = self.format_chat(req.messages, plan.tools, plan.tool_choice,
                                                          surface.template_inputs(req))
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=not added_special, special=True)
        else:
            stops = []
            tokens = llm.tokenize((req.prompt or "").encode("utf-8"), add_bos=True, special=True)
        self._last = (req, tokens, stops)
        return tokens, stops

    def prompt_tokens(self, req: GenerateRequest) -> int:
        return len(self._encode(req)[0])

    def check_request(self, req: GenerateRequest) -> None:
        super().check_request(req)
        self._plan_for(req)

    def _plan_for(self, req: GenerateRequest) -> surface.Plan:
        """Grammar and tools of one request (llama_surface); a 400 for what cannot be done."""
        last = self._plan
        if last is not None and last[0] is req:
            return last[1]
        llama_cpp, llm = _import_llama_cpp(), self._require_llm()
        plan = surface.Plan()
        surface.check_template_inputs(req, self._formatter, self.spec.id)
        use_tools = bool(req.tools)
        if use_tools and req.messages is None:
            raise ValidationFailed("'tools' needs chat messages", field="tools")
        if use_tools:
            surface.tool_support(self._formatter, self.spec.id)
            plan.tools, plan.tool_choice = req.tools, req.tool_choice or "auto"
            forced = plan.tool_choice == "required" or isinstance(plan.tool_choice, dict)
            plan.parse_calls = plan.tool_choice != "none"
            if plan.parse_calls and req.response_format and req.response_format.get("type", "text") != "text":
                raise ValidationFailed("'response_format' together with 'tools' is not supported on the "
                                       "in-process engine (send one or the other)", field="response_format")
            if forced:
                plan.grammar = surface.tool_call_grammar(llama_cpp, req.tools or [], plan.tool_choice,
                                                         req.parallel_tool_calls)
                surface.check_grammar(llama_cpp, llm, plan.grammar, "tools")
        if plan.grammar is None:
            plan.grammar = surface.response_grammar(llama_cpp, req.response_format)
            if plan.grammar is not None:
                surface.check_grammar(llama_cpp, llm, plan.grammar, "response_format")
        self._plan = (req, plan)
        return plan

    def stream(self, req: GenerateRequest, cancel: threading.Event) -> Iterator[TokenChunk]:
        llm = self._require_llm()
        tokens, format_stops = self._encode(req)
        if self._last is not None and self._last[0] is req:
            self._last = None
        n_ctx = llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise InputTooLong(f"prompt is {len(tokens)} tokens; the context of '{self.spec.id}' is {n_ctx}",
                               limit=n_ctx, got=len(tokens))
        if cancel.is_set():
            yield TokenChunk("", "cancelled")
            return
        if req.seed is not None:
            # Reusing the KV cache of a shared prompt prefix evaluates the prompt in other
            # batch shapes, which moves the logits slightly (measured: up to 1.0 on Gemma 3
            # 270M Q4_K_M) and can change the sampled text. A seed asks for reproducible
            # output, so those requests evaluate their whole prompt afresh.
            llm.reset()
        stop = [s for s in (*req.stop, *format_stops) if s]
        plan = self._plan_for(req)
        if self._plan is not None and self._plan[0] is req:
            self._plan = None
        llama_cpp = _import_llama_cpp()
        grammar = llama_cpp.LlamaGrammar.from_string(plan.grammar, verbose=False) if plan.grammar else None
        # repeat_last_n: llama-cpp-python reads it from the model when it builds the sampler
        # (one generation at a time per model, so setting it per request is safe)
        default_last_n = llm.last_n_tokens_size
        llm.last_n_tokens_size = surface.last_n(req, default_last_n)
        if req.logprobs:
            pieces = surface.LogprobDecoder(llama_cpp, llm, req, tokens, stop, grammar, cancel).run()
        else:
            pieces = self._pieces(llm, tokens, req, stop, grammar, cancel)
        try:
            if plan.parse_calls:
                yield from surface.tool_answer(pieces, plan)
                return
            for piece in pieces:
                if isinstance(piece, str):
                    yield TokenChunk("", piece)
                    return
                text, entries = piece
                if text or entries:
                    yield TokenChunk(text, logprobs=entries or None, tokens=len(entries) if entries else None)
        except (ValueError, RuntimeError) as exc:  # llama_decode failures, sampler errors
            raise TarsError(f"generation failed in llama.cpp for '{self.spec.id}': {exc}") from exc
        finally:
            pieces.close()
            llm.last_n_tokens_size = default_last_n

    def _pieces(self, llm: Any, tokens: list[int], req: GenerateRequest, stop: list[str], grammar: Any,
                cancel: threading.Event) -> Generator[tuple[str, Any] | str, None, None]:
        """(text, None) per piece from llama-cpp-python's own decode loop, then the finish reason."""
        # A generator: nothing runs until the first next(), which evaluates the prompt.
        chunks = llm.create_completion(prompt=tokens, max_tokens=req.max_tokens, temperature=req.temperature,
                                       top_p=req.top_p, stop=stop, seed=req.seed, stream=True, grammar=grammar,
                                       presence_penalty=req.presence_penalty,
                                       frequency_penalty=req.frequency_penalty, **surface.sampler_kwargs(req))
        finish: str | None = None
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                text = choice["text"]
                finish = choice["finish_reason"]
                if text:
                    yield text, None
                if finish is not None:
                    break
                if cancel.is_set():
                    finish = "cancelled"
                    break
        finally:
            chunks.close()
        yield finish or "stop"

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise ModelFailed(f"model '{self.spec.id}' is not loaded")
        return self._llm
