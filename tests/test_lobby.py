"""Issue 24: app messages through the room, quick match, per-room sizes from the token, and
the demo page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from peersig.jwtauth import JWTAuthorizer, KeyFile
from peersig.messages import app_type_problem
from peersig.tap import Options

from .fakes import FakeTransport, World
from .serverproc import ServerProcess
from .test_jwt import SECRET, mint
from .test_process import recv_json


def chat_world(**config: Any) -> World:
    return World(app_message_types=frozenset({"CHAT", "READY"}), rate_limit=0, **config)


def members(world: World, *ids: str, token: str = "room1") -> list[FakeTransport]:
    peers = [world.connect(i, token=token) for i in ids]
    for p in peers:
        p.take()
    return peers


# -- app messages ---------------------------------------------------------------------------


def test_an_app_message_goes_to_its_dst_with_the_senders_src() -> None:
    world = chat_world()
    alice, bob, carol = members(world, "alice", "bob", "carol")
    world.send(alice, b'{"type":"CHAT","dst":"bob","src":"carol","payload":{"text":"gg"}}')
    assert bob.take() == [{"type": "CHAT", "src": "alice", "dst": "bob",
                           "payload": {"text": "gg"}}]
    assert carol.take() == [] and alice.take() == []


def test_an_app_message_without_dst_goes_to_every_other_member() -> None:
    world = chat_world()
    alice, bob, carol = members(world, "alice", "bob", "carol")
    (elsewhere,) = members(world, "dave", token="room2")
    world.send(alice, {"type": "READY", "payload": True})
    for other in (bob, carol):
        assert other.take() == [{"type": "READY", "src": "alice", "payload": True}]
    assert alice.take() == [] and elsewhere.take() == []


def test_an_app_message_to_an_absent_or_foreign_id_gets_expire_at_once() -> None:
    world = chat_world()
    alice, = members(world, "alice")
    members(world, "dave", token="room2")
    world.send(alice, {"type": "CHAT", "dst": "nobody", "payload": 1})
    world.send(alice, {"type": "CHAT", "dst": "dave", "payload": 2})  # another room's
    assert alice.take() == [{"type": "EXPIRE", "src": "nobody", "dst": "alice"},
                            {"type": "EXPIRE", "src": "dave", "dst": "alice"}]
    world.advance(10.0)
    assert alice.take() == [] and not world.hub.rooms["room1"].queues  # never queued


def test_unknown_types_are_still_refused_and_app_types_obey_the_rate_limit() -> None:
    world = World(app_message_types=frozenset({"CHAT"}), rate_limit=5)
    alice, bob = members(world, "alice", "bob")
    world.send(alice, {"type": "SHOUT", "payload": 1})
    assert world.hub.stats.drops["bad_type"] == 1
    for n in range(8):
        world.send(alice, {"type": "CHAT", "dst": "bob", "payload": n})
    # A burst of 5, one of which the refused frame took: frames count, whatever their type.
    assert [m["payload"] for m in bob.take()] == [0, 1, 2, 3]
    assert world.hub.stats.drops["rate_limit"] == 4


def test_without_rooms_an_app_message_needs_a_dst() -> None:
    world = chat_world(room_by="none")
    alice, bob = members(world, "alice", "bob")
    world.send(alice, {"type": "CHAT", "payload": "all?"})
    assert bob.take() == [] and world.hub.stats.drops["no_dst"] == 1
    world.send(alice, {"type": "CHAT", "dst": "bob", "payload": "you"})
    assert bob.take()[0]["payload"] == "you"


@pytest.mark.parametrize("name", ["OFFER", "offer", "Leave", "HEARTBEAT", "ID-TAKEN", "ERROR",
                                  "INVALID-KEY", "OPEN", "PEERS", "join", "PART", "", "9LIVES",
                                  "has space", "x" * 33])
def test_a_peerjs_or_peersig_type_is_never_an_app_type(name: str) -> None:
    assert app_type_problem(name) is not None
    with pytest.raises(SystemExit, match="--app-message-type"):
        Options().parseOptions(["--app-message-type", name])


@pytest.mark.parametrize("name", ["CHAT", "READY", "game.move", "LOBBY-SEAT", "x" * 32])
def test_app_types_a_stock_client_ignores_are_taken(name: str) -> None:
    assert app_type_problem(name) is None


# -- quick match ----------------------------------------------------------------------------


def test_quick_match_seats_five_duellists_two_two_one_and_peers_says_who_is_there() -> None:
    world = World(quick_match=True, room_events=True, room_size=2)
    joined = [world.connect(f"p{n}", token="match:duel") for n in range(5)]
    rooms = sorted(world.hub.rooms)
    assert rooms == ["match:duel:1", "match:duel:2", "match:duel:3"]
    assert [len(world.hub.rooms[r].peers) for r in rooms] == [2, 2, 1]
    peers = [next(m for m in t.messages() if m["type"] == "PEERS")["payload"]["peers"]
             for t in joined]
    assert peers == [[], ["p0"], [], ["p2"], []]
    assert {"type": "JOIN", "src": "p1"} in joined[0].messages()


def test_a_quick_match_reconnect_returns_to_its_room() -> None:
    world = World(quick_match=True, room_events=True, room_size=2)
    a, _b, _c = (world.connect(f"p{n}", token="match:duel") for n in range(3))
    assert a.session is not None
    world.hub.socket_closed(a.session, None, True)  # peer.disconnect(): within the grace
    back = world.connect("p0", token="match:duel")
    assert back.session is not None and back.session.room.name == "match:duel:1"
    assert world.hub.stats.connections["resumed"] == 1


def test_a_quick_match_room_can_only_be_reached_through_its_queue() -> None:
    world = World(quick_match=True, room_events=True)
    refused = world.connect("x", token="match:duel:1")  # a queue name has no ':'
    assert refused.messages()[0]["payload"]["msg"] == "Invalid room name"
    assert not world.hub.rooms


def test_a_ban_in_a_match_room_sends_the_id_to_another_room() -> None:
    world = World(quick_match=True, room_events=True, room_size=2)
    world.connect("p0", token="match:duel")
    world.hub.ban("match:duel:1", "p1", world.clock.seconds() + 60, "Banned")
    banned = world.connect("p1", token="match:duel")
    assert banned.types()[0] == "OPEN"
    assert banned.session is not None and banned.session.room.name != "match:duel:1"


def test_match_rooms_are_numbered_once_for_all_queues() -> None:
    # One count: a queue name a client made up leaves nothing behind once its room is gone.
    world = World(quick_match=True, room_events=True)
    for n in range(3):
        t = world.connect(f"p{n}", token=f"match:q{n}")
        assert t.session is not None
        world.hub.depart(t.session, "closed")
    assert not world.hub.matches and world.hub.match_number == 3


def test_a_broadcast_costs_the_sender_a_token_per_receiver() -> None:
    world = World(app_message_types=frozenset({"CHAT"}), rate_limit=4, room_size=0)
    alice, *others = members(world, "alice", "b", "c", "d")
    world.send(alice, {"type": "CHAT", "payload": 1})  # 3 receivers: 3 of alice's 4 tokens
    world.send(alice, {"type": "CHAT", "payload": 2})
    assert [m["payload"] for m in others[0].take()] == [1, 2]
    world.send(alice, {"type": "CHAT", "payload": 3})  # the bucket is empty now
    assert others[0].take() == [] and world.hub.stats.drops["rate_limit"] == 1


# -- room sizes from the token ----------------------------------------------------------------


def sized_token(peer_id: str, room: str, size: int | None) -> str:
    return f"{room}~{mint(SECRET, 'HS256', sub=peer_id, room=room, room_size=size)}"


def test_a_room_size_claim_of_two_fills_the_room_at_two() -> None:
    world = World(authorizer=JWTAuthorizer(), jwt_keys=KeyFile(SECRET), room_size=4)
    world.connect("ann", token=sized_token("ann", "duel", 2))
    world.connect("ben", token=sized_token("ben", "duel", 4))  # the room keeps its size
    third = world.connect("cat", token=sized_token("cat", "duel", 4))
    assert third.messages() == [{"type": "ERROR", "payload": {"msg": "Room is full (2 peers)"}}]


def test_a_token_cannot_ask_for_more_than_the_room_size() -> None:
    world = World(authorizer=JWTAuthorizer(), jwt_keys=KeyFile(SECRET), room_size=3)
    for n in range(3):
        world.connect(f"p{n}", token=sized_token(f"p{n}", "big", 10))
    late = world.connect("p3", token=sized_token("p3", "big", 10))
    assert late.messages()[0]["payload"]["msg"] == "Room is full (3 peers)"


@pytest.mark.parametrize("size", [0, -1, "2", 2.5, True])
def test_a_room_size_claim_that_is_no_positive_integer_is_refused(size: Any) -> None:
    world = World(authorizer=JWTAuthorizer(), jwt_keys=KeyFile(SECRET))
    refused = world.connect("ann", token=sized_token("ann", "duel", size))
    assert refused.messages()[0]["payload"]["msg"] == "Invalid token provided"


def test_quick_match_with_a_jwt_takes_the_size_it_carries() -> None:
    world = World(authorizer=JWTAuthorizer(), jwt_keys=KeyFile(SECRET), quick_match=True,
                  room_events=True, room_size=4)
    for n in range(3):
        world.connect(f"p{n}", token=sized_token(f"p{n}", "match:duel", 2))
    world.connect("p3", token=sized_token("p3", "match:duel", None))  # a room of 4
    sizes = sorted((r.size, len(r.peers)) for r in world.hub.rooms.values())
    assert sizes == [(2, 1), (2, 2), (4, 1)]


# -- a real twistd ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lobby_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(tmp_path_factory.mktemp("lobby"), [
        "--app-message-type", "CHAT", "--quick-match", "--room-size", "2",
        "--max-message-size", "2000", "--demo"])
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_app_messages_and_quick_match_through_a_real_server(lobby_server: Any) -> None:
    urls = [lobby_server.ws_url(f"q{n}", token="match:duel") for n in range(3)]
    with connect(urls[0]) as a, connect(urls[1]) as b, connect(urls[2]) as c:
        assert [recv_json(a), recv_json(a)] == [{"type": "OPEN"},
                                                {"type": "PEERS", "payload": {"peers": []}}]
        assert recv_json(a) == {"type": "JOIN", "src": "q1"}
        assert [recv_json(c), recv_json(c)] == [{"type": "OPEN"},
                                                {"type": "PEERS", "payload": {"peers": []}}]
        for _ in range(2):
            recv_json(b)
        b.send(json.dumps({"type": "CHAT", "payload": {"text": "hi"}}))
        assert recv_json(a) == {"type": "CHAT", "src": "q1", "payload": {"text": "hi"}}
        c.send(json.dumps({"type": "CHAT", "dst": "q0", "payload": 1}))  # not its room
        assert recv_json(c) == {"type": "EXPIRE", "src": "q0", "dst": "q2"}
        a.send(json.dumps({"type": "CHAT", "dst": "q1", "payload": "x" * 3000}))
        with pytest.raises(Exception, match="1009"):  # over --max-message-size
            recv_json(a)


@pytest.mark.slow
def test_the_demo_page_is_served_with_the_pinned_client(lobby_server: Any) -> None:
    status, headers, body = lobby_server.get("/demo")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    text = body.decode()
    assert 'src="https://cdn.jsdelivr.net/npm/peerjs@1.5.5/dist/peerjs.min.js"' in text
    assert 'integrity="sha384-' in text and 'path: "/", key: "peerjs"' in text
    assert "{" + "path}" not in text


def test_the_demo_page_is_off_by_default(tmp_path: Path) -> None:
    world = World()
    from .test_websocket import http_connection

    channel, transport = http_connection(world)
    channel.dataReceived(b"GET /demo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 404 ")
