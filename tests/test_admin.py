"""Operator control in the core, on a fake clock: room events, removing peers and rooms,
bans; and webhook delivery (order, retries, bounds, signatures) with a fake HTTP client."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from websockets.sync.client import connect

from peersig.webhooks import FIRST_BACKOFF, MAX_IN_FLIGHT, Webhooks, signature

from .fakes import World
from .localhttp import LocalServer
from .serverproc import ServerProcess, free_port
from .test_process import close_code, recv_json


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def event(self, kind: str, room: str, peer: str | None = None,
              reason: str | None = None) -> None:
        self.events.append((kind, room, peer, reason))

    def queued(self) -> int:
        return 0


def world_with_events(**config: Any) -> tuple[World, Recorder]:
    world = World(**config)
    recorder = Recorder()
    world.hub.events = recorder
    return world, recorder


def test_a_rooms_life_is_told_in_order() -> None:
    world, rec = world_with_events()
    alice = world.connect("alice")
    bob = world.connect("bob")
    world.connect("carol", token="other")
    world.close(bob)
    world.close(alice)
    assert rec.events == [
        ("room_started", "room1", None, None),
        ("peer_joined", "room1", "alice", None),
        ("peer_joined", "room1", "bob", None),
        ("room_started", "other", None, None),
        ("peer_joined", "other", "carol", None),
        ("peer_left", "room1", "bob", "closed"),
        ("peer_left", "room1", "alice", "closed"),
        ("room_finished", "room1", None, None),
    ]


def test_a_takeover_is_no_event_and_a_timeout_is_a_departure() -> None:
    world, rec = world_with_events(room_by="key")
    world.connect("alice", token="t1")
    world.connect("alice", token="t1", responsive=False)  # the same token: a takeover
    assert [e[0] for e in rec.events] == ["room_started", "peer_joined"]
    world.advance(60)
    assert rec.events[2:] == [("peer_left", "peerjs", "alice", "timeout"),
                              ("room_finished", "peerjs", None, None)]


def test_in_none_mode_the_namespace_is_named_by_the_key() -> None:
    world, rec = world_with_events(room_by="none", key="game")
    world.connect("alice", key="game")
    assert rec.events[0] == ("room_started", "game", None, None)
    hub = world.hub
    room = hub.room_named("game")
    assert room is not None and hub.public_name(room) == "game"
    assert hub.room_named("") is None


def test_a_removed_peer_gets_the_reason_and_1008_and_its_room_a_leave() -> None:
    world, rec = world_with_events()
    alice, bob = world.connect("alice"), world.connect("bob")
    alice.take(), bob.take()
    assert bob.session is not None
    world.hub.remove(bob.session, "Cheating")
    assert bob.take() == [{"type": "ERROR", "payload": {"msg": "Cheating"}}]
    assert bob.closed == (1008, "Cheating")
    assert alice.take() == [{"type": "LEAVE", "src": "bob"}]
    assert rec.events[-1] == ("peer_left", "room1", "bob", "removed")
    assert world.hub.stats.disconnections["removed"] == 1


def test_a_ban_refuses_the_id_in_its_room_until_it_expires() -> None:
    world = World()
    hub = world.hub
    world.connect("alice")
    hub.ban("room1", "bob", world.clock.seconds() + 30, "Banned for spam")
    refused = world.connect("bob")
    assert refused.messages() == [{"type": "ERROR", "payload": {"msg": "Banned for spam"}}]
    assert refused.closed == (1008, "Banned for spam")
    assert hub.stats.connections["banned"] == 1
    elsewhere = world.connect("bob", token="room2")
    assert elsewhere.types() == ["OPEN"]  # only in that room
    world.advance(29)
    assert world.connect("bob").closed is not None
    world.advance(1.5)
    assert hub.bans == {}  # the sweep forgot it
    assert world.connect("bob").types() == ["OPEN"]


def test_a_ban_in_none_mode_names_the_key() -> None:
    world = World(room_by="none", key="game")
    world.hub.ban("game", "bob", world.clock.seconds() + 30, "Out")
    assert world.connect("bob", key="game").closed == (1008, "Out")


def test_closing_a_room_removes_every_peer_without_leave() -> None:
    world, rec = world_with_events()
    peers = [world.connect(p) for p in ("a", "b", "c")]
    other = world.connect("d", token="room2")
    for p in peers:
        p.take()
    room = world.hub.rooms["room1"]
    assert world.hub.close_room(room, "Match over") == 3
    for p in peers:
        assert p.take() == [{"type": "ERROR", "payload": {"msg": "Match over"}}]
        assert p.closed == (1008, "Match over")
    assert "room1" not in world.hub.rooms and other.closed is None
    assert rec.events[-1] == ("room_finished", "room1", None, None)


# -- webhooks -------------------------------------------------------------------------------

SECRET = b"s" * 32


class FakeReceiver:
    """A fake ``Post``: every request waits on a Deferred the test fires."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, dict[str, Any], dict[bytes, bytes], Deferred[int]]] = []

    def __call__(self, url: bytes, body: bytes, headers: dict[bytes, bytes]) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.requests.append((url, json.loads(body), headers, d))
        return d

    def answer(self, index: int, status: int) -> None:
        self.requests[index][3].callback(status)

    def types(self) -> list[tuple[str, str]]:
        return [(r[1]["room"], r[1]["type"]) for r in self.requests]


