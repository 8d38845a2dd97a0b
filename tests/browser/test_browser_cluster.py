"""Issue 23 end to end: two pages with the stock client (npm peerjs@1.5.5) in Chromium,
each on its own node of a --cluster (two ``twistd -n peersig`` on wss sharing one
``redis-server``), find each other and connect data and media."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_harness import OpenTabs, PeersigServer, await_mesh, exchange

from tests.serverproc import REDIS, Redis

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(REDIS is None, reason="redis-server not found")]


@pytest.fixture(scope="module")
def nodes(loopback_only: None, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[list[PeersigServer]]:
    folder: Path = tmp_path_factory.mktemp("cluster")
    redis = Redis(folder)
    redis.start()
    servers = []
    try:
        for i in range(2):
            (folder / f"node{i}").mkdir()
            server = PeersigServer(folder / f"node{i}", ["--cluster", redis.url], tls=True)
            server.start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.stop()
        redis.stop()


def test_two_pages_on_two_nodes_connect_data_and_media(
        tabs: OpenTabs, nodes: list[PeersigServer], room: str) -> None:
    a, b = tabs(2)
    for tab, node, name in ((a, nodes[0], "alice"), (b, nodes[1], "bob")):
        endpoint = node.wss
        assert endpoint is not None
        tab.start(endpoint, room, f"{name}{secrets.token_hex(3)}")
        tab.id = tab.wait_open()
    assert a.id is not None and b.id is not None
    a.connect(b.id)
    await_mesh([a, b])
    exchange([a, b], "across-nodes")
    report = a.call(b.id)
    assert report["videoFrames"] > 0, report
    b.answered_call(a.id)
    assert a.errors() == [] and b.errors() == []
