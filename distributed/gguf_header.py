"""GGUF headers: the numbers a model's file states about itself, read without its weights.

A GGUF file starts with its header — metadata key/values (architecture, block count, head
counts, trained context, chat template, vocabulary) then one entry per tensor (name, shape,
quantisation) — and only then the weights. Everything the planner and the catalog need is
in the header, so it is read here from any byte source:

- a file on disk (``read_gguf(path)``, over an mmap; the other shards of a split model
  ``-0000i-of-0000N.gguf`` beside it add their tensors);
- a file on the hub, through ranged reads (``read_header(fetch, name=...)`` with ``fetch(offset,
  length) -> bytes``: ``hub.range_reader``): the bytes are fetched in growing blocks as the
  walk needs them, never past ``limit`` bytes (``HEADER_LIMIT``), so a 20 GB model costs a
  few MB of traffic;
- a header parsed earlier and cached as JSON (``GGUFMeta.save`` / ``read_gguf(path.json)``):
  a model that is not pulled yet plans from its real numbers with no network.

``gguf.GGUFReader`` parses every metadata array (a 262k-token vocabulary takes ~10 s on a
small CPU), so the header is walked here with ``struct``, skipping string arrays, using the
``gguf`` package's own type and quantisation tables.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .optional import require

HEADER_LIMIT = 64 * 2**20  # a header past this many bytes is refused (the biggest vocabularies take ~20 MB)
FIRST_READ = 1 * 2**20  # the first ranged read; later ones double what was read so far
_ARRAY_KEEP = 4096  # numeric arrays up to this length are kept (per-layer head counts)
SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
CACHE_VERSION = 1


@dataclass
class GGUFMeta:
    """What a GGUF header says: scalar metadata + tensor sizes.

    ``fields``: scalars and strings as they are; arrays of strings as their length; numeric
    arrays as a list when short, else their length. ``tensor_bytes``: every tensor's size
    (of every shard, for a split model); ``n_params``: their element count.
    """

    path: Path | str
    fields: dict[str, Any]
    tensor_bytes: dict[str, int]
    data_offset: int
    n_params: int = 0
    header_bytes: int = 0  # bytes the walk needed (the header's length)
    notes: list[str] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return str(self.fields.get("general.architecture", "llama"))

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(f"{self.arch}.{key}", default)

    def to_json(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, "path": str(self.path), "fields": self.fields,
                "tensor_bytes": self.tensor_bytes, "data_offset": self.data_offset, "n_params": self.n_params,
                "header_bytes": self.header_bytes}

    def save(self, dest: Path) -> Path:
        """Write the parsed header as JSON (atomically); ``read_gguf(dest)`` reads it back."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(dest)
        return dest


class _Bytes:
    """The header's bytes from offset 0: a mapped file, or a buffer that grows by ranged reads."""

    def __init__(self, buf: Any, fetch: Callable[[int, int], bytes] | None = None, limit: int = HEADER_LIMIT,
                 name: str = "") -> None:
        self.buf, self.fetch, self.limit, self.name = buf, fetch, limit, name

    def need(self, end: int) -> None:
        if end <= len(self.buf):
            return
        if self.fetch is None:
            raise struct.error(f"the file ends at byte {len(self.buf)}, the header needs {end}")
        if end > self.limit:
            raise ConfigError(f"'{self.name}': its GGUF header is larger than {self.limit // 2**20} MB; not read")
        want = min(self.limit, max(end, 2 * len(self.buf), FIRST_READ)) - len(self.buf)
        got = self.fetch(len(self.buf), want)
        self.buf += got
        if len(self.buf) < end:
            raise struct.error(f"the file ends at byte {len(self.buf)}, the header needs {end}")


