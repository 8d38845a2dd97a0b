"""A real ``twistd -n peersig`` process driven over real sockets (SPEC §1, §5, §7)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from bench.vanish import Vanish, unusable

from .serverproc import REPO, ServerProcess
from .wssclient import wss_connect


def recv_json(ws: ClientConnection, timeout: float = 5) -> dict[str, object]:
    return json.loads(ws.recv(timeout=timeout))  # type: ignore[no-any-return]


def close_code(ws: ClientConnection, timeout: float = 5) -> int | None:
    """Read until the server closes; the close code it sent."""
    try:
        while True:
            ws.recv(timeout=timeout)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("peersig"),
                         ["--max-message-size", "2048", "--allow-discovery"])
    proc.start()
    yield proc
    proc.stop()


def test_plugin_is_found_by_twisted() -> None:
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "peersig" in makers
    assert makers["peersig"].module == "peersig.tap"


def test_help_lists_every_option_with_its_default() -> None:
    out = subprocess.run([sys.executable, "-c",
                          "from twisted.scripts.twistd import run; run()", "peersig", "--help"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    flat = " ".join(out.split())
    from peersig.tap import Options

    for name, _short, default, *_ in Options.optParameters:
        assert f"--{name}=" in out
        if default is not None:
            assert f"[default: {default}]" in flat, name
    for option in ("--port=", "--allowed-origin=", "--allow-discovery", "[default: tcp:9000]"):
        assert option in flat


@pytest.mark.parametrize(("args", "environment", "error"), [
    (["--bogus"], {}, "option --bogus not recognized"),
    (["--room-size", "-1"], {}, "must not be negative"),
    (["--room-by", "room"], {}, "must be one of token, key, none"),
    (["--keepalive", "1"], {}, "must be 0 (off) or at least 3"),
    (["--ping-interval", "9"], {}, "--alive-timeout must exceed"),
    (["--poll-coalesce", "150"], {}, "--poll-coalesce is at most 100 ms"),
    (["--auth", "nonsense"], {}, "no such authorizer"),
    (["--auth", "hmac"], {}, "--auth hmac needs --secret-file"),
    (["--secret-file", "/nonexistent/secret"], {}, "--secret-file"),
    ([], {"PEERSIG_ROOM_SIZE": "four"}, "PEERSIG_ROOM_SIZE='four'"),
])
def test_an_invalid_option_exits_1_with_the_reason(tmp_path: Path, args: list[str],
                                                    environment: dict[str, str],
                                                    error: str) -> None:
    # systemd takes exit status 0 for a good start (twistd before 26.10 exited 0).
    proc = ServerProcess(tmp_path, args)
    result = subprocess.run(proc.command(), env={**proc.environment(), **environment},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result
    assert error in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_open_relay_with_forced_src_and_leave_on_close(server: ServerProcess) -> None:
    with connect(server.ws_url("alice")) as a, connect(server.ws_url("bob")) as b:
        assert a.recv(timeout=5) == '{"type":"OPEN"}'
        assert b.recv(timeout=5) == '{"type":"OPEN"}'
        payload = {"sdp": {"type": "offer", "sdp": "v=0\r\n" + "a" * 900}, "type": "data",
                   "connectionId": "dc_abc", "label": "x", "reliable": True,
                   "serialization": "binary", "metadata": None}
        a.send(json.dumps({"type": "OFFER", "src": "mallory", "dst": "bob",
                           "payload": payload}))
        assert recv_json(b) == {"type": "OFFER", "src": "alice", "dst": "bob",
                                "payload": payload}
        b.send(json.dumps({"type": "ANSWER", "dst": "alice", "payload": {"n": 1}}))
        assert recv_json(a) == {"type": "ANSWER", "src": "bob", "dst": "alice",
                                "payload": {"n": 1}}
        a.close(1001)  # as a browser closes a page's sockets
        assert recv_json(b) == {"type": "LEAVE", "src": "alice"}


def test_error_frame_then_close_1008(server: ServerProcess) -> None:
    with connect(server.ws_url("alice", key="wrong")) as ws:
        assert recv_json(ws) == {"type": "ERROR", "payload": {"msg": "Invalid key provided"}}
        assert close_code(ws) == 1008


def test_query_values_are_url_decoded(server: ServerProcess) -> None:
    with connect(server.ws_url("al%20ice", token="room%3A1")) as a, \
            connect(server.ws_url("bob", token="room:1")) as b:
        recv_json(a), recv_json(b)
        b.send(json.dumps({"type": "OFFER", "dst": "al ice", "payload": {}}))
        assert recv_json(a)["src"] == "bob"


def test_binary_frame_closes_1003(server: ServerProcess) -> None:
    with connect(server.ws_url("bin")) as ws:
        recv_json(ws)
        ws.send(b"\x00\x01")
        assert close_code(ws) == 1003


def test_oversize_frame_closes_1009(server: ServerProcess) -> None:
    with connect(server.ws_url("big"), max_size=None) as ws:
        recv_json(ws)
        ws.send(json.dumps({"type": "OFFER", "dst": "x", "payload": "a" * 5000}))
        assert close_code(ws) == 1009


def test_garbage_closes_1008_after_ten(server: ServerProcess) -> None:
    with connect(server.ws_url("noisy")) as ws:
        recv_json(ws)
        for _ in range(11):
            ws.send("{not json")
        assert close_code(ws) == 1008


def test_http_routes(server: ServerProcess) -> None:
    status, _, body = server.get("/")
    assert status == 200 and json.loads(body)["name"] == "peersig"
    status, _headers, body = server.get("/peerjs/id?ts=1&version=1.5.5")
    assert status == 200 and uuid.UUID(body.decode()).version == 4
    status, _, body = server.get("/peerjs/peers")
    assert status == 200 and json.loads(body) == []
    health = json.loads(server.get("/health")[2])
    assert health["status"] == "ok" and {"timestamp", "version", "peers", "rooms",
                                         "uptime"} <= set(health)
    assert server.get("/nope/x/y")[0] == 404


def test_cors_and_preflight(server: ServerProcess) -> None:
    status, headers, _ = server.get("/peerjs/id", {"Origin": "http://game.example"})
    assert headers["Access-Control-Allow-Origin"] == "http://game.example"
    status, headers, body = server.get(
        "/peerjs/id", {"Origin": "http://game.example", "Access-Control-Request-Method": "GET",
                       "Access-Control-Request-Headers": "x-thing"}, method="OPTIONS")
    assert status == 204 and body == b""
    assert headers["Access-Control-Allow-Origin"] == "http://game.example"
    assert "GET" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "x-thing"


def test_metrics_follow_a_session(server: ServerProcess) -> None:
    def sample(name: str, **labels: str) -> float:
        text = server.get("/metrics")[2].decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    before = sample("peersig_messages_total", type="CANDIDATE")
    drops = sample("peersig_drops_total", reason="bad_json")
    away = sample("peersig_peers_away")
    peers = sample("peersig_peers")
    with connect(server.ws_url("m1", token="metrics")) as a, \
            connect(server.ws_url("m2", token="metrics")) as b:
        recv_json(a), recv_json(b)
        assert sample("peersig_peers") == peers + 2
        assert sample("peersig_room_occupancy_bucket", le="2") >= 1
        a.send(json.dumps({"type": "CANDIDATE", "dst": "m2", "payload": {}}))
        recv_json(b)
        a.send("][")
        a.send(json.dumps({"type": "HEARTBEAT"}))  # ordered after the bad frame
        a.send(json.dumps({"type": "CANDIDATE", "dst": "m2", "payload": {}}))
        recv_json(b)
    assert sample("peersig_messages_total", type="CANDIDATE") == before + 2
    assert sample("peersig_relays_total", type="CANDIDATE") >= before + 2
    assert sample("peersig_drops_total", reason="bad_json") == drops + 1
    deadline = time.monotonic() + 5
    while sample("peersig_peers") != peers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sample("peersig_peers") == peers
    # Closed with 1000, not a page's 1001: each keeps its place for the reconnect grace.
    assert sample("peersig_peers_away") == away + 2
    assert sample("peersig_sweep_seconds_count") > 0


@pytest.mark.parametrize(("code", "leave"), [(1001, True), (1000, False), (None, False)])
def test_a_close_tells_the_room_only_when_the_page_is_gone(
        server: ServerProcess, code: int | None, leave: bool) -> None:
    room = f"departure{code}"
    with connect(server.ws_url("stay", token=room)) as stay:
        recv_json(stay)
        going = connect(server.ws_url("go", token=room))
        recv_json(going)
        if code is None:
            going.socket.shutdown(socket.SHUT_RDWR)  # no close frame, while talking
            going.socket.close()
        else:
            going.close(code)
        if leave:
            assert recv_json(stay) == {"type": "LEAVE", "src": "go"}
        else:
            with pytest.raises(TimeoutError):
                recv_json(stay, timeout=1)
            with connect(server.ws_url("go", token=room)) as back:  # within the grace
                assert recv_json(back) == {"type": "OPEN"}


def test_metrics_json_shape(server: ServerProcess) -> None:
    status, headers, body = server.get("/metrics", {"Accept": "application/json"})
    data = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert set(data) == {"activeRooms", "totalConnections", "messagesPerSecond",
                         "uptimeSeconds", "timestamp", "errors"}
    assert isinstance(data["errors"], dict) and data["uptimeSeconds"] > 0


def test_path_option_and_environment(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path, ["--path", "myapp"], env={"PEERSIG_KEY": "envkey",
                                                            "PEERSIG_PATH": "/ignored/"})
    proc.start()
    try:
        assert proc.get("/myapp/")[0] == 200
        assert proc.get("/myapp/envkey/id")[0] == 200
        with connect(proc.ws_url("a", key="envkey", path="/myapp/")) as ws:
            assert recv_json(ws) == {"type": "OPEN"}
        with connect(proc.ws_url("a", key="peerjs", path="/myapp/")) as ws:
            assert recv_json(ws)["type"] == "ERROR"
        with pytest.raises(InvalidStatus):
            connect(proc.ws_url("b", key="envkey"))  # the WebSocket moved with --path
    finally:
        proc.stop()


def test_disallowed_origin_cannot_open_a_websocket(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path, ["--allowed-origin", "https://good.example"])
    proc.start()
    try:
        with pytest.raises(InvalidStatus) as e:
            connect(proc.ws_url("a"), origin="https://evil.example")  # type: ignore[arg-type]
        assert e.value.response.status_code == 403
        with connect(proc.ws_url("a"), origin="https://good.example") as ws:  # type: ignore[arg-type]
            assert recv_json(ws) == {"type": "OPEN"}
        _status, headers, _ = proc.get("/peerjs/id", {"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in headers
    finally:
        proc.stop()


# -- what browsers, app shells and proxies send (issue 17) ----------------------------------

FIELD_ORIGINS = ["null", "file://", "capacitor://localhost", "app://", "https://game.example"]


def test_any_origin_opens_without_an_allowlist(server: ServerProcess) -> None:
    for n, origin in enumerate(FIELD_ORIGINS):
        # A room each: a closed peer keeps its seat for the reconnect grace.
        with connect(server.ws_url(f"origin{n}", token=f"origin{n}"),
                     origin=origin) as ws:  # type: ignore[arg-type]
            assert recv_json(ws) == {"type": "OPEN"}, origin
        _status, headers, _ = server.get("/peerjs/id", {"Origin": origin})
        assert headers["Access-Control-Allow-Origin"] == origin


def test_an_allowlist_opens_exactly_its_origins(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path, ["--allowed-origin", "null", "--allowed-origin", "file://"])
    proc.start()
    try:
        for n, origin in enumerate(FIELD_ORIGINS):
            if origin in ("null", "file://"):
                with connect(proc.ws_url(f"o{n}"), origin=origin) as ws:  # type: ignore[arg-type]
                    assert recv_json(ws) == {"type": "OPEN"}, origin
            else:
                with pytest.raises(InvalidStatus) as e:
                    connect(proc.ws_url(f"o{n}"), origin=origin)  # type: ignore[arg-type]
                assert e.value.response.status_code == 403, origin
            _status, headers, _ = proc.get("/peerjs/id", {"Origin": origin})
            assert (headers.get("Access-Control-Allow-Origin") == origin) == (
                origin in ("null", "file://")), origin
    finally:
        proc.stop()


def test_a_server_gathering_heartbeats_at_rest_relays_every_message_in_order(
        tmp_path: Path) -> None:
    """--poll-coalesce, on by default: after QUIET s of nothing but heartbeats (the server
    at rest, each heartbeat a wakeup of its own) it gathers them. A new connection ends the
    gathering, and so does the first message; messages sent one by one and then in a burst
    all arrive, in order."""
    from peersig.upstream.twisted import QUIET, SETTLE

    def heartbeats(seconds: float) -> None:
        for _ in range(int(seconds / 0.01)):
            a.send('{"type":"HEARTBEAT"}')
            time.sleep(0.01)

    proc = ServerProcess(tmp_path)
    proc.start()
    try:
        assert "heartbeats gather for up to 50 ms" in proc.log_path.read_text()
        with connect(proc.ws_url("alice")) as a, connect(proc.ws_url("bob")) as b:
            assert a.recv(timeout=5) == '{"type":"OPEN"}'
            assert b.recv(timeout=5) == '{"type":"OPEN"}'
            heartbeats(QUIET + 0.5)
            # This request's own connection ended the gathering.
            assert proc.metric("peersig_poll_gathering_total", event="connection") >= 1
            assert proc.metric("peersig_poll_gathering_total", event="round") > 0
            assert proc.metric("peersig_poll_gathering_total", event="message") == 0
            heartbeats(SETTLE + 0.5)  # at rest again
            for n in range(12):
                if n < 6:
                    time.sleep(0.03)
                a.send(json.dumps({"type": "CANDIDATE", "dst": "bob", "payload": {"n": n}}))
            for n in range(12):
                assert recv_json(b)["payload"] == {"n": n}
            assert proc.metric("peersig_poll_gathering_total", event="message") >= 1
    finally:
        proc.stop()


def test_the_startup_log_says_what_the_room_mode_means(server: ServerProcess) -> None:
    log = server.log_path.read_text()
    assert ("room mode token: peers meet when they pass the same PeerJS token option; a Peer "
            "created without one gets a random token and meets no one") in log


def test_the_websocket_url_opened_in_a_browser_names_the_missing_parameters(
        server: ServerProcess) -> None:
    status, headers, body = server.get("/peerjs")
    assert (status, headers["Content-Type"]) == (400, "text/plain; charset=utf-8")
    assert body.startswith(b"Missing query parameters: key, id, token (")
    status, _headers, body = server.get("/peerjs?key=peerjs&id=a")
    assert status == 400 and body.startswith(b"Missing query parameters: token (")


@pytest.mark.parametrize("hops", [
    ["203.0.113.7:50001", "203.0.113.7:50002", "203.0.113.7:50003"],
    ["[2001:db8::7]:50001", "2001:DB8:0:0::7", '"[2001:db8::7]"'],
    ["203.0.113.7", "::ffff:203.0.113.7", "[::ffff:203.0.113.7]:443"],
])
def test_a_client_counts_once_however_its_proxy_writes_it(tmp_path: Path,
                                                          hops: list[str]) -> None:
    proc = ServerProcess(tmp_path, ["--trusted-proxies", "1", "--max-peers-per-ip", "2"])
    proc.start()
    try:
        opened = []
        for n, hop in enumerate(hops):
            ws = connect(proc.ws_url(f"p{n}"),
                         additional_headers={"X-Forwarded-For": f"198.51.100.1, {hop}"})
            opened.append(ws)
            reply = recv_json(ws)
            if n < 2:
                assert reply == {"type": "OPEN"}, hop
            else:
                assert reply == {"type": "ERROR", "payload": {
                    "msg": "Too many connections from your address"}}, hop
        # Another client behind the same proxy still gets in.
        with connect(proc.ws_url("other"),
                     additional_headers={"X-Forwarded-For": "192.0.2.55:1234"}) as ws:
            assert recv_json(ws) == {"type": "OPEN"}
        for ws in opened:
            ws.close()
    finally:
        proc.stop()


def test_a_cut_emoji_in_an_offer_reaches_the_callee_byte_for_byte(server: ServerProcess) -> None:
    offer = ('{"type":"OFFER","dst":"callee","payload":{"type":"data","connectionId":"dc_1",'
             '"metadata":{"name":"Ana \\ud83d"},"sdp":{"type":"offer","sdp":"v=0\\r\\n"}}}')
    with connect(server.ws_url("caller", token="emoji")) as a, \
            connect(server.ws_url("callee", token="emoji")) as b:
        recv_json(a), recv_json(b)
        a.send(offer)
        got = b.recv(timeout=5)
        assert got == ('{"type":"OFFER","src":"caller","dst":"callee",'
                       + offer[offer.index('"payload"'):])


# -- reconnects: contention decides liveness (issue 16) ------------------------------------

def silent_peer(server: ServerProcess, peer_id: str, token: str) -> socket.socket:
    """A peer that opens, then never reads or answers anything again: a page whose network
    changed while its kernel still ACKs (or a frozen tab)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /peerjs?key=peerjs&id={peer_id}&token={token}&version=1.5.5 HTTP/1.1"
                 f"\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    sock.settimeout(5)
    data = b""
    while b'{"type":"OPEN"}' not in data:
        data += sock.recv(4096)
    return sock


