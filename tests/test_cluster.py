"""--cluster (issue 23): two or three ``twistd -n peersig`` nodes sharing one real
``redis-server`` on a Unix socket in the test's temp dir. The test picks the node each
client dials, as a round-robin balancer would.

``bash tests/install-and-run.sh`` installs redis-server from Debian when it is missing;
the module is skipped only when no ``redis-server`` binary can be found, and says so.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from bench.haproxy import free_port

from .serverproc import REDIS, Redis, ServerProcess
from .test_admin import ADMIN_TOKEN, WEBHOOK_SECRET, Receiver, admin, write_secret

NOT_FOUND = ("REDIS-SERVER NOT FOUND: the cluster tests (tests/test_cluster.py) did NOT run. "
             "Install it (apt-get install -y redis-server; tests/install-and-run.sh does).")
if REDIS is None:
    warnings.warn(NOT_FOUND, stacklevel=1)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(REDIS is None, reason=NOT_FOUND)]

NODE_ARGS = ["--max-peers-per-ip", "0"]
# A node reaps others only once its own lease has held two leases (cluster.Link._leased).
STEADY = 6.5


class Nodes:
    def __init__(self, workdir: Path, redis: Redis, count: int, extra: list[str]) -> None:
        self.redis = redis
        self.nodes = []
        for i in range(count):
            folder = workdir / f"node{i}"
            folder.mkdir()
            self.nodes.append(ServerProcess(folder, [*NODE_ARGS, "--cluster", redis.url,
                                                     *extra]))
        self.sockets = contextlib.ExitStack()

    def start(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.start(), self.nodes))
        for node in self.nodes:
            self.wait_health(node, "ok")

    def wait_health(self, node: ServerProcess, want: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen = node.get_json("/health").get("cluster")
            except OSError as e:  # 503 while degraded
                seen = str(e)
            if seen == want:
                return
            assert time.monotonic() < deadline, f"cluster health {seen!r}, not {want!r}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.sockets.close()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.stop(), self.nodes))

    def dial(self, node: int, peer_id: str, token: str = "room1",
             expect_open: bool = True) -> tuple[ClientConnection, Any]:
        ws = self.sockets.enter_context(
            connect(self.nodes[node].ws_url(peer_id, token), open_timeout=5, close_timeout=1))
        first = json.loads(ws.recv(timeout=5))
        if expect_open:
            assert first == {"type": "OPEN"}, f"{peer_id} on node {node}: {first}"
        return ws, first


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def cluster(tmp_path: Path, redis: Redis, count: int = 2,
            extra: list[str] | None = None) -> Iterator[Nodes]:
    nodes = Nodes(tmp_path, redis, count, extra or [])
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


def frames_until(ws: ClientConnection, want: str, timeout: float = 5) -> dict[str, Any]:
    """The first frame of type ``want``, skipping others (PEERS, HEARTBEAT answers)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {want} within {timeout} s"
        frame = json.loads(ws.recv(timeout=left))
        if frame["type"] == want:
            return frame  # type: ignore[no-any-return]


def offer(dst: str, sdp: str = "v=0") -> str:
    return json.dumps({"type": "OFFER", "dst": dst,
                       "payload": {"sdp": {"type": "offer", "sdp": sdp}, "type": "media",
                                   "connectionId": "mc_1"}})


@pytest.mark.parametrize("mode", ["none", "token", "key"])
def test_offer_answer_candidate_cross_nodes(tmp_path: Path, redis: Redis, mode: str) -> None:
    with cluster(tmp_path, redis, 2, ["--room-by", mode]) as nodes:
        if mode == "key":  # the room is the key
            a = nodes.sockets.enter_context(connect(
                nodes.nodes[0].ws_url("alice", "t1", key="app"), open_timeout=5))
            b = nodes.sockets.enter_context(connect(
                nodes.nodes[1].ws_url("bob", "t2", key="app"), open_timeout=5))
            for ws in (a, b):
                assert json.loads(ws.recv(timeout=5)) == {"type": "OPEN"}
        else:
            a, _ = nodes.dial(0, "alice")
            b, _ = nodes.dial(1, "bob")
        for i in range(20):  # in order per sender
            a.send(offer("bob", f"o{i}"))
        for i in range(20):
            got = frames_until(b, "OFFER")
            assert got["src"] == "alice" and got["payload"]["sdp"]["sdp"] == f"o{i}"
        b.send(json.dumps({"type": "ANSWER", "dst": "alice", "payload": {"sdp": "a"}}))
        assert frames_until(a, "ANSWER")["src"] == "bob"
        b.send(json.dumps({"type": "CANDIDATE", "dst": "alice", "payload": {"c": 1}}))
        assert frames_until(a, "CANDIDATE")["payload"] == {"c": 1}
        # A departure reaches the room-mate on the other node (in none mode, a contact).
        a.close(code=1001)
        assert frames_until(b, "LEAVE")["src"] == "alice"


