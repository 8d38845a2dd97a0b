"""How a closed socket ends a peer's membership (issue 22, docs/protocol.md, Departures):
LEAVE when the page is gone or unreachable, a silent grace when it may come back."""

from __future__ import annotations

from typing import Any

import pytest

from peersig.messages import CLOSE_GOING_AWAY
from peersig.session import AWAY, OPEN

from .fakes import FakeTransport, World


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, str | None]] = []

    def event(self, kind: str, room: str, peer: str | None = None,
              reason: str | None = None) -> None:
        self.seen.append((kind, peer, reason))

    def queued(self) -> int:
        return 0


def closed(world: World, transport: FakeTransport, code: int | None = None,
           clean: bool = True) -> None:
    """The peer's socket closed: with a close frame carrying ``code`` (None: no code, as
    ``peer.disconnect()`` sends it), or without one (``clean`` false)."""
    assert transport.session is not None
    world.hub.socket_closed(transport.session, code, clean)


def types(transport: FakeTransport) -> list[tuple[str, Any]]:
    return [(m["type"], m.get("src")) for m in transport.take()]


@pytest.fixture
def world() -> World:
    return World(room_events=True, reconnect_grace=10.0)


def pair(world: World) -> tuple[FakeTransport, FakeTransport]:
    a, b = world.connect("alice"), world.connect("bob")
    a.take(), b.take()
    return a, b


def test_a_page_that_is_gone_leaves_at_once(world: World) -> None:
    a, b = pair(world)
    closed(world, a, CLOSE_GOING_AWAY)  # what a browser sends for a closed or left page
    assert types(b) == [("LEAVE", "alice"), ("PART", "alice")]
    assert "alice" not in world.hub.rooms["room1"].members()
    assert world.hub.stats.disconnections["closed"] == 1


@pytest.mark.parametrize(("code", "clean", "reason"), [
    (None, True, "left"),  # peer.disconnect() and peer.destroy(): a close without a code
    (1000, True, "left"),
    (4000, True, "left"),
    (None, False, "lost"),  # no close frame, while the peer was talking (a cut connection)
])
def test_a_peer_that_may_come_back_keeps_its_place_and_no_leave_ever_goes(
        world: World, code: int | None, clean: bool, reason: str) -> None:
    a, b = pair(world)
    session = a.session
    assert session is not None
    closed(world, a, code, clean)
    assert session.state == AWAY and b.take() == []
    assert world.hub.list_peers("peerjs", "room1") == ["bob", "alice"]
    world.advance(9.0)
    assert b.take() == [] and "alice" in world.hub.rooms["room1"].away
    world.advance(1.0)  # the grace is over: the membership ends, still without LEAVE
    assert types(b) == [("PART", "alice")]
    assert world.hub.list_peers("peerjs", "room1") == ["bob"]
    assert world.hub.stats.disconnections[reason] == 1 and not world.hub.away


def test_a_socket_dead_after_the_keepalive_silence_is_a_vanished_network(world: World) -> None:
    a, b = pair(world)
    world.clock.advance(world.hub.config.keepalive - 1)  # nothing heard: the kernel gave up
    closed(world, a, clean=False)
    assert types(b) == [("LEAVE", "alice"), ("PART", "alice")]
    assert world.hub.stats.disconnections["vanished"] == 1


def test_a_reconnect_within_the_grace_is_silent_and_gets_its_queue(world: World) -> None:
    events = Events()
    world.hub.events = events
    a, b = pair(world)
    closed(world, a)
    world.send(b, {"type": "OFFER", "dst": "alice", "payload": {"sdp": 1}})
    world.advance(3.0)
    back = world.connect("alice")
    assert types(back) == [("OPEN", None), ("PEERS", None), ("OFFER", "bob")]
    assert b.take() == []  # no LEAVE before, no JOIN after
    world.advance(20.0)
    assert b.take() == [] and world.hub.rooms["room1"].members() == ["bob", "alice"]
    world.send(b, {"type": "ANSWER", "dst": "alice", "payload": 2})
    assert types(back) == [("ANSWER", "bob")]
    assert world.hub.stats.connections["resumed"] == 1
    assert [e[0] for e in events.seen] == ["room_started", "peer_joined", "peer_joined"]


def test_a_reconnect_after_the_grace_is_an_ordinary_join(world: World) -> None:
    a, b = pair(world)
    closed(world, a)
    world.advance(11.0)
    assert types(b) == [("PART", "alice")]
    world.connect("alice")
    assert types(b) == [("JOIN", "alice")]


def test_messages_for_an_away_peer_wait_for_it_until_its_grace_ends(world: World) -> None:
    a, b = pair(world)
    closed(world, a)
    world.send(b, {"type": "OFFER", "dst": "alice", "payload": 1})
    world.advance(8.0)  # past --expire-timeout: kept, alice may still come back
    assert b.take() == []
    back = world.connect("alice")
    assert types(back) == [("OPEN", None), ("PEERS", None), ("OFFER", "bob")]


def test_what_waits_for_an_away_peer_expires_when_its_grace_ends(world: World) -> None:
    a, b = pair(world)
    closed(world, a)
    world.send(b, {"type": "OFFER", "dst": "alice", "payload": 1})
    world.advance(10.0)
    assert types(b) == [("PART", "alice"), ("EXPIRE", "alice")]


def test_an_away_peer_keeps_its_seat(world: World) -> None:
    world = World(room_size=2, reconnect_grace=10.0)
    a, _b = pair(world)
    closed(world, a)
    late = world.connect("carol")
    assert late.messages()[0]["payload"]["msg"] == "Room is full (2 peers)"
    world.advance(10.0)
    assert world.connect("carol").types() == ["OPEN"]


