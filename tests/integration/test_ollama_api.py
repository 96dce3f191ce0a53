"""Ollama's API in process (httpx ASGITransport) over the fake backends, driven by the
official ``ollama`` client where it has a call for the endpoint and by raw HTTP for the
wire details (NDJSON lines, error shapes, status codes, the OpenAPI document)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from distributed.api.app import create_app
from distributed.domain import HostProfile
from distributed.node import Node
from distributed.service import build
from distributed.settings import load_settings
from tests.hubstub import hub  # noqa: F401  (the hub stand-in fixture)

ollama = pytest.importorskip("ollama")
pytestmark = pytest.mark.anyio

CHAT, EMBED = "smollm2-135m-instruct", "all-MiniLM-L6-v2"


@contextlib.asynccontextmanager
async def serve(tmp_path, **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any, Node]]:
    settings = load_settings(None, **{"node_name": "pc1", "backend_override": "fake", "models_dir": tmp_path,
                                      "models": [CHAT, EMBED], "context": 2048, **overrides})
    service = build(settings, profile=HostProfile(hostname="pc1", cpu_model="test cpu", cpu_cores=2,
                                                  ram_total_mb=16000, ram_free_mb=12000))
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:11434") as raw:
            for t in node.local_targets():
                await t.wait_loaded(10)
            client = ollama.AsyncClient(host="http://127.0.0.1:11434", transport=transport)
            yield raw, client, node


def lines(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.headers["content-type"].startswith("application/x-ndjson"), r.headers
    return [orjson.loads(line) for line in r.text.splitlines() if line]


def error(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body  # Ollama's shape, nothing else
    for w in words:
        assert w in body["error"], body["error"]
    return body["error"]


async def test_list_show_ps_version_with_the_official_client(tmp_path):
    async with serve(tmp_path) as (raw, client, node):
        listed = await client.list()
        names = {m.model for m in listed.models}
        assert names == {f"{CHAT}:latest", f"{EMBED}:latest"}
        chat = next(m for m in listed.models if m.model == f"{CHAT}:latest")
        assert chat.details.format == "gguf" and chat.details.parameter_size == "135M"
        assert chat.details.quantization_level == "Q4_1" and chat.size > 0 and len(chat.digest) == 64
        shown = await client.show(f"{CHAT}:latest")
        assert "completion" in shown.capabilities and shown.details.family
        arch = shown.modelinfo["general.architecture"]
        assert shown.modelinfo[f"{arch}.context_length"] == 2048  # the context it is served with
        assert "num_ctx" in shown.parameters
        assert (await client.show(EMBED)).capabilities == ["embedding"]
        running = await client.ps()
        assert {m.name for m in running.models} == names
        assert all(m.context_length and m.expires_at for m in running.models)
        assert (await raw.get("/api/version")).json()["version"].count(".") == 2
        assert (await raw.head("/api/version")).status_code == 200
        assert (await raw.head("/api/tags")).status_code == 200


async def test_chat_streams_ndjson_ending_with_the_counts(tmp_path):
    async with serve(tmp_path) as (raw, client, node):
        r = await raw.post("/api/chat", json={"model": f"{CHAT}:latest", "options": {"num_predict": 5},
                                              "messages": [{"role": "user", "content": "hi"}]})
        got = lines(r)  # stream defaults to true
        assert [g["done"] for g in got] == [False] * 5 + [True]
        assert all(g["model"] == f"{CHAT}:latest" and g["created_at"].endswith("Z") for g in got)
        text = "".join(g["message"]["content"] for g in got)
        done = got[-1]
        assert done["done_reason"] == "length" and done["eval_count"] == 5 and done["message"]["content"] == ""
        for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_duration"):
            assert isinstance(done[key], int) and done[key] >= 0, key
        assert done["total_duration"] >= done["prompt_eval_duration"]
        # the same answer, not streamed, through the official client (same seed: same words)
        whole = await client.chat(model=CHAT, messages=[{"role": "user", "content": "hi"}], stream=False,
                                  options={"num_predict": 5})
        assert whole.message.content == text and whole.done and whole.eval_count == 5
        parts = [p async for p in await client.chat(model=CHAT, messages=[{"role": "user", "content": "hi"}],
                                                    stream=True, options={"num_predict": 5})]
        assert "".join(p.message.content for p in parts) == text and parts[-1].done


async def test_generate_and_a_model_on_the_default_tag(tmp_path):
    async with serve(tmp_path) as (raw, client, node):
        r = await client.generate(model=f"{CHAT}:latest", prompt="The sky is", options={"num_predict": 4})
        assert r.done and r.response and r.eval_count == 4 and r.done_reason == "length"
        raw_r = await client.generate(model=CHAT, prompt="The sky is", raw=True, options={"num_predict": 4})
        assert raw_r.response != r.response  # raw: the prompt as is, no chat template
        loaded = await raw.post("/api/generate", json={"model": CHAT})  # empty prompt: load the model
        assert loaded.json()["done_reason"] == "load" and loaded.json()["done"] is True
        loaded = await raw.post("/api/chat", json={"model": CHAT, "messages": []})
        assert loaded.json()["message"] == {"role": "assistant", "content": ""}


async def test_embed_and_the_older_embeddings(tmp_path):
    async with serve(tmp_path) as (raw, client, node):
        e = await client.embed(model=EMBED, input=["hello", "world"])
        assert len(e.embeddings) == 2 and len(e.embeddings[0]) == 384 and e.prompt_eval_count == 2
        one = await client.embed(model=f"{EMBED}:latest", input="hello")
        assert one.embeddings[0] == e.embeddings[0]
        old = await client.embeddings(model=EMBED, prompt="hello")
        assert len(old.embedding) == 384
        assert (await raw.post("/api/embeddings", json={"model": EMBED, "prompt": ""})).json() == {"embedding": []}
        error(await raw.post("/api/embed", json={"model": EMBED, "input": "x", "dimensions": 12}), 400, "384")
        error(await raw.post("/api/embed", json={"model": EMBED, "input": "x", "truncate": False}), 400, "truncate")
        error(await raw.post("/api/embed", json={"model": EMBED, "input": "x", "options": {"temperature": 1}}),
              400, "options.temperature")
        error(await raw.post("/api/embed", json={"model": EMBED, "input": "x", "options": {"num_ctx": 4096}}),
              400, "256")
        error(await raw.post("/api/embed", json={"model": CHAT, "input": "x"}), 400, "chat model")


async def test_errors_in_ollamas_shape_with_the_right_status(tmp_path):
    async with serve(tmp_path) as (raw, client, node):
        msg = [{"role": "user", "content": "hi"}]
        text = error(await raw.post("/api/chat", json={"model": "nope", "messages": msg}), 404, "nope", CHAT, EMBED)
        with pytest.raises(ollama.ResponseError) as exc:
            await client.chat(model="nope:latest", messages=msg)
        assert exc.value.status_code == 404 and "nope" in exc.value.error
        assert "Traceback" not in text
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "options": {"num_gpu": 1}}),
              400, "options.num_gpu")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "options": {"bogus": 1}}),
              400, "bogus", "num_predict")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "options": {"top_k": -1}}),
              400, "options.top_k")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "options": {"temperature": "hot"}}),
              400, "options.temperature")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "options": {"num_ctx": 100000}}),
              400, "2048")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "think": True}), 400,
              "chat_template_kwargs")  # the fake engine refuses the template switches by name
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "keep_alive": 0}), 400, "keep_alive")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "keep_alive": "soon"}), 400,
              "keep_alive")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "format": "xml"}), 400, "format")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": msg, "extra": 1}), 400, "extra")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": [{"role": "robot", "content": "x"}]}),
              400, "messages[0].role")
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": [
            {"role": "user", "content": "what is this?", "images": ["aGk="]}]}), 400, "has no vision")
        error(await raw.post("/api/generate", json={"model": CHAT, "prompt": "x", "images": ["aGk="]}), 400,
              "has no vision")
        error(await raw.post("/api/generate", json={"model": CHAT, "prompt": "x", "suffix": "y"}), 400, "suffix")
        error(await raw.post("/api/generate", json={"model": CHAT, "prompt": "x", "template": "{{ .Prompt }}"}),
              400, "template")
        error(await raw.post("/api/generate", json={"model": CHAT, "prompt": "x", "context": [1, 2]}), 400,
              "context")
        error(await raw.post("/api/generate", json={"model": CHAT, "prompt": "x", "raw": True, "system": "s"}),
              400, "system")
        error(await raw.post("/api/generate", json={"model": EMBED, "prompt": "x"}), 400, "embedding model")
        error(await raw.post("/api/show", json={"model": "nope"}), 404, "nope")
        error(await raw.post("/api/show", json={}), 400, "model")
        error(await raw.post("/api/chat", content=b"{not json", headers={"content-type": "application/json"}), 400)
        error(await raw.get("/api/nothing-here"), 404)


async def test_options_reach_the_domain_request(tmp_path):
    async with serve(tmp_path) as (raw, client, node):
        seen: list[Any] = []
        target = node.targets[CHAT]
        original = target.stream

        def spy(req):
            seen.append(req)
            return original(req)

        target.stream = spy  # type: ignore[method-assign]
        r = await raw.post("/api/chat", json={"model": CHAT, "stream": False, "messages": [{"role": "user",
                                              "content": "hi"}], "options": {"num_predict": 7, "temperature": 0.2,
                                              "top_p": 0.5, "seed": 3, "stop": ["x"], "num_ctx": 1024}})
        assert r.status_code == 200, r.text
        req = seen[-1]
        assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop) == (7, 0.2, 0.5, 3, ["x"])
        # llama.cpp's samplers go to GenerateRequest.sampling; the fake engine refuses them by name (400)
        error(await raw.post("/api/chat", json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}],
                                               "options": {"top_k": 20}}), 400, "top_k")
        assert seen[-1].sampling == {"top_k": 20}


async def test_pull_is_a_runtime_deploy_and_delete_a_remove(tmp_path):
    async with serve(tmp_path) as (raw, client, node):
        statuses = [p.status async for p in await client.pull("gemma-3-270m:latest", stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        assert any(s.startswith("pulling ") and s != "pulling manifest" for s in statuses)
        assert "gemma-3-270m" in node.targets
        assert "gemma-3-270m:latest" in {m.model for m in (await client.list()).models}
        assert (await client.pull("gemma-3-270m")).status == "success"  # stream=False: one object
        assert (await client.delete("gemma-3-270m:latest")).status == "success"
        assert "gemma-3-270m" not in {m.model.split(":")[0] for m in (await client.list()).models}
        with pytest.raises(ollama.ResponseError) as exc:
            await client.delete("gemma-3-270m")
        assert exc.value.status_code == 404
        error(await raw.post("/api/pull", json={"model": "no-such-model"}), 404, "no-such-model", "gemma-3-270m")


async def test_every_route_is_in_openapi_and_root_stays_the_dashboard(tmp_path):
    async with serve(tmp_path) as (raw, client, node):
        doc = (await raw.get("/openapi.json")).json()
        want = {"/api/tags": "get", "/api/version": "get", "/api/ps": "get", "/api/show": "post",
                "/api/chat": "post", "/api/generate": "post", "/api/embed": "post", "/api/embeddings": "post",
                "/api/pull": "post", "/api/delete": "delete"}
        for path, method in want.items():
            assert method in doc["paths"][path], path
        body = doc["paths"]["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "messages" in body["properties"] and "$ref" not in orjson.dumps(body).decode()
        r = await raw.get("/")  # TARS_OLLAMA_PORT is off: the dashboard
        assert r.headers["content-type"].startswith("text/html")


async def test_root_says_ollama_is_running_on_the_ollama_port(tmp_path):
    async with serve(tmp_path, ollama_port=11434) as (raw, client, node):
        r = await raw.get("/")  # the ASGI scope's server port is the URL's: 11434
        assert r.text == "Ollama is running" and r.headers["content-type"].startswith("text/plain")
        assert (await raw.head("/")).status_code == 200
    async with serve(tmp_path, ollama_port=11435) as (raw, client, node):
        assert (await raw.get("/")).headers["content-type"].startswith("text/html")


async def test_a_model_only_a_peers_catalog_has_is_listed_from_its_report(tmp_path):
    async with serve(tmp_path) as (raw, client, node):
        real = node.models

        def models():
            return [*real(), {"id": "peer-only", "kind": "chat", "backend": "llama_cpp", "quant": "Q4_0",
                              "context": 4096, "state": "ready", "node": "pc2"}]

        node.models = models  # type: ignore[method-assign]
        rows = {m.model: m for m in (await client.list()).models}
        assert rows["peer-only:latest"].details.quantization_level == "Q4_0"
        ps = {m["model"]: m for m in (await raw.get("/api/ps")).json()["models"]}
        assert ps["peer-only:latest"]["context_length"] == 4096 and ps["peer-only:latest"]["node"] == "pc2"


async def test_tools_the_model_cannot_take_are_dropped_saying_so(tmp_path):
    from distributed.errors import ToolsUnsupported

    async with serve(tmp_path) as (raw, client, node):
        target = node.targets[CHAT]
        original = target.stream

        def no_tools(req):  # a model whose chat template renders no tools
            if req.tools:
                raise ToolsUnsupported(f"model '{CHAT}': its chat template cannot do tool calls")
            return original(req)

        target.stream = no_tools  # type: ignore[method-assign]
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
        body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "tools": [tool],
                "options": {"num_predict": 3}}
        r = await raw.post("/api/chat", json=body)  # streamed
        assert r.status_code == 200 and "template" in r.headers["x-tars-tools-dropped"]
        assert "tools dropped" in lines(r)[-1]["notes"][0]
        r = await raw.post("/api/chat", json={**body, "stream": False})
        assert r.status_code == 200 and r.headers["x-tars-tools-dropped"] and r.json()["eval_count"] == 3
        assert (await client.chat(**{k: v for k, v in body.items() if k != "options"})).message.content


async def test_pull_takes_a_hub_reference_as_ollama_does(hub, smollm2_gguf, tmp_path):  # noqa: F811
    from tests.hubstub import SMOL_REPO, add_repos

    add_repos(hub, smollm2_gguf)
    ref = f"hf.co/{SMOL_REPO}:Q4_1"
    async with serve(tmp_path) as (raw, client, node):
        statuses = [p.status async for p in await client.pull(ref, stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
        assert ref in node.targets and ref in {m.model for m in (await client.list()).models}  # served by that name
        r = await client.chat(model=ref, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
        assert r.message.content and r.model == ref
        text = error(await raw.post("/api/pull", json={"model": f"hf.co/{SMOL_REPO}:Q5_K_M"}), 404, "Q5_K_M")
        assert "Q4_K_M" in text  # the quants the repo has
        error(await raw.post("/api/pull", json={"model": "hf.co/tars-test/Nothing-Here"}), 404,
              "tars-test/Nothing-Here")
        assert (await client.delete(ref)).status == "success"
