"""``tars status`` and ``tars bench``: look at a running node, and measure it.

Both talk to a node over its public HTTP API only (``/status``, ``/health``,
``/v1/chat/completions``, ``/v1/embeddings``), so they work the same against the
node on this machine and against one across the LAN, and they see exactly what
a client sees. A node that cannot be reached, or that wants an API key, gives a
one-line error with the fix rather than a traceback.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any, Optional

import typer

from ..errors import PeerError, RequestTimeout, ValidationFailed
from .node_http import KEY_OPT, URL_ARG, auth_headers, call_node, fail_for, unreachable

DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."
_SENTENCES = (
    "The cat sat on the warm windowsill all afternoon.",
    "Distributed inference splits work across several machines.",
    "A graphics card with more memory can hold a larger model.",
    "Embeddings turn sentences into vectors that can be compared.",
    "The quick brown fox jumps over the lazy dog.",
    "Two home computers can act as one local AI service.",
    "Heartbeats tell each host that its peer is still alive.",
    "Quantisation stores weights with fewer bits per value.",
)


# ----------------------------------------------------------------------------- HTTP
def fetch_status(url: str, api_key: str = "", timeout: float = 10.0) -> dict[str, Any]:
    """GET /status of the node at ``url``, or raise a TarsError that says what to do."""
    return call_node("GET", url, "/status", api_key, timeout=timeout)


# ----------------------------------------------------------------------------- status
def _mb(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v / 1024:.1f} GB" if v >= 1024 else f"{v:.0f} MB"


def _num(v: Any, digits: int = 0, unit: str = "") -> str:
    return f"{v:,.{digits}f}{unit}" if isinstance(v, (int, float)) else "–"


def _gpus(x: Any) -> list[dict[str, Any]]:
    if not x:
        return []
    if isinstance(x, dict):
        return [x]
    if isinstance(x, str):
        return [{"name": x}]
    return [g if isinstance(g, dict) else {"name": str(g)} for g in x]


def _gpu_rows(host: str, gpus: list[dict[str, Any]], simulated: bool = False) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for g in gpus:
        total, used = g.get("vram_total_mb"), g.get("vram_used_mb")
        if used is None and isinstance(total, (int, float)) and isinstance(g.get("vram_free_mb"), (int, float)):
            used = total - g["vram_free_mb"]
        power = _num(g.get("power_w"), 0)
        if isinstance(g.get("power_limit_w"), (int, float)):
            power += f" / {g['power_limit_w']:.0f}"
        name = str(g.get("name", "GPU")).replace("NVIDIA ", "").replace("GeForce ", "")
        name += " [magenta](simulated)[/magenta]" if simulated else ""
        rows.append((host, f"{g.get('index', '?')}: {name}", f"{_mb(used)} / {_mb(total)}",
                     _num(g.get("temperature_c"), 0, " °C"), power + (" W" if power != "–" else ""),
                     _num(g.get("utilization_pct"), 0, " %")))
    return rows or [(host, "no GPU: CPU mode", "–", "–", "–", "–")]


def _state(s: Any) -> str:
    color = {"ready": "green", "alive": "green", "loading": "yellow", "suspect": "yellow",
             "joining": "yellow", "failed": "red", "dead": "red", "unavailable": "red"}.get(str(s), "white")
    return f"[{color}]{s or 'unknown'}[/{color}]"


def _table(title: str, cols: tuple[str, ...], right: tuple[str, ...] = (), no_wrap: tuple[str, ...] = ()) -> Any:
    from rich import box
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for c in cols:
        t.add_column(c, justify="right" if c in right else "left", overflow="fold", no_wrap=c in no_wrap)
    return t


def render_status(data: dict[str, Any], console: Any) -> None:
    """Draw /status as rich tables: the node, hosts, GPUs, models, and the live figures."""
    models = data.get("models") or []
    profile = data.get("profile") or {}
    healthy = "[green]healthy[/green]" if data.get("healthy") else "[yellow]not healthy[/yellow]"
    console.print(f"[bold]{data.get('node', '?')}[/bold] · {data.get('role', '?')} · v{data.get('version', '?')}"
                  f" · up {_num(data.get('uptime_s'), 0, ' s')} · {healthy}"
                  + (" · [magenta]simulated hardware[/magenta]" if profile.get("simulated") else ""))

    me = str(data.get("node", "?"))
    hosts = _table("Hosts", ("Host", "Role", "State", "Heartbeat", "RTT", "URL", "Models"), ("Heartbeat", "RTT"),
                   no_wrap=("URL",))
    gpus = _table("GPUs", ("Host", "GPU", "VRAM used / total", "Temp", "Power", "Util"), ("Temp", "Power", "Util"))
    hosts.add_row(f"{me} (this)", str(data.get("role", "?")), _state("ready" if data.get("healthy") else "loading"),
                  "–", "–", str(data.get("url", "")), ", ".join(str(m.get("id")) for m in models if m.get("node") == me) or "–")
    for row in _gpu_rows(me, _gpus(data.get("gpus")) or _gpus(profile.get("gpus")), bool(profile.get("simulated"))):
        gpus.add_row(*row)
    for p in data.get("peers") or []:
        name = str(p.get("name", "?"))
        peer_models = [m if isinstance(m, str) else str(m.get("id")) for m in p.get("models") or []]
        peer_models = peer_models or [str(m.get("id")) for m in models if m.get("node") == name]
        hosts.add_row(name, str(p.get("role", "?")), _state(p.get("state")), _num(p.get("last_heartbeat_s"), 1, " s"),
                      _num(p.get("rtt_ms"), 1, " ms"), str(p.get("url", "")), ", ".join(peer_models) or "–")
        for row in _gpu_rows(name, _gpus(p.get("gpus") or p.get("gpu") or (p.get("profile") or {}).get("gpus")),
                             bool(p.get("simulated"))):
            gpus.add_row(*row)
    console.print(hosts)
    console.print(gpus)

    table = _table("Models", ("Model", "Kind", "Host", "State", "Queue", "Requests", "Tokens", "tok/s"),
                   ("Queue", "Requests", "Tokens", "tok/s"))
    for m in models:
        label = f"{m.get('id', '?')}{' (fallback)' if m.get('fallback') else ''}\n" \
                f"[dim]{m.get('backend', '–')} {m.get('quant', '')}[/dim]"
        host = str(m.get("node", "–"))
        if m.get("split"):  # pooled VRAM: every host it runs on, with its layers
            host = " + ".join(f"{s.get('node')} {s.get('layers')}L"
                              + (" [red]missing[/red]" if s.get("state") == "missing" else "") for s in m["split"])
        table.add_row(label, str(m.get("kind", "–")), host, _state(m.get("state")),
                      _num(m.get("queue_depth")), _num(m.get("requests")), _num(m.get("tokens_generated")),
                      _num(m.get("last_tokens_per_s"), 1))
    console.print(table)
    for m in models:
        if m.get("error"):
            console.print(f"[red]{m.get('id')}: {m['error']}[/red]")
    for u in (data.get("plan") or {}).get("unplaced") or []:
        console.print(f"[yellow]not placed: {u.get('model')}: {u.get('reason')}[/yellow]")

    t = cluster_totals(data)
    console.print(f"{t['scope']}: tokens/s {_num(t['tokens_per_s'], 1)} · embeddings/s {_num(t['embeddings_per_s'], 1)}"
                  f" · queue {_num(t['queue_depth'])} · requests {_num(t['requests'])}")


def cluster_totals(data: dict[str, Any]) -> dict[str, Any]:
    """This node's totals plus those of live peers that report theirs (in heartbeats)."""
    keys = ("tokens_per_s", "embeddings_per_s", "queue_depth", "requests")
    own = data.get("totals") or {}
    out: dict[str, Any] = {k: own.get(k) or 0 for k in keys}
    counted = 0
    for p in data.get("peers") or []:
        t = p.get("totals")
        if isinstance(t, dict) and p.get("state") in ("alive", "suspect"):
            counted += 1
            for k in keys:
                out[k] += t.get(k) or 0
    out["scope"] = f"whole cluster ({counted + 1} hosts)" if counted else "this node"
    return out


