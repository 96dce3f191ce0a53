"""Deterministic fake backends shipped in the package.

They drive the API and node tests through the *real* code paths (queue, batcher,
targets, routes) in milliseconds, without a model on disk. Output depends only on
the input (a BLAKE2 hash), so tests can compare answers across calls and hosts.

Knobs, read from ``options.extra`` at every call (tests may change them live):

- ``token_delay_s``   seconds slept per generated token (default 0)
- ``reply_tokens``    natural reply length before "stop" (default: 8..23, from the hash)
- ``load_delay_s``    seconds ``load()`` takes (default 0)
- ``load_event``      a ``threading.Event`` that ``load()`` waits for (tests hold loading)
- ``fail_models``     model ids whose ``load()`` raises ``ModelFailed``
- ``batch_delay_s``   seconds one embedding batch takes (default 0)

Tokens are whitespace-separated words, so counts are easy to reason about. The fake engine
honours none of the optional request parameters (penalties, response formats, tools,
logprobs, llama.cpp's sampler extras, template inputs): ``ChatBackend.check_request``
refuses each by name, as a real engine refuses what it cannot do.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..domain import GenerateRequest, TokenChunk
from ..errors import ModelFailed
from .base import ChatBackend, EmbedBackend

_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
          "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def _digest(*parts: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return h.digest()


def render_messages(messages: list[dict[str, Any]]) -> str:
    """The fake 'chat template': one ``role: content`` line per message."""
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


class _FakeBase:
    """What both fakes share: the knobs, and load/unload (``loaded`` says which ran last)."""

    options: Any
    spec: Any
    loaded = False

    def load(self) -> None:
        self._fake_load()
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def _extra(self, key: str, default: Any = None) -> Any:
        return self.options.extra.get(key, default)

    def _fake_load(self) -> None:
        if self.spec.id in (self._extra("fail_models") or ()):
            raise ModelFailed(f"fake load failure for '{self.spec.id}' (fail_models)")
        event = self._extra("load_event")
        if event is not None:
            event.wait()
        delay = float(self._extra("load_delay_s", 0) or 0)
        if delay:
            time.sleep(delay)


class FakeChatBackend(_FakeBase, ChatBackend):
    """Generates words from a fixed vocabulary, chosen by hashing prompt, seed and position."""

    name = "fake"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_produced = 0  # total, across requests (tests watch it)
        self.active = 0  # generations running right now
        self.max_active = 0  # most that ever ran at once (must stay 1)
        self.cancelled = 0  # streams that stopped on the cancel event
        self._guard = threading.Lock()

    @property
    def context_length(self) -> int:
        return int(self.options.context)

    def _prompt_text(self, req: GenerateRequest) -> str:
        return render_messages(req.messages) if req.messages else (req.prompt or "")

    def prompt_tokens(self, req: GenerateRequest) -> int:
        return len(self._prompt_text(req).split())

    def stream(self, req: GenerateRequest, cancel: threading.Event) -> Iterator[TokenChunk]:
        with self._guard:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from self._generate(req, cancel)
        finally:
            with self._guard:
                self.active -= 1

    def _generate(self, req: GenerateRequest, cancel: threading.Event) -> Iterator[TokenChunk]:
        prompt = self._prompt_text(req)
        seed = _digest(prompt, req.seed)
        natural = self._extra("reply_tokens")
        natural = int(natural) if natural is not None else 8 + seed[0] % 16
        delay = float(self._extra("token_delay_s", 0) or 0)
        text = ""
        for i in range(min(natural, req.max_tokens)):
            if cancel.is_set():
                self.cancelled += 1
                yield TokenChunk("", "cancelled")
                return
            if delay:
                time.sleep(delay)
            word = _WORDS[_digest(seed, i)[0] % len(_WORDS)]
            piece = word if i == 0 else " " + word
            text += piece
            self.tokens_produced += 1
            hit = next((s for s in req.stop if s and s in text), None)
            if hit is not None:
                yield TokenChunk(piece, "stop")
                return
            yield TokenChunk(piece)
        yield TokenChunk("", "stop" if natural <= req.max_tokens else "length")


class FakeEmbedBackend(_FakeBase, EmbedBackend):
    """A unit vector per text, drawn from a generator seeded by the text's hash."""

    name = "fake_embed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []  # size of every encode call (the micro-batcher test reads it)

    @property
    def dim(self) -> int:
        return int(self.spec.dim or 384)

    def embed(self, texts: list[str], normalize: bool = True) -> Any:
        self.batches.append(len(texts))
        delay = float(self._extra("batch_delay_s", 0) or 0)
        if delay:
            time.sleep(delay)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            rng = np.random.default_rng(int.from_bytes(_digest(t)[:8], "little"))
            out[i] = rng.standard_normal(self.dim, dtype=np.float32)
        if normalize:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out
