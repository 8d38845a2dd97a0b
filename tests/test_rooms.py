"""The signaling core on a fake clock: SPEC §1-§5 behaviour by behaviour."""

from __future__ import annotations

import json
import random

import pytest

from peersig import messages as m
from peersig.rooms import JoinRequest
from peersig.session import CLOSED

from .fakes import FakeTransport, World

# The sweep alone keeping the 5 s bound, as it must behind a proxy (where the kernel's
# keepalive only reaches the proxy): ping after 2.5 s of silence, drop after 5 s.
PINGS_5S = {"ping_interval": 2.5, "alive_timeout": 5.0}

OFFER = {"type": "OFFER", "payload": {"sdp": {"type": "offer", "sdp": "v=0"},
                                      "type": "data", "connectionId": "dc_1"}}


def offer_to(dst: str, **extra: object) -> dict[str, object]:
    return {**OFFER, "dst": dst, **extra}


def error_of(t: FakeTransport) -> str:
    (msg,) = t.messages()
    assert msg["type"] == "ERROR"
    assert t.closed is not None and t.closed[0] == m.CLOSE_POLICY
    assert t.session is None
    return str(msg["payload"]["msg"])


# -- §1 registration and relay ---------------------------------------------------------------

def test_open_is_exactly_type_open() -> None:
    w = World()
    a = w.connect("alice")
    assert a.frames == [b'{"type":"OPEN"}']
    assert a.closed is None


def test_relay_forces_src_and_keeps_payload() -> None:
    w = World()
    a, b = w.connect("alice"), w.connect("bob")
    b.take()
    w.send(a, offer_to("bob", src="mallory"))
    assert b.take() == [{"type": "OFFER", "src": "alice", "dst": "bob",
                         "payload": OFFER["payload"]}]
    assert w.hub.stats.relayed["OFFER"] == 1


@pytest.mark.parametrize("mtype", ["ANSWER", "CANDIDATE", "LEAVE", "EXPIRE"])
def test_other_relayed_types(mtype: str) -> None:
    w = World()
    a, b = w.connect("alice"), w.connect("bob")
    b.take()
    w.send(a, {"type": mtype, "dst": "bob", "payload": {"x": 1}})
    assert b.take() == [{"type": mtype, "src": "alice", "dst": "bob", "payload": {"x": 1}}]


def test_heartbeat_gets_no_reply_and_counts() -> None:
    w = World()
    a = w.connect("alice")
    a.take()
    w.send(a, {"type": "HEARTBEAT"})
    assert a.frames == []
    assert w.hub.stats.received["HEARTBEAT"] == 1


def test_leave_on_clean_close_goes_to_the_room_at_once() -> None:
    w = World()
    a, b, c = w.connect("alice"), w.connect("bob"), w.connect("carol")
    other_room = w.connect("dave", token="room2")
    for t in (a, b, c, other_room):
        t.take()
    w.close(a)
    assert b.take() == [{"type": "LEAVE", "src": "alice"}]
    assert c.take() == [{"type": "LEAVE", "src": "alice"}]
    assert other_room.frames == []
    w.close(a)  # a second close notice changes nothing
    assert b.frames == [] and c.frames == []


# -- §2 rooms -------------------------------------------------------------------------------

def test_token_mode_isolates_rooms_with_the_same_ids() -> None:
    w = World()
    a1, b1 = w.connect("alice", token="r1"), w.connect("bob", token="r1")
    a2, b2 = w.connect("alice", token="r2"), w.connect("bob", token="r2")
    assert all(t.types() == ["OPEN"] for t in (a1, b1, a2, b2))
    for t in (a1, b1, a2, b2):
        t.take()
    w.send(a1, offer_to("bob"))
    assert b1.types() == ["OFFER"] and b2.frames == []
    w.send(a2, offer_to("bob"))
    assert b2.types() == ["OFFER"] and len(b1.frames) == 1


