"""End to end: the official ``ollama`` Python client against real node processes.

One node on 127.0.0.2 with the llama-server engine and the default models (SmolLM2 chat,
all-MiniLM-L6-v2 embeddings) and ``TARS_OLLAMA_PORT`` set: the client talks to that second
port, as an app that only knows Ollama's port would. List, chat, stream, structured output,
generate, embed, show, ps, pull (a runtime deploy of the embedded Gemma), delete, errors.
Then two nodes (127.0.0.2 / 127.0.0.3, fake backend): a model on the other host answers
through this one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from distributed.engine.binary import locate
from tests.support import ServerProcess, free_port, wait_until

ollama = pytest.importorskip("ollama")
pytestmark = [pytest.mark.slow, pytest.mark.e2e]

HOST = "127.0.0.2"
CHAT, EMBED, BASE = "smollm2-135m-instruct", "all-MiniLM-L6-v2", "gemma-3-270m"
PORTS = range(19200, 19240)  # this file's share


@pytest.fixture(scope="module")
def node(gemma_gguf: Path, tmp_path_factory):
    if locate(os.environ.get("TARS_ENGINE_BIN", "")) is None:
        pytest.skip("no llama-server built (scripts/build_engine.sh)")
    models = tmp_path_factory.mktemp("ollama-models")  # its own: /api/pull and /api/delete persist the desired set
    (models / gemma_gguf.name).symlink_to(gemma_gguf)  # the assembled embedded Gemma, not copied again
    taken: set[int] = set()
    oport = free_port(HOST, range(19240, 19260), taken)
    env = {"TARS_CHAT_ENGINE": "server", "TARS_PARALLEL": "2", "TARS_THREADS": "1", "TARS_CONTEXT": "1024",
           "TARS_MODELS_DIR": str(models), "TARS_OLLAMA_PORT": str(oport)}
    if os.environ.get("TARS_ENGINE_BIN"):
        env["TARS_ENGINE_BIN"] = os.environ["TARS_ENGINE_BIN"]
    server = ServerProcess("ollama-e2e", HOST, ports=PORTS, taken=taken, env=env,
                           log_dir=tmp_path_factory.mktemp("ollama-e2e"))
    with server:
        server.start(timeout=300)
        server.ollama_url = f"http://{HOST}:{oport}"  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="module")
def client(node):
    return ollama.Client(host=node.ollama_url, timeout=180)


def test_the_ollama_port_serves_the_same_api(node, client):
    assert f"also listening on http://{HOST}:{node.ollama_url.rsplit(':', 1)[1]}" in node.log_text()
    r = httpx.get(node.ollama_url + "/", timeout=10)
    assert r.text == "Ollama is running"
    assert httpx.get(node.url + "/", timeout=10).headers["content-type"].startswith("text/html")  # the dashboard
    assert httpx.get(node.url + "/api/version", timeout=10).json() == httpx.get(node.ollama_url + "/api/version",
                                                                                 timeout=10).json()


def test_list_show_ps(client):
    names = {m.model for m in client.list().models}
    assert {f"{CHAT}:latest", f"{EMBED}:latest"} <= names
    shown = client.show(f"{CHAT}:latest")
    assert shown.details.format == "gguf" and shown.details.family == "llama"  # from the GGUF header
    assert shown.modelinfo["llama.context_length"] == 1024 and "completion" in shown.capabilities
    assert "<|im_start|>" in shown.template  # the model's own chat template
    running = {m.model: m for m in client.ps().models}
    assert running[f"{CHAT}:latest"].context_length == 1024 and running[f"{EMBED}:latest"].context_length == 256


def test_chat(client):
    r = client.chat(model=CHAT, messages=[{"role": "user", "content": "Name three colours."}],
                    options={"num_predict": 24, "temperature": 0, "top_k": 20, "repeat_penalty": 1.1})
    assert r.message.role == "assistant" and r.message.content.strip()
    assert r.done and r.done_reason in ("stop", "length") and 0 < r.eval_count <= 24
    assert r.prompt_eval_count > 0 and r.eval_duration > 0 and r.total_duration >= r.eval_duration
    r = client.chat(model=CHAT, messages=[{"role": "user", "content": "Hi."}], think=False,  # apps send it
                    options={"num_predict": 8})
    assert r.message.content and not r.message.thinking


def test_stream(client):
    parts = list(client.chat(model=f"{CHAT}:latest", messages=[{"role": "user", "content": "Count to five."}],
                             stream=True, options={"num_predict": 16, "temperature": 0}))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts).strip()
    pieces = sum(1 for p in parts[:-1] if p.message.content)  # a piece per token
    assert parts[-1].eval_count in (pieces, pieces + 1)  # + the end token when it stopped by itself


def test_structured_output_follows_the_schema(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = client.chat(model=CHAT, messages=[{"role": "user", "content": "Give a person's name and age as JSON."}],
                    format=schema, options={"temperature": 0, "num_predict": 64})
    data = json.loads(r.message.content)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)
    r = client.chat(model=CHAT, messages=[{"role": "user", "content": "A JSON object with a colour."}], format="json",
                    options={"temperature": 0, "num_predict": 96})
    assert isinstance(json.loads(r.message.content), dict)


def test_generate(client):
    r = client.generate(model=CHAT, prompt="The capital of France is", raw=True,
                        options={"num_predict": 8, "temperature": 0})
    assert "Paris" in r.response and r.done
    r = client.generate(model=CHAT, prompt="Say hello.", system="You answer in one word.",
                        options={"num_predict": 8, "temperature": 0})
    assert r.response.strip()


def test_embed(client):
    import numpy as np

    e = client.embed(model=EMBED, input=["The cat sat on the mat.", "A feline rested on the rug.", "Stock prices"])
    v = np.asarray(e.embeddings)
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-3)
    assert v[0] @ v[1] > v[0] @ v[2]  # related sentences are closer
    assert len(client.embeddings(model=EMBED, prompt="hello").embedding) == 384


def test_tools_on_the_default_model(node, client):
    """SmolLM2 is served with the shipped ChatML template that renders tools (Hermes calls), so
    /api/show says "tools" and a request with tools reaches the model. Ollama's API has no
    tool_choice (the model chooses, "auto"), and SmolLM2 135M answers these in text rather
    than calling; a call it makes comes back in Ollama's shape (arguments an object)."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
    assert "tools" in client.show(CHAT).capabilities
    r = client.chat(model=CHAT, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                    tools=[tool], options={"temperature": 0, "num_predict": 48})
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    assert r.message.tool_calls or r.message.content.strip()
    raw = httpx.post(node.ollama_url + "/api/chat", timeout=180, json={
        "model": CHAT, "stream": False, "tools": [tool], "options": {"num_predict": 8},
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]})
    assert raw.status_code == 200 and "x-tars-tools-dropped" not in raw.headers  # the template took them
    # a conversation that already holds a call and its result renders
    r = client.chat(model=CHAT, tools=[tool], options={"temperature": 0, "num_predict": 16}, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21 degrees and sunny", "tool_name": "get_weather"}])
    assert r.message.content.strip()


def test_errors(client):
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 404 and CHAT in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model=CHAT, messages=[{"role": "user", "content": "hi"}], options={"num_ctx": 8192})
    assert exc.value.status_code == 400 and "1024" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model=CHAT, messages=[{"role": "user", "content": "What is this?", "images": [b"\x89PNG"]}])
    assert exc.value.status_code == 400 and "no vision" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model=CHAT, messages=[{"role": "user", "content": "word " * 2000}])
    assert exc.value.status_code == 400 and "1024" in exc.value.error  # too long for the context: the limit


