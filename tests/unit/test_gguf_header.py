"""GGUF headers read without the weights: over ranged reads (bounded), from a server that
ignores Range, from a split model's shards, and from the JSON cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.errors import ConfigError
from distributed.gguf_header import FIRST_READ, numbers, read_gguf, read_header, shard_names
from tests.hubstub import SMOL_REPO, add_repos, hub, smollm2_shards  # noqa: F401


def _fetcher(path: Path):
    data = path.read_bytes()
    calls: list[tuple[int, int]] = []

    def fetch(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return data[offset:offset + length]

    return fetch, calls


def test_ranged_reads_fetch_the_header_and_little_more(smollm2_gguf: Path, gemma_gguf: Path) -> None:
    for path in (smollm2_gguf, gemma_gguf):
        fetch, calls = _fetcher(path)
        meta = read_header(fetch, name=path.name)
        local = read_gguf(path)
        assert meta.tensor_bytes == local.tensor_bytes and meta.fields == local.fields
        fetched = sum(n for _, n in calls)
        assert meta.header_bytes <= fetched <= max(FIRST_READ, 2 * meta.header_bytes)  # doubling blocks
        assert [o for o, _ in calls] == sorted(o for o, _ in calls)  # forward only, never twice
    assert numbers(meta)["n_layers"] == 18 and not numbers(meta)["has_template"]  # gemma base: no template


def test_a_header_past_the_limit_is_refused(gemma_gguf: Path) -> None:
    fetch, calls = _fetcher(gemma_gguf)
    with pytest.raises(ConfigError, match="larger than 2 MB"):
        read_header(fetch, name="big.gguf", limit=2 * 2**20)  # gemma's 262k-token vocabulary: 6.5 MB
    assert sum(n for _, n in calls) <= 2 * 2**20


def test_a_file_cut_short_is_malformed(smollm2_gguf: Path) -> None:
    data = smollm2_gguf.read_bytes()[:300_000]
    with pytest.raises(ConfigError, match="malformed"):
        read_header(lambda o, n: data[o:o + n], name="cut.gguf")
    with pytest.raises(ConfigError, match="not a GGUF"):
        read_header(lambda o, n: b"PK\x03\x04" + b"\0" * 100, name="x.zip")


def test_a_server_that_ignores_range_is_read_only_as_far_as_needed(hub, smollm2_gguf: Path) -> None:
    import huggingface_hub

    from distributed.hub import RangeReader

    add_repos(hub, smollm2_gguf)
    hub.ignore_range.add(SMOL_REPO)
    reader = RangeReader(huggingface_hub, SMOL_REPO, "SmolLM2-135M-Instruct-Q4_1.gguf", revision="main",
                         endpoint=hub.url)
    meta = read_header(reader, name="x")
    assert meta.fields["llama.block_count"] == 30
    size = smollm2_gguf.stat().st_size
    assert reader.bytes_read < 16 * 2**20 < size  # the connection was dropped once enough had come
    assert hub.bytes_served(SMOL_REPO) < size // 2


def test_a_split_model_on_disk_reads_every_shard(smollm2_gguf: Path, smollm2_shards: list[Path]) -> None:
    whole, split = read_gguf(smollm2_gguf), read_gguf(smollm2_shards[0])
    assert split.tensor_bytes == whole.tensor_bytes and split.n_params == whole.n_params
    assert shard_names("sub/m-Q4_K_M-00002-of-00003.gguf") == [f"sub/m-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert shard_names("m.gguf") == ["m.gguf"]


def test_the_json_cache_reads_back_the_same(smollm2_gguf: Path, tmp_path: Path) -> None:
    meta = read_gguf(smollm2_gguf)
    back = read_gguf(meta.save(tmp_path / "h.json"))
    assert (back.fields, back.tensor_bytes, back.n_params, back.data_offset) == (
        meta.fields, meta.tensor_bytes, meta.n_params, meta.data_offset)
    (tmp_path / "bad.json").write_text('{"version": 99}')
    with pytest.raises(ConfigError, match="cached GGUF header unreadable"):
        read_gguf(tmp_path / "bad.json")


def test_a_ranged_read_cut_short_is_asked_again_for_the_rest(hub, smollm2_gguf: Path) -> None:
    import huggingface_hub

    from distributed.hub import RangeReader

    add_repos(hub, smollm2_gguf)
    name = "SmolLM2-135M-Instruct-Q4_1.gguf"
    hub.cut_first_range.add((SMOL_REPO, name))
    reader = RangeReader(huggingface_hub, SMOL_REPO, name, revision="main", endpoint=hub.url)
    assert read_header(reader, name=name).fields["llama.block_count"] == 30
    ranges = [g["range"] for g in hub.gets(name)]
    first_end = int(ranges[0].split("-")[1])
    assert int(ranges[1].removeprefix("bytes=").split("-")[0]) > 0 and int(ranges[1].split("-")[1]) == first_end
