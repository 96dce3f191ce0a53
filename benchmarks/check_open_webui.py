"""Open WebUI chats with a TARS node, in a real browser (issue 17): a benchmark-style check.

Starts a node serving the default models (SmolLM2 through llama-server when it is built),
starts Open WebUI from its own virtual environment (``pip install open-webui`` there;
offline: ``OFFLINE_MODE=True WEBUI_AUTH=False``, data in a temporary folder, both on
127.0.0.1) connected to the node, then drives it with Playwright in headless Chromium
(Debian's ``chromium``): types "Name three colours." into a new chat and watches the
answer arrive. It passes when the answer streams in (its text grows in several steps and
ends non-empty, no error shown) and reports what the node did with the tools Open WebUI
sent (its log's "answering without the N tools" line, if any).

    .venv/bin/python benchmarks/check_open_webui.py                    # OpenAI connection
    .venv/bin/python benchmarks/check_open_webui.py --connection ollama  # Ollama connection (/api/*)
    .venv/bin/python benchmarks/check_open_webui.py --owui /work/owui-venv --node-url http://127.0.0.1:8000

``--connection ollama`` points Open WebUI's Ollama connection at the node's root (its
``/api/*`` routes, issue 17 item 1) instead of the OpenAI one (``/v1``). Exit code 0 when
the check passes. The result goes to docs/BENCHMARKS.md ("Open WebUI").
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import ServerProcess, free_port  # noqa: E402

CHAT = "smollm2-135m-instruct"
PROMPT = "Name three colours."
KEY = "owui-check-key"


def node_process(log_dir: Path) -> ServerProcess:
    env = {"TARS_API_KEY": KEY, "TARS_MODELS": f"{CHAT},all-MiniLM-L6-v2", "TARS_QUEUE_MAX_WAIT_S": "0",
           "TARS_REQUEST_TIMEOUT_S": "1800", "TARS_LOG_LEVEL": "debug"}  # debug: llama-server's timing lines
    return ServerProcess("owui-node", "127.0.0.1", ports=range(19200, 19300), env=env, log_dir=log_dir,
                         args=["--models-dir", str(log_dir / "models")])


def webui_process(owui: Path, node_url: str, connection: str, data: Path, log_dir: Path) -> ServerProcess:
    port = free_port("127.0.0.1", range(19300, 19400))
    env = {"OFFLINE_MODE": "True", "WEBUI_AUTH": "False", "DATA_DIR": str(data), "HF_HUB_OFFLINE": "1",
           "ENABLE_VERSION_UPDATE_CHECK": "False", "DEFAULT_MODELS": CHAT, "ENABLE_EVALUATION_ARENA_MODELS": "False",
           "WEBUI_SECRET_KEY": "owui-check-secret-of-at-least-32-bytes", "SCARF_NO_ANALYTICS": "true", "DO_NOT_TRACK": "true",
           "ANONYMIZED_TELEMETRY": "false"}
    if connection == "openai":
        env.update({"ENABLE_OPENAI_API": "True", "OPENAI_API_BASE_URL": f"{node_url}/v1", "OPENAI_API_KEY": KEY,
                    "ENABLE_OLLAMA_API": "False"})
    else:  # the node's Ollama API (/api/*): the hook for issue 17 item 1
        env.update({"ENABLE_OLLAMA_API": "True", "OLLAMA_BASE_URL": node_url, "ENABLE_OPENAI_API": "False"})
    return ServerProcess("open-webui", "127.0.0.1", port=port, env=env, log_dir=log_dir, address_env=False,
                         command=[str(owui / "bin" / "open-webui"), "serve", "--host", "127.0.0.1",
                                  "--port", str(port)])


def owui_installed(owui: Path) -> bool:
    """Whether Open WebUI is installed in the virtual environment ``owui``; says how to install it when not."""
    if (owui / "bin" / "open-webui").exists():
        return True
    print(f"Open WebUI is not installed in {owui}: python3 -m venv {owui} && {owui}/bin/pip install open-webui",
          file=sys.stderr)
    return False


@contextmanager
def running_webui(owui: Path, node_url: str, connection: str, work: Path) -> Iterator[ServerProcess]:
    """Open WebUI (:func:`webui_process`, data and logs in ``work``) started and answering /health."""
    with webui_process(owui, node_url, connection, work / "owui-data", work) as webui:
        webui.start(timeout=900, ready=lambda: httpx.get(f"{webui.url}/health", timeout=5).status_code == 200,
                    what="Open WebUI's /health")
        yield webui


def tools_dropped(log: str) -> list[str]:
    """The node log's "answering without the N tools" lines (api/tool_drop.py), what follows those words."""
    return [line.split("answering without", 1)[1].strip() for line in log.splitlines() if "answering without" in line]