def webhooks(receiver: Any, limit: int = 100, retry_for: float = 10.0,
             urls: tuple[str, ...] = ("http://127.0.0.1/hook",)) -> tuple[Webhooks, Clock]:
    clock = Clock()
    clock.advance(1_800_000_000)
    counts: Counter[str] = Counter()
    return Webhooks(urls, SECRET, clock, receiver, counts, limit, retry_for), clock


def test_events_of_a_room_go_one_at_a_time_in_order_and_rooms_in_parallel() -> None:
    receiver = FakeReceiver()
    hooks, _clock = webhooks(receiver)
    hooks.event("room_started", "r1")
    hooks.event("peer_joined", "r1", "alice")
    hooks.event("room_started", "r2")
    assert receiver.types() == [("r1", "room_started"), ("r2", "room_started")]
    receiver.answer(0, 204)
    assert receiver.types()[2] == ("r1", "peer_joined")
    assert receiver.requests[2][1]["peer"] == "alice"
    receiver.answer(1, 200)
    receiver.answer(2, 200)
    assert hooks.queued() == 0 and hooks.counts["delivered"] == 3


def test_an_event_is_signed_as_documented() -> None:
    receiver = FakeReceiver()
    hooks, _clock = webhooks(receiver)
    hooks.event("peer_left", "r1", "alice", "closed")
    _url, event, headers, _d = receiver.requests[0]
    body = json.dumps(event, separators=(",", ":")).encode()
    assert event["type"] == "peer_left" and event["reason"] == "closed"
    assert event["timestamp"] == 1_800_000_000_000 and len(event["id"]) == 32
    t, v1 = headers[b"x-peersig-signature"].decode().split(",")
    assert t == "t=1800000000"
    mac = hmac.new(SECRET, b"1800000000." + body, hashlib.sha256).hexdigest()
    assert v1 == "v1=" + mac
    assert signature(SECRET, body, 1_800_000_000) == f"{t},{v1}"
    assert headers[b"content-type"] == b"application/json"