def test_message_to_an_id_in_another_room_is_never_delivered() -> None:
    w = World()
    a = w.connect("alice", token="r1")
    carol = w.connect("carol", token="r2")
    carol.take()
    a.take()
    w.send(a, offer_to("carol"))
    w.advance(6)
    assert carol.types() == []
    assert a.types() == ["EXPIRE"]


def test_wrong_key_in_token_mode() -> None:
    w = World()
    assert error_of(w.connect("alice", key="other")) == "Invalid key provided"


def test_room_full_sends_error_frame_and_keeps_the_four() -> None:
    w = World()
    four = [w.connect(f"p{i}") for i in range(4)]
    fifth = w.connect("p4")
    assert error_of(fifth) == "Room is full (4 peers)"
    assert all(t.closed is None for t in four)
    assert len(w.hub.rooms["room1"].peers) == 4
    w.connect("p4", token="room2")  # another room is not full
    assert w.hub.stats.connections["room_full"] == 1


def test_room_size_option_and_unlimited() -> None:
    w = World(room_size=2)
    w.connect("a"), w.connect("b")
    assert error_of(w.connect("c")) == "Room is full (2 peers)"
    w = World(room_size=0)
    assert all(w.connect(f"p{i}").types() == ["OPEN"] for i in range(50))


@pytest.mark.parametrize("token", ["has space", "x" * 129, "a/b", "ü"])
def test_invalid_room_names(token: str) -> None:
    w = World()
    assert error_of(w.connect("alice", token=token)) == "Invalid room name"


def test_key_mode_room_is_the_key_and_token_is_free() -> None:
    w = World(room_by="key")
    a = w.connect("alice", key="game1", token="t-a")
    b = w.connect("bob", key="game1", token="t-b")
    c = w.connect("bob", key="game2", token="t-c")
    assert [t.types() for t in (a, b, c)] == [["OPEN"]] * 3
    b.take(), c.take()
    w.send(a, offer_to("bob"))
    assert b.types() == ["OFFER"] and c.frames == []
    assert sorted(w.hub.list_peers("game1", "")) == ["alice", "bob"]
    assert w.hub.list_peers("nope", "") == []
    assert error_of(w.connect("x", key="bad key")) == "Invalid room name"


def test_none_mode_everyone_meets_without_room_size() -> None:
    w = World(room_by="none", room_size=2)
    peers = [w.connect(f"p{i}", token=f"t{i}") for i in range(5)]
    assert all(t.types() == ["OPEN"] for t in peers)
    for t in peers:
        t.take()
    w.send(peers[0], offer_to("p4"))
    assert peers[4].types() == ["OFFER"]
    assert error_of(w.connect("x", key="other")) == "Invalid key provided"
    assert sorted(w.hub.list_peers("peerjs", "")) == [f"p{i}" for i in range(5)]


def test_none_mode_leave_goes_only_to_peers_it_talked_with() -> None:
    w = World(room_by="none")
    a, b, c, d = (w.connect(x, token=x) for x in ("a", "b", "c", "d"))
    for t in (a, b, c, d):
        t.take()
    w.send(a, offer_to("b"))
    w.send(c, offer_to("a"))
    b.take()
    a.take()
    w.close(a)
    assert b.take() == [{"type": "LEAVE", "src": "a"}]
    assert c.take() == [{"type": "LEAVE", "src": "a"}]
    assert d.frames == []


def test_empty_room_is_forgotten_with_its_queues() -> None:
    w = World()
    a = w.connect("alice")
    w.send(a, offer_to("bob"))
    assert w.hub.queued_bytes > 0
    w.close(a)
    assert w.hub.rooms == {}
    assert w.hub.queued_bytes == 0
    assert w.hub.rooms_with_queues == set()
    assert w.hub.per_address == {}


# -- §3 sessions, ids, reconnects -----------------------------------------------------------

@pytest.mark.parametrize(("key", "peer_id", "token"),
                         [("", "a", "r"), ("peerjs", "", "r"), ("peerjs", "a", "")])