def test_one_id_asked_on_two_nodes_at_once_has_one_holder(tmp_path: Path,
                                                          redis: Redis) -> None:
    with cluster(tmp_path, redis, 2) as nodes:
        for round_ in range(50):
            peer_id = f"racer{round_}"
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(
                    lambda n, i=peer_id, room=f"race{round_}":  # type: ignore[misc]
                    nodes.dial(n, i, room, expect_open=False)[1], (0, 1)))
            kinds = sorted(r["type"] for r in results)
            assert kinds == ["ID-TAKEN", "OPEN"], f"round {round_}: {results}"
            nodes.sockets.close()
            nodes.sockets = contextlib.ExitStack()


def test_five_joiners_of_a_room_of_four_on_three_nodes(tmp_path: Path, redis: Redis) -> None:
    with cluster(tmp_path, redis, 3) as nodes:
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(
                lambda i: nodes.dial(i % 3, f"p{i}", "full", expect_open=False)[1], range(5)))
        kinds = sorted(r["type"] for r in results)
        assert kinds == ["ERROR", "OPEN", "OPEN", "OPEN", "OPEN"], results


def test_a_queue_waits_for_its_destination_on_another_node(tmp_path: Path,
                                                           redis: Redis) -> None:
    with cluster(tmp_path, redis, 2) as nodes:
        a, _ = nodes.dial(0, "early")
        a.send(offer("late", "queued"))
        time.sleep(0.5)
        b, _ = nodes.dial(1, "late")
        got = frames_until(b, "OFFER")
        assert got["src"] == "early" and got["payload"]["sdp"]["sdp"] == "queued"
        # Nobody comes for this one: EXPIRE, about expire-timeout later.
        a.send(offer("never"))
        expired = frames_until(a, "EXPIRE", timeout=10)
        assert expired["src"] == "never"


def test_a_same_token_reconnect_on_another_node_takes_the_id_over(tmp_path: Path,
                                                                  redis: Redis) -> None:
    with cluster(tmp_path, redis, 2, ["--room-by", "none"]) as nodes:
        old = nodes.sockets.enter_context(
            connect(nodes.nodes[0].ws_url("phone", "tok-1"), open_timeout=5))
        assert json.loads(old.recv(timeout=5)) == {"type": "OPEN"}
        other, _ = nodes.dial(1, "thief", "tok-2")
        # Another token: the id is taken.
        _, first = nodes.dial(1, "phone", "tok-3", expect_open=False)
        assert first["type"] == "ID-TAKEN"
        # The same token: the reconnect wins; the old socket closes 1000, nobody hears LEAVE.
        new = nodes.sockets.enter_context(
            connect(nodes.nodes[1].ws_url("phone", "tok-1"), open_timeout=5))
        assert json.loads(new.recv(timeout=5)) == {"type": "OPEN"}
        with pytest.raises(ConnectionClosed) as closed:
            old.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        other.send(offer("phone", "to-new"))
        assert frames_until(new, "OFFER")["payload"]["sdp"]["sdp"] == "to-new"


@pytest.mark.chaos
def test_a_killed_node_is_reaped_within_five_seconds(tmp_path: Path, redis: Redis) -> None:
    with cluster(tmp_path, redis, 2) as nodes:
        a, _ = nodes.dial(0, "stays")
        nodes.dial(1, "dies")
        time.sleep(STEADY)
        started = time.monotonic()
        nodes.nodes[1].signal(signal.SIGKILL)
        assert frames_until(a, "LEAVE", timeout=8)["src"] == "dies"
        took = time.monotonic() - started
        print(f"LEAVE {took:.2f} s after the kill")
        assert took < 5.0, f"LEAVE after {took:.1f} s"
        # Its id is free.
        nodes.dial(0, "dies")
        assert redis.cli("HLEN", "ps:ids:{room1}") == "2"


