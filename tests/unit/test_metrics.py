"""Metrics: one registry per node, request/generation counters, scrape-time gauges."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from distributed.domain import GPUInfo
from distributed.metrics import Metrics


def _samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_two_nodes_in_one_process_have_separate_registries():
    a, b = Metrics("pc1"), Metrics("pc2")
    a.observe_request("/inference", "m", 200, 0.1)
    sa, sb = _samples(a), _samples(b)
    assert sa[("tars_requests_total", (("endpoint", "/inference"), ("model", "m"), ("status", "200")))] == 1
    assert not any(k[0] == "tars_requests_total" for k in sb)
    assert sa[("tars_node_info", (("node", "pc1"),))] == 1
    assert sb[("tars_node_info", (("node", "pc2"),))] == 1


def test_requests_latency_tokens_ttft_and_embeddings():
    m = Metrics("n")
    for status in (200, 200, 429):
        m.observe_request("/v1/chat/completions", "gemma", status, 0.3)
    m.observe_generation("gemma", 12, 0.04)
    m.observe_generation("gemma", 0, None)  # a cancelled request before its first token
    m.observe_embeddings("minilm", 32)
    s = _samples(m)
    lab = (("endpoint", "/v1/chat/completions"), ("model", "gemma"))
    assert s[("tars_requests_total", (*lab, ("status", "200")))] == 2
    assert s[("tars_requests_total", (*lab, ("status", "429")))] == 1
    assert s[("tars_request_duration_seconds_count", lab)] == 3
    assert abs(s[("tars_request_duration_seconds_sum", lab)] - 0.9) < 1e-9
    assert s[("tars_tokens_generated_total", (("model", "gemma"),))] == 12
    assert s[("tars_time_to_first_token_seconds_count", (("model", "gemma"),))] == 1
    assert s[("tars_time_to_first_token_seconds_bucket", (("le", "0.05"), ("model", "gemma")))] == 1
    assert s[("tars_embeddings_total", (("model", "minilm"),))] == 32


def test_state_gauges_are_read_at_scrape_time():
    depth = {"gemma": 3}
    gpus = [GPUInfo(index=0, name="RTX 3060", vram_total_mb=12288, vram_used_mb=5000, vram_free_mb=7288,
                    temperature_c=61.0, power_w=120.5)]
    m = Metrics("n")
    m.bind(queue_depths=lambda: dict(depth), gpus=lambda: gpus)
    s = _samples(m)
    g = (("gpu", "0"), ("name", "RTX 3060"))
    assert s[("tars_queue_depth", (("model", "gemma"),))] == 3
    assert s[("tars_gpu_vram_used_mb", g)] == 5000
    assert s[("tars_gpu_vram_free_mb", g)] == 7288
    assert s[("tars_gpu_temperature_celsius", g)] == 61.0
    assert s[("tars_gpu_power_watts", g)] == 120.5
    depth.clear()  # the model went away: its gauge goes too
    gpus.clear()
    s = _samples(m)
    assert not any(k[0] in ("tars_queue_depth", "tars_gpu_vram_used_mb") for k in s)
