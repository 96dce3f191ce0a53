"""`tars run`, `tars stop`, `tars ps`: models at runtime, against any host of the cluster.

    tars run ID [--replicas N] [--host NAME] [--draft ID]
                                               deploy (pull on the serving host if needed), wait until ready
    tars stop ID                               remove it everywhere (after its requests in flight)
    tars ps                                    every model: host, state (pulling with percent), queue,
                                               speculative decoding (n-gram, or the draft model)

Each talks to one node over HTTP (``--url``, default http://127.0.0.1:8000 or ``$TARS_URL``);
a worker forwards deploys to the planning host. While a pull runs, `run` shows its percent
on stderr; it exits 0 once the model is ready, 1 when it failed (with the reason).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional

import typer

from ..errors import ModelFailed, RequestTimeout
from .node_http import DEFAULT_URL, KEY_OPT, call_node

URL_OPT = typer.Option(DEFAULT_URL, "--url", envvar="TARS_URL", help="Base URL of any node of the cluster.")


def models(url: str, api_key: str) -> list[dict[str, Any]]:
    return list(call_node("GET", url, "/models", api_key).get("models", []))


def _state(m: dict[str, Any]) -> str:
    state = str(m.get("state", "?"))
    p = m.get("progress") or {}
    if state == "pulling" and p.get("percent") is not None:
        done, total = p.get("done_bytes") or 0, p.get("total_bytes") or 0
        return f"pulling {p['percent']:.0f}% ({done / 2**20:.0f}/{total / 2**20:.0f} MB)"
    return state


def speculative(m: dict[str, Any]) -> str:
    """``tars ps``' column: "ngram", "draft <id>" or "off", with the acceptance once drafts ran."""
    s = m.get("speculative")
    if not s:
        return "–"
    what = f"draft {s.get('draft')}" if s.get("kind") == "draft" else str(s.get("kind"))
    rate = s.get("acceptance")
    return what + (f" ({rate:.0%} accepted)" if isinstance(rate, (int, float)) else "")


def runtime_cell(m: dict[str, Any]) -> str:
    """An embedding/rerank model's runtime with its measured speed-up ("openvino 3.1x"), else "–"."""
    rt = m.get("runtime") or {}
    if not rt.get("name"):
        return "–"
    speedup = rt.get("speedup")
    return f"{rt['name']} {speedup:.1f}x" if speedup and rt["name"] != "torch" else str(rt["name"])


def wait_ready(url: str, api_key: str, model: str, timeout: float, interval: float = 0.5,
               echo: Any = None) -> dict[str, Any]:
    """Poll GET /models until ``model`` is ready everywhere it is routed (or failed)."""
    echo = echo or (lambda line: typer.echo(line, err=True))
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        rows = [m for m in models(url, api_key) if m.get("id") == model]
        states = sorted({_state(m) for m in rows}) or ["waiting for the plan"]
        line = ", ".join(states)
        if line != last:
            echo(f"  {model}: {line}")
            last = line
        failed = next((m for m in rows if m.get("state") == "failed"), None)
        if failed is not None:
            raise ModelFailed(f"'{model}' failed on {failed.get('node')}: {failed.get('error', 'no reason given')}",
                              model=model)
        if rows and all(m.get("state") == "ready" for m in rows):
            return rows[0]
        if time.monotonic() > deadline:
            raise RequestTimeout(f"'{model}' is not ready after {timeout:g} s (last: {line}); `tars ps` shows it")
        time.sleep(interval)


def register(app: typer.Typer) -> None:
    @app.command()
    def run(model: str = typer.Argument(..., help="Catalog id (`tars models list` shows them) or a hub reference "
                                                  "hf.co/ORG/REPO[:QUANT] (served under that name)."),
            replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help="Hosts to run it on."),
            host: Optional[str] = typer.Option(None, "--host", help="Run it on this host (node name)."),
            draft: Optional[str] = typer.Option(None, "--draft", help="A draft model (catalog id, same vocabulary) "
                                                "for speculative decoding."),
            url: str = URL_OPT, api_key: str = KEY_OPT,
            wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until it is ready (progress on stderr)."),
            timeout: float = typer.Option(3600.0, "--timeout", help="Longest to wait, seconds.")) -> None:
        """Deploy a model at runtime: placed by the planner (or on --host), pulled if needed, routed everywhere."""
        body: dict[str, Any] = {"model": model}
        if replicas is not None:
            body["replicas"] = replicas
        if host is not None:
            body["node"] = host
        if draft is not None:
            body["draft"] = draft
        out = call_node("POST", url, "/models", api_key, body, timeout=120.0)
        where = ", ".join(f"{a['node']} ({a['device']})" for a in out.get("placement", []))
        if out.get("status") == "unchanged":
            typer.echo(f"{model}: already deployed on {where}")
        elif out.get("status") == "retrying":
            typer.echo(f"{model}: it had failed; loading it again on {where}")
        else:
            typer.echo(f"{model}: deploying on {where} — {out.get('reason', '')}")
        if wait:
            info = wait_ready(url, api_key, model, timeout)
            typer.echo(f"{model}: ready on {info.get('node')}")

    @app.command()
    def stop(model: str = typer.Argument(..., help="A deployed model's id."),
             url: str = URL_OPT, api_key: str = KEY_OPT) -> None:
        """Remove a model from the cluster (each host unloads it after its requests in flight)."""
        out = call_node("DELETE", url, f"/models/{model}", api_key, timeout=120.0)
        typer.echo(f"{model}: removing; the cluster now serves {', '.join(out.get('models', [])) or 'nothing'}")

    @app.command()
    def ps(url: str = URL_OPT, api_key: str = KEY_OPT,
           json_out: bool = typer.Option(False, "--json", help="Print GET /models as JSON.")) -> None:
        """The models of the cluster: host, state (pulling with its percent), runtime (embeddings and
        rerank: torch, onnx or openvino, with the speed-up measured over torch; --json says why),
        queue and requests."""
        rows = models(url, api_key)
        if json_out:
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(box=None, pad_edge=False)
        for col in ("model", "kind", "host", "state", "runtime", "queue", "requests", "speculative"):
            t.add_column(col)
        for m in rows:
            kind = str(m.get("kind", "–")) + (" +vision" if m.get("vision") else "")  # sees images
            t.add_row(str(m.get("id")), kind, str(m.get("node", "–")), _state(m), runtime_cell(m),
                      str(m.get("queue_depth", 0)), str(m.get("requests", 0)), speculative(m))
        Console(file=sys.stdout, soft_wrap=False).print(t)