@pytest.mark.chaos
def test_a_stalled_node_comes_back_without_ghosts(tmp_path: Path, redis: Redis) -> None:
    with cluster(tmp_path, redis, 2) as nodes:
        a, _ = nodes.dial(0, "steady")
        nodes.dial(1, "sleeper")
        time.sleep(STEADY)
        nodes.nodes[1].signal(signal.SIGSTOP)
        try:
            assert frames_until(a, "LEAVE", timeout=8)["src"] == "sleeper"
            # The id is free meanwhile: a newcomer on node 0 holds it.
            nodes.dial(0, "sleeper")
        finally:
            nodes.nodes[1].signal(signal.SIGCONT)
        nodes.wait_health(nodes.nodes[1], "ok")
        time.sleep(2)
        assert nodes.nodes[1].get_json("/health")["peers"] == 0
        rows = redis.cli("HGETALL", "ps:ids:{room1}").split("\n")
        assert sorted(rows[0::2]) == ["sleeper", "steady"]
        assert all(row.startswith(nodes.nodes[0].get_json("/health")["node"] + "|")
                   for row in rows[1::2])


@pytest.mark.chaos
@pytest.mark.parametrize("how", ["stopped", "hung"])
def test_redis_away_for_ten_seconds(tmp_path: Path, redis: Redis, how: str) -> None:
    with cluster(tmp_path, redis, 2) as nodes:
        a, _ = nodes.dial(0, "a")
        a2, _ = nodes.dial(0, "a2")
        b, _ = nodes.dial(1, "b")
        if how == "stopped":
            redis.stop()
        else:
            redis.signal(signal.SIGSTOP)
        try:
            time.sleep(6)
            # Same-node relays go on; cross-node sends end in EXPIRE.
            a.send(offer("a2", "local"))
            assert frames_until(a2, "OFFER")["payload"]["sdp"]["sdp"] == "local"
            a.send(offer("b", "remote"))
            assert frames_until(a, "EXPIRE")["src"] == "b"
            # New joins are refused with 1013, and /health says so.
            _, first = nodes.dial(1, "newcomer", expect_open=False)
            assert first["type"] == "ERROR"
            assert nodes.nodes[0].get("/health")[0] == 503
            assert nodes.nodes[0].metric("peersig_cluster_up") == 0
            assert nodes.nodes[0].metric("peersig_drops_total", reason="cluster") >= 1
            time.sleep(4)
        finally:
            if how == "stopped":
                redis.start()
            else:
                redis.signal(signal.SIGCONT)
        for node in nodes.nodes:
            nodes.wait_health(node, "ok", timeout=20)
        # Nobody was reaped or told anyone left: the same peers, and cross-node works.
        time.sleep(7)
        a.send(offer("b", "after"))
        got = frames_until(b, "OFFER")
        assert got["payload"]["sdp"]["sdp"] == "after"
        for ws in (a, a2, b):
            ws.send(json.dumps({"type": "HEARTBEAT"}))
        assert [n.get_json("/health")["peers"] for n in nodes.nodes] == [2, 1]
        assert nodes.nodes[0].metric("peersig_cluster_up") == 1
        assert sorted(redis.cli("HKEYS", "ps:ids:{room1}").split()) == ["a", "a2", "b"]


def test_the_admin_api_of_any_node_sees_and_bans_across_the_cluster(tmp_path: Path,
                                                                    redis: Redis) -> None:
    token_file = write_secret(tmp_path, "admin.token", ADMIN_TOKEN + b"\n")
    ports = [free_port(), free_port()]
    nodes = Nodes(tmp_path, redis, 2, [])
    for node, port in zip(nodes.nodes, ports, strict=True):
        node.args += ["--admin-port", f"tcp:{port}:interface=127.0.0.1",
                      "--admin-token-file", str(token_file)]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    nodes.start()
    try:
        a, _ = nodes.dial(0, "a", "red")
        nodes.dial(0, "a2", "red")
        b, _ = nodes.dial(1, "b", "blue")
        for base in bases:
            status, body = admin(base, "GET", "/rooms")
            assert status == 200
            assert {r["room"]: r["peers"] for r in body["rooms"]} == {"red": 2, "blue": 1}
        node0 = nodes.nodes[0].get_json("/health")["node"]
        status, body = admin(bases[1], "GET", "/rooms/red")
        assert status == 200
        assert sorted((p["id"], p["node"]) for p in body["peers"]) == [("a", node0),
                                                                       ("a2", node0)]
        assert admin(bases[1], "GET", "/rooms/green")[0] == 404
        # Node 1 closes a room whose members are on node 0.
        status, body = admin(bases[1], "DELETE", "/rooms/red?reason=Closed")
        assert (status, body) == (200, {"removed": 2})
        assert frames_until(a, "ERROR")["payload"]["msg"] == "Closed"
        # Node 0 removes and bans a peer connected to node 1.
        status, body = admin(bases[0], "DELETE", "/rooms/blue/peers/b?ban=600&reason=Go")
        assert status == 200 and body["removed"] is True and "banned_until" in body
        assert frames_until(b, "ERROR")["payload"]["msg"] == "Go"
        for node in (1, 0):
            _, first = nodes.dial(node, "b", "blue", expect_open=False)
            assert first == {"type": "ERROR", "payload": {"msg": "Go"}}
        # The ban outlives a restart of the nodes (it is kept in Redis).
        nodes.stop()
        nodes.sockets = contextlib.ExitStack()
        nodes.start()
        _, first = nodes.dial(1, "b", "blue", expect_open=False)
        assert first == {"type": "ERROR", "payload": {"msg": "Go"}}
        assert admin(bases[1], "DELETE", "/rooms/blue/peers/nobody")[0] == 404
    finally:
        nodes.stop()


