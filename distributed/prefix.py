"""Prompt-prefix fingerprints: which earlier prompt a request starts with, and where it went.

An engine keeps the state of the prompts it computed (llama-server: each slot's KV cache).
A request that starts as an earlier one did — the next turn of a conversation, the same long
system prompt — skips the prefill of that start if it runs where the earlier one ran. This
module owns that concept for both levels that route by it:

* ``Prefix.of(req)`` — cumulative fingerprints over a ``GenerateRequest``'s leading parts:
  for ``messages``, a head (the model, its tools and template options: they render before
  the messages) and then each message in order; for a raw ``prompt``, fixed blocks of
  ``BLOCK_CHARS`` characters. Fingerprint ``i`` covers parts ``0..i``, so two requests share
  their first ``k`` fingerprints exactly when they share their first ``k`` parts. Hashing is
  stdlib blake2b (16 bytes), linear in the request's size; at most ``MAX_PARTS`` parts count.
* ``PrefixIndex`` — a bounded LRU map fingerprint → owner (a replica's host) answering "the
  owner holding the longest prefix of this request" (``ReplicaSet``, targets/replicas.py).
* ``SlotPins`` — which llama-server slot (``id_slot``) a request gets among the free ones:
  the slot whose last prompt shares the longest prefix, else the least recently used
  (``EngineTarget``, engine/target.py).

A prefix shorter than ``MIN_MATCH_CHARS`` counts as no match: its prefill costs nothing worth
skewing the load for (a short shared system prompt would otherwise send every new
conversation to one replica).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .domain import GenerateRequest

BLOCK_CHARS = 512  # a raw prompt's parts
MAX_PARTS = 256  # parts fingerprinted at most (a longer request matches on its first ones)
MIN_MATCH_CHARS = 256  # ~60 tokens: a shorter shared prefix is not worth routing for
INDEX_SIZE = 8192  # fingerprints a PrefixIndex remembers (LRU)


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


@dataclass(frozen=True)
class Prefix:
    """A request's cumulative fingerprints and, for each, the characters it covers."""

    keys: tuple[bytes, ...] = ()
    chars: tuple[int, ...] = ()

    @classmethod
    def of(cls, req: GenerateRequest) -> Prefix:
        """The fingerprints of a ``GenerateRequest`` (see the module doc)."""
        if req.messages is not None:
            head = {"model": req.model, "tools": req.tools, "kwargs": req.chat_template_kwargs,
                    "effort": req.reasoning_effort}
            parts = [_canonical(head)] + [_canonical(m) for m in req.messages[:MAX_PARTS - 1]]
        else:
            text = (req.prompt or "").encode("utf-8", "surrogatepass")
            parts = [_canonical({"model": req.model})]
            parts += [text[i:i + BLOCK_CHARS] for i in range(0, min(len(text), BLOCK_CHARS * (MAX_PARTS - 1)),
                                                              BLOCK_CHARS)]
        return cls.from_parts(parts)

    @classmethod
    def from_parts(cls, parts: list[bytes]) -> Prefix:
        h = hashlib.blake2b(digest_size=16)
        keys: list[bytes] = []
        chars: list[int] = []
        total = 0
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))  # part boundaries count: ("ab","c") != ("a","bc")
            h.update(part)
            total += len(part)
            keys.append(h.digest())
            chars.append(total)
        return cls(tuple(keys), tuple(chars))

    def common(self, other: Prefix) -> int:
        """Characters of the longest prefix the two share (0 below ``MIN_MATCH_CHARS``)."""
        n = 0
        for a, b in zip(self.keys, other.keys):
            if a != b:
                break
            n += 1
        covered = self.chars[n - 1] if n else 0
        return covered if covered >= MIN_MATCH_CHARS else 0


class PrefixIndex:
    """Fingerprint → owner, the ``size`` most recently recorded (LRU)."""

    def __init__(self, size: int = INDEX_SIZE) -> None:
        self.size = max(1, size)
        self._owners: collections.OrderedDict[bytes, str] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def record(self, prefix: Prefix, owner: str) -> None:
        """``owner`` now holds every prefix of ``prefix`` (the newest record wins)."""
        for key in prefix.keys:
            self._owners[key] = owner
            self._owners.move_to_end(key)
        while len(self._owners) > self.size:
            self._owners.popitem(last=False)

    def longest(self, prefix: Prefix, usable: Callable[[str], bool] = lambda _o: True) -> tuple[str, int] | None:
        """(owner, characters matched) of the longest recorded prefix of ``prefix`` whose
        owner is ``usable``; None when none reaches ``MIN_MATCH_CHARS``."""
        for i in range(len(prefix.keys) - 1, -1, -1):
            if prefix.chars[i] < MIN_MATCH_CHARS:
                return None
            owner = self._owners.get(prefix.keys[i])
            if owner is not None and usable(owner):
                self._owners.move_to_end(prefix.keys[i])
                return owner, prefix.chars[i]
        return None

    def forget(self, owner: str) -> None:
        for key in [k for k, o in self._owners.items() if o == owner]:
            del self._owners[key]


@dataclass
class SlotPins:
    """Which of an engine's ``slots`` each admitted request runs in (llama-server ``id_slot``).

    The caller admits at most ``slots`` requests at once (``SlotQueue``), so a free slot is
    always there: llama-server defers a request pinned to a busy slot, so only free ones are
    chosen. Among them: the one whose last prompt shares the longest prefix with this one
    (its KV cache holds that prefix), else the least recently used (the coldest state is
    the one overwritten). ``hits`` / ``misses`` count the two cases."""

    slots: int
    enabled: bool = True  # False (TARS_ROUTING=least-loaded): no id_slot, llama-server picks
    last: dict[int, Prefix] = field(default_factory=dict)  # slot -> the prompt it last ran
    used: dict[int, int] = field(default_factory=dict)  # slot -> when it was last taken (a counter)
    busy: set[int] = field(default_factory=set)
    hits: int = 0
    misses: int = 0
    _clock: int = 0

    def take(self, prefix: Prefix) -> int | None:
        """The slot for a request with ``prefix`` (held until ``give``); None if all are busy."""
        free = [s for s in range(self.slots) if s not in self.busy]
        if not free:
            return None
        shared = {s: prefix.common(self.last[s]) if s in self.last else 0 for s in free}
        best = max(free, key=shared.__getitem__)
        if shared[best]:
            self.hits += 1
        else:
            self.misses += 1
            best = min(free, key=lambda s: self.used.get(s, -1))
        self._clock += 1
        self.busy.add(best)
        self.used[best] = self._clock
        self.last[best] = prefix
        return best

    def give(self, slot: int | None) -> None:
        if slot is not None:
            self.busy.discard(slot)

    @asynccontextmanager
    async def pin(self, req: GenerateRequest, body: dict[str, Any]) -> AsyncIterator[int | None]:
        """Hold a slot for ``req`` while the block runs and send it in ``body`` (``id_slot``,
        with ``cache_prompt`` on: the slot keeps and reuses the prompt's state)."""
        slot = self.take(Prefix.of(req)) if self.enabled else None
        if slot is not None:
            body["id_slot"] = slot
            body["cache_prompt"] = True
        try:
            yield slot
        finally:
            self.give(slot)

    def info(self) -> dict[str, int]:
        return {"affinity": self.enabled, "hits": self.hits, "misses": self.misses}