def test_errors_and_5xx_are_retried_with_backoff_then_given_up() -> None:
    receiver = FakeReceiver()
    hooks, clock = webhooks(receiver, retry_for=4.0)
    hooks.event("room_started", "r1")
    hooks.event("room_finished", "r1")
    receiver.answer(0, 503)
    assert len(receiver.requests) == 1
    clock.advance(FIRST_BACKOFF)
    assert len(receiver.requests) == 2  # the same event again, the same id
    assert receiver.requests[1][1] == receiver.requests[0][1]
    receiver.requests[1][3].errback(ConnectionRefusedError())
    clock.advance(FIRST_BACKOFF * 2)
    receiver.answer(2, 500)
    clock.advance(FIRST_BACKOFF * 4)  # 3.5 s after the first attempt
    receiver.answer(3, 502)  # the next wait would pass 4 s: given up
    assert hooks.counts["failed"] == 1 and hooks.counts["retries"] == 3
    assert receiver.types()[4] == ("r1", "room_finished")  # its room goes on


def test_a_4xx_is_given_up_at_once_and_429_is_retried() -> None:
    receiver = FakeReceiver()
    hooks, clock = webhooks(receiver)
    hooks.event("room_started", "r1")
    receiver.answer(0, 429)
    clock.advance(FIRST_BACKOFF)
    receiver.answer(1, 400)
    assert hooks.counts["rejected"] == 1 and hooks.queued() == 0


def test_the_queue_is_bounded_and_drops_are_counted() -> None:
    receiver = FakeReceiver()
    hooks, _clock = webhooks(receiver, limit=5)
    for n in range(20):
        hooks.event("room_started", f"r{n}")
    assert hooks.queued() == 5 and hooks.counts["dropped"] == 15
    assert len(receiver.requests) == 5


def test_at_most_max_in_flight_requests_per_receiver() -> None:
    receiver = FakeReceiver()
    hooks, _clock = webhooks(receiver)
    for n in range(MAX_IN_FLIGHT + 3):
        hooks.event("room_started", f"r{n}")
    assert len(receiver.requests) == MAX_IN_FLIGHT
    receiver.answer(0, 200)
    assert len(receiver.requests) == MAX_IN_FLIGHT + 1


def test_a_retry_waits_for_a_free_slot() -> None:
    receiver = FakeReceiver()
    hooks, clock = webhooks(receiver)
    hooks.event("room_started", "r0")
    receiver.answer(0, 500)
    for n in range(1, MAX_IN_FLIGHT + 1):
        hooks.event("room_started", f"r{n}")
    clock.advance(FIRST_BACKOFF)  # every slot is taken
    assert len(receiver.requests) == 1 + MAX_IN_FLIGHT
    receiver.answer(1, 200)
    assert receiver.types()[-1] == ("r0", "room_started")


def test_every_receiver_gets_every_event() -> None:
    seen: list[bytes] = []

    def post(url: bytes, body: bytes, headers: dict[bytes, bytes]) -> Deferred[int]:
        seen.append(url)
        return succeed(200)

    hooks, _clock = webhooks(post, urls=("http://a/", "https://b/x"))
    hooks.event("room_started", "r1")
    assert seen == [b"http://a/", b"https://b/x"]


@pytest.mark.parametrize("raises", [True, False])
def test_a_broken_client_counts_as_an_error(raises: bool) -> None:
    calls = []

    def post(url: bytes, body: bytes, headers: dict[bytes, bytes]) -> Deferred[int]:
        calls.append(body)
        if raises:
            raise OSError("no route")
        d: Deferred[int] = Deferred()
        d.errback(OSError("no route"))
        return d

    hooks, _clock = webhooks(post, retry_for=0.1)
    hooks.event("room_started", "r1")
    assert hooks.counts["failed"] == 1 and hooks.queued() == 0


# -- against a real twistd ------------------------------------------------------------------

