"""The Python cost per streamed token of each re-parse and re-encode on the forwarding path
(issue 18.4), in process, without sockets: what ``bench_forward_cpu``'s per-node totals
are made of besides the event loop, the HTTP server and the socket I/O.

PC1 (the engine's host):
  * SSE re-parsing: an engine chunk (llama-server's ``chat.completion.chunk``) → its JSON →
    a TokenChunk (``orjson.loads`` + ``engine/wire.py`` ``StreamState.feed``);
  * JSON re-encoding for the /rpc hop: a TokenChunk → its NDJSON notification line
    (``rpc/server.py`` ``NdjsonFormat.token``; "before": the whole notification encoded per
    token, as before issue 18.4; "after": the envelope encoded once per stream).
PC2 (the forwarding host):
  * the /rpc hop read: an NDJSON line → its message → a TokenChunk (``rpc/client.py`` +
    ``targets/remote.py``);
  * JSON re-encoding for the client: a TokenChunk → its OpenAI SSE event
    (``api/chat_surface.py`` ``ChunkEncoder.piece``).
And the whole Python path of a token on PC1 without its socket I/O: engine bytes → loads →
feed → TokenChunk → a node-stream generator → ``streams.drain`` → NDJSON line → an ASGI
``send`` that does nothing, in one event loop, hot — what a token costs before the event
loop's wakeup, uvicorn's send and the kernel.

    .venv/bin/python -m benchmarks.bench_forward_parts [--n 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import orjson

from distributed.api.chat_surface import ChunkEncoder
from distributed.domain import TokenChunk
from distributed.engine.wire import StreamState
from distributed.rpc import protocol as p
from distributed.domain import Completion
from distributed.rpc.server import NdjsonFormat
from distributed.streams import drain

ENGINE_CHUNK = (b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" the"}}],"created":1765000000,'
                b'"id":"chatcmpl-3bq0Zk1cWmM2yB8p9sQ2","model":"smollm2-135m-instruct",'
                b'"system_fingerprint":"b6915-0a1b2c3d","object":"chat.completion.chunk"}')


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    for _ in range(min(n, 1000)):
        fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


async def _pipeline(n: int) -> float:
    """CPU seconds for ``n`` tokens through the PC1 path without sockets (see the module doc)."""
    state = StreamState()

    async def engine() -> Any:  # EngineTarget.stream's loop over the engine's events
        for _ in range(n):
            piece = state.feed(orjson.loads(ENGINE_CHUNK))
            if piece is not None:
                yield piece
        yield Completion(model="m", node="pc1", text="", finish_reason="length")

    async def node(items: Any) -> Any:  # Node.stream's layer
        async for item in items:
            yield item

    async def send(message: dict[str, Any]) -> None:
        return None

    agen = node(engine())
    first = await agen.__anext__()
    t0 = time.process_time()
    async for line in drain(first, agen, NdjsonFormat(7)):
        await send({"type": "http.response.body", "body": line, "more_body": True})
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    n = ap.parse_args().n
    state = StreamState()
    piece = TokenChunk(" the")
    fmt = NdjsonFormat(7)
    line = fmt.token(piece)

    def whole_notification() -> bytes:  # NdjsonFormat.token before issue 18.4
        params: dict[str, Any] = {"id": fmt.rid, "text": piece.text}
        return p.dumps_line({"jsonrpc": p.JSONRPC, "method": p.TOKEN_METHOD, "params": params})

    def rpc_read() -> TokenChunk:
        msg = p.loads(line)["params"]
        return TokenChunk(text=msg.get("text", ""), finish_reason=msg.get("finish_reason"),
                          logprobs=msg.get("logprobs"), tool_calls=msg.get("tool_calls"), reasoning=msg.get("reasoning"))

    enc = ChunkEncoder("chat", "smollm2-135m-instruct", "chatcmpl-x", 1765000000)
    assert whole_notification() == line
    rows = {
        "pc1 SSE re-parsing (orjson.loads + StreamState.feed)": per_call_us(
            lambda: state.feed(orjson.loads(ENGINE_CHUNK)), n),
        "pc1 NDJSON encoding, before (whole notification per token)": per_call_us(whole_notification, n),
        "pc1 NDJSON encoding, after (envelope once per stream)": per_call_us(lambda: fmt.token(piece), n),
        "pc2 /rpc hop read (NDJSON line -> TokenChunk)": per_call_us(rpc_read, n),
        "pc2 OpenAI SSE encoding (ChunkEncoder.piece)": per_call_us(lambda: enc.piece(piece), n),
        "pc1 whole Python path without I/O (engine bytes -> drain -> send)": asyncio.run(_pipeline(n)) / n * 1e6,
    }
    for name, us in rows.items():
        print(f"  {name:66} {us:6.2f} us/token")
    print(json.dumps({k: round(v, 2) for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