@pytest.mark.parametrize(("room_by", "same_token", "resumes"), [
    ("token", False, True),  # the token is the room: anyone of the room with the id
    ("key", True, True),
    ("key", False, False),  # the holder's token keeps its id, as for a connected holder
    ("none", False, False),
])
def test_who_may_take_an_away_place_back(room_by: str, same_token: bool,
                                         resumes: bool) -> None:
    world = World(room_by=room_by, reconnect_grace=10.0)
    a = world.connect("alice", token="secret1")
    closed(world, a)
    token = "secret1" if same_token or room_by == "token" else "other"
    back = world.connect("alice", token=token)
    assert back.types()[0] == ("OPEN" if resumes else "ID-TAKEN")


def test_the_operator_removes_an_away_peer_with_leave(world: World) -> None:
    a, b = pair(world)
    closed(world, a)
    session = world.hub.rooms["room1"].away["alice"]
    world.hub.remove(session, "Kicked")
    assert types(b) == [("LEAVE", "alice"), ("PART", "alice")]
    assert not world.hub.away


def test_a_drain_forgets_away_peers_without_leave(world: World) -> None:
    a, b = pair(world)
    closed(world, a)
    world.hub.close_all()
    assert b.take() == [] and b.closed == (1001, "Server shutting down")
    assert not world.hub.away and not world.hub.rooms


def test_without_a_grace_the_membership_ends_at_once_still_without_leave() -> None:
    world = World(room_events=True, reconnect_grace=0.0)
    a, b = pair(world)
    closed(world, a)
    assert types(b) == [("PART", "alice")] and not world.hub.away


def test_away_peers_count_against_the_server_cap() -> None:
    world = World(max_peers=2, reconnect_grace=10.0)
    a, _b = pair(world)
    closed(world, a)
    assert world.connect("carol").messages()[0]["payload"]["msg"] == (
        "Server has reached its concurrent user limit")


def test_the_last_member_going_away_keeps_the_room_until_its_grace_ends(world: World) -> None:
    events = Events()
    world.hub.events = events
    a = world.connect("alice")
    closed(world, a)
    assert "room1" in world.hub.rooms
    world.advance(10.0)
    assert not world.hub.rooms
    assert events.seen[-2:] == [("peer_left", "alice", "left"), ("room_finished", None, None)]


def test_a_probe_of_a_holder_that_goes_away_lets_the_contender_resume(world: World) -> None:
    # A reconnect that overtakes its own old socket's close: the newcomer waits on a probe
    # of the holder; the close then arrives, and the newcomer takes the place back at once.
    a, b = world.connect("alice", responsive=False), world.connect("bob")
    a.take(), b.take()
    world.clock.advance(2.0)
    new = FakeTransport()
    assert world.hub.join(new, world_request("alice")) is None
    closed(world, a)
    assert new.types() == ["OPEN", "PEERS"] and new.session is not None
    assert new.session.state == OPEN and b.take() == []
    assert world.hub.stats.connections["resumed"] == 1


def world_request(peer_id: str) -> Any:
    from peersig.rooms import JoinRequest

    return JoinRequest("peerjs", peer_id, "room1", "127.0.0.1")


def test_without_a_grace_a_probe_contender_joins_as_the_holder_goes() -> None:
    # Found in review: with --reconnect-grace 0, the holder's unclean close while a reconnect
    # waited on its probe raised KeyError out of connectionLost.
    world = World(reconnect_grace=0.0)
    a, b = world.connect("alice", responsive=False), world.connect("bob")
    a.take(), b.take()
    world.clock.advance(2.0)
    new = FakeTransport()
    assert world.hub.join(new, world_request("alice")) is None
    closed(world, a, clean=False)  # cut while talking (2 s of silence, under keepalive - 1)
    assert new.types() == ["OPEN"] and not world.hub.away
    assert world.hub.per_address == {"127.0.0.1": 2}


def test_away_peers_count_for_their_address_until_they_come_back_or_go() -> None:
    world = World(max_peers_per_ip=2, reconnect_grace=10.0)
    a, _b = pair(world)
    closed(world, a)
    refused = world.connect("carol")  # alice's kept place still counts for the address
    assert refused.messages()[0]["payload"]["msg"] == "Too many connections from your address"
    back = world.connect("alice")  # its own place: handed over, not counted twice
    assert back.types() == ["OPEN"] and world.hub.per_address == {"127.0.0.1": 2}
    assert back.session is not None
    closed(world, back)
    world.advance(10.0)
    assert world.hub.per_address == {"127.0.0.1": 1}


def test_a_place_is_not_taken_back_once_its_grace_is_over_even_before_the_sweep() -> None:
    world = World(room_events=True, reconnect_grace=10.0, sweep_interval=5.0)
    a, b = pair(world)
    closed(world, a)
    world.clock.advance(10.5)  # the grace is over; the sweep has not run yet
    back = world.connect("alice")
    assert back.types() == ["OPEN", "PEERS"]
    assert types(b) == [("PART", "alice"), ("JOIN", "alice")]


def test_a_drain_ends_a_join_that_waits_on_the_authorizer() -> None:
    from twisted.internet.defer import Deferred

    from peersig.auth import ALLOW, Verdict

    later: Deferred[None] = Deferred()

    class Waiting:
        name = "waiting"

        def authorize(self, *args: Any) -> Any:
            return ALLOW if later.called else Verdict(False, later=later)

    world = World(authorizer=Waiting())
    waiting = FakeTransport()
    assert world.hub.join(waiting, world_request("late")) is None
    world.hub.draining = True
    world.hub.close_all()
    assert waiting.closed == (1001, "Server shutting down") and not world.hub.waiting
    later.callback(None)
    assert waiting.types() == [] and not world.hub.sessions
