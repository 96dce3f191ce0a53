"""distributed/discovery.py without the network: the record a node advertises, how answers
are parsed (untrusted input) and when a node does not advertise at all. Multicast for real,
across network namespaces: tests/e2e/test_netns_cluster.py and test_setup_scripts.py."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from distributed import discovery
from distributed.settings import load_settings


def settings(**kw: Any) -> Any:
    base = {"node_name": "pc1", "cluster_token": "super-secret-token"}
    return load_settings(None, **{**base, **kw})


def test_the_record_names_cluster_node_version_and_planner_never_the_token() -> None:
    s = settings(cluster_name="home", host="0.0.0.0", advertise_url="http://192.168.1.10:8000")
    txt = discovery.txt_record(s, planner=True, role="server")
    assert txt == {"cluster": "home", "node": "pc1", "version": discovery.__version__, "planner": "1",
                   "role": "server", "scheme": "http"}
    assert not any("super-secret-token" in v for v in txt.values())
    assert discovery.instance_name("home", "pc1") == "home-pc1"
    assert len(discovery.instance_name("c" * 32, "n" * 64)) == 63


@pytest.mark.parametrize(("host", "advertise", "expected"), [
    ("127.0.0.1", "", []),                                   # loopback only: nothing to announce
    ("127.0.0.2", "", []),
    ("0.0.0.0", "http://127.0.0.2:8000", []),                # peers told to use loopback: one machine
    ("192.168.1.10", "", ["192.168.1.10"]),                  # bound to one address: that one
    ("0.0.0.0", "http://192.168.1.10:8000", ["192.168.1.10"]),
    ("0.0.0.0", "http://pc1.lan:8000", None),                # a name: every address of the host
    ("0.0.0.0", "", None),
])
def test_which_addresses_are_announced(host: str, advertise: str, expected: list[str] | None) -> None:
    assert discovery.advertised_addresses(settings(host=host, advertise_url=advertise)) == expected


def test_answers_are_parsed_as_untrusted_input() -> None:
    props = {b"cluster": b"home", b"node": b"pc1", b"version": b"0.1.0", b"planner": b"1", b"scheme": b"http",
             b"token": b"should-be-ignored"}
    f = discovery.parse("home-pc1._tars._tcp.local.", 8000, ["fe80::1", "192.168.1.10"], props)
    assert f is not None and f.url == "http://192.168.1.10:8000" and f.planner and f.cluster == "home"
    assert f.line().split("\t") == ["home", "pc1", "http://192.168.1.10:8000", "planner", "?", "0.1.0"]
    assert discovery.parse("x", 8000, ["127.0.0.1"], props) is None  # loopback: not a LAN host
    assert discovery.parse("x", 8000, ["192.168.1.10"], {**props, b"node": b"pc1\nforged"}) is None
    assert discovery.parse("x", 8000, ["192.168.1.10"], {b"node": b"pc1"}) is None  # no cluster: not ours
    assert discovery.parse("x", None, ["192.168.1.10"], props) is None
    v6 = discovery.parse("x", 8000, ["2001:db8::5"], {**props, b"scheme": b"https"})
    assert v6 is not None and v6.url == "https://[2001:db8::5]:8000"


def test_clusters_are_the_planning_nodes() -> None:
    a = discovery.Found("home", "pc1", "http://10.0.0.1:8000", "0.1.0", True, "server", ("10.0.0.1",))
    b = discovery.Found("home", "pc2", "http://10.0.0.2:8001", "0.1.0", False, "worker", ("10.0.0.2",))
    c = discovery.Found("lab", "x", "http://10.0.0.3:8000", "0.1.0", True, "server", ("10.0.0.3",))
    assert discovery.clusters([a, b, c]) == [a, c]


def test_a_loopback_node_or_discovery_off_announces_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distributed")

    class Node:
        role, cluster = "server", None

    async def main() -> None:
        adv = await discovery.advertise(settings(host="127.0.0.1"), Node())
        assert adv._zc is None
        await adv.close()
        adv = await discovery.advertise(settings(host="192.168.1.10", discovery="off"), Node())
        assert adv._zc is None
        await adv.close()

    asyncio.run(main())
    assert "not advertising, the node is reached over loopback only" in caplog.text


def test_discovery_setting_is_validated() -> None:
    from distributed.errors import ConfigError

    assert settings(discovery="OFF").discovery == "off"
    with pytest.raises(ConfigError, match="TARS_DISCOVERY"):
        settings(discovery="maybe")
    with pytest.raises(ConfigError, match="TARS_CLUSTER_NAME"):
        settings(cluster_name="bad name")