def test_a_reconnect_replaces_a_silent_holder_within_the_probe(server: ServerProcess) -> None:
    room = f"re{uuid.uuid4().hex[:8]}"
    ghost = silent_peer(server, "alice", room)
    with connect(server.ws_url("bob", token=room)) as bob:
        recv_json(bob)
        time.sleep(1.0)  # the ghost has been silent for a while
        started = time.monotonic()
        with connect(server.ws_url("alice", token=room)) as alice:
            assert recv_json(alice) == {"type": "OPEN"}
            took = time.monotonic() - started
            assert 0.9 < took < 1.0 + 1.0, took  # the default --takeover-probe 1 s, + 1 s
            bob.send(json.dumps({"type": "OFFER", "dst": "alice", "payload": "after"}))
            assert recv_json(alice)["payload"] == "after"
            with pytest.raises(TimeoutError):
                bob.recv(timeout=1.0)  # no LEAVE for alice: a takeover, not a departure
    ghost.close()


def test_a_heartbeating_holder_keeps_its_id(server: ServerProcess) -> None:
    room = f"hb{uuid.uuid4().hex[:8]}"
    with connect(server.ws_url("alice", token=room)) as alice:  # answers pings itself
        recv_json(alice)
        for _ in range(3):
            time.sleep(0.7)
            alice.send('{"type":"HEARTBEAT"}')
            with connect(server.ws_url("alice", token=room)) as impostor:
                assert recv_json(impostor)["type"] == "ID-TAKEN"
            time.sleep(0.7)  # silent for most of the probe window: now it is pinged
            with connect(server.ws_url("alice", token=room)) as impostor:
                assert recv_json(impostor)["type"] == "ID-TAKEN"
        alice.send(json.dumps({"type": "OFFER", "dst": "alice", "payload": "still mine"}))
        assert recv_json(alice)["payload"] == "still mine"


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on ``port``: ``ss -ltn``'s Send-Q."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[2])


