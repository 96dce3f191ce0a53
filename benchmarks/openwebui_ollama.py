"""Open WebUI chatting with the default model through its *Ollama* connection, in a real
browser (issue 17.5, the Ollama half): ``benchmarks/check_open_webui.py``'s browser check,
with what the Ollama connection needs and checks of its own.

Apps that speak only Ollama send no API key (Open WebUI's Ollama connection sends none by
default), so the node here has none, as on a home PC's 127.0.0.1. It serves the default
models with the llama-server engine; Open WebUI (``check_open_webui.running_webui``,
``--connection ollama``: only its Ollama connection, offline, no auth) points at it, and
``check_open_webui.chat_in_browser`` sends "Name three colours." in headless Chromium and
watches the answer grow. It passes when the answer streams in (several growing steps, ends
non-empty, no error shown) and the node counted the chat on ``/api/chat`` and none on
``/v1``. Whether the tools Open WebUI sends with every chat reached the model or were
dropped (api/tool_drop.py) comes from the node's log.

Setup once (Open WebUI and its dependencies are ~7 GB)::

    python3 -m venv /tmp/owui-venv && /tmp/owui-venv/bin/pip install open-webui

Run from the repository root::

    .venv/bin/python -m benchmarks.openwebui_ollama --owui /tmp/owui-venv
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.check_open_webui import (CHAT, answered, chat_in_browser, owui_installed, stop_cleanly_on_sigterm,  # noqa: E402
                                         running_webui, tools_dropped)
from tests.support import ServerProcess  # noqa: E402


def requests_by_endpoint(node_url: str) -> dict[str, int]:
    """The node's request counts by endpoint and status (its Prometheus text)."""
    counts: dict[str, int] = {}
    for line in httpx.get(node_url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r'tars_requests_total\{endpoint="([^"]+)",model="[^"]*",status="(\d+)"\} ([0-9.]+)', line)
        if m and float(m.group(3)):
            key = f"{m.group(1)} {m.group(2)}"
            counts[key] = counts.get(key, 0) + int(float(m.group(3)))
    return counts


def main() -> int:
    stop_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--owui", type=Path, default=Path("/tmp/owui-venv"), help="Open WebUI's virtual environment")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds the answer may take (a 2-core box is slow)")
    args = ap.parse_args()
    if not owui_installed(args.owui):
        return 2
    work = Path(tempfile.mkdtemp(prefix="owui-ollama-"))
    node = ServerProcess("node", "127.0.0.2", ports=range(19400, 19420), log_dir=work,
                         env={"TARS_MODELS": f"{CHAT},all-MiniLM-L6-v2", "TARS_CHAT_ENGINE": "server",
                              "TARS_QUEUE_MAX_WAIT_S": "0", "TARS_REQUEST_TIMEOUT_S": "900"},
                         args=["--models-dir", str(work / "models")])
    with node:
        node.start(timeout=600)
        with running_webui(args.owui, node.url, "ollama", work) as webui:
            result = chat_in_browser(webui.url, args.timeout, work / "open-webui-ollama.png")
        counts = requests_by_endpoint(node.url)
        dropped = tools_dropped(node.log_text())
    api_chat = sum(v for k, v in counts.items() if k.startswith("/api/chat 200"))
    v1 = sum(v for k, v in counts.items() if k.startswith("/v1/"))
    ok = answered(result) and api_chat >= 1 and v1 == 0
    print(json.dumps({"connection": "ollama", "passed": ok, "streamed_steps": len(result["steps"]),
                      "steps": result["steps"][:12], "answer": result["text"][:300], "answer_done_s": result["done_s"],
                      "first_text_s": next((s[0] for s in result["steps"] if s[1]), None),
                      "node_requests": counts, "tools_dropped": dropped[:3], "error_shown": result["error"][:300],
                      "logs": str(work)}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