class _Cursor:
    """Little-endian reads moving forward through ``_Bytes``."""

    def __init__(self, src: _Bytes) -> None:
        self.src, self.pos = src, 0

    def take(self, f: str) -> Any:
        n = struct.calcsize(f)
        self.src.need(self.pos + n)
        (v,) = struct.unpack_from("<" + f, self.src.buf, self.pos)
        self.pos += n
        return v

    def take_str(self) -> str:
        n = self.take("Q")
        self.src.need(self.pos + n)
        s = bytes(self.src.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return s

    def skip_str(self) -> None:
        n = self.take("Q")  # (not ``self.pos += self.take(..)``: that adds to the position before the read)
        self.pos += n


def _read_value(gguf: Any, c: _Cursor, name: str, key: str) -> Any:
    vt = gguf.GGUFValueType
    fmt = {vt.UINT8: "B", vt.INT8: "b", vt.UINT16: "H", vt.INT16: "h", vt.UINT32: "I", vt.INT32: "i",
           vt.FLOAT32: "f", vt.BOOL: "?", vt.UINT64: "Q", vt.INT64: "q", vt.FLOAT64: "d"}
    t = vt(c.take("I"))
    if t == vt.STRING:
        return c.take_str()
    if t != vt.ARRAY:
        return c.take(fmt[t])
    et, count = vt(c.take("I")), c.take("Q")
    if et == vt.STRING:
        for _ in range(count):
            c.skip_str()
        c.src.need(c.pos)
        return count
    if et == vt.ARRAY:
        raise ConfigError(f"'{name}': nested arrays in key '{key}' are not supported")
    size = struct.calcsize(fmt[et]) * count
    c.src.need(c.pos + size)
    value = list(struct.unpack_from(f"<{count}{fmt[et]}", c.src.buf, c.pos)) if count <= _ARRAY_KEEP else count
    c.pos += size
    return value


def _walk(src: _Bytes, name: str) -> GGUFMeta:
    """Parse the header in ``src``; ConfigError naming ``name`` when it is not a GGUF."""
    gguf = require("gguf", "gguf", "reading GGUF metadata")
    c = _Cursor(src)
    try:
        if c.take("I") != gguf.GGUF_MAGIC:
            raise ConfigError(f"'{name}' is not a GGUF file (bad magic)")
        version = c.take("I")
        if version & 0xFFFF == 0:
            raise ConfigError(f"'{name}' is a big-endian GGUF; only little-endian files are supported")
        n_tensors, n_kv = c.take("Q"), c.take("Q")
        fields: dict[str, Any] = {"GGUF.version": version}
        for _ in range(n_kv):
            key = c.take_str()
            fields[key] = _read_value(gguf, c, name, key)
        sizes: dict[str, int] = {}
        n_params = 0
        for _ in range(n_tensors):
            tname = c.take_str()
            dims = [c.take("Q") for _ in range(c.take("I"))]
            qtype = gguf.GGMLQuantizationType(c.take("I"))
            c.take("Q")  # offset within the data section
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            elems = math.prod(dims)
            sizes[tname] = elems // block * type_size
            n_params += elems
        align = int(fields.get("general.alignment", 32))
        data_offset = c.pos + (-c.pos % align)
    except (struct.error, ValueError, KeyError) as exc:
        raise ConfigError(f"'{name}' has a malformed GGUF header: {exc}") from None
    return GGUFMeta(path=name, fields=fields, tensor_bytes=sizes, data_offset=data_offset, n_params=n_params,
                    header_bytes=c.pos)


def read_header(fetch: Callable[[int, int], bytes], *, name: str, limit: int = HEADER_LIMIT) -> GGUFMeta:
    """A GGUF header through ``fetch(offset, length) -> bytes`` (ranged reads): blocks of at
    least ``FIRST_READ`` bytes, each as big as all before it, never past ``limit``."""
    return _walk(_Bytes(bytearray(), fetch, limit, name), name)


def _read_file(path: Path) -> GGUFMeta:
    with path.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ConfigError(f"'{path}' is not a GGUF file (empty)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            meta = _walk(_Bytes(mm), str(path))
    meta.path = path
    return meta


def merge_shards(first: GGUFMeta, others: list[GGUFMeta]) -> GGUFMeta:
    """A split model's header: the first shard's metadata with every shard's tensors."""
    for other in others:
        first.tensor_bytes.update(other.tensor_bytes)
        first.n_params += other.n_params
    return first


def shard_names(name: str) -> list[str]:
    """Every shard's file name of a split model, from any one of them (``[name]`` when not split)."""
    m = SHARD_RE.match(Path(name).name)
    if m is None:
        return [name]
    count = int(m["count"])
    folder = name[: len(name) - len(Path(name).name)]
    return [f"{folder}{m['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


_CACHE: dict[tuple[str, int, int], GGUFMeta] = {}
_CACHE_LOCK = threading.Lock()


def read_gguf(path: str | Path) -> GGUFMeta:
    """The header of a GGUF on disk (cached in memory while the file is unchanged).

    A split model's first shard reads the tensors of the shards beside it too. A ``.json``
    path is a header cached by ``GGUFMeta.save`` (read with no network). Raises ConfigError
    for a file that is not a GGUF.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    if path.suffix == ".json":
        meta = _from_json(path)
    else:
        meta = _read_file(path)
        names = shard_names(path.name)
        if len(names) > 1 and names[0] == path.name:
            meta = merge_shards(meta, [_read_file(path.with_name(n)) for n in names[1:]
                                       if path.with_name(n).is_file()])
    with _CACHE_LOCK:
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = meta
    return meta


def _from_json(path: Path) -> GGUFMeta:
    try:
        doc = json.loads(path.read_text())
        if doc.get("version") != CACHE_VERSION:
            raise ValueError(f"cache version {doc.get('version')}")
        return GGUFMeta(path=doc["path"], fields=doc["fields"], tensor_bytes=doc["tensor_bytes"],
                        data_offset=int(doc["data_offset"]), n_params=int(doc.get("n_params", 0)),
                        header_bytes=int(doc.get("header_bytes", 0)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"'{path}': cached GGUF header unreadable ({exc})") from None


# --------------------------------------------------------------------------- what it says
def file_type(meta: GGUFMeta) -> str | None:
    """The quantisation the file states (``general.file_type`` → "Q4_K_M"), if any."""
    ft = meta.fields.get("general.file_type")
    if ft is None:
        return None
    gguf = require("gguf", "gguf", "reading GGUF metadata")
    try:
        name = gguf.LlamaFileType(int(ft)).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def is_projector(meta: GGUFMeta) -> bool:
    """A multimodal projector (``mmproj``: the vision encoder llama-server loads with ``--mmproj``)."""
    return meta.arch == "clip" or str(meta.fields.get("general.type", "")) in ("mmproj", "clip-vision")


def numbers(meta: GGUFMeta) -> dict[str, Any]:
    """The catalog's fields as the header states them: ``n_layers``, ``n_embd``, ``n_head_kv``
    (the most any layer has), ``head_dim`` (key length), ``context`` (trained), ``params_b``,
    plus ``arch``, ``file_type`` and ``has_template`` (the GGUF carries a chat template)."""
    n_embd = int(meta.arch_field("embedding_length", 0) or 0)
    heads = meta.arch_field("attention.head_count", 0) or 0
    n_head = max(heads) if isinstance(heads, list) else int(heads)
    kv = meta.arch_field("attention.head_count_kv", n_head)
    n_head_kv = max(kv) if isinstance(kv, list) else int(kv)
    head_dim = int(meta.arch_field("attention.key_length", 0) or 0) or (n_embd // n_head if n_head else 0)
    out: dict[str, Any] = {
        "arch": meta.arch,
        "n_layers": int(meta.arch_field("block_count", 0) or 0) or None,
        "n_embd": n_embd or None,
        "n_head_kv": n_head_kv or None,
        "head_dim": head_dim or None,
        "context": int(meta.arch_field("context_length", 0) or 0) or None,
        "params_b": round(meta.n_params / 1e9, 4) if meta.n_params else None,
        "file_type": file_type(meta),
        "has_template": isinstance(meta.fields.get("tokenizer.chat_template"), str),
    }
    return out