class Receiver(LocalServer):
    """A webhook receiver: records each event with its signature header; ``status`` is its
    answer."""

    def __init__(self, port: int = 0) -> None:
        self.events: list[dict[str, Any]] = []
        self.signatures: list[tuple[bytes, str]] = []
        self.status = 204
        self.lock = threading.Lock()
        super().__init__(_Handler, port)

    @property
    def url(self) -> str:
        return self.address("/hook")

    def wait_for(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.events


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.hold()
        with self.server.lock:
            if self.server.status < 300:
                self.server.events.append(json.loads(body))
                self.server.signatures.append((body, self.headers["X-Peersig-Signature"]))
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def verifies(secret: bytes, body: bytes, header: str) -> bool:
    """What docs/operations.md tells a receiver to do."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < 300


def write_secret(folder: Path, name: str, value: bytes) -> Path:
    path = folder / name
    path.write_bytes(value)
    return path


ADMIN_TOKEN = b"admin-token-0123456789abcdef"


@pytest.fixture
def admin_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    port = free_port()
    token_file = write_secret(tmp_path, "admin.token", ADMIN_TOKEN + b"\n")
    proc = ServerProcess(tmp_path, ["--admin-port", f"tcp:{port}:interface=127.0.0.1",
                                    "--admin-token-file", str(token_file)])
    proc.start()
    yield proc, f"http://127.0.0.1:{port}"
    proc.stop()


def admin(base: str, method: str, path: str, token: bytes | None = ADMIN_TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": "Bearer " + token.decode()} if token is not None else {}
    request = urllib.request.Request(base + path, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_the_admin_api_needs_its_token_and_only_answers_on_its_endpoint(
        admin_server: tuple[ServerProcess, str]) -> None:
    server, base = admin_server
    assert admin(base, "GET", "/rooms", token=None)[0] == 401
    assert admin(base, "GET", "/rooms", token=b"admin-token-0123456789abcdeX")[0] == 401
    assert admin(base, "GET", "/rooms", token=ADMIN_TOKEN + b"x")[0] == 401
    assert admin(base, "GET", "/rooms") == (200, {"rooms": []})
    for path in ("/rooms", "/rooms/x", "/rooms/x/peers/y"):
        status, _headers, _body = server.get(path, {"Authorization": "Bearer "
                                                    + ADMIN_TOKEN.decode()})
        assert status == 404
    assert admin(base, "GET", "/nothing")[0] == 404
    assert admin(base, "POST", "/rooms")[0] == 405


def test_rooms_peers_kick_ban_and_close(admin_server: tuple[ServerProcess, str]) -> None:
    server, base = admin_server
    before = time.time() * 1000
    with connect(server.ws_url("alice", token="lobby")) as a, \
            connect(server.ws_url("bob", token="lobby")) as b, \
            connect(server.ws_url("carol", token="other")) as c:
        for ws in (a, b, c):
            assert recv_json(ws) == {"type": "OPEN"}
        status, rooms = admin(base, "GET", "/rooms")
        assert status == 200
        by_name = {r["room"]: r for r in rooms["rooms"]}
        assert by_name["lobby"]["peers"] == 2 and by_name["other"]["peers"] == 1
        assert before - 1000 <= by_name["lobby"]["created"] <= time.time() * 1000
        status, room = admin(base, "GET", "/rooms/lobby")
        assert status == 200 and room["room"] == "lobby"
        assert sorted(p["id"] for p in room["peers"]) == ["alice", "bob"]
        assert all(set(p) == {"id", "since", "away"} for p in room["peers"])  # no --log-peers
        assert admin(base, "GET", "/rooms/nobody")[0] == 404

        status, answer = admin(base, "DELETE", "/rooms/lobby/peers/bob?reason=Cheating&ban=2")
        assert status == 200 and answer["removed"] is True
        assert recv_json(b) == {"type": "ERROR", "payload": {"msg": "Cheating"}}
        assert close_code(b) == 1008
        assert recv_json(a) == {"type": "LEAVE", "src": "bob"}
        banned_until = answer["banned_until"] / 1000
        with connect(server.ws_url("bob", token="lobby")) as again:
            assert recv_json(again) == {"type": "ERROR", "payload": {"msg": "Cheating"}}
            assert close_code(again) == 1008
        with connect(server.ws_url("bob", token="other")) as elsewhere:
            assert recv_json(elsewhere) == {"type": "OPEN"}
        time.sleep(max(0.0, banned_until - time.time()) + 0.2)
        with connect(server.ws_url("bob", token="lobby")) as back:
            assert recv_json(back) == {"type": "OPEN"}
            status, answer = admin(base, "DELETE", "/rooms/lobby")
            assert status == 200 and answer == {"removed": 2}
            for ws in (a, back):
                assert recv_json(ws) == {"type": "ERROR",
                                         "payload": {"msg": "Removed by the server"}}
                assert close_code(ws) == 1008
        assert admin(base, "GET", "/rooms/lobby")[0] == 404
        assert admin(base, "DELETE", "/rooms/lobby/peers/bob")[0] == 404
        assert admin(base, "DELETE", "/rooms/other/peers/x?ban=abc")[0] == 400
        assert admin(base, "DELETE", "/rooms/other/peers/x?reason=%0a")[0] == 400


def test_the_admin_api_listens_on_a_unix_socket(tmp_path: Path) -> None:
    sock_path = tmp_path / "admin.sock"
    token_file = write_secret(tmp_path, "admin.token", ADMIN_TOKEN)
    server = ServerProcess(tmp_path, ["--admin-port", f"unix:{sock_path}",
                                      "--admin-token-file", str(token_file),
                                      "--log-peers"])
    server.start()
    try:
        with connect(server.ws_url("alice", token="lobby")) as a:
            recv_json(a)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(sock_path))
                s.sendall(b"GET /rooms/lobby HTTP/1.0\r\nAuthorization: Bearer "
                          + ADMIN_TOKEN + b"\r\n\r\n")
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200")
            peers = json.loads(body)["peers"]
            assert peers[0]["id"] == "alice" and peers[0]["address"] == "127.0.0.1"
    finally:
        server.stop()


WEBHOOK_SECRET = b"webhook-secret-0123456789abcdef"


def webhook_server(folder: Path, receiver_url: str, *extra: str) -> ServerProcess:
    secret = write_secret(folder, "webhook.secret", WEBHOOK_SECRET)
    return ServerProcess(folder, ["--webhook", receiver_url, "--webhook-secret-file",
                                  str(secret), *extra])


def test_a_receiver_gets_a_sessions_events_in_order_signed(tmp_path: Path) -> None:
    receiver = Receiver()
    port = free_port()
    token_file = write_secret(tmp_path, "admin.token", ADMIN_TOKEN)
    server = webhook_server(tmp_path, receiver.url, "--admin-port",
                            f"tcp:{port}:interface=127.0.0.1", "--admin-token-file",
                            str(token_file))
    server.start()
    try:
        with connect(server.ws_url("alice", token="game.7~not-a-secret")) as a:
            recv_json(a)
            b = connect(server.ws_url("bob", token="game.7~other"))
            recv_json(b)
            b.close(1001)  # a page gone
            recv_json(a)  # bob's LEAVE
            admin(f"http://127.0.0.1:{port}", "DELETE", "/rooms/game.7/peers/alice")
            close_code(a)
        events = receiver.wait_for(6)
        assert [(e["type"], e.get("peer"), e.get("reason")) for e in events] == [
            ("room_started", None, None),
            ("peer_joined", "alice", None),
            ("peer_joined", "bob", None),
            ("peer_left", "bob", "closed"),
            ("peer_left", "alice", "removed"),
            ("room_finished", None, None),
        ]
        assert {e["room"] for e in events} == {"game.7"}
        assert len({e["id"] for e in events}) == 6
        stamps = [e["timestamp"] for e in events]
        assert stamps == sorted(stamps) and abs(stamps[0] / 1000 - time.time()) < 30
        for body, header in receiver.signatures:
            assert verifies(WEBHOOK_SECRET, body, header)
            assert b"not-a-secret" not in body and b"other" not in body
            assert not verifies(b"another-secret-0123456789", body, header)
    finally:
        server.stop()
        receiver.stop()


def test_a_hanging_receiver_holds_up_no_relay_and_its_queue_stays_bounded(
        tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.hang.set()
    server = webhook_server(tmp_path, receiver.url, "--webhook-queue", "20", "--rate-limit", "0")
    server.start()
    try:
        with connect(server.ws_url("a", token="relay")) as a, \
                connect(server.ws_url("b", token="relay")) as b:
            recv_json(a), recv_json(b)
            for n in range(30):  # 4 events each: room_started, joined, left, finished
                with connect(server.ws_url(f"p{n}", token=f"churn{n}")) as p:
                    recv_json(p)
            for n in range(2000):
                a.send(json.dumps({"type": "CANDIDATE", "dst": "b", "payload": {"n": n}}))
            for n in range(2000):
                assert recv_json(b)["payload"] == {"n": n}
            metrics = sample_metrics(server)
            assert metrics[("peersig_webhook_queue", "")] <= 20
            assert metrics[("peersig_webhook_events_total", "dropped")] > 0
            assert metrics[("peersig_relays_total", "CANDIDATE")] == 2000
        receiver.released.set()
        deadline = time.monotonic() + 15
        while sample_metrics(server)[("peersig_webhook_queue", "")] > 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert sample_metrics(server)[("peersig_webhook_events_total", "delivered")] >= 20
    finally:
        server.stop()
        receiver.stop()


def test_retries_reach_a_receiver_that_comes_back(tmp_path: Path) -> None:
    port = free_port()
    server = webhook_server(tmp_path, f"http://127.0.0.1:{port}/hook")
    server.start()
    try:
        with connect(server.ws_url("alice", token="r")) as a:
            recv_json(a)
        time.sleep(1.0)  # the first attempts find nobody listening
        assert sample_metrics(server)[("peersig_webhook_events_total", "retries")] > 0
        receiver = Receiver(port)
        try:
            events = receiver.wait_for(4)
            assert [e["type"] for e in events] == ["room_started", "peer_joined",
                                                   "peer_left", "room_finished"]
        finally:
            receiver.stop()
    finally:
        server.stop()


def sample_metrics(server: ServerProcess) -> dict[tuple[str, str], float]:
    """Every sample as (name, its one label's value or "") -> value."""
    text = server.get("/metrics")[2].decode()
    samples: dict[tuple[str, str], float] = Counter()  # type: ignore[assignment]
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = next(iter(s.labels.values()), "")
            samples[(s.name, label)] = float(s.value)
    return samples


@pytest.mark.parametrize("args, error", [
    (["--admin-port", "tcp:0"], "--admin-port and --admin-token-file go together"),
    (["--webhook", "http://127.0.0.1:1/"], "--webhook needs --webhook-secret-file"),
    (["--webhook", "ftp://x/", "--webhook-secret-file", "SECRET"], "not an http:// or https://"),
    (["--admin-port", "nonsense:1", "--admin-token-file", "SECRET"], "not an endpoint"),
])
def test_admin_and_webhook_options_are_checked_at_startup(tmp_path: Path, args: list[str],
                                                          error: str) -> None:
    secret = write_secret(tmp_path, "secret", b"x" * 32)
    args = [str(secret) if a == "SECRET" else a for a in args]
    server = ServerProcess(tmp_path, args)
    result = subprocess.run(server.command(), cwd=tmp_path, env=server.environment(),
                            capture_output=True, timeout=60)
    assert result.returncode == 1
    assert error in result.stderr.decode()


def test_a_draining_server_sends_the_departures_before_it_exits(tmp_path: Path) -> None:
    receiver = Receiver()
    server = webhook_server(tmp_path, receiver.url)
    server.start()
    try:
        with connect(server.ws_url("alice", token="r")) as a:
            recv_json(a)
            receiver.wait_for(2)
            server.signal()
            assert close_code(a) == 1001
            assert server.proc is not None and server.proc.wait(timeout=15) == 0
        assert [(e["type"], e.get("reason")) for e in receiver.events] == [
            ("room_started", None), ("peer_joined", None), ("peer_left", "shutdown"),
            ("room_finished", None)]
    finally:
        server.stop()
        receiver.stop()


def test_a_retry_that_waited_for_a_slot_keeps_its_deadline() -> None:
    receiver = FakeReceiver()
    hooks, clock = webhooks(receiver, retry_for=3.0)
    hooks.event("room_started", "r0")
    receiver.answer(0, 500)
    for n in range(1, MAX_IN_FLIGHT + 1):
        hooks.event("room_started", f"r{n}")
    clock.advance(FIRST_BACKOFF)  # r0's retry finds every slot taken
    clock.advance(5.0)  # past retry_for while it waits
    receiver.answer(1, 200)  # a slot frees: r0 goes once more
    receiver.answer(len(receiver.requests) - 1, 500)
    assert hooks.counts["failed"] == 1  # its deadline held: given up, not retried anew


def test_a_failed_attempt_frees_its_slot_for_a_waiting_room() -> None:
    receiver = FakeReceiver()
    hooks, _clock = webhooks(receiver)
    for n in range(MAX_IN_FLIGHT + 1):
        hooks.event("room_started", f"r{n}")
    assert len(receiver.requests) == MAX_IN_FLIGHT
    receiver.answer(0, 503)  # r0 backs off; its slot goes to the waiting room
    assert receiver.types()[-1] == (f"r{MAX_IN_FLIGHT}", "room_started")


class _Http10Handler(BaseHTTPRequestHandler):
    """Answers as http.server does by default: HTTP/1.0, no Content-Length, body to EOF."""

    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.events.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_receiver_whose_answer_ends_with_its_connection_gets_each_event_once(
        tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.RequestHandlerClass = _Http10Handler
    server = webhook_server(tmp_path, receiver.url)
    server.start()
    try:
        with connect(server.ws_url("alice", token="r")) as a:
            recv_json(a)
        events = receiver.wait_for(4)
        time.sleep(1.5)  # a retry would come after 0.5 s
        assert [e["type"] for e in receiver.events] == ["room_started", "peer_joined",
                                                         "peer_left", "room_finished"]
        assert sample_metrics(server)[("peersig_webhook_events_total", "delivered")] == 4
        assert events == receiver.events
    finally:
        server.stop()
        receiver.stop()


def test_in_none_mode_only_the_key_names_a_room(tmp_path: Path) -> None:
    from twisted.web.test.requesthelper import DummyRequest

    from peersig.admin import AdminRoot

    world = World(room_by="none", key="game")
    root = AdminRoot(world.hub, ADMIN_TOKEN)
    for name, status in (("typo", 404), ("game", 200)):
        request = DummyRequest([])
        request.method = b"DELETE"
        request.path = f"/rooms/{name}/peers/bob".encode()
        request.args = {b"ban": [b"60"]}
        request.requestHeaders.addRawHeader(b"authorization", b"Bearer " + ADMIN_TOKEN)
        root.render(request)
        assert request.responseCode in (status, None if status == 200 else status), name
    assert list(world.hub.bans) == [("", "bob")]


def test_a_long_non_ascii_reason_still_closes_1008(
        admin_server: tuple[ServerProcess, str]) -> None:
    server, base = admin_server
    reason = "é" * 100  # 200 bytes: the close reason is cut to 123, on a character
    with connect(server.ws_url("bob", token="lobby")) as b:
        recv_json(b)
        status, _ = admin(base, "DELETE", f"/rooms/lobby/peers/bob?reason={quote(reason)}")
        assert status == 200
        assert recv_json(b) == {"type": "ERROR", "payload": {"msg": reason}}
        assert close_code(b) == 1008
