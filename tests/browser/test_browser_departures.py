"""Issue 22 end to end: how each way a signaling socket ends reaches the room, with the stock
client (npm peerjs@1.5.5) in Chromium, in token and none mode. The timings printed here are
those docs/protocol.md (Departures) reports."""

from __future__ import annotations

import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_harness import (
    Endpoint,
    OpenTabs,
    PeersigServer,
    PeerTab,
    await_mesh,
    client_ports,
    exchange,
)

from bench.vanish import Vanish, unusable

pytestmark = pytest.mark.browser

CLOSED = ("conn-close", "conn-error", "call-close", "call-error")


def serve(folder: Path, *args: str, tls: bool = True) -> PeersigServer:
    server = PeersigServer(folder, list(args), tls=tls)
    server.start()
    return server


@pytest.fixture(scope="module")
def none_server(loopback_only: None, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[PeersigServer]:
    """peersig as npm peer users run it: one namespace (--room-by none), ws and wss."""
    server = serve(tmp_path_factory.mktemp("none"), "--room-by", "none")
    yield server
    server.stop()


@pytest.fixture(params=["token", "none"])
def mode(request: pytest.FixtureRequest, server: PeersigServer,
         none_server: PeersigServer) -> tuple[str, PeersigServer]:
    return request.param, (server if request.param == "token" else none_server)


def token_for(mode: str, room: str) -> str:
    """What a page passes as PeerJS's token: the room in token mode; in none mode its own
    random token, as the stock client makes one."""
    return room if mode == "token" else secrets.token_hex(5)


def pair(tabs: OpenTabs, endpoint: Endpoint, mode: str, room: str,
         ids: tuple[str, str] = ("alice", "bob"), call: bool = True) -> tuple[PeerTab, PeerTab]:
    """Two pages with a data connection and (``call``) a media call between them. The first
    page's signaling socket's local port is ``signal_port`` (over ws)."""
    a, b = tabs(2)
    ids = (f"{ids[0]}{secrets.token_hex(3)}", f"{ids[1]}{secrets.token_hex(3)}")
    for tab, peer_id in zip((a, b), ids, strict=True):
        before = client_ports(endpoint.port)
        tab.start(endpoint, token_for(mode, room), peer_id)
        tab.id = tab.wait_open()
        tab.signal_ports = client_ports(endpoint.port) - before
    a.connect(b.id or "")
    await_mesh([a, b])
    exchange([a, b], "first")
    if call:
        report = a.call(b.id or "")
        assert report["videoFrames"] > 0, report
        b.answered_call(a.id or "")
    return a, b


def signals_about(tab: PeerTab, peer_id: str) -> list[str]:
    """The room frames (LEAVE, and with room events JOIN and PART) ``tab`` got about
    ``peer_id``."""
    return [e["type"] for e in tab.events("signal")
            if e["src"] == peer_id and e["type"] in ("LEAVE", "JOIN", "PART")]


def endpoint_of(server: PeersigServer, transport: str) -> Endpoint:
    endpoint = server.ws if transport == "ws" else server.wss
    assert endpoint is not None
    return endpoint


# -- peer.disconnect(): PeerJS keeps the connections, so the room hears no LEAVE ---------------


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_after_disconnect_data_and_media_flow_and_reconnect_reopens(
        tabs: OpenTabs, mode: tuple[str, PeersigServer], room: str, transport: str) -> None:
    name, server = mode
    endpoint = endpoint_of(server, transport)
    a, b = pair(tabs, endpoint, name, room)
    assert a.id is not None and b.id is not None
    a.disconnect()
    before = {tab.name: tab.media_counters((b if tab is a else a).id or "") for tab in (a, b)}
    for second in range(12):  # past the 10-s reconnect grace: it must end without LEAVE too
        exchange([a, b], f"after-disconnect-{second}")
        time.sleep(1)
    for tab in (a, b):
        counters = tab.media_counters((b if tab is a else a).id or "")
        assert counters["videoFrames"] > before[tab.name]["videoFrames"], (tab.name, counters)
        assert counters["audioBytes"] > before[tab.name]["audioBytes"], (tab.name, counters)
        assert tab.events(*CLOSED) == [], tab.name
    assert "LEAVE" not in signals_about(b, a.id)
    assert a.state()["disconnected"] and not a.state()["destroyed"]

    called = a.reconnect_only()
    opened = a.wait_reopen(called)
    assert a.state()["id"] == a.id and a.state()["open"]
    print(f"{name}/{transport}: reconnect() reopened in {opened - called} ms")
    (newcomer,) = tabs(1)
    newcomer.start(endpoint, token_for(name, room), f"carol{secrets.token_hex(3)}")
    newcomer.id = newcomer.wait_open()
    newcomer.connect(a.id)
    await_mesh([newcomer, a])
    exchange([newcomer, a], "through-the-server-again")
    exchange([a, b], "still")
    assert b.events(*CLOSED) == [] and b.errors() == []


# -- peer.destroy(): the client closes its connections itself ----------------------------------

# peerjs 1.5.5 closes only every other connection with a peer, on LEAVE and on destroy():
# _cleanupPeer iterates the array of connections that each close() removes itself from. With
# a data connection and then a call to one peer, the call stays open until its own data
# channel closes (the remote page gone) or ICE gives up.


def media_closed_after(b: PeerTab, remote: str, since: int, ms: int) -> str:
    """When ``b``'s call with ``remote`` closed, as text for the report: within ``ms``, or
    still open."""
    try:
        return f"{b.wait_call_closed(remote, ms=ms) - since} ms"
    except Exception:
        return f"still open after {ms} ms"


def test_after_destroy_the_room_mate_connections_close_by_webrtc_without_leave(
        tabs: OpenTabs, mode: tuple[str, PeersigServer], room: str) -> None:
    name, server = mode
    a, b = pair(tabs, server.ws, name, room)
    assert a.id is not None
    destroyed = a.destroy()
    data_closed = b.wait_conn_closed(a.id, ms=5000)
    media = media_closed_after(b, a.id, destroyed, 5000)
    print(f"{name}: destroy(): data connection closed after {data_closed - destroyed} ms, "
          f"media {media}, without LEAVE")
    assert "LEAVE" not in signals_about(b, a.id)
    assert b.errors() == []


# -- the page is gone, or unreachable: LEAVE within 5 s ------------------------------------


@pytest.mark.parametrize("how", ["closed", "navigated"])
def test_a_page_that_is_gone_is_left_within_5s(
        tabs: OpenTabs, mode: tuple[str, PeersigServer], room: str, how: str) -> None:
    name, server = mode
    a, b = pair(tabs, server.ws, name, room)
    assert a.id is not None
    gone = int(time.time() * 1000)
    if how == "closed":
        a.page.close()
    else:
        a.page.goto("about:blank")
    left = b.wait_signal("LEAVE", a.id)
    data_closed = b.wait_conn_closed(a.id)
    media = media_closed_after(b, a.id, gone, 40_000 if name == "token" else 5000)
    print(f"{name}: page {how}: LEAVE after {left - gone} ms, data closed after "
          f"{data_closed - gone} ms, media {media}")
    assert max(left, data_closed) - gone <= 5000


def test_a_vanished_network_is_left_within_5s(
        tabs: OpenTabs, server: PeersigServer, room: str) -> None:
    # The page's signaling socket goes dark (every segment dropped); the server's keepalive
    # gives up on it after --keepalive 5 s, and the room gets LEAVE.
    why = unusable()
    if why:
        pytest.fail(f"nftables not usable here: {why}")
    a, b = pair(tabs, server.ws, "token", room)
    assert a.id is not None
    (port,) = a.signal_ports
    with Vanish(port):
        vanished = int(time.time() * 1000)
        left = b.wait_signal("LEAVE", a.id, ms=8000)
        data_closed = b.wait_conn_closed(a.id)
    print(f"network vanished: LEAVE after {left - vanished} ms, data closed after "
          f"{data_closed - vanished} ms")
    assert max(left, data_closed) - vanished <= 5000


@pytest.fixture(scope="module")
def silent_server(loopback_only: None, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[PeersigServer]:
    """Liveness by the server's pings alone (no kernel keepalive), as behind a proxy, with
    the documented proxy settings."""
    server = serve(tmp_path_factory.mktemp("silent"), "--keepalive", "0", "--ping-interval",
                   "2.5", "--alive-timeout", "5", tls=False)
    yield server
    server.stop()


def test_a_silent_peer_is_left_within_the_alive_timeout(
        tabs: OpenTabs, silent_server: PeersigServer, room: str) -> None:
    why = unusable()
    if why:
        pytest.fail(f"nftables not usable here: {why}")
    a, b = pair(tabs, silent_server.ws, "token", room)
    assert a.id is not None
    (port,) = a.signal_ports
    with Vanish(port):  # no heartbeat and no pong reach the server any more
        silent = int(time.time() * 1000)
        left = b.wait_signal("LEAVE", a.id, ms=8000)
        data_closed = b.wait_conn_closed(a.id)
    print(f"silent peer (--alive-timeout 5): LEAVE after {left - silent} ms, data closed "
          f"after {data_closed - silent} ms")
    assert max(left, data_closed) - silent <= 5000


@pytest.fixture(scope="module")
def admin_server(loopback_only: None, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[PeersigServer, int]]:
    from tests.serverproc import free_port

    folder = tmp_path_factory.mktemp("admin")
    (folder / "admin.token").write_text("browser-admin-token\n")
    port = free_port()
    server = serve(folder, "--admin-port", f"tcp:{port}:interface=127.0.0.1",
                   "--admin-token-file", str(folder / "admin.token"), tls=False)
    yield server, port
    server.stop()


def test_a_peer_removed_by_the_operator_is_left_at_once(
        tabs: OpenTabs, admin_server: tuple[PeersigServer, int], room: str) -> None:
    server, admin_port = admin_server
    a, b = pair(tabs, server.ws, "token", room)
    assert a.id is not None
    removed = int(time.time() * 1000)
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/rooms/{room}/peers/{a.id}?reason=Kicked",
        method="DELETE", headers={"Authorization": "Bearer browser-admin-token"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    left = b.wait_signal("LEAVE", a.id)
    data_closed = b.wait_conn_closed(a.id)
    print(f"admin removal: LEAVE after {left - removed} ms, data closed after "
          f"{data_closed - removed} ms")
    assert max(left, data_closed) - removed <= 5000
    error = a.wait_error()
    assert (error.type, error.message) == ("server-error", "Kicked")


# -- what keeps the room quiet: a drain, a takeover, a reconnect within the grace -------------


def test_a_draining_server_sends_no_leave_and_connections_stay(
        tabs: OpenTabs, room: str, tmp_path: Path) -> None:
    server = serve(tmp_path, tls=False)
    try:
        a, b = pair(tabs, server.ws, "token", room)
        assert a.id is not None and b.id is not None
        server.signal()
        assert server.proc is not None and server.proc.wait(timeout=15) == 0
    finally:
        server.stop()
    for tab in (a, b):
        tab.page.wait_for_function("T.events().some((e) => e.kind === 'disconnected')")
    exchange([a, b], "after-the-drain")
    assert b.events(*CLOSED) == [] and "LEAVE" not in signals_about(b, a.id)


@pytest.fixture(scope="module")
def grace_server(loopback_only: None, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[PeersigServer]:
    server = serve(tmp_path_factory.mktemp("grace"), "--room-events", "--reconnect-grace",
                   "3", tls=False)
    yield server
    server.stop()


def test_a_reconnect_within_the_grace_is_silent_and_one_after_it_is_a_join(
        tabs: OpenTabs, grace_server: PeersigServer, room: str) -> None:
    a, b = pair(tabs, grace_server.ws, "token", room, call=False)
    assert a.id is not None
    a.disconnect()
    time.sleep(1)
    a.wait_reopen(a.reconnect_only())
    time.sleep(0.5)
    assert signals_about(b, a.id) == []  # a was there before b: no LEAVE, PART or JOIN
    a.disconnect()
    b.wait_signal("PART", a.id, ms=6000)  # the grace (3 s) is over: a left, without LEAVE
    a.wait_reopen(a.reconnect_only())
    b.wait_signal("JOIN", a.id)
    assert signals_about(b, a.id) == ["PART", "JOIN"]
    exchange([a, b], "through-it-all")
    assert b.errors() == [] and b.events(*CLOSED) == []  # PART is nothing to the stock client


def test_a_cut_signaling_socket_resumes_silently_after_reconnect(
        tabs: OpenTabs, server: PeersigServer, room: str) -> None:
    # A middlebox resets the page's signaling connection (RST) while it talks: PeerJS says
    # "disconnected", the app calls reconnect(), and nobody in the room notices.
    a, b = pair(tabs, server.ws, "token", room)
    assert a.id is not None
    (port,) = a.signal_ports
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{server.port}",
                    "sport", "=", f":{port}"], check=True, capture_output=True)
    a.page.wait_for_function("T.events().some((e) => e.kind === 'disconnected')")
    a.wait_reopen(a.reconnect_only())
    exchange([a, b], "after-the-cut")
    assert "LEAVE" not in signals_about(b, a.id) and b.events(*CLOSED) == []


# -- PeerJS's own e2e scenarios, through peersig in token and none mode ------------------------

SERIALIZATIONS = {
    "binary": ["numbers", "strings", "long_string", "objects", "arrays", "dates",
               "array_buffers", "uint8_arrays", "int32_arrays", "blobs"],
    "json": ["numbers", "strings", "objects", "arrays", "dates"],
    "MsgPack": ["numbers", "strings", "long_string", "objects", "arrays", "dates",
                "uint8_arrays", "int32_arrays"],
}


@pytest.mark.parametrize("serialization", list(SERIALIZATIONS))
def test_e2e_data_channel_serialization(
        tabs: OpenTabs, mode: tuple[str, PeersigServer], room: str, serialization: str) -> None:
    name, server = mode
    a, b = pair(tabs, server.ws, name, room, call=False)
    assert a.id is not None and b.id is not None
    for value_set in SERIALIZATIONS[serialization]:
        b.page.evaluate("T.clearInbox()")
        a.connect(b.id, serialization)
        a.wait_conn_open(b.id)
        count = a.send_set(b.id, value_set)
        b.page.wait_for_function(f"(T.received()['{a.id}'] ?? []).length >= {count}",
                                 timeout=10_000)
        assert b.check_set(a.id, value_set, serialization) == [], value_set
        a.page.evaluate("([r]) => T.closeConn(r)", [b.id])
    assert a.errors() == [] and b.errors() == []


def test_e2e_media_close_reaches_the_caller(
        tabs: OpenTabs, mode: tuple[str, PeersigServer], room: str) -> None:
    name, server = mode
    a, b = pair(tabs, server.ws, name, room)
    assert a.id is not None and b.id is not None
    b.close_call(a.id)
    b.wait_call_closed(a.id)
    a.wait_call_closed(b.id)


def test_e2e_id_taken(tabs: OpenTabs, mode: tuple[str, PeersigServer], room: str) -> None:
    name, server = mode
    holder, thieves = tabs(2)
    holder.start(server.ws, token_for(name, room), f"held{secrets.token_hex(3)}")
    holder.id = holder.wait_open()
    for _ in range(10):
        assert thieves.try_id(server.ws, token_for(name, room), holder.id) == "unavailable-id"
    assert holder.state()["open"] and holder.errors() == []


def test_e2e_disconnected(tabs: OpenTabs, mode: tuple[str, PeersigServer], room: str) -> None:
    name, server = mode
    (peer,) = tabs(1)
    peer.start(server.ws, token_for(name, room), f"lonely{secrets.token_hex(3)}")
    peer.wait_open()
    peer.disconnect()
    peer.connect_while_disconnected("otherid")
    assert peer.wait_error().type == "disconnected"
    assert peer.state()["disconnected"] and not peer.state()["destroyed"]
