"""Small causal LMs in 8-bit (LLM.int8) through transformers + bitsandbytes.

The point of this backend is VRAM: a 1-3B model at int8 fits beside the embedding model
on the 6 GB card. Linear layers are stored as int8 (``bnb.nn.Linear8bitLt``); the rest
(embeddings, norms, head) stays in fp16, the usual LLM.int8 layout — fp16 also keeps
bitsandbytes from casting every activation on each matmul.

bitsandbytes >= 0.45 runs the int8 kernels on the CPU too, so the same code path is
tested here without a GPU. If 8-bit loading fails the model fails to load with the
reason; it never silently comes up in another precision the plan did not budget for.

Generation runs ``model.generate`` in a helper thread feeding a ``TextIteratorStreamer``;
a ``StoppingCriteria`` reads ``cancel`` (and our own halt flag, set when a stop string
appears or the consumer goes away) before every new token, so a cancelled request stops
within one token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..domain import GenerateRequest, TokenChunk
from ..errors import InputTooLong, ModelFailed, TarsError, ValidationFailed
from ..logs import fields, get_logger
from ..optional import require
from .base import ChatBackend
from .devices import apply_cuda_tuning, pick_device

log = get_logger(__name__)

_PURPOSE = "8-bit transformers models (hf8bit backend)"
_MIN_BNB_CPU = (0, 45)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _import_bnb() -> Any:
    """bitsandbytes warns at import, on CPUs with AVX512-BF16, that its optional *4-bit*
    hub kernel is absent; we only use 8-bit, so that warning is noise in a node's log."""
    quiet = logging.getLogger("bitsandbytes")
    before = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return require("bitsandbytes", purpose=_PURPOSE)
    finally:
        quiet.setLevel(before)


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that could
    still grow into one (so a stop string is never half-sent to the client)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was hit."""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class HF8BitBackend(ChatBackend):
    name = "hf8bit"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._torch: Any = None
        self._tf: Any = None
        self._model: Any = None
        self._tok: Any = None
        self._device = "cpu"
        self._context = 0
        self._eos: set[int] = set()
        self._last: tuple[GenerateRequest, list[int]] | None = None

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        torch = require("torch", purpose=_PURPOSE)
        tf = require("transformers", purpose=_PURPOSE)
        require("accelerate", purpose=_PURPOSE)  # device_map placement
        bnb = _import_bnb()
        if self.model_path is None:
            raise ModelFailed(f"model '{self.spec.id}': no model folder given to the hf8bit backend")
        source = str(self.model_path)
        if not Path(source).exists():
            raise ModelFailed(f"model '{self.spec.id}': folder not found: {source}", path=source)
        self._device = pick_device(torch, self.assignment.device, self.spec.id, self.notes, log)
        apply_cuda_tuning(torch, self._device, self.options.extra)
        if self._device == "cpu" and _version_tuple(bnb.__version__) < _MIN_BNB_CPU:
            raise ModelFailed(f"model '{self.spec.id}': 8-bit on the CPU needs bitsandbytes >= 0.45 "
                              f"(installed {bnb.__version__}): pip install -U 'bitsandbytes>=0.45'")
        # transformers >= 4.56 calls it ``dtype``; older releases ``torch_dtype``
        dtype_kw = "dtype" if _version_tuple(tf.__version__) >= (4, 56) else "torch_dtype"
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(
                source, quantization_config=tf.BitsAndBytesConfig(load_in_8bit=True),
                device_map={"": self._device}, local_files_only=True, **{dtype_kw: torch.float16})
            tok = tf.AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            raise ModelFailed(f"model '{self.spec.id}' failed to load in 8-bit from {source}: {exc}",
                              path=source) from exc
        model.eval()
        n_int8 = sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt))
        if n_int8 == 0:
            note = "no Linear layer was quantized to int8 (architecture not supported by bitsandbytes?)"
            self.notes.append(note)
            log.warning(note, extra=fields(model=self.spec.id))
        self._torch, self._tf, self._model, self._tok = torch, tf, model, tok
        native = getattr(model.config, "max_position_embeddings", None) or self.options.context
        self._context = int(min(self.options.context, native))
        self._eos = self._eos_ids(model, tok)
        log.info("loaded 8-bit model", extra=fields(model=self.spec.id, device=self._device, int8_linears=n_int8,
                                                   context=self._context))

    @staticmethod
    def _eos_ids(model: Any, tok: Any) -> set[int]:
        ids: set[int] = set()
        for v in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
            if isinstance(v, int):
                ids.add(v)
            elif v:
                ids.update(int(x) for x in v)
        return ids

    def warmup(self) -> None:
        # two greedy tokens, as llama_cpp.py's warm-up: alike by design (`duplicates` pairs them); not a
        # ChatBackend default, because the fake engine must not generate at load
        for _ in self.stream(GenerateRequest(prompt="Hello", max_tokens=2, temperature=0.0), threading.Event()):
            pass

    def unload(self) -> None:
        model, self._model = self._model, None
        self._tok = None
        self._last = None
        if model is not None:
            del model
            if self._device.startswith("cuda"):
                self._torch.cuda.empty_cache()

    def memory_mb(self) -> dict[str, float]:
        if self._model is None:
            return {"vram_mb": 0.0, "ram_mb": 0.0}
        mb = round(self._model.get_memory_footprint() / 2**20, 1)
        return {"vram_mb": mb, "ram_mb": 0.0} if self._device.startswith("cuda") else {"vram_mb": 0.0, "ram_mb": mb}

    # ------------------------------------------------------------------ requests
    @property
    def context_length(self) -> int:
        self._require_model()
        return self._context

    def format_chat(self, messages: list[dict[str, Any]]) -> tuple[str, bool]:
        """Prompt text, and whether it already holds the special tokens (BOS...).
        The tokenizer's own chat template when it has one, else "role: content" lines."""
        tok = self._require_model()[1]
        if getattr(tok, "chat_template", None):
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja templates may reject roles or orderings
                raise ValidationFailed(f"messages do not fit the model's chat template: {exc}",
                                       field="messages") from exc
            return str(text), True
        lines = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages]
        return "\n".join([*lines, "assistant:"]), False

    def _encode(self, req: GenerateRequest) -> list[int]:
        last = self._last
        if last is not None and last[0] is req:
            return last[1]
        tok = self._require_model()[1]
        if req.messages is not None:
            text, has_special = self.format_chat(req.messages)
            ids = tok(text, add_special_tokens=not has_special)["input_ids"]
        else:
            ids = tok(req.prompt or "", add_special_tokens=True)["input_ids"]
        ids = list(ids)
        self._last = (req, ids)
        return ids

    def prompt_tokens(self, req: GenerateRequest) -> int:
        return len(self._encode(req))

    def stream(self, req: GenerateRequest, cancel: threading.Event) -> Iterator[TokenChunk]:
        model, tok = self._require_model()
        ids = self._checked_ids(req)
        if cancel.is_set():
            yield TokenChunk("", "cancelled")
            return
        max_new = max(1, min(req.max_tokens, self._context - len(ids)))
        halt = threading.Event()
        streamer = self._tf.TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(req, ids, max_new, streamer, cancel, halt)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["ids"] = model.generate(**kwargs)
            except BaseException as exc:  # handed to the consumer thread below
                result["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, name=f"hf8bit-{self.spec.id}", daemon=True)
        worker.start()
        matcher = StopMatcher(list(req.stop))
        hit_stop = False
        try:
            for piece in streamer:
                text, hit_stop = matcher.feed(piece)
                if text:
                    yield TokenChunk(text)
                if hit_stop or cancel.is_set():
                    break
        finally:
            halt.set()
            worker.join()
        if "error" in result:
            raise TarsError(f"generation failed for '{self.spec.id}': {result['error']}") from result["error"]
        finish = "stop" if hit_stop else self._finish_reason(result["ids"], len(ids), max_new, cancel)
        if finish != "cancelled" and not hit_stop:
            tail = matcher.flush()
            if tail:
                yield TokenChunk(tail)
        yield TokenChunk("", finish)

    def _checked_ids(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids (reusing the count ``prompt_tokens`` just made), checked
        against the context."""
        ids = self._encode(req)
        if self._last is not None and self._last[0] is req:
            self._last = None
        if len(ids) >= self._context:
            raise InputTooLong(f"prompt is {len(ids)} tokens; the context of '{self.spec.id}' is {self._context}",
                               limit=self._context, got=len(ids))
        if not ids:
            raise ValidationFailed("the prompt encodes to no tokens", field="prompt")
        return ids

    def _generate_kwargs(self, req: GenerateRequest, ids: list[int], max_new: int, streamer: Any,
                         cancel: threading.Event, halt: threading.Event) -> dict[str, Any]:
        """``model.generate`` arguments: greedy or sampled, seeded, with a stopping
        criterion that ends generation before the next token once ``cancel`` or ``halt`` is set."""
        torch, tf = self._torch, self._tf
        criterion: Any = tf.StoppingCriteria  # transformers' base class, imported lazily

        class _Control(criterion):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = cancel.is_set() or halt.is_set()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        tok = self._require_model()[1]
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        sampling: dict[str, Any] = {"do_sample": False}
        if req.temperature > 0:
            sampling = {"do_sample": True, "temperature": float(req.temperature), "top_p": float(req.top_p),
                        "top_k": 0}
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self._eos), None)
        if req.seed is not None:
            torch.manual_seed(int(req.seed))
        return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new,
                    streamer=streamer, stopping_criteria=tf.StoppingCriteriaList([_Control()]),
                    pad_token_id=pad, **sampling)

    def _finish_reason(self, out: Any, prompt_len: int, max_new: int, cancel: threading.Event) -> str:
        """Why generation ended, from its output ids: an end-of-sequence token, the token
        limit, a cancel, else a stop."""
        new = int(out.shape[-1]) - prompt_len
        last = int(out[0, -1]) if new > 0 else -1
        if last in self._eos:
            return "stop"
        if new >= max_new:
            return "length"
        return "cancelled" if cancel.is_set() else "stop"

    def _require_model(self) -> tuple[Any, Any]:
        if self._model is None or self._tok is None:
            raise ModelFailed(f"model '{self.spec.id}' is not loaded")
        return self._model, self._tok