@pytest.mark.chaos
def test_a_drained_node_hands_its_peers_over(tmp_path: Path, redis: Redis) -> None:
    with cluster(tmp_path, redis, 2) as nodes:
        stays, _ = nodes.dial(0, "stays")
        nodes.dial(1, "mover")
        nodes.dial(1, "goner")
        time.sleep(STEADY)
        nodes.nodes[1].signal(signal.SIGTERM)
        # mover reconnects to the other node at once: it takes its id back, unseen.
        deadline = time.monotonic() + 3
        while True:
            _, first = nodes.dial(0, "mover", expect_open=False)
            if first["type"] == "OPEN":
                break
            assert time.monotonic() < deadline, first
            time.sleep(0.1)
        stays.send(offer("mover", "after-drain"))
        # goner does not come back: its room-mate hears LEAVE (from the reaper), and only
        # of goner.
        assert frames_until(stays, "LEAVE", timeout=8)["src"] == "goner"
        assert sorted(redis.cli("HKEYS", "ps:ids:{room1}").split()) == ["mover", "stays"]


@pytest.mark.chaos
def test_a_short_redis_stall_is_ridden_out(tmp_path: Path, redis: Redis) -> None:
    """A stall longer than a call's deadline (1 s) but shorter than a lease: the node's
    calls fail meanwhile, and it is whole again right after."""
    with cluster(tmp_path, redis, 2) as nodes:
        a, _ = nodes.dial(0, "a")
        b, _ = nodes.dial(1, "b")
        time.sleep(STEADY)
        redis.signal(signal.SIGSTOP)
        time.sleep(1.5)
        redis.signal(signal.SIGCONT)
        for node in nodes.nodes:
            nodes.wait_health(node, "ok", timeout=6)
        a.send(offer("b", "after-stall"))
        assert frames_until(b, "OFFER")["payload"]["sdp"]["sdp"] == "after-stall"
        time.sleep(2)
        for node in nodes.nodes:
            assert node.get_json("/health")["cluster"] == "ok"
        assert sorted(redis.cli("HKEYS", "ps:ids:{room1}").split()) == ["a", "b"]


def test_webhooks_tell_of_a_room_once_whatever_the_nodes(tmp_path: Path, redis: Redis) -> None:
    receiver = Receiver()
    secret = write_secret(tmp_path, "webhook.secret", WEBHOOK_SECRET)
    try:
        with cluster(tmp_path, redis, 2, ["--webhook", receiver.url, "--webhook-secret-file",
                                          str(secret)]) as nodes:
            a, _ = nodes.dial(0, "a", "hooks")
            b, _ = nodes.dial(1, "b", "hooks")
            c, _ = nodes.dial(1, "c", "hooks")
            for ws in (a, b, c):
                ws.close(code=1001)
            events = receiver.wait_for(8)
            time.sleep(1)  # nothing more comes
            kinds = [e["type"] for e in receiver.events]
            assert kinds.count("room_started") == 1 and kinds.count("room_finished") == 1, kinds
            assert kinds.count("peer_joined") == 3 and kinds.count("peer_left") == 3, kinds
            assert {e["room"] for e in events} == {"hooks"}
    finally:
        receiver.stop()


