"""The dashboard in headless Chromium, served by real node processes.

Two nodes form a cluster (pc1 on 127.0.0.2 with a simulated RTX 3060, pc2 on
127.0.0.3 with a simulated GTX 1660 Super, the real embedded models, computed on
this machine's CPU) while a thread sends chat and embedding traffic. The page must show both hosts with
their GPUs, every model with its host and state, live figures that move, and a
chart; the theme toggle must switch to dark and stay there. A third node with an
API key checks the key form. The light screenshot is kept as docs/dashboard.png.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
PORTS = range(18620, 18630)  # this file's share of 18600-18699
TOKEN = "dashboard-test-token"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def node_proc(name: str, host: str, log_dir: Path, models_dir: Path, taken: set[int], **env: str) -> ServerProcess:
    """`python -m distributed serve` on a free port of this file's range, its log in a file."""
    return ServerProcess(name, host, ports=PORTS, taken=taken, log_dir=log_dir,
                         env={"TARS_CLUSTER_TOKEN": TOKEN, "TARS_HEARTBEAT_S": "0.5",
                              "TARS_MODELS": "gemma-3-270m,all-MiniLM-L6-v2", "TARS_MODELS_DIR": str(models_dir),
                              **env})


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium) to run this test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir: Path, gemma_gguf: Path, minilm_dir: Path):  # noqa: ANN001, ANN201
    logs = tmp_path_factory.mktemp("dashboard-nodes")
    taken: set[int] = set()
    pc1 = node_proc("pc1", "127.0.0.2", logs, models_dir, taken, TARS_GPU_PROFILE="rtx3060-12gb")
    pc2 = node_proc("pc2", "127.0.0.3", logs, models_dir, taken, TARS_GPU_PROFILE="gtx1660s-6gb")
    try:
        pc1.start(timeout=180)
        pc2.env["TARS_PEERS"] = pc1.url
        pc2.launch()

        def joined() -> bool:
            s = httpx.get(f"{pc1.url}/status", timeout=2).json()
            where = {m["id"]: (m["node"], m["state"]) for m in s["models"]}
            return any(p["name"] == "pc2" and p["state"] == "alive" for p in s["peers"]) and \
                where.get("all-MiniLM-L6-v2") == ("pc2", "ready")

        wait_until(joined, 180, "pc1 joined by pc2 with the embedding model ready", pc1, pc2)
        yield pc1, pc2
    finally:
        for n in (pc2, pc1):
            n.stop()


@pytest.fixture(scope="module")
def traffic(cluster):
    """Chat on pc1 and embeddings through pc1 (computed on pc2) until the module ends."""
    pc1, _ = cluster
    stop = threading.Event()
    sent = {"chat": 0, "embed": 0}

    def loop() -> None:
        with httpx.Client(base_url=pc1.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                i += 1
                c.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [f"sentence {i}"] * 4})
                sent["embed"] += 1
                if i % 3 == 0:
                    c.post("/v1/chat/completions", json={"model": "gemma-3-270m", "max_tokens": 32,
                                                         "messages": [{"role": "user", "content": f"hi {i}"}]})
                    sent["chat"] += 1
                time.sleep(0.05)

    t = threading.Thread(target=loop, name="dashboard-traffic", daemon=True)
    t.start()
    yield sent
    stop.set()
    t.join(10)


def _page(browser, errors: list[str], **kw):  # noqa: ANN001, ANN202
    page = browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme="light", **kw)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    return page


def _number(page, selector: str) -> float:  # noqa: ANN001
    text = page.inner_text(selector).replace(",", "")
    return float(text) if text not in ("", "–") else float("nan")