def status(url: str = URL_ARG, json_out: bool = typer.Option(False, "--json", help="Print /status as JSON."),
           api_key: str = KEY_OPT) -> None:
    """The cluster at a glance: hosts, roles, GPUs, models, peers, health. Exit 1 when not healthy."""
    from rich.console import Console

    data = fetch_status(url, api_key)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
    else:
        render_status(data, Console())
    raise typer.Exit(0 if data.get("healthy") else 1)


# ----------------------------------------------------------------------------- bench
def _pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _pick(models: list[dict[str, Any]], kind: str, wanted: Optional[str]) -> Optional[dict[str, Any]]:
    if wanted:
        for m in models:
            if m.get("id") == wanted:
                return m
        known = ", ".join(sorted(str(m.get("id")) for m in models)) or "none"
        raise ValidationFailed(f"model '{wanted}' is not served by this cluster; models: {known}", field="model")
    of_kind = [m for m in models if m.get("kind") == kind]
    return next((m for m in of_kind if m.get("state") == "ready"), of_kind[0] if of_kind else None)


async def _chat_once(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    pieces, usage = 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code >= 400:
            await resp.aread()
            fail_for(resp, str(client.base_url))
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
                    pieces += 1
    end = time.perf_counter()
    tokens = int((usage or {}).get("completion_tokens") or pieces)
    decode = (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else None
    return {"tokens": tokens, "ttft_ms": (first - t0) * 1000 if first else None, "decode_tokens_per_s": decode,
            "end_to_end_tokens_per_s": tokens / (end - t0) if end > t0 else None, "total_ms": (end - t0) * 1000}


async def _embed_level(client: Any, model: str, concurrency: int, n: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            text = f"{_SENTENCES[i % len(_SENTENCES)]} (#{i})"
            t = time.perf_counter()
            try:
                resp = await client.post("/v1/embeddings", json={"model": model, "input": text})
                fail_for(resp, str(client.base_url))
                if len(resp.json().get("data") or []) != 1:
                    raise PeerError("answer without exactly one embedding")
                latencies.append((time.perf_counter() - t) * 1000)
            except Exception as exc:  # counted and reported, the run goes on
                errors.append(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n, "ok": len(latencies), "errors": len(errors),
            "embeddings_per_s": len(latencies) / wall if wall > 0 else 0.0, "wall_s": wall,
            "p50_ms": _pct(latencies, 0.5), "p95_ms": _pct(latencies, 0.95),
            "first_error": errors[0] if errors else None}


async def run_bench(url: str, *, api_key: str = "", chat_requests: int = 3, max_tokens: int = 64,
                    prompt: str = DEFAULT_PROMPT, requests: int = 64, concurrency: tuple[int, ...] = (1, 8, 32),
                    model: Optional[str] = None, embed_model: Optional[str] = None, chat: bool = True,
                    embed: bool = True, timeout: float = 300.0,
                    chat_concurrency: tuple[int, ...] = (), chat_per_client: int = 2) -> dict[str, Any]:
    """Measure a node: streamed chat (TTFT, decode tokens/s), chat at concurrent streams
    (aggregate tokens/s, TTFT p50/p95), then embeddings/s per concurrency level."""
    import httpx

    url = url.rstrip("/")
    data = fetch_status(url, api_key)
    models = data.get("models") or []
    out: dict[str, Any] = {"url": url, "node": data.get("node"), "chat": None, "embeddings": None, "notes": []}
    most = max((*concurrency, *chat_concurrency))
    limits = httpx.Limits(max_connections=most + 2, max_keepalive_connections=most + 2)
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(api_key), timeout=timeout, limits=limits) as client:
        try:
            if chat:
                m = _pick(models, "chat", model)
                if m is None:
                    out["notes"].append("no chat model in this cluster: chat not measured")
                else:
                    await _chat_once(client, m["id"], "Hello", 4)  # warm-up, not counted
                    # Each prompt starts differently: llama.cpp reuses the KV cache of a repeated
                    # prompt prefix, which would make every run after the first skip the prompt
                    # and report a time to first token no real request sees.
                    runs = [await _chat_once(client, m["id"], f"Request {i + 1}. {prompt}", max_tokens)
                            for i in range(chat_requests)]
                    med = lambda k: statistics.median([r[k] for r in runs if r[k] is not None] or [0.0])  # noqa: E731
                    out["chat"] = {"model": m["id"], "node": m.get("node"), "runs": runs, "max_tokens": max_tokens,
                                   "ttft_ms_median": med("ttft_ms"),
                                   "decode_tokens_per_s_median": med("decode_tokens_per_s"),
                                   "end_to_end_tokens_per_s_median": med("end_to_end_tokens_per_s")}
                    from .bench_chat import chat_level

                    out["chat"]["levels"] = [  # `tars bench` asks for 1, 4 and 8 streams
                        await chat_level(client, m["id"], c, once=_chat_once, per_client=chat_per_client,
                                         max_tokens=max_tokens, prompt=prompt, tag=f"Level {c}. ")
                        for c in chat_concurrency]
                    out["chat"]["slots"] = m.get("slots")
            if embed:
                m = _pick(models, "embed", embed_model)
                if m is None:
                    out["notes"].append("no embedding model in this cluster: embeddings not measured")
                else:
                    await _embed_level(client, m["id"], 1, 2)  # warm-up, not counted
                    levels = [await _embed_level(client, m["id"], c, requests) for c in concurrency]
                    out["embeddings"] = {"model": m["id"], "node": m.get("node"), "levels": levels}
        except httpx.TimeoutException as exc:
            raise RequestTimeout(f"{url} gave no answer within {timeout:g}s during the benchmark") from exc
        except httpx.TransportError as exc:
            raise unreachable(url, exc) from exc
    return out


def render_bench(result: dict[str, Any], console: Any) -> None:
    console.print(f"[bold]Benchmark of {result['url']}[/bold] (node {result.get('node')})")
    c = result.get("chat")
    if c:
        cols = ("Run", "Tokens", "TTFT ms", "Decode tok/s", "End-to-end tok/s", "Total ms")
        t = _table(f"Chat, streamed /v1/chat/completions — {c['model']} on {c.get('node')}, "
                   f"max_tokens {c['max_tokens']}", cols, cols)
        for i, r in enumerate(c["runs"], 1):
            t.add_row(str(i), str(r["tokens"]), _num(r["ttft_ms"], 1), _num(r["decode_tokens_per_s"], 1),
                      _num(r["end_to_end_tokens_per_s"], 1), _num(r["total_ms"], 0))
        t.add_row("median", "", _num(c["ttft_ms_median"], 1), _num(c["decode_tokens_per_s_median"], 1),
                  _num(c["end_to_end_tokens_per_s_median"], 1), "", style="bold")
        console.print(t)
        if c.get("levels"):
            from .bench_chat import render_levels

            slots = c.get("slots") or {}
            render_levels(c["levels"], f"Chat, concurrent streams — {c['model']}"
                          + (f" ({slots.get('total')} engine slots)" if slots else " (one at a time: in-process engine)"),
                          _table, _num, console)
    e = result.get("embeddings")
    if e:
        cols = ("Concurrency", "Requests", "Errors", "Embeddings/s", "p50 ms", "p95 ms")
        t = _table(f"Embeddings, /v1/embeddings, one sentence a request — {e['model']} on {e.get('node')}", cols, cols)
        for lv in e["levels"]:
            t.add_row(str(lv["concurrency"]), str(lv["requests"]), str(lv["errors"]), _num(lv["embeddings_per_s"], 1),
                      _num(lv["p50_ms"], 1), _num(lv["p95_ms"], 1))
        console.print(t)
        for lv in e["levels"]:
            if lv["first_error"]:
                console.print(f"[red]concurrency {lv['concurrency']}: {lv['errors']} errors, first: {lv['first_error']}[/red]")
    for note in result.get("notes") or []:
        console.print(f"[yellow]{note}[/yellow]")


def _levels(text: str, option: str = "--concurrency") -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1 or max(levels) > 1024:
        raise typer.BadParameter(f"'{text}': give comma-separated client counts from 1 to 1024, e.g. 1,8,32",
                                 param_hint=option)
    return levels


def bench(url: str = URL_ARG,
          requests: int = typer.Option(64, "--requests", "-n", min=1, max=100000,
                                       help="Embedding requests at each concurrency level."),
          concurrency: str = typer.Option("1,8,32", "--concurrency", "-c", help="Embedding client counts, comma-separated."),
          chat_requests: int = typer.Option(3, "--chat-requests", min=1, max=1000, help="Streamed chat requests."),
          chat_concurrency: str = typer.Option("1,4,8", "--chat-concurrency",
                                               help="Concurrent chat streams per level, comma-separated."),
          chat_per_client: int = typer.Option(1, "--chat-per-client", min=1, max=1000,
                                              help="Chat requests each concurrent client sends per level."),
          max_tokens: int = typer.Option(64, "--max-tokens", min=1, max=32768, help="Tokens per chat request."),
          prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="The chat prompt."),
          model: Optional[str] = typer.Option(None, "--model", help="Chat model id (default: the cluster's chat model)."),
          embed_model: Optional[str] = typer.Option(None, "--embed-model", help="Embedding model id (default: the cluster's)."),
          no_chat: bool = typer.Option(False, "--no-chat", help="Skip the chat benchmark."),
          no_embed: bool = typer.Option(False, "--no-embed", help="Skip the embeddings benchmark."),
          timeout: float = typer.Option(300.0, "--timeout", min=1, help="Seconds one request may take."),
          json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
          api_key: str = KEY_OPT) -> None:
    """Measure a running node: chat tokens/s and time to first token, embeddings/s by concurrency."""
    from rich.console import Console

    result = asyncio.run(run_bench(url, api_key=api_key, chat_requests=chat_requests, max_tokens=max_tokens,
                                   prompt=prompt, requests=requests, concurrency=_levels(concurrency), model=model,
                                   embed_model=embed_model, chat=not no_chat, embed=not no_embed, timeout=timeout,
                                   chat_concurrency=_levels(chat_concurrency, "--chat-concurrency"),
                                   chat_per_client=chat_per_client))
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        render_bench(result, Console())


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("bench")(bench)