def test_an_app_message_to_the_room_reaches_every_node(tmp_path: Path, redis: Redis) -> None:
    with cluster(tmp_path, redis, 2, ["--app-message-type", "GAME"]) as nodes:
        a, _ = nodes.dial(0, "a", "game")
        b, _ = nodes.dial(0, "b", "game")
        c, _ = nodes.dial(1, "c", "game")
        a.send(json.dumps({"type": "GAME", "payload": {"move": 1}}))
        for ws in (b, c):
            got = frames_until(ws, "GAME")
            assert got["src"] == "a" and got["payload"] == {"move": 1}


def silent_peer(node: ServerProcess, peer_id: str, token: str = "room1") -> socket.socket:
    """A client that joins and then reads nothing and answers nothing (a page whose network
    went away without a FIN): pings to it go unanswered."""
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /peerjs?key=peerjs&id={peer_id}&token={token}&version=1.5.5 HTTP/1.1\r\n"
                  f"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    seen = b""
    while b'{"type":"OPEN"}' not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk
    return sock


def test_a_holder_on_another_node_is_probed(tmp_path: Path, redis: Redis) -> None:
    with cluster(tmp_path, redis, 2) as nodes:
        # A live holder answers its node's ping: the newcomer gets ID-TAKEN.
        nodes.dial(0, "alive")
        time.sleep(0.3)
        _, first = nodes.dial(1, "alive", expect_open=False)
        assert first["type"] == "ID-TAKEN"
        # A silent one does not: the newcomer on the other node takes its id over.
        silent = silent_peer(nodes.nodes[0], "silent")
        try:
            mate, _ = nodes.dial(1, "mate")
            time.sleep(0.3)
            started = time.monotonic()
            new, first = nodes.dial(1, "silent", expect_open=False)
            assert first == {"type": "OPEN"}
            print(f"takeover after {time.monotonic() - started:.2f} s")
            mate.send(offer("silent", "to-the-new-one"))
            assert frames_until(new, "OFFER")["payload"]["sdp"]["sdp"] == "to-the-new-one"
            assert redis.cli("HGET", "ps:ids:{room1}", "silent").startswith(
                nodes.nodes[1].get_json("/health")["node"] + "|")
        finally:
            silent.close()


def test_a_subscriber_cut_off_by_redis_subscribes_again(tmp_path: Path, redis: Redis) -> None:
    with cluster(tmp_path, redis, 2) as nodes:
        a, _ = nodes.dial(0, "a")
        b, _ = nodes.dial(1, "b")
        assert redis.cli("CLIENT", "KILL", "TYPE", "pubsub") == "2"
        # Both nodes' subscribers reconnect and subscribe again; meanwhile /health may dip.
        deadline = time.monotonic() + 10
        while redis.cli("PUBSUB", "NUMSUB", "ps:ev").split()[-1] != "2":
            assert time.monotonic() < deadline, "not subscribed again"
            time.sleep(0.1)
        for node in nodes.nodes:
            nodes.wait_health(node, "ok")
        a.send(offer("b", "again"))
        assert frames_until(b, "OFFER")["payload"]["sdp"]["sdp"] == "again"