def test_missing_parameters(key: str, peer_id: str, token: str) -> None:
    w = World()
    t = w.connect(peer_id, token=token, key=key)
    assert error_of(t) == "No id, token, or key supplied to websocket server"


@pytest.mark.parametrize("peer_id", ["a--b", "-a", "a.b", "x" * 65, "ali ce ", "é"])
def test_invalid_id(peer_id: str) -> None:
    assert error_of(World().connect(peer_id)) == "Invalid id"


def test_id_taken_in_token_mode_even_with_the_same_token() -> None:
    w = World()
    first = w.connect("alice")
    second = w.connect("alice")
    assert second.messages() == [{"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}}]
    assert second.closed is not None and second.closed[0] == m.CLOSE_POLICY
    assert first.closed is None
    assert w.hub.rooms["room1"].peers["alice"] is first.session


@pytest.mark.parametrize("mode", ["key", "none"])
def test_same_token_takes_over_at_once_without_leave(mode: str) -> None:
    w = World(room_by=mode)
    key = "game" if mode == "key" else "peerjs"
    old = w.connect("alice", key=key, token="secret1")
    bob = w.connect("bob", key=key, token="other")
    bob.take()
    w.send(bob, offer_to("alice"))
    new = w.connect("alice", key=key, token="secret1")
    assert new.types() == ["OPEN"]
    assert old.closed is not None
    assert bob.frames == []  # no LEAVE for a takeover
    assert old.session is not None and old.session.state == CLOSED
    w.hub.depart(old.session, "closed")  # the old socket's late close notice
    assert bob.frames == []
    w.send(bob, offer_to("alice"))
    assert new.types() == ["OPEN", "OFFER"]
    thief = w.connect("alice", key=key, token="guess")
    assert thief.types() == ["ID-TAKEN"]
    assert w.hub.stats.connections["takeover"] == 1


def test_presumed_dead_holder_is_replaced() -> None:
    # Without probes (--takeover-probe 0), only the silence rule frees an id.
    w = World(**PINGS_5S, takeover_probe=0)
    old = w.connect("alice", responsive=False)
    bob = w.connect("bob")
    bob.take()
    w.advance(4.0)
    assert w.connect("alice").types() == ["ID-TAKEN"]
    w.clock.advance(0.5)  # silent for longer than the sweep tolerates, before it ran
    new = w.connect("alice")
    assert new.types() == ["OPEN"]
    assert old.closed is not None
    assert bob.frames == []  # a takeover is not a departure


def test_healthy_holder_answering_pings_is_not_replaced() -> None:
    w = World(**PINGS_5S)
    w.connect("alice")
    for _ in range(10):
        w.advance(1.0)
        assert w.connect("alice").types() == ["ID-TAKEN"]


def test_global_peer_cap() -> None:
    w = World(max_peers=3, room_size=0)
    for i in range(3):
        w.connect(f"p{i}")
    assert error_of(w.connect("p3")) == "Server has reached its concurrent user limit"
    first = w.hub.rooms["room1"].peers["p0"]
    w.hub.depart(first, "closed")
    assert w.connect("p3").types() == ["OPEN"]


def test_per_address_cap_counts_registered_peers() -> None:
    w = World(max_peers_per_ip=2, room_size=0)
    w.connect("a", address="10.0.0.1"), w.connect("b", address="10.0.0.1")
    assert error_of(w.connect("c", address="10.0.0.1")) == "Too many connections from your address"
    assert w.connect("c", address="10.0.0.2").types() == ["OPEN"]
    w.hub.depart(w.hub.rooms["room1"].peers["a"], "closed")
    assert w.connect("d", address="10.0.0.1").types() == ["OPEN"]


# -- §4 liveness ----------------------------------------------------------------------------

def test_by_default_a_heartbeating_peer_is_never_pinged() -> None:
    # The kernel's keepalive watches its network; the sweep waits for a missed heartbeat.
    w = World()
    t = w.connect("alice", responsive=False)
    for _ in range(24):
        w.advance(5.0)
        w.send(t, {"type": "HEARTBEAT"})
    assert t.pings == 0 and not t.aborted


@pytest.mark.parametrize(("config", "pinged_by", "dropped_by"), [
    ({}, 8.0, 10.0),  # by default: pinged once it missed a heartbeat, dropped at 10 s
    (PINGS_5S, 3.0, 5.0),
])
def test_silent_peer_is_pinged_then_dropped_within_alive_timeout_and_room_told(
        config: dict[str, float], pinged_by: float, dropped_by: float) -> None:
    w = World(**config)
    silent = w.connect("alice", responsive=False)
    bob = w.connect("bob")
    bob.take()
    w.advance(pinged_by)
    assert silent.pings == 1 and not silent.aborted
    w.advance(dropped_by - pinged_by - 1.0)
    assert not silent.aborted
    w.advance(1.0)  # never silent for longer than the alive timeout
    assert silent.aborted
    assert bob.take() == [{"type": "LEAVE", "src": "alice"}]
    assert w.hub.stats.disconnections["timeout"] == 1
    assert "alice" not in w.hub.rooms["room1"].peers


def test_healthy_peer_that_only_answers_pings_is_kept() -> None:
    w = World(**PINGS_5S)
    t = w.connect("alice", )
    w.advance(120.0)
    assert not t.aborted and t.closed is None
    assert 20 <= t.pings <= 60


def test_heartbeats_alone_keep_a_peer() -> None:
    w = World(**PINGS_5S)
    t = w.connect("alice", responsive=False)
    for _ in range(20):
        w.advance(4.0)
        w.send(t, {"type": "HEARTBEAT"})
    assert not t.aborted


def test_any_frame_counts_as_alive_even_a_bad_one() -> None:
    w = World(**PINGS_5S)
    t = w.connect("alice", responsive=False)
    for _ in range(8):
        w.advance(4.0)
        w.send(t, b"garbage")
    assert not t.aborted


class ExplodingTransport(FakeTransport):
    def send_ping(self) -> None:
        raise RuntimeError("boom")


def test_sweep_survives_a_failing_peer_and_keeps_running() -> None:
    w = World(**PINGS_5S)
    bad = ExplodingTransport()
    bad.session = w.hub.join(bad, JoinRequest("peerjs", "bad", "room1", "127.0.0.1"))
    good = w.connect("good", responsive=False)
    w.advance(3.0)
    assert good.pings == 1
    assert w.hub.stats.sweep_errors >= 1
    w.advance(3.0)
    assert good.aborted and bad.aborted
    assert sum(w.hub.stats.sweep_seconds.counts) == 6


@pytest.mark.parametrize("config", [{}, PINGS_5S, {"sweep_interval": 0.25}])
def test_the_sweep_pings_and_drops_whom_a_walk_of_every_peer_would(
        config: dict[str, float]) -> None:
    # The sweep finds idle peers in Hub.seen, not by visiting each. Against a walk of every
    # connected peer at each sweep: peers heartbeating, falling silent, answering pings or
    # not, leaving, away within their grace, joining, at irregular sweep times.
    rng = random.Random(25)
    w = World(room_size=0, **config)
    hub = w.hub
    cfg = hub.config
    peers = [w.connect(f"p{i}", responsive=rng.random() < 0.5) for i in range(60)]
    joined = len(peers)
    pinged = dropped = 0
    for _ in range(600):
        w.clock.advance(rng.uniform(0.05, 1.6) * cfg.sweep_interval)
        for t in rng.sample(peers, 6):
            if t.session in hub.sessions and not t.aborted:
                if rng.random() < 0.8:
                    w.send(t, {"type": "HEARTBEAT"})
                else:
                    t.responsive = not t.responsive
        if rng.random() < 0.1:
            gone = rng.choice(peers)
            if gone.session in hub.sessions:
                if rng.random() < 0.5:
                    w.close(gone)
                else:  # its socket closed: away, its seat kept for the grace
                    hub.socket_closed(gone.session, 1006, False)
            peers.append(w.connect(f"p{joined}", responsive=rng.random() < 0.5))
            joined += 1
        now = w.clock.seconds()
        due = {t: (now - t.session.last_seen > cfg.dead_after,
                   now - t.session.last_seen > cfg.ping_interval
                   and now - t.session.pinged_at >= cfg.ping_interval)
               for t in peers if t.session in hub.sessions}
        pings = {t: t.pings for t in due}
        hub.sweep()
        for t, (drop, ping) in due.items():
            assert t.aborted == drop, (now, t.session)
            assert t.pings - pings[t] == (ping and not drop), (now, t.session)
            pinged += ping and not drop
            dropped += drop
    assert pinged > 50 and dropped > 10  # both happened, many times
    # Each connected session in its own slot; every other slot free and never idle.
    assert {hub.slot_of[s.slot] for s in hub.sessions if s.slot is not None} == hub.sessions
    assert all(hub.seen[i] == float("inf") for i in hub.free_slots)
    assert len(hub.free_slots) + len(hub.sessions) == len(hub.seen) == len(hub.slot_of)


def test_a_departed_peer_keeps_its_last_sign_of_life() -> None:
    w = World()
    t = w.connect("alice")
    w.clock.advance(3.0)
    w.send(t, {"type": "HEARTBEAT"})
    assert t.session is not None
    session = t.session
    w.close(t)
    bob = w.connect("bob")  # takes alice's slot
    w.clock.advance(1.0)
    w.send(bob, {"type": "HEARTBEAT"})
    assert session.last_seen == 1003.0
    assert bob.session is not None and bob.session.last_seen == 1004.0


def test_sweep_timer_keeps_running_after_a_sweep_raises() -> None:
    from twisted.application.internet import TimerService

    from peersig.service import run_sweep

    w = World()
    calls = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first sweep fails")

    w.hub.sweep = flaky  # type: ignore[method-assign]
    timer = TimerService(1.0, run_sweep, w.hub)
    timer.clock = w.clock
    timer.startService()
    for _ in range(3):
        w.clock.advance(1.0)
    timer.stopService()
    assert len(calls) == 4
    assert w.hub.stats.sweep_errors == 1


# -- §5 messages and limits -----------------------------------------------------------------

def test_garbage_is_tolerated_then_closed_1008_without_error_frame() -> None:
    w = World()
    a = w.connect("alice")
    bob = w.connect("bob")
    a.take(), bob.take()
    for frame in [b"x", b"[]", b"{}", b'{"type":"NOPE"}', b'{"type":"OFFER"}'] * 2:
        w.send(a, frame)
    assert a.closed is None and a.frames == []
    w.send(a, offer_to("bob"))  # still relays after ten bad frames
    assert bob.types() == ["OFFER"]
    w.send(a, b"one too many")
    assert a.closed is not None and a.closed[0] == m.CLOSE_POLICY
    assert a.frames == []
    assert bob.take()[-1] == {"type": "LEAVE", "src": "alice"}
    drops = w.hub.stats.drops
    assert (drops["bad_json"], drops["not_object"], drops["bad_type"], drops["no_dst"]) == (
        3, 2, 4, 2)


def test_bad_frames_cut_a_peer_only_in_a_spell() -> None:
    # Eleven bad frames over an hours-long game are the app's odd mistakes, not an attack:
    # only a spell cuts the peer (issue 17): a bucket of ten that refills at one a second.
    w = World(rate_limit=0)
    a = w.connect("alice")
    w.connect("bob")
    for _ in range(60):  # one a second for a minute: never more than ten in ten seconds
        w.send(a, b"{not json")
        w.clock.advance(1.0)
    assert a.closed is None
    for _ in range(10):  # a burst of ten, after the minute: still no spell
        w.send(a, b"{not json")
    assert a.closed is None
    w.clock.advance(5.0)  # five seconds later, five of the burst are forgotten
    for _ in range(5):
        w.send(a, b"{not json")
    assert a.closed is None
    w.send(a, b"{not json")  # one more than the bucket holds
    assert a.closed == (m.CLOSE_POLICY, "Too many invalid messages")


@pytest.mark.parametrize(("limit", "window"), [(10, 10.0), (3, 1.0), (7, 0.3)])
def test_the_bad_frame_spell_is_exactly_more_than_the_limit(limit: int, window: float) -> None:
    for burst, cut in ((limit, False), (limit + 1, True)):
        w = World(rate_limit=0, bad_frame_limit=limit, bad_frame_window=window)
        a = w.connect("alice")
        for _ in range(burst):
            w.clock.advance(window / limit / 1000)  # all well within the window
            w.send(a, b"[]")
        assert (a.closed is not None) == cut, (burst, cut)


def test_rate_limit_drops_excess_then_cuts_a_persistent_flooder() -> None:
    w = World(rate_limit=10)
    a = w.connect("alice")
    bob = w.connect("bob", )
    a.take(), bob.take()
    for _ in range(15):
        w.send(a, offer_to("bob"))
    assert len(bob.take()) == 10  # the burst
    assert w.hub.stats.drops["rate_limit"] == 5
    # Flood at ~4x the rate for a while: some get through, the peer stays for 5 s.
    for _ in range(4):
        for _ in range(40):
            w.clock.advance(0.025)
            w.send(a, offer_to("bob"))
        assert a.closed is None
    for _ in range(80):
        w.clock.advance(0.025)
        w.send(a, offer_to("bob"))
        if a.closed:
            break
    assert a.closed == (m.CLOSE_POLICY, "Rate limit exceeded")
    assert a.messages()[-1] == {"type": "ERROR", "payload": {"msg": "Rate limit exceeded"}}
    assert 40 <= len(bob.take()) <= 70


def test_rate_limit_forgives_a_short_burst() -> None:
    w = World(rate_limit=10)
    a = w.connect("alice")
    for _ in range(10):
        for _ in range(20):
            w.send(a, {"type": "HEARTBEAT"})
        w.clock.advance(2.0)
    assert a.closed is None


# -- §5 offline queues ----------------------------------------------------------------------

def test_queued_messages_are_delivered_after_open_in_order() -> None:
    w = World()
    a = w.connect("alice")
    w.send(a, offer_to("bob"))
    w.send(a, {"type": "CANDIDATE", "dst": "bob", "payload": {"n": 1}})
    w.advance(2.0)
    bob = w.connect("bob")
    msgs = bob.messages()
    assert [x["type"] for x in msgs] == ["OPEN", "OFFER", "CANDIDATE"]
    assert all(x["src"] == "alice" for x in msgs[1:])
    w.advance(10.0)
    assert "EXPIRE" not in a.types()
    assert w.hub.queued_bytes == 0


def test_expire_once_per_sender_and_destination() -> None:
    w = World()
    a, c = w.connect("alice"), w.connect("carol")
    a.take(), c.take()
    for _ in range(3):
        w.send(a, offer_to("bob"))
        w.send(c, offer_to("bob"))
    w.send(a, offer_to("dave"))
    w.advance(4.0)
    assert a.frames == []
    w.advance(2.0)
    assert sorted(json.dumps(x) for x in a.take()) == sorted(
        json.dumps({"type": "EXPIRE", "src": s, "dst": "alice"}) for s in ("bob", "dave"))
    assert c.take() == [{"type": "EXPIRE", "src": "bob", "dst": "carol"}]
    w.advance(10.0)
    assert a.frames == [] and c.frames == []
    assert w.hub.stats.expiries == 3


def test_leave_and_expire_to_offline_ids_are_not_queued() -> None:
    w = World()
    a = w.connect("alice")
    a.take()
    w.send(a, {"type": "LEAVE", "dst": "bob"})
    w.send(a, {"type": "EXPIRE", "dst": "bob"})
    assert w.hub.queued_bytes == 0
    bob = w.connect("bob")
    assert bob.types() == ["OPEN"]
    assert w.hub.stats.drops["offline"] == 2


def test_full_queue_keeps_oldest_and_expires_sender_at_once_once() -> None:
    w = World(queue_limit=3)
    a = w.connect("alice")
    a.take()
    for n in range(6):
        w.send(a, {"type": "CANDIDATE", "dst": "bob", "payload": {"n": n}})
    assert a.take() == [{"type": "EXPIRE", "src": "bob", "dst": "alice"}]
    w.advance(6.0)
    assert a.frames == []  # not a second time at expiry
    w.send(a, {"type": "CANDIDATE", "dst": "bob", "payload": {"n": 9}})
    bob = w.connect("bob")
    assert [x.get("payload") for x in bob.messages()] == [None, {"n": 9}]


def test_queue_delivery_keeps_the_oldest_messages() -> None:
    w = World(queue_limit=2)
    a = w.connect("alice")
    for n in range(5):
        w.send(a, {"type": "CANDIDATE", "dst": "bob", "payload": {"n": n}})
    bob = w.connect("bob")
    assert [x.get("payload") for x in bob.messages()] == [None, {"n": 0}, {"n": 1}]


def test_room_queue_cap_bounds_made_up_destinations() -> None:
    w = World(room_queue_limit=20, rate_limit=0)
    a = w.connect("alice")
    a.take()
    for n in range(1000):
        w.send(a, offer_to(f"ghost{n}"))
    assert w.hub.rooms["room1"].queued == 20
    # 20 queues with messages, 20 empty ones remembering who was told (bounded at 2x)
    assert len(w.hub.rooms["room1"].queues) == 40
    assert len(a.take()) == 980  # every refused destination told at once
    w.advance(6.0)
    assert len(a.take()) == 20
    assert w.hub.queued_bytes == 0


def test_server_queue_bytes_cap() -> None:
    w = World(total_queue_bytes=2000, room_size=0, rate_limit=0)
    peers = [w.connect(f"p{i}", token=f"r{i}") for i in range(5)]
    for t in peers:
        for n in range(10):
            w.send(t, offer_to(f"ghost{n}"))
    assert 0 < w.hub.queued_bytes <= 2000


def test_invalid_destination_expires_at_once() -> None:
    w = World()
    a = w.connect("alice")
    a.take()
    w.send(a, offer_to("no such/id"))
    assert a.take() == [{"type": "EXPIRE", "src": "no such/id", "dst": "alice"}]
    assert w.hub.queued_bytes == 0


# -- HTTP helpers of the core ----------------------------------------------------------------

def test_new_id_is_a_uuid4() -> None:
    import uuid

    w = World()
    value = w.hub.new_id("peerjs")
    assert uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value


def test_close_all_sends_going_away() -> None:
    w = World()
    a, b = w.connect("a"), w.connect("b")
    a.take()
    w.hub.close_all()
    assert a.closed == (1001, "Server shutting down") and b.closed is not None
    assert a.frames == [] and b.types() == ["OPEN"]  # no LEAVE: everyone is going
    assert w.hub.sessions == set()


def test_activity_counts_what_should_not_wait_and_not_liveness() -> None:
    """Stats.activity, which tells the reactor a server at rest (upstream.twisted): joins
    (even refused ones) and routed messages count; heartbeats and pongs do not."""
    w = World(room_size=2)
    a = w.connect("a")
    b = w.connect("b")
    assert w.hub.stats.activity == 2
    w.connect("c")  # the room is full: refused, still a newcomer to answer at once
    assert w.hub.stats.activity == 3
    w.send(a, {"type": "HEARTBEAT"})
    a.session.alive()  # a pong
    assert w.hub.stats.activity == 3
    w.send(a, {"type": "OFFER", "dst": "b", "payload": {}})
    assert w.hub.stats.activity == 4
    assert b.types()[-1] == "OFFER"
