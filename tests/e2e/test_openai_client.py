"""End to end: `python -m distributed serve` as a real process with the real embedded
models, and the official `openai` client talking to it over a socket (127.0.0.2)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.support import ROOT, ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

HOST = "127.0.0.2"
KEY = "e2e-secret-key"
MODELS = "gemma-3-270m,all-MiniLM-L6-v2"  # named, so the test does not follow the default set


@pytest.fixture(scope="module")
def server(gemma_gguf, models_dir, tmp_path_factory):
    """The node with the embedded models and an API key, on a free port of 18400-18499."""
    node = ServerProcess("e2e", HOST, ports=range(18400, 18500), log_dir=tmp_path_factory.mktemp("e2e"),
                         env={"TARS_API_KEY": KEY, "TARS_CONTEXT": "1024", "TARS_MODELS": MODELS},
                         args=["--name", "e2e", "--models-dir", str(models_dir)])
    with node:
        node.start(timeout=240)
        yield node.url, node.log


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    base, _ = server
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, timeout=120, max_retries=0)


def test_server_logs_where_it_listens_and_guards_with_the_key(server):
    base, log_path = server
    assert f"listening on {base}" in log_path.read_text()
    assert httpx.get(f"{base}/status", timeout=5).status_code == 401
    assert httpx.get(f"{base}/status", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()["node"] == "e2e"


def test_models(client):
    assert {m.id for m in client.models.list().data} == {"gemma-3-270m", "all-MiniLM-L6-v2"}


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.content.strip()
    assert r.usage.completion_tokens <= 16 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming(client):
    stream = client.chat.completions.create(model="gemma-3-270m", stream=True, max_tokens=16, temperature=0,
                                            messages=[{"role": "user", "content": "Count to five."}],
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces).strip() and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_completions(client):
    r = client.completions.create(model="gemma-3-270m", prompt="The sky is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text


def test_embeddings(client):
    import numpy as np

    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a red apple", "a green apple", "tax law"])
    v = np.asarray([d.embedding for d in r.data])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_errors_reach_the_client_as_openai_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="available models"):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="gemma-3-270m", prompt="word " * 2000)


@pytest.mark.parametrize("env, flag, expect", [
    ({"TARS_PORT": "eighty"}, [], "TARS_PORT"),
    ({"TARS_MODELS": "no-such-model"}, [], "no-such-model"),
    ({}, ["--env-file", "/nonexistent/.env"], "does not exist"),
])
def test_bad_settings_stop_start_up_with_exit_code_2(env, flag, expect, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    base.update({"TARS_MODELS_DIR": str(tmp_path), "TARS_HOST": HOST, "TARS_PORT": "18499", **env})
    r = subprocess.run([sys.executable, "-m", "distributed", "serve", *flag],
                       cwd=ROOT, env=base, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr
