"""Open WebUI chatting with the default model through its *Ollama* connection, in a real
browser (issue 17.5, the Ollama half). A check to run before closing the issue, not CI:
it needs Open WebUI in a venv of its own and takes minutes on a 2-core machine.

Starts (``tests/support.ServerProcess``) one node on 127.0.0.2 with the llama-server engine
and the default models, and Open WebUI on 127.0.0.1 with only its Ollama connection, pointed
at the node (``OLLAMA_BASE_URL``; ``ENABLE_OPENAI_API=False``, ``OFFLINE_MODE=True``,
``WEBUI_AUTH=False``, its own data folder). Headless Chromium (Playwright, Debian's
``/usr/bin/chromium``) opens Open WebUI, checks that the model picker shows the node's
model, sends a message and watches the answer grow in the page until Open WebUI shows its
Regenerate button. It passes when the answer is there, grew in several steps (streamed),
and the node counted the requests on ``/api/*`` (none on ``/v1``). Whether the tools Open
WebUI sends with every chat reached the model or were dropped (api/tool_drop.py) is read
from the node's log. A screenshot is written next to the logs.

Setup once (about 2-10 minutes; Open WebUI and its dependencies are ~7 GB)::

    python3 -m venv /tmp/owui-venv && /tmp/owui-venv/bin/pip install open-webui

Run from the repository root::

    .venv/bin/python -m benchmarks.openwebui_ollama --open-webui /tmp/owui-venv/bin/open-webui
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHROMIUM = "/usr/bin/chromium"
CHAT = "smollm2-135m-instruct"


def requests_by_endpoint(node_url: str) -> dict[str, int]:
    """The node's request counts by endpoint (its Prometheus text)."""
    counts: dict[str, int] = {}
    for line in httpx.get(node_url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r'tars_requests_total\{endpoint="([^"]+)",model="[^"]*",status="(\d+)"\} ([0-9.]+)', line)
        if m and float(m.group(3)):
            key = f"{m.group(1)} {m.group(2)}"
            counts[key] = counts.get(key, 0) + int(float(m.group(3)))
    return counts


def chat_in_browser(url: str, prompt: str, timeout_s: float, shot: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_selector("#chat-input", timeout=120_000)
        welcome = page.get_by_role("button", name="Okay, Let's Go!")  # the release notes of a first visit
        if welcome.count():
            welcome.click()
        picked = page.locator(f"[aria-label='Selected model: {CHAT}:latest']")
        picked.wait_for(timeout=60_000)
        page.locator("#chat-input").click()
        page.keyboard.type(prompt)
        t0 = time.monotonic()
        page.keyboard.press("Enter")
        growth: list[tuple[float, int]] = []
        text, done = "", False
        while time.monotonic() - t0 < timeout_s:
            answers = page.locator("#response-content-container")
            if answers.count():
                now = answers.last.inner_text()
                if now != text:
                    text = now
                    growth.append((round(time.monotonic() - t0, 2), len(now)))
            if text and page.locator("button[aria-label='Regenerate']").count():
                done = True
                break
            time.sleep(0.1)
        page.screenshot(path=str(shot))
        browser.close()
    return {"answer": text, "growth": growth, "done": done, "seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--open-webui", default="/tmp/owui-venv/bin/open-webui", help="the open-webui command")
    ap.add_argument("--prompt", default="Name three colours.")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds the answer may take (a 2-core box is slow)")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads; 0 = the node's default")
    args = ap.parse_args()
    if not Path(args.open_webui).exists():
        raise SystemExit(f"{args.open_webui} not found: python3 -m venv /tmp/owui-venv && "
                         "/tmp/owui-venv/bin/pip install open-webui")
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} not found: apt-get install chromium")

    from tests.support import ServerProcess, free_port

    work = Path(tempfile.mkdtemp(prefix="owui-ollama-"))
    env = {"TARS_CHAT_ENGINE": "server", "TARS_MODELS_DIR": str(work / "models"), "TARS_LOG_LEVEL": "info"}
    if args.threads:
        env["TARS_THREADS"] = str(args.threads)
    node = ServerProcess("node", "127.0.0.2", ports=range(19300, 19320), env=env, log_dir=work)
    ui_port = free_port("127.0.0.1", range(19320, 19340))
    (work / "owui").mkdir()
    ui = ServerProcess("open-webui", "127.0.0.1", port=ui_port, log_dir=work, cwd=work / "owui",
                       command=[args.open_webui, "serve", "--host", "127.0.0.1", "--port", str(ui_port)],
                       env={"DATA_DIR": str(work / "owui"), "OFFLINE_MODE": "True", "WEBUI_AUTH": "False",
                            "ENABLE_OPENAI_API": "False", "ENABLE_OLLAMA_API": "True"})
    print(f"logs and screenshot in {work}", flush=True)
    with node, ui:
        node.start(timeout=300)
        ui.env["OLLAMA_BASE_URL"] = node.url
        ui.start(timeout=600, ready=lambda: httpx.get(ui.url + "/health", timeout=5).status_code == 200,
                 what="Open WebUI /health 200")
        print(f"node {node.url}, Open WebUI {ui.url} (its Ollama connection → {node.url})", flush=True)
        got = chat_in_browser(ui.url, args.prompt, args.timeout, work / "open-webui-ollama.png")
        counts = requests_by_endpoint(node.url)
        dropped = [ln for ln in node.log_text().splitlines() if "answering without the" in ln]
    steps = len(got["growth"])
    first = got["growth"][0][0] if got["growth"] else None
    print(f"\nanswer ({got['seconds']} s, first text after {first} s, {steps} visible steps):\n{got['answer'][:600]}")
    print(f"growth (s, characters): {got['growth'][:12]}{' ...' if steps > 12 else ''}")
    print("node requests:", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print("tools Open WebUI sent:", "dropped — " + dropped[-1].split("answering")[-1][:200] if dropped
          else "taken by the model's chat template (none dropped)")
    api_chat = sum(v for k, v in counts.items() if k.startswith("/api/chat 200"))
    v1 = sum(v for k, v in counts.items() if k.startswith("/v1/"))
    ok = got["done"] and got["answer"].strip() and steps >= 3 and api_chat >= 1 and v1 == 0
    print("PASS: Open WebUI chats through its Ollama connection and the answer streams" if ok else
          f"FAIL: done={got['done']} steps={steps} /api/chat 200={api_chat} /v1 requests={v1}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