def test_ports_listen_with_room_for_a_reconnect_storm(tmp_path: Path) -> None:
    from peersig.tls import BACKLOG

    proc = ServerProcess(tmp_path, [], tls=True)
    (tmp_path / "explicit").mkdir()
    explicit = ServerProcess(tmp_path / "explicit", [], ports=False)
    explicit.args = ["--port", f"tcp:{explicit.port}:interface=127.0.0.1:backlog=77"]
    proc.start()
    try:
        assert proc.tls_port is not None
        expected = min(BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))
        assert listen_backlog(proc.port) == expected  # tcp:
        assert listen_backlog(proc.tls_port) == expected  # ssl:
    finally:
        proc.stop()
    explicit.start()
    try:
        assert listen_backlog(explicit.port) == 77  # an explicit backlog= wins
    finally:
        explicit.stop()


def test_bursts_to_a_slow_reader_arrive_whole_and_in_order(tmp_path: Path) -> None:
    # More than the kernel's socket buffers take at once: the rest queues behind it.
    proc = ServerProcess(tmp_path, ["--rate-limit", "0"])
    proc.start()
    try:
        with connect(proc.ws_url("fast")) as a, connect(proc.ws_url("slow")) as b:
            recv_json(a), recv_json(b)
            for n in range(60):
                a.send(json.dumps({"type": "CANDIDATE", "dst": "slow",
                                   "payload": {"n": n, "pad": "x" * 60000}}))
            time.sleep(0.5)
            got = [recv_json(b)["payload"] for _ in range(60)]
            assert [p["n"] for p in got] == list(range(60))  # type: ignore[index]
            assert all(len(p["pad"]) == 60000 for p in got)  # type: ignore[index]
    finally:
        proc.stop()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_a_peer_whose_network_vanishes_is_dropped_within_5s(
        server: ServerProcess, scheme: str, tmp_path: Path) -> None:
    # No WebSocket ping is involved: with the default --keepalive 5 the kernel probes the
    # silent socket and gives up on it, and the room hears of it as of any lost connection.
    why = unusable()
    if why:
        pytest.skip(f"NFTABLES NOT USABLE: the vanished-network test did NOT run: {why}. "
                    "Run as root with nftables installed (tests/install-and-run.sh installs it).")
    tls = None
    if scheme == "wss":
        tls = ServerProcess(tmp_path, tls=True)
        tls.start()
    try:
        def join(peer_id: str) -> ClientConnection:
            if tls is None:
                return connect(server.ws_url(peer_id, token="vanish"))
            return wss_connect(f"wss://127.0.0.1:{tls.tls_port}/peerjs?key=peerjs"
                               f"&id={peer_id}&token=vanish")
        a = join("alice")
        with join("bob") as b:
            assert recv_json(a) == {"type": "OPEN"} and recv_json(b) == {"type": "OPEN"}
            a.send(json.dumps({"type": "HEARTBEAT"}))
            time.sleep(0.2)
            address, port = a.socket.getsockname()[:2]
            with Vanish(port, address):
                started = time.monotonic()
                assert recv_json(b, timeout=10) == {"type": "LEAVE", "src": "alice"}
                took = time.monotonic() - started
            a.close_socket()
    finally:
        if tls is not None:
            tls.stop()
    assert took <= 5.0, took  # given up at 4 s, and the kernel's timers run a little late
    assert took >= 2.0, took  # by the kernel's probes, not by anything alice did
