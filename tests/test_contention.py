"""Contention decides liveness (issue 16): a newcomer for a held id, or for a seat in a full
room, makes the server ask the holder with a ping; a silent holder is replaced within
``--takeover-probe``, a live one never. All on ``task.Clock`` with fake transports."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from peersig import messages as m
from peersig.rooms import JoinRequest
from peersig.session import CLOSED

from .fakes import FakeTransport, World

ID_TAKEN = [{"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}}]


def knock(w: World, peer_id: str, token: str = "room1", key: str = "peerjs",
          address: str = "127.0.0.1") -> FakeTransport:
    """A newcomer whose join may wait: ``session`` is set when (if) it opens."""
    t = FakeTransport(responsive=True)
    session = w.hub.join(t, JoinRequest(key, peer_id, token, address))
    if session is not None:
        t.session = session
    return t


def quiet(w: World) -> bool:
    """Nothing of contention is left over."""
    return not (w.hub.probes or w.hub.probed or w.hub.waiting)


def test_a_silent_holder_is_replaced_after_the_probe_without_leave() -> None:
    w = World()
    old = w.connect("alice", responsive=False)
    bob = w.connect("bob")
    w.send(bob, {"type": "OFFER", "dst": "alice", "payload": 1})  # alice gets it: online
    w.clock.advance(2.0)  # alice's network changed two seconds ago
    new = knock(w, "alice")
    assert new.frames == [] and new.session is None  # waiting: no OPEN yet
    assert old.pings == 1
    w.clock.advance(0.99)
    assert new.frames == []
    w.clock.advance(0.01)
    assert new.types() == ["OPEN"] and new.session is not None
    assert old.closed == (m.CLOSE_NORMAL, "Replaced by a new connection") and old.aborted
    assert old.session is not None and old.session.state == CLOSED
    assert bob.types() == ["OPEN"]  # no LEAVE: the room's connections to alice survive
    w.send(bob, {"type": "OFFER", "dst": "alice", "payload": 2})
    assert new.messages()[-1]["payload"] == 2
    stats = w.hub.stats
    assert stats.probes == {"started": 1, "holder_dead": 1}
    assert stats.takeovers == {"probe": 1} and stats.connections["takeover"] == 1
    assert quiet(w)


def test_what_waited_for_the_id_is_delivered_on_takeover() -> None:
    w = World()
    w.connect("alice", responsive=False)
    bob = w.connect("bob")
    w.clock.advance(2.0)
    new = knock(w, "alice")
    w.send(bob, {"type": "OFFER", "dst": "alice", "payload": "during"})  # to the old socket
    w.clock.advance(1.0)
    assert new.types() == ["OPEN"]  # what went to the dead socket is lost, as before


def test_a_holder_that_answers_the_ping_keeps_its_id_at_once() -> None:
    w = World()
    holder = w.connect("alice")  # answers pings at once
    w.clock.advance(3.0)
    second = knock(w, "alice")
    assert second.messages() == ID_TAKEN and second.closed is not None
    assert holder.pings == 1 and holder.closed is None
    assert w.hub.stats.probes == {"started": 1, "holder_alive": 1}
    assert quiet(w)


def test_a_holder_heard_a_moment_ago_is_not_even_pinged() -> None:
    w = World()
    holder = w.connect("alice", responsive=False)
    w.clock.advance(0.05)
    assert knock(w, "alice").messages() == ID_TAKEN
    assert holder.pings == 0 and not w.hub.stats.probes


def test_a_holder_that_sends_a_frame_during_the_probe_keeps_its_id() -> None:
    w = World()
    holder = w.connect("alice", responsive=False)
    w.clock.advance(3.0)
    second = knock(w, "alice")
    w.clock.advance(0.5)
    w.send(holder, {"type": "HEARTBEAT"})
    assert second.frames == []
    w.clock.advance(0.5)
    assert second.messages() == ID_TAKEN
    assert holder.closed is None and not holder.aborted


def test_a_holder_that_just_joined_is_probed_like_any_other() -> None:
    # A page reconnecting a second after it first opened: its join is no ping it answered.
    w = World()
    old = w.connect("alice", responsive=False)
    w.send(old, {"type": "HEARTBEAT"})
    w.clock.advance(0.3)
    new = knock(w, "alice")
    assert old.pings == 1
    w.clock.advance(1.0)
    assert new.types() == ["OPEN"]


def test_two_contenders_one_probe_one_takeover() -> None:
    w = World()
    old = w.connect("alice", responsive=False)
    w.clock.advance(2.0)
    first, second = knock(w, "alice"), knock(w, "alice")
    assert old.pings == 1  # the second waits on the same probe
    w.clock.advance(1.0)
    assert first.types() == ["OPEN"]
    assert second.messages() == ID_TAKEN  # the new holder was heard just now
    assert w.hub.rooms["room1"].peers["alice"] is first.session
    assert w.hub.stats.takeovers == {"probe": 1}
    assert quiet(w)


def test_a_holder_that_closes_during_the_probe_leaves_an_ordinary_join() -> None:
    w = World()
    old = w.connect("alice", responsive=False)
    bob = w.connect("bob")
    bob.take()
    w.clock.advance(2.0)
    new = knock(w, "alice")
    w.close(old)  # its close arrived after all
    assert new.types() == ["OPEN"]
    assert bob.messages() == [{"type": "LEAVE", "src": "alice"}]  # it did leave
    assert w.hub.stats.probes["holder_gone"] == 1 and not w.hub.stats.takeovers
    assert quiet(w)


def test_a_newcomer_that_closes_during_the_probe_costs_the_holder_nothing() -> None:
    w = World()
    old = w.connect("alice", responsive=False)
    w.clock.advance(2.0)
    new = knock(w, "alice")
    w.hub.withdraw(new)
    assert quiet(w)
    w.clock.advance(5.0)
    assert old.closed is None and not old.aborted and new.frames == []
    w.hub.withdraw(new)  # twice, or for a transport that never waited: nothing
    w.hub.withdraw(FakeTransport())


def test_a_ghost_in_a_full_room_makes_way_for_a_newcomer() -> None:
    w = World(room_size=3)
    ghost = w.connect("ghost", responsive=False)
    w.clock.advance(3.0)
    a, b = w.connect("a"), w.connect("b")
    w.clock.advance(3.0)  # the ghost missed a heartbeat; a and b heartbeat
    w.send(a, {"type": "HEARTBEAT"}), w.send(b, {"type": "HEARTBEAT"})
    a.take(), b.take()
    c = knock(w, "c")
    assert c.frames == [] and ghost.pings == 1 and a.pings == b.pings == 0
    w.clock.advance(1.0)
    assert c.types() == ["OPEN"]
    assert ghost.aborted and ghost.session is not None and ghost.session.state == CLOSED
    assert a.messages() == b.messages() == [{"type": "LEAVE", "src": "ghost"}]  # a departure
    assert w.hub.stats.disconnections["probe"] == 1
    assert quiet(w)


def test_a_full_room_of_live_members_stays_full() -> None:
    w = World(room_size=2)
    w.connect("a"), w.connect("b")
    refused = knock(w, "c")  # nobody silent past a heartbeat: no probe
    assert refused.messages() == [{"type": "ERROR", "payload": {"msg": "Room is full (2 peers)"}}]
    w.clock.advance(6.0)  # both silent past a heartbeat, but they answer the ping
    assert knock(w, "c").messages()[0]["payload"]["msg"] == "Room is full (2 peers)"
    assert w.hub.stats.probes == {"started": 1, "holder_alive": 1}
    assert quiet(w)


def test_a_flood_of_contenders_costs_one_ping_per_probe_window() -> None:
    w = World()
    holder = w.connect("alice")  # alive: answers every ping
    refused = 0
    for _ in range(200):  # ten seconds of a contender every 50 ms
        w.clock.advance(0.05)
        refused += knock(w, "alice").messages() == ID_TAKEN
    assert refused == 200
    assert holder.pings <= 10 / 1.0 + 1
    assert holder.closed is None and quiet(w)


def test_contenders_waiting_on_one_probe_are_bounded() -> None:
    w = World()
    w.connect("alice", responsive=False)
    w.clock.advance(2.0)
    waiting = [knock(w, "alice") for _ in range(10)]
    assert sum(t.frames == [] for t in waiting) == 4  # the rest refused at once
    w.clock.advance(1.0)
    assert [t.types() for t in waiting[:4]] == [["OPEN"]] + [["ID-TAKEN"]] * 3
    assert quiet(w)


def test_a_live_holder_is_never_displaced_whatever_the_newcomer_sends() -> None:
    w = World(room_by="none")
    holder = w.connect("alice", token="mine")
    for _ in range(30):
        w.clock.advance(0.7)
        t = knock(w, "alice", token="guess")
        w.hub.join(FakeTransport(), JoinRequest("peerjs", "alice", "guess", "10.9.9.9"))
        assert t.messages() == ID_TAKEN
    assert holder.closed is None and w.hub.rooms[""].peers["alice"] is holder.session


def test_a_drain_closes_the_newcomers_waiting_on_a_probe() -> None:
    w = World()
    w.connect("alice", responsive=False)
    w.clock.advance(2.0)
    new = knock(w, "alice")
    w.hub.close_all()
    assert new.closed == (m.CLOSE_GOING_AWAY, "Server shutting down") and quiet(w)
    w.clock.advance(2.0)
    assert new.frames == []


def test_no_probe_when_off() -> None:
    w = World(takeover_probe=0)
    old = w.connect("alice", responsive=False)
    w.clock.advance(3.0)
    assert knock(w, "alice").messages() == ID_TAKEN and old.pings == 0


def test_a_refused_contender_does_not_hold_back_the_sweeps_ping() -> None:
    # Found by the fuzz model: with probes off, a contender marked the holder as pinged
    # without pinging it, so the sweep skipped its ping and dropped a live peer.
    for probe in (0, 1.0):
        w = World(takeover_probe=probe)
        holder = w.connect("alice")  # answers every ping
        w.advance(6.5)
        knock(w, "alice")
        w.advance(5.0)
        assert holder.pings >= 1 and holder.session is not None
        assert holder.session.state != CLOSED, probe


# Found in review: only the end of a window presumes anyone dead.

def test_a_member_pinged_for_a_seat_keeps_its_window_when_another_leaves() -> None:
    w = World(room_size=2)
    a, b = w.connect("a", responsive=False), w.connect("b", responsive=False)
    w.clock.advance(6.0)
    c = knock(w, "c")
    assert a.pings == b.pings == 1
    w.clock.advance(0.1)
    w.close(a)  # a leaves: its seat is c's, and b still has 0.9 s to answer
    assert c.types() == ["OPEN"] and not b.aborted and quiet(w)


def test_a_sweep_dropping_one_member_does_not_drop_another_mid_window() -> None:
    w = World(room_size=2)
    ghost = w.connect("ghost", responsive=False)
    w.clock.advance(6.0)
    tab = w.connect("tab", responsive=False)  # a background tab: answers pings, no frames
    w.clock.advance(6.0)
    knock(w, "c")
    w.hub.sweep()  # the ghost times out
    assert ghost.aborted and not tab.aborted


def test_a_member_replaced_by_its_reconnect_leaves_the_others_their_window() -> None:
    w = World(room_by="key", room_size=2)
    w.connect("a", key="game", token="ta", responsive=False)
    b = w.connect("b", key="game", token="tb", responsive=False)
    w.clock.advance(6.0)
    c = knock(w, "c", key="game", token="tc")
    w.clock.advance(0.1)
    assert knock(w, "a", key="game", token="ta").types() == ["OPEN"]  # a's own token
    assert not b.aborted
    w.clock.advance(1.0)  # b never answered: it is dropped, and c gets its seat
    assert b.aborted and c.types() == ["OPEN"] and quiet(w)


def test_a_probe_takeover_respects_the_address_cap() -> None:
    w = World(max_peers_per_ip=1)
    w.connect("alice", address="10.0.0.1", responsive=False)
    w.connect("x", address="10.0.0.2")
    w.clock.advance(2.0)
    refused = knock(w, "alice", address="10.0.0.2")
    assert refused.frames == []  # ID-TAKEN would come first: the holder is asked
    w.clock.advance(1.0)
    assert refused.messages()[0]["payload"]["msg"] == m.E_ADDRESS_FULL
    assert w.hub.per_address == {"10.0.0.1": 1, "10.0.0.2": 1} and quiet(w)


def test_the_verdict_waits_one_reactor_turn_after_the_window() -> None:
    # Timers run before sockets are read: a pong that came in time may still be unread.
    w = World()
    holder = w.connect("alice", responsive=False)
    w.clock.advance(2.0)
    new = knock(w, "alice")
    call = next(c for c in w.clock.getDelayedCalls() if c.getTime() == w.clock.seconds() + 1)
    w.clock.rightNow = call.getTime()
    w.clock.calls.remove(call)
    call.func(*call.args)  # the window passed; the reactor reads the socket next
    assert holder.session is not None
    holder.session.alive()  # the pong that was waiting
    w.clock.advance(0)
    assert new.messages() == ID_TAKEN and not holder.aborted


def test_a_contender_whose_join_fails_is_closed_and_the_others_get_theirs() -> None:
    w = World()
    w.connect("alice", responsive=False)
    w.clock.advance(2.0)
    first, second = knock(w, "alice"), knock(w, "alice")
    real = w.hub.join

    def join(transport: FakeTransport, req: JoinRequest) -> object:
        if transport is second:
            raise RuntimeError("an authorizer broke")
        return real(transport, req)

    w.hub.join = join  # type: ignore[method-assign]
    w.clock.advance(1.0)
    assert first.types() == ["OPEN"]
    assert second.closed == (m.CLOSE_INTERNAL, m.E_INTERNAL) and quiet(w)


@pytest.mark.parametrize("mode", ["token", "key", "none"])
def test_every_room_mode_probes(mode: str) -> None:
    w = World(room_by=mode)
    key = "game" if mode == "key" else "peerjs"
    old = w.connect("alice", key=key, token="t1", responsive=False)
    w.clock.advance(2.0)
    new = knock(w, "alice", key=key, token="t2" if mode != "token" else "t1")
    w.clock.advance(1.0)
    assert new.types() == ["OPEN"] and old.aborted


# -- a stateful fuzz of contention ----------------------------------------------------------

WINDOW = 1.0


class Tracked:
    """One newcomer or holder: its transport, and when it was pinged, heard and replaced."""

    def __init__(self, t: FakeTransport, peer_id: str, now: float) -> None:
        self.t = t
        self.id = peer_id
        self.knocked = now
        self.withdrawn = False
        self.pinged: list[float] = []  # by probes
        self.pings: list[float] = []  # by probes and sweeps
        self.heard: list[float] = []
        self.replaced_at: float | None = None
        self.dropped_at: float | None = None  # aborted by a probe


class Contention(RuleBasedStateMachine):
    """Knocks for a few ids in one room of two, holders that answer or not, closes on both
    sides and time passing, in any order. After every step: the registry and the probes'
    bookkeeping agree, every newcomer has its one verdict in bounded time, a holder
    that answered its last ping is never replaced, and a holder is pinged at most once per
    window (no sweeps run here, so every ping is a probe's)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = World(room_size=2, rate_limit=0, takeover_probe=WINDOW)
        self.tracked: list[Tracked] = []
        self.sweeping = False

    @property
    def now(self) -> float:
        return self.w.clock.seconds()

    @rule(peer_id=st.sampled_from(["a", "b", "c"]))
    def knock(self, peer_id: str) -> None:
        t = FakeTransport(responsive=False)
        tracked = Tracked(t, peer_id, self.now)
        clock = self.w.clock

        def send_ping() -> None:
            tracked.pings.append(clock.seconds())
            if not self.sweeping:
                tracked.pinged.append(clock.seconds())

        def abort_connection() -> None:
            if not self.sweeping and tracked.dropped_at is None:
                tracked.dropped_at = clock.seconds()
            FakeTransport.abort_connection(t)

        def close_with(code: int, reason: str) -> None:
            if reason == "Replaced by a new connection":
                tracked.replaced_at = clock.seconds()
            FakeTransport.close_with(t, code, reason)

        t.send_ping = send_ping  # type: ignore[method-assign]
        t.close_with = close_with  # type: ignore[method-assign]
        t.abort_connection = abort_connection  # type: ignore[method-assign]
        self.tracked.append(tracked)
        session = self.w.hub.join(t, JoinRequest("peerjs", peer_id, "room1", "127.0.0.1"))
        if session is not None:
            t.session = session

    def _open(self) -> list[Tracked]:
        return [x for x in self.tracked
                if x.t.session is not None and x.t.session.state != CLOSED]

    @precondition(lambda self: self._open())
    @rule(data=st.data(), pong=st.booleans())
    def answer(self, data: st.DataObject, pong: bool) -> None:
        x = data.draw(st.sampled_from(self._open()))
        assert x.t.session is not None
        x.heard.append(self.now)
        if pong:
            x.t.session.alive()
        else:
            x.t.session.received(b'{"type":"HEARTBEAT"}')

    @precondition(lambda self: self.tracked)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        x = data.draw(st.sampled_from(self.tracked))
        session = x.t.session
        if session is not None:
            self.w.hub.depart(session, "closed")
        elif x.t in self.w.hub.waiting:
            x.withdrawn = True
            self.w.hub.withdraw(x.t)

    @rule()
    def sweep(self) -> None:
        self.sweeping = True
        try:
            self.w.hub.sweep()
        finally:
            self.sweeping = False

    @rule(seconds=st.sampled_from([0.05, 0.1, 0.3, 0.6, 1.0, 2.5, 10.0]))
    def wait(self, seconds: float) -> None:
        # In steps, so that timers run when due, as the reactor runs them (Clock.advance
        # runs a timer with the clock already at the end of the jump).
        steps = round(seconds / 0.05)
        self.w.clock.pump([seconds / steps] * steps)

    @invariant()
    def registry_and_bookkeeping_agree(self) -> None:
        hub = self.w.hub
        for room in hub.rooms.values():
            assert 0 < len(room.peers) <= 2
            for peer_id, session in room.peers.items():
                assert session.state != CLOSED and session.id == peer_id
        for key, probe in hub.probes.items():
            assert probe.key == key and probe.call is not None and probe.call.active()
            assert 0 < len(probe.contenders) <= 4
            for session in probe.asked:
                assert probe in hub.probed[session]
            for t, _req in probe.contenders:
                assert hub.waiting[t] is probe
        assert all(hub.probes[p.key] is p for ps in hub.probed.values() for p in ps)
        assert all(hub.probes[p.key] is p for p in hub.waiting.values())

    @invariant()
    def every_newcomer_gets_one_verdict_in_time(self) -> None:
        for x in self.tracked:
            types = x.t.types()
            if types:
                assert types[0] in ("OPEN", "ID-TAKEN", "ERROR"), types
                if types[0] != "OPEN":
                    assert len(types) == 1 and x.t.closed is not None and x.t.session is None
                else:
                    assert x.t.session is not None and x.t.session.id == x.id
            elif not x.withdrawn:
                # One window, or one per member when a seat's probe ends with a member
                # replaced and the others, silent meanwhile, are asked in turn.
                assert self.now - x.knocked < 3 * WINDOW + 1e-9, (x.id, x.knocked, self.now)
                assert x.t in self.w.hub.waiting

    @invariant()
    def a_holder_that_answered_is_never_replaced(self) -> None:
        for x in self.tracked:
            if x.replaced_at is not None and x.pinged:
                last_ping = max(p for p in x.pinged if p <= x.replaced_at)
                answered = [h for h in x.heard if last_ping <= h <= x.replaced_at]
                silent_for = x.replaced_at - max(x.heard or [x.knocked])
                assert not answered or silent_for > self.w.hub.config.dead_after, x.id

    @invariant()
    def a_probe_drops_only_who_stayed_silent_a_whole_window(self) -> None:
        for x in self.tracked:
            if x.dropped_at is not None:
                # Some ping a whole window before, and not a word since.
                asked = [p for p in x.pings if p <= x.dropped_at - WINDOW + 1e-9]
                assert asked, (x.id, x.pings, x.dropped_at)
                assert not [h for h in x.heard if asked[-1] <= h <= x.dropped_at], x.id

    @invariant()
    def one_ping_per_window(self) -> None:
        for x in self.tracked:
            gaps = [b - a for a, b in zip(x.pinged, x.pinged[1:], strict=False)]
            assert all(gap >= WINDOW - 1e-9 for gap in gaps), x.pinged


TestContention = Contention.TestCase