def _luminance(css_rgb: str) -> float:
    r, g, b = (int(x) for x in css_rgb[css_rgb.index("(") + 1:css_rgb.index(")")].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def test_hosts_models_and_live_figures_render(browser, cluster, traffic, tmp_path_factory) -> None:  # noqa: ANN001
    pc1, _ = cluster
    errors: list[str] = []
    page = _page(browser, errors)
    page.goto(pc1.url + "/")

    page.wait_for_selector('#hosts .host[data-host="pc2"]', timeout=15000)
    card1 = page.locator('#hosts .host[data-host="pc1"]')
    card2 = page.locator('#hosts .host[data-host="pc2"]')
    assert "RTX 3060" in card1.inner_text() and "this node" in card1.inner_text()
    assert "server" in card1.inner_text() and "simulated" in card1.inner_text()
    assert "°C" in card1.locator(".temp").inner_text() and "W" in card1.locator(".power").inner_text()
    width = card1.locator(".gpu .bar > span").first.evaluate("e => parseFloat(e.style.width)")
    assert 0 < width < 100  # the simulated card has some VRAM in use, not all of it
    assert "GTX 1660" in card2.inner_text() and "worker" in card2.inner_text() and "alive" in card2.inner_text()
    assert "all-MiniLM-L6-v2" in card2.locator(".chips").inner_text()
    assert "gemma-3-270m" in card1.locator(".chips").inner_text()

    rows = {r.get_attribute("data-model"): r.inner_text() for r in page.locator("#models tbody tr[data-model]").all()}
    assert "pc1" in rows["gemma-3-270m"] and "ready" in rows["gemma-3-270m"]
    assert "pc2" in rows["all-MiniLM-L6-v2"] and "ready" in rows["all-MiniLM-L6-v2"]
    assert page.locator("#plan tbody tr[data-model]").count() >= 2
    assert page.inner_text("#health") == "healthy"

    # live figures: tokens/s from pc1's chat model, requests counting up between polls
    page.wait_for_function("parseFloat(document.querySelector('#stat-tps [data-value]').textContent) > 0",
                           timeout=20000)
    first = _number(page, "#stat-misc [data-value]")
    page.wait_for_function(f"parseFloat(document.querySelector('#stat-misc [data-value]').textContent"
                           f".replace(/,/g, '')) > {first}", timeout=10000)
    assert _number(page, "#stat-queue [data-value]") >= 0
    # the chart has history and draws a line
    page.wait_for_timeout(4500)
    inked = page.evaluate("""() => {
        const c = document.querySelector('#stat-tps canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n;
    }""")
    assert inked > 200, "the tokens/s chart drew nothing"
    # docs/dashboard.png is refreshed on demand (TARS_UPDATE_SCREENSHOT=1), so a test
    # run leaves the checkout clean; otherwise the shot still proves the page renders.
    shot = (ROOT / "docs" / "dashboard.png" if os.environ.get("TARS_UPDATE_SCREENSHOT")
            else tmp_path_factory.mktemp("shot") / "dashboard.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert traffic["chat"] > 0 and traffic["embed"] > 0
    assert not errors, errors
    page.close()


def test_phone_width_dark_page_fits_and_loads_nothing_external(browser, cluster) -> None:  # noqa: ANN001
    """On a 390-px phone in dark mode: no sideways scrolling of the page (wide tables scroll
    in their own box), every request goes to the node, and the simulated peer says so."""
    pc1, _ = cluster
    requests: list[str] = []
    page = browser.new_page(viewport={"width": 390, "height": 844}, color_scheme="dark")
    page.on("request", lambda r: requests.append(r.url))
    page.goto(pc1.url + "/")
    page.wait_for_selector('#hosts .host[data-host="pc2"]', timeout=15000)
    page.wait_for_timeout(2500)  # a refresh or two
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert _luminance(page.evaluate("getComputedStyle(document.body).backgroundColor")) < 0.2
    # the text is light on the dark page: readable
    assert _luminance(page.evaluate("getComputedStyle(document.querySelector('#models td')).color")) > 0.6
    assert "simulated" in page.locator('#hosts .host[data-host="pc2"]').inner_text()
    assert requests and all(u.startswith(pc1.url + "/") for u in requests), requests
    page.close()


def test_dark_mode_toggle_switches_and_persists(browser, cluster) -> None:  # noqa: ANN001
    pc1, _ = cluster
    errors: list[str] = []
    page = _page(browser, errors)
    page.goto(pc1.url + "/dashboard")
    page.wait_for_selector("#hosts .host")
    light_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert _luminance(light_bg) > 0.8
    assert page.inner_text("#theme-toggle") == "Dark"

    page.click("#theme-toggle")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    dark_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert _luminance(dark_bg) < 0.2
    assert page.evaluate("localStorage.getItem('tars.theme')") == "dark"
    assert page.inner_text("#theme-toggle") == "Light"

    page.reload()
    page.wait_for_selector("#hosts .host")
    assert _luminance(page.evaluate("getComputedStyle(document.body).backgroundColor")) < 0.2
    page.click("#theme-toggle")
    assert _luminance(page.evaluate("getComputedStyle(document.body).backgroundColor")) > 0.8
    assert not errors, errors
    page.close()


def test_system_dark_preference_is_followed(browser, cluster) -> None:  # noqa: ANN001
    pc1, _ = cluster
    page = browser.new_page(color_scheme="dark")
    page.goto(pc1.url + "/dashboard")
    page.wait_for_selector("#hosts .host")
    assert _luminance(page.evaluate("getComputedStyle(document.body).backgroundColor")) < 0.2
    assert page.inner_text("#theme-toggle") == "Light"
    page.close()


def test_worker_dashboard_shows_its_embeddings_per_second(browser, cluster, traffic) -> None:  # noqa: ANN001
    _, pc2 = cluster
    errors: list[str] = []
    page = _page(browser, errors)
    page.goto(pc2.url + "/dashboard/")  # the trailing-slash form works too
    page.wait_for_selector('#hosts .host[data-host="pc1"]', timeout=15000)
    assert page.inner_text("#node-name") == "pc2" and page.inner_text("#node-role") == "worker"
    page.wait_for_function("parseFloat(document.querySelector('#stat-eps [data-value]').textContent"
                           ".replace(/,/g, '')) > 0", timeout=20000)
    assert not errors, errors
    page.close()


def test_api_key_form_then_data_then_unreachable_banner(browser, tmp_path) -> None:  # noqa: ANN001
    node = node_proc("keyed", "127.0.0.2", tmp_path, tmp_path / "models", set(),
                     TARS_API_KEY="s3cret-key", TARS_BACKEND_OVERRIDE="fake")  # the page, not the models, is tested
    try:
        node.start(timeout=60)
        errors: list[str] = []
        page = _page(browser, errors)
        page.goto(node.url + "/")
        page.wait_for_selector("#key-form:not([hidden])", timeout=10000)
        assert "API key" in page.inner_text("#banner")
        assert page.locator("#hosts .host").count() == 0

        page.fill("#key-input", "wrong-key")
        page.click("#key-form button[type=submit]")
        page.wait_for_function("document.querySelector('#banner').textContent.includes('rejected')", timeout=10000)

        page.fill("#key-input", "s3cret-key")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector('#hosts .host[data-host="keyed"]', timeout=10000)
        assert page.evaluate("localStorage.getItem('tars.apiKey')") == "s3cret-key"
        # on a host without a GPU the plan says CPU, not "0" GPU layers and "0 MB" of VRAM
        page.wait_for_selector("#plan tbody tr[data-model]")
        status = httpx.get(f"{node.url}/status", headers={"Authorization": "Bearer s3cret-key"}, timeout=5).json()
        if not status["profile"]["gpus"]:
            assert all("CPU" in row.inner_text() and "0 MB" not in row.inner_text()
                       for row in page.locator("#plan tbody tr[data-model]").all())
        assert page.is_hidden("#key-form") and page.is_hidden("#banner")

        node.stop()
        page.wait_for_selector("#banner:not([hidden])", timeout=15000)
        assert "Cannot reach the node" in page.inner_text("#banner")
        assert page.inner_text("#health") == "unreachable"
        assert page.locator('#hosts .host[data-host="keyed"]').count() == 1  # the last figures stay
        # the only errors are the browser's own logs of the 401s and the refused connections
        assert all("401" in e or "Failed to" in e or "ERR_CONNECTION" in e for e in errors), errors
        page.close()
    finally:
        node.stop()