class Blackhole:
    """TCP on loopback to Redis's Unix socket, for one node: ``block`` cuts its connections
    and refuses new ones (a partition of that node alone) until ``unblock``."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.blocked = threading.Event()
        self.conns: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.blocked.is_set():
                client.close()
                continue
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def block(self) -> None:
        self.blocked.set()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.conns = []

    def close(self) -> None:
        self.server.close()
        self.block()


@pytest.mark.chaos
def test_a_node_cut_off_from_redis_alone_is_reaped_and_closes_its_peers(
        tmp_path: Path, redis: Redis) -> None:
    """A partition of one node: the others reap it (its peers' room-mates hear LEAVE); when
    it reaches Redis again it closes its peers (1012), who come back as newcomers."""
    proxy = Blackhole(redis.socket)
    nodes = Nodes(tmp_path, redis, 2, [])
    args = nodes.nodes[1].args
    args[args.index("--cluster") + 1] = f"redis://127.0.0.1:{proxy.port}/0"
    nodes.start()
    try:
        a, _ = nodes.dial(0, "a")
        b, _ = nodes.dial(1, "b")
        time.sleep(STEADY)
        proxy.block()
        assert frames_until(a, "LEAVE", timeout=10)["src"] == "b"
        status, _, body = nodes.nodes[1].get("/health")
        assert status == 503 and json.loads(body)["peers"] == 1  # b stays on its node
        proxy.blocked.clear()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                b.recv(timeout=15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        nodes.wait_health(nodes.nodes[1], "ok")
        nodes.dial(1, "b")
        assert sorted(redis.cli("HKEYS", "ps:ids:{room1}").split()) == ["a", "b"]
    finally:
        nodes.stop()
        proxy.close()


def test_discovery_lists_every_nodes_peers(tmp_path: Path, redis: Redis) -> None:
    with cluster(tmp_path, redis, 2, ["--room-by", "none", "--allow-discovery"]) as nodes:
        nodes.dial(0, "a", "t1")
        nodes.dial(1, "b", "t2")
        for node in nodes.nodes:
            status, _, body = node.get("/peerjs/peers")
            assert status == 200 and sorted(json.loads(body)) == ["a", "b"]


def test_room_events_reach_every_node(tmp_path: Path, redis: Redis) -> None:
    with cluster(tmp_path, redis, 2, ["--room-events"]) as nodes:
        a, _ = nodes.dial(0, "a")
        assert frames_until(a, "PEERS")["payload"] == {"peers": []}
        b, _ = nodes.dial(1, "b")
        assert frames_until(b, "PEERS")["payload"] == {"peers": ["a"]}
        assert frames_until(a, "JOIN")["src"] == "b"
        c, _ = nodes.dial(0, "c")
        assert sorted(frames_until(c, "PEERS")["payload"]["peers"]) == ["a", "b"]
        assert frames_until(b, "JOIN")["src"] == "c"
        b.close(code=1001)
        for ws in (a, c):
            assert frames_until(ws, "LEAVE")["src"] == "b"
            assert frames_until(ws, "PART")["src"] == "b"


def test_news_older_than_a_members_peers_is_not_told_again(tmp_path: Path,
                                                           redis: Redis) -> None:
    """A joined or left message may reach a node after a newcomer's PEERS that already
    reflects it (a claim's answer and the bus are two sockets): each carries its number
    from ps:seq, and a member hears only news numbered after its own roster."""
    with cluster(tmp_path, redis, 2, ["--room-events"]) as nodes:
        a, _ = nodes.dial(0, "a")
        assert frames_until(a, "PEERS")["payload"] == {"peers": []}
        before_b = int(redis.cli("GET", "ps:seq"))  # a's claim, and a's row
        b, _ = nodes.dial(1, "b")
        assert json.loads(b.recv(timeout=5)) == {"type": "PEERS", "payload": {"peers": ["a"]}}
        assert frames_until(a, "JOIN")["src"] == "b"
        b_claim = int(redis.cli("GET", "ps:seq"))
        room = redis.cli("KEYS", "ps:ids:*")[len("ps:ids:{"):-1]
        # Late news of a's join, and of a departure before b's claim: old news to b.
        stale = [["joined", room, "a", "elsewhere", True, before_b],
                 ["left", room, "gone", "elsewhere", True, True, None, -1, before_b]]
        for message in stale:
            assert redis.publish("ps:ev", msgspec.msgpack.encode(message)) == 2
        # News after b's claim is told, and it is the next thing b hears.
        assert redis.publish("ps:ev", msgspec.msgpack.encode(
            ["left", room, "later", "elsewhere", True, True, None, -1, b_claim + 1])) == 2
        assert [json.loads(b.recv(timeout=5))["type"] for _ in range(2)] == ["LEAVE", "PART"]
        # A counter rolled back with Redis's data (a failover to a replica behind) goes on
        # from Redis's clock: c's join is still news to b.
        redis.cli("SET", "ps:seq", "1")
        nodes.dial(0, "c")
        assert json.loads(b.recv(timeout=5)) == {"type": "JOIN", "src": "c"}


def test_a_reconnect_on_its_node_hears_of_every_nodes_members(tmp_path: Path,
                                                              redis: Redis) -> None:
    with cluster(tmp_path, redis, 2, ["--room-by", "key", "--room-events"]) as nodes:
        def join(node: int, peer_id: str, token: str) -> ClientConnection:
            ws = nodes.sockets.enter_context(connect(
                nodes.nodes[node].ws_url(peer_id, token, key="app"), open_timeout=5))
            assert json.loads(ws.recv(timeout=5)) == {"type": "OPEN"}
            return ws

        join(0, "a", "t1")
        join(1, "b", "t2")
        again = join(0, "a", "t1")  # the same token: a takeover on node 0
        assert frames_until(again, "PEERS")["payload"] == {"peers": ["b"]}
