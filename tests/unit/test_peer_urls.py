"""What the cluster channel accepts from a peer (distributed/peer_urls.py) and log escaping."""

from __future__ import annotations

import asyncio
import logging

import pytest

from distributed import logs, peer_urls
from distributed.domain import GPUInfo, HostProfile
from distributed.errors import ValidationFailed


@pytest.mark.parametrize("name", ["pc1", "PC-2", "a.b_c-d", "x" * 64])
def test_valid_names(name):
    assert peer_urls.check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "pc1\nINFO forged", "pc 1", "pc1/..", "é", None, 5])
def test_invalid_names_are_refused_naming_the_field(name):
    with pytest.raises(ValidationFailed) as err:
        peer_urls.check_name(name)
    assert err.value.field == "name" and "\n" not in err.value.message


@pytest.mark.parametrize("url,norm", [("http://192.168.1.10:8000", "http://192.168.1.10:8000"),
                                      ("https://pc1.lan:8443/", "https://pc1.lan:8443"),
                                      ("http://[::1]:8000", "http://[::1]:8000"), ("http://pc2", "http://pc2")])
def test_valid_urls(url, norm):
    assert peer_urls.check_url(url) == norm


@pytest.mark.parametrize("url", ["ftp://pc1:21", "file:///etc/passwd", "http://pc1:8000/admin", "http://pc1:8000?x=1",
                                 "http://user:pw@pc1:8000", "http://pc1:99999", "http://", "pc1:8000",
                                 "http://pc1:8000#frag", "http://pc 1:8000", "http://pc1\n:8000", "", None,
                                 "http://pc1:8000/rpc", "http://evil_host:80"])
def test_invalid_urls_are_refused(url):
    with pytest.raises(ValidationFailed) as err:
        peer_urls.check_url(url)
    assert err.value.field == "url" and "\n" not in err.value.message


def test_join_origin_must_match_the_url():
    run = asyncio.run
    run(peer_urls.check_join_origin("http://192.168.1.20:8000", "192.168.1.20"))
    run(peer_urls.check_join_origin("http://127.0.0.3:8000", "127.0.0.1"))  # loopback = one machine
    run(peer_urls.check_join_origin("http://localhost:8000", "127.0.0.2"))  # a name resolving to it
    run(peer_urls.check_join_origin("http://10.0.0.9:8000", "::ffff:10.0.0.9"))  # IPv4-mapped source
    run(peer_urls.check_join_origin("http://10.0.0.9:8000", None))  # no origin known (in-process call)
    with pytest.raises(ValidationFailed) as err:
        run(peer_urls.check_join_origin("http://192.168.1.99:8000", "192.168.1.20"))
    assert err.value.field == "url" and "192.168.1.20" in err.value.message and "TARS_ADVERTISE_URL" in err.value.message
    with pytest.raises(ValidationFailed):
        run(peer_urls.check_join_origin("http://localhost:8000", "192.168.1.20"))


def _profile(vram: int) -> HostProfile:
    return HostProfile(hostname="pc2", cpu_model="cpu", cpu_cores=4, ram_total_mb=16000, ram_free_mb=8000,
                       gpus=[GPUInfo(index=0, name="GTX 1660 SUPER", vram_total_mb=vram)])


def test_vram_claims_must_agree_with_live_figures():
    live = [{"index": 0, "name": "GTX 1660 SUPER", "vram_total_mb": 6144, "vram_used_mb": 300}]
    assert peer_urls.vram_doubt(_profile(6144), live) is None
    assert peer_urls.vram_doubt(_profile(6144), None) is None  # no live figures (yet, or an older peer)
    why = peer_urls.vram_doubt(_profile(81920), live)
    assert why and "81920" in why and "6144" in why
    assert peer_urls.vram_doubt(_profile(6144), []) is not None  # claims a GPU, reports none

    class P:
        name = "pc2"
        profile = _profile(81920)
        gpus = live

    p = P()
    assert peer_urls.recheck_vram(p) is True and not peer_urls.trusted(p)
    assert peer_urls.recheck_vram(p) is False  # unchanged
    p.profile = _profile(6144)
    assert peer_urls.recheck_vram(p) is True and peer_urls.trusted(p)


def test_safe_escapes_control_characters():
    assert peer_urls.safe("pc2\nERROR forged\r\x1b[31m") == "pc2\\x0aERROR forged\\x0d\\x1b[31m"
    assert len(peer_urls.safe("x" * 1000)) == 203


def test_text_logs_escape_control_characters(capsys):
    logs.configure("pc1", "info", "text")
    try:
        logs.get_logger("cluster").warning("peer %s joined", "evil\n2026-01-01 INFO pc1 cluster: forged")
        err = capsys.readouterr().err
    finally:
        logging.getLogger("distributed").handlers[:] = []
    assert err.count("\n") == 1 and "evil\\x0a2026" in err