def answered(result: dict) -> bool:
    """The check's verdict on :func:`chat_in_browser`'s result: the answer streamed in (its text grew
    in two steps or more), ends non-empty, and no error was shown."""
    streamed = len([s for s in result["steps"] if s[1] > 0]) >= 2
    return bool(result["text"].strip()) and streamed and not result["error"]


def chat_in_browser(url: str, timeout_s: float, shot: Path) -> dict:
    """Send PROMPT in a new chat; the answer's text length over time, and the final text."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=300_000)
            page.wait_for_selector("#chat-input", timeout=300_000)
            welcome = page.get_by_role("button", name=re.compile("Let's Go", re.I))
            if welcome.count():
                welcome.first.click()
            page.locator("#chat-input").click()
            page.keyboard.type(PROMPT)
            page.keyboard.press("Enter")
            t0 = time.monotonic()
            steps: list[tuple[float, int]] = []
            text, done_at = "", None
            while time.monotonic() - t0 < timeout_s:
                answers = page.locator("#response-content-container")
                if answers.count():
                    now = answers.last.inner_text()
                    if now != text:
                        text = now
                        steps.append((round(time.monotonic() - t0, 2), len(text)))
                finished = page.locator("button[aria-label='Regenerate'], button.regenerate-response-button")
                quiet = bool(steps) and time.monotonic() - t0 - steps[-1][0] > 30  # no new text for 30 s
                if text and (finished.count() or quiet):
                    done_at = steps[-1][0]
                    break
                time.sleep(0.1)
            errors = page.locator(".text-red-500, [role='alert']")
            error_text = errors.first.inner_text() if errors.count() else ""
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return {"text": text, "steps": steps, "done_s": done_at, "error": error_text}


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM (``timeout``, a closed terminal) unwinds like Ctrl-C, so the node, Open WebUI and
    the browser this check started are stopped by their ``with`` blocks instead of orphaned."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main() -> int:
    stop_cleanly_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connection", choices=("openai", "ollama"), default="openai")
    ap.add_argument("--owui", type=Path, default=Path("/work/owui-venv"), help="Open WebUI's virtual environment")
    ap.add_argument("--node-url", default="", help="a running node (its API key: --key); default: start one")
    ap.add_argument("--key", default=KEY)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds the answer may take")
    ap.add_argument("--keep", action="store_true", help="keep the logs folder")
    args = ap.parse_args()
    if not owui_installed(args.owui):
        return 2
    work = Path(tempfile.mkdtemp(prefix="owui-check-"))
    node = None if args.node_url else node_process(work)
    t_start = time.monotonic()
    try:
        if node is not None:
            node.start(timeout=600)
        node_url = args.node_url or node.url  # type: ignore[union-attr]
        with running_webui(args.owui, node_url, args.connection, work) as webui:
            ready_s = round(time.monotonic() - t_start, 1)
            result = chat_in_browser(webui.url, args.timeout, work / "open-webui.png")
        log = node.log_text() if node is not None else ""
        dropped = tools_dropped(log)
        # llama-server's own timing lines (at debug level): the prompts Open WebUI's requests made
        prompts = [int(m.group(1)) for m in re.finditer(r"prompt eval time =.*?/\s*(\d+) tokens", log)]
        ok = answered(result)
        report = {"connection": args.connection, "passed": ok, "streamed_steps": len(result["steps"]),
                  "answer": result["text"][:300], "answer_done_s": result["done_s"],
                  "first_text_s": next((s[0] for s in result["steps"] if s[1]), None), "ready_s": ready_s,
                  "tools_dropped": dropped[:3], "prompt_tokens_per_request": prompts,
                  "error_shown": result["error"][:300],
                  "screenshot": str(work / "open-webui.png")}
        print(json.dumps(report, indent=2))
        return 0 if ok else 1
    finally:
        if node is not None:
            node.stop()
        if not args.keep:
            print(f"logs: {work} (removed; --keep keeps them)")
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs: {work}")


if __name__ == "__main__":
    sys.exit(main())