def test_pull_deploys_and_delete_removes(client):
    progress = list(client.pull(f"{BASE}:latest", stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    sized = [p for p in progress if p.total]
    assert sized and sized[-1].completed == sized[-1].total  # all of it is here (an embedded model)
    assert f"{BASE}:latest" in {m.model for m in client.list().models}
    r = client.generate(model=BASE, prompt="The sky is", raw=True, options={"num_predict": 6, "temperature": 0})
    assert r.response.strip()
    assert client.delete(f"{BASE}:latest").status == "success"
    assert f"{BASE}:latest" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as exc:
        client.generate(model=BASE, prompt="x")
    assert exc.value.status_code == 404


# --------------------------------------------------------------------------- two hosts
def test_a_model_on_another_host_answers_through_this_one(tmp_path: Path):
    taken: set[int] = set()
    common = {"TARS_BACKEND_OVERRIDE": "fake", "TARS_CLUSTER_TOKEN": "ollama-e2e", "TARS_HEARTBEAT_S": "1",
              "TARS_MODELS": f"{CHAT},{EMBED}"}
    pc1 = ServerProcess("pc1", "127.0.0.2", ports=PORTS, taken=taken, log_dir=tmp_path,
                        env={**common, "TARS_GPU_PROFILE": "rtx3060-12gb", "TARS_MODELS_DIR": str(tmp_path / "m1")})
    pc2 = ServerProcess("pc2", "127.0.0.3", ports=PORTS, taken=taken, log_dir=tmp_path,
                        env={**common, "TARS_GPU_PROFILE": "gtx1660s-6gb", "TARS_MODELS_DIR": str(tmp_path / "m2")})
    with pc1, pc2:
        pc1.start()
        pc2.env["TARS_PEERS"] = pc1.url
        pc2.start()

        def placed() -> bool:  # seen from both, and pc1 no longer holds its own copy of the embedding model
            for host in (pc1, pc2):
                rows = {m["id"]: m for m in httpx.get(host.url + "/models", timeout=5).json()["models"]}
                for model, where in ((CHAT, "pc1"), (EMBED, "pc2")):
                    row = rows[model]
                    if row["node"] != where or row["state"] != "ready" or "handoff" in row or "fallback" in row:
                        return False
            return True

        wait_until(placed, 120, "chat on pc1, embeddings on pc2, seen from both", pc1, pc2)
        via_pc2 = ollama.Client(host=pc2.url, timeout=60)
        assert {m.model for m in via_pc2.ps().models} == {f"{CHAT}:latest", f"{EMBED}:latest"}
        ps = {m["model"]: m for m in httpx.get(pc2.url + "/api/ps", timeout=10).json()["models"]}
        assert ps[f"{CHAT}:latest"]["node"] == "pc1" and ps[f"{EMBED}:latest"]["node"] == "pc2"  # extra fields
        r = httpx.post(pc2.url + "/api/chat", timeout=60, json={
            "model": CHAT, "stream": False, "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 5}}).json()
        assert (r["node"], r["via"], r["eval_count"]) == ("pc1", "pc2", 5)
        parts = list(via_pc2.chat(model=CHAT, messages=[{"role": "user", "content": "hi"}], stream=True,
                                  options={"num_predict": 5}))
        assert "".join(p.message.content for p in parts) == r["message"]["content"]  # same answer, streamed
        assert parts[-1].done and parts[-1].eval_count == 5
        with httpx.stream("POST", pc2.url + "/api/chat", timeout=60, json={
                "model": CHAT, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 5}}) as s:
            last = json.loads(list(s.iter_lines())[-1])
        assert (last["done"], last["node"], last["via"]) == (True, "pc1", "pc2")
        e = httpx.post(pc1.url + "/api/embed", json={"model": EMBED, "input": ["a", "b"]}, timeout=60).json()
        assert (e["node"], e["via"], len(e["embeddings"])) == ("pc2", "pc1", 2)
