"""The Hub's side of --cluster, synchronously on a fake clock: a stub stands in for
``cluster.Link`` (Redis), so that what the Hub does with each of its answers, and with what
other nodes say, is tested without processes; the last tests run the real Link on a fake
Redis connection. tests/test_cluster.py runs the real thing."""

from __future__ import annotations

import json
from typing import Any

import msgspec
from twisted.internet.defer import Deferred, succeed

from peersig.cluster import CLAIM, RELEASE, ROSTER, Claim, Link, Target
from peersig.rooms import JoinRequest
from peersig.session import Session

from .fakes import FakeTransport, World


class StubLink:
    """Records what the Hub asks; the test answers claims and probes."""

    node = "here"

    def __init__(self) -> None:
        self.ok = True
        self.quiet = False
        self.rows: dict[Session, str] = {}
        self.seen: dict[Session, int] = {}
        self.releases: dict[tuple[str, str], str] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.claims: list[tuple[str, str, str, Deferred[Claim]]] = []
        self.probes: list[tuple[tuple[str, str], Deferred[bool]]] = []
        self.room_members: dict[str, str] = {}
        self.roster_seq = 0

    def claim(self, room: str, peer_id: str, token: str, cap: int, takeover: str,
              members: bool, dead_epoch: str = "") -> Deferred[Claim]:
        answer: Deferred[Claim] = Deferred()
        self.claims.append((peer_id, takeover, dead_epoch, answer))
        return answer

    def joined(self, session: Session, claim: Claim) -> None:
        self.rows[session] = claim.row
        self.seen[session] = claim.seq
        self.calls.append(("joined", session.id, claim.old))
        if claim.old is not None:
            self.displace(session.room.name, session.id, claim.old)

    def told(self, session: Session, seq: int, since: int = -1) -> bool:
        return since < self.seen.get(session, 0) < seq

    def forget(self, session: Session) -> str | None:
        self.seen.pop(session, None)
        return self.rows.pop(session, None)

    def unclaim(self, room: str, peer_id: str, row: str) -> None:
        self.calls.append(("unclaim", peer_id, row))

    def withdraw(self, room: str, peer_id: str, claim: Claim) -> None:
        if claim.old is not None:
            self.displace(room, peer_id, claim.old)
        self.unclaim(room, peer_id, claim.row)

    def displace(self, room: str, peer_id: str, old: tuple[str, str]) -> None:
        self.calls.append(("displace", peer_id, old))

    def left(self, session: Session, leave: bool, part: bool) -> None:
        self.forget(session)
        self.calls.append(("left", session.id, leave, part))

    def relay(self, sender: Session, room: Any, dst: str, mtype: str, frame: bytes) -> None:
        self.calls.append(("relay", sender.id, dst, frame))

    def forward(self, node: str, room: str, dst: str, src: str, origin: str,
                frame: bytes) -> None:
        self.calls.append(("forward", node, dst, src, origin))

    def expired(self, node: str, room: str, src: str, dst: str) -> None:
        self.calls.append(("expired", node, src, dst))

    def epoch_of(self, session: Session) -> str:
        row = self.rows.get(session, "")
        return row.split("|")[1] if row else ""

    def inherit(self, old: Session, new: Session) -> None:
        row = self.rows.pop(old, None)
        if row is not None:
            self.rows[new] = row

    def roster(self, session: Session, tell: Any) -> None:
        self.seen[session] = self.roster_seq
        tell(list(self.room_members))

    def broadcast(self, room: str, frame: bytes) -> None:
        self.calls.append(("broadcast", room))

    def probe(self, old: tuple[str, str], room: str, peer_id: str) -> Deferred[bool]:
        answer: Deferred[bool] = Deferred()
        self.probes.append((old, answer))
        return answer


def clustered(**config: Any) -> tuple[World, StubLink]:
    world = World(**config)
    link = StubLink()
    world.hub.cluster = link  # type: ignore[assignment]
    return world, link


def ok(row: str = "here|e1|t", old: tuple[str, str] | None = None,
       members: list[str] | None = None, seq: int = 0) -> Claim:
    return Claim("ok" if old is None else "takeover", row, members or [], old, old is None,
                 seq, old is not None)


def join(world: World, link: StubLink, peer_id: str, answer: Claim | None = None,
         token: str = "room1") -> FakeTransport:
    """A newcomer whose claim Redis answers with ``answer`` (ok by default)."""
    transport = world.connect(peer_id, token)
    assert transport.session is None and transport.frames == []  # it waits on Redis
    _, _, _, claim = link.claims[-1]
    claim.callback(answer or ok(f"here|{peer_id}|t"))
    return transport


def test_a_claim_won_opens_and_is_announced() -> None:
    world, link = clustered()
    a = join(world, link, "a")
    assert a.types() == ["OPEN"] and a.session is not None
    assert link.calls == [("joined", "a", None)]


def test_a_claim_lost_is_id_taken_and_a_full_room_is_full() -> None:
    world, link = clustered(takeover_probe=0.0)
    taken = join(world, link, "a", Claim("taken", "", [], ("there", "e9"), False))
    assert taken.types() == ["ID-TAKEN"] and taken.closed == (1008, "ID is taken")
    full = join(world, link, "b", Claim("full", "", [], None, False))
    assert full.messages()[0]["payload"]["msg"].startswith("Room is full")


def test_a_newcomer_gone_before_the_answer_gives_its_row_back() -> None:
    world, link = clustered()
    transport = world.connect("a")
    world.hub.withdraw(transport)
    link.claims[-1][3].callback(ok("here|x|t", old=("there", "e9")))
    # The former holder still gives way (its row is not its own any more); ours goes back.
    assert link.calls == [("displace", "a", ("there", "e9")), ("unclaim", "a", "here|x|t")]
    assert transport.frames == []


def test_limits_are_checked_again_when_claims_come_back() -> None:
    world, link = clustered(max_peers=1)
    first, second = world.connect("a"), world.connect("b")
    link.claims[0][3].callback(ok("here|1|t"))
    link.claims[1][3].callback(ok("here|2|t"))
    assert first.types() == ["OPEN"]
    assert second.types() == ["ERROR"] and ("unclaim", "b", "here|2|t") in link.calls


def test_redis_unreachable_refuses_the_join_with_1013() -> None:
    world, link = clustered()
    link.ok = False
    transport = world.connect("a")
    assert transport.closed is not None and transport.closed[0] == 1013
    assert link.claims == []


def test_a_holder_elsewhere_is_probed_and_replaced_only_when_dead() -> None:
    world, link = clustered()
    alive = world.connect("a")
    link.claims[-1][3].callback(Claim("taken", "", [], ("there", "e1"), False))
    (old, answer), = link.probes
    assert old == ("there", "e1") and alive.frames == []  # it waits on the probe
    answer.callback(True)
    assert alive.types() == ["ID-TAKEN"]

    dead = world.connect("b")
    link.claims[-1][3].callback(Claim("taken", "", [], ("there", "e2"), False))
    link.probes[-1][1].callback(False)
    peer_id, takeover, dead_epoch, again = link.claims[-1]
    assert (peer_id, takeover, dead_epoch) == ("b", "3", "e2")  # only that holder
    again.callback(ok("here|b|t", old=("there", "e2")))
    assert dead.types() == ["OPEN"]
    assert ("displace", "b", ("there", "e2")) in link.calls
    assert world.hub.stats.takeovers["cluster"] == 1


def test_a_local_holder_asked_by_another_node_is_pinged() -> None:
    world, link = clustered(takeover_probe=1.0)
    silent = join(world, link, "a")
    silent.responsive = False
    answers: list[bool] = []
    world.clock.advance(2)
    world.hub.remote_probe("room1", "a", "a", answers.append)
    assert silent.pings == 1 and answers == []
    world.clock.advance(1.0)
    assert answers == [False]
    world.hub.remote_probe("room1", "a", "stale-epoch", answers.append)
    assert answers == [False, False]  # not the holder Redis named: a row left behind


def test_frames_from_other_nodes_reach_their_peer_or_go_back_as_expire() -> None:
    world, link = clustered()
    b = join(world, link, "b")
    b.take()
    world.hub.remote_relay("room1", "b", "a", "there", b'{"type":"OFFER","src":"a"}')
    assert b.types() == ["OFFER"]
    world.hub.remote_relay("room1", "nobody", "a", "there", b"{}")
    assert link.calls[-1] == ("expired", "there", "a", "nobody")


def test_a_queue_here_goes_to_its_destination_joining_elsewhere() -> None:
    world, link = clustered()
    a = join(world, link, "a")
    assert a.session is not None
    # Redis knew no holder of x: the Hub's offline path queues it here.
    world.hub._offline(a.session, a.session.room, "x", "OFFER", b"frame")
    world.hub.remote_joined("room1", "x", "there", True, 9)
    assert link.calls[-1] == ("forward", "there", "x", "a", "here")
    assert world.hub.queued_bytes == 0


def test_a_departure_elsewhere_is_told_as_one_process_tells_it() -> None:
    world, link = clustered(room_by="none")
    a = join(world, link, "a", token="t1")
    c = join(world, link, "c", token="t2")
    a.take(), c.take()
    world.hub.remote_left("", "b", True, False, ["a"], 9)  # b talked to a only
    assert [m["type"] for m in a.take()] == ["LEAVE"] and c.take() == []


def test_a_takeover_elsewhere_closes_the_holder_here_unseen() -> None:
    world, link = clustered()
    a = join(world, link, "a")
    mate = join(world, link, "mate")
    a.take(), mate.take()
    world.hub.remote_takeover("room1", "a", "a")  # "a" is its epoch (join() above)
    assert a.closed == (1000, "Replaced by a new connection")
    assert mate.take() == []
    assert ("left", "a", False, False) in link.calls


def test_room_started_and_finished_once_per_room() -> None:
    from .test_departures import Events

    world, link = clustered()
    events = Events()
    world.hub.events = events
    join(world, link, "a", Claim("ok", "here|a|t", [], None, True))  # the room's first
    b = join(world, link, "b", Claim("ok", "here|b|t", [], None, False))
    assert [e[0] for e in events.seen] == ["room_started", "peer_joined", "peer_joined"]
    world.close(b)
    assert "room_finished" not in [e[0] for e in events.seen]  # Redis says when (release)
    world.hub.room_finished("room1")
    world.hub.node_lost("room1", "z", emptied=True)
    assert events.seen[-3:] == [("room_finished", None, None),
                                ("peer_left", "z", "node_lost"), ("room_finished", None, None)]


def test_an_app_message_to_the_room_goes_to_every_node() -> None:
    world, link = clustered(app_message_types=frozenset({"GAME"}))
    a = join(world, link, "a")
    world.send(a, {"type": "GAME", "payload": {}})
    assert ("broadcast", "room1") in link.calls
    b = join(world, link, "b")
    b.take()
    world.hub.remote_broadcast("room1", json.dumps({"type": "GAME", "src": "z"}).encode())
    assert b.types() == ["GAME"]


def test_without_a_cluster_the_hub_asks_nothing() -> None:
    world = World()
    transport = world.connect("a")
    assert transport.types() == ["OPEN"] and world.hub.cluster is None
    assert JoinRequest  # the same join path as every other test of the core


def test_a_probe_of_a_holder_that_reconnected_here_meanwhile_finds_it_alive() -> None:
    world, link = clustered(takeover_probe=1.0, room_by="key")
    old = join(world, link, "a", token="t1")
    old.responsive = False
    answers: list[bool] = []
    world.clock.advance(2)
    world.hub.remote_probe("peerjs", "a", "a", answers.append)
    # Within the window, its client comes back here with its token: a local takeover,
    # the same row (and epoch) for the new connection.
    again = world.connect("a", "t1")
    assert again.types() == ["OPEN"]
    world.clock.advance(1.0)
    assert answers == [True]


def test_a_drained_node_leaves_peer_left_to_the_reaper() -> None:
    from .test_departures import Events

    world, link = clustered()
    events = Events()
    world.hub.events = events
    join(world, link, "a")
    link.quiet = True  # as Link.hand_over sets it
    world.hub.close_all()
    assert "peer_left" not in [e[0] for e in events.seen]


def test_news_is_told_only_to_members_whose_peers_came_before_it() -> None:
    """A join or departure numbered before a member's claim (its PEERS listed the room
    after it) is old news to that member, however late the bus brings it."""
    world, link = clustered(room_events=True)
    early = join(world, link, "early", ok("here|early|t", members=["early"], seq=2))
    late = join(world, link, "late", ok("here|late|t", members=["early", "x", "late"], seq=5))
    early.take(), late.take()
    world.hub.remote_joined("room1", "x", "there", True, 4)
    assert early.messages() == [{"type": "JOIN", "src": "x"}] and late.take() == []
    early.take()
    world.hub.remote_left("room1", "gone", True, True, None, 3)
    assert early.types() == ["LEAVE", "PART"] and late.take() == []
    early.take()
    world.hub.remote_joined("room1", "y", "there", True, 6)
    world.hub.remote_left("room1", "x", True, True, None, 7)
    for member in (early, late):
        assert member.types() == ["JOIN", "LEAVE", "PART"]


# -- the real Link on a fake Redis connection: the numbering of news -------------------------


class FakeRedis:
    """Records each script call; the test answers it (``answer``)."""

    def __init__(self) -> None:
        self.scripts: list[tuple[bytes, list[Any], Deferred[Any]]] = []

    def eval(self, script: bytes, keys: list[str], args: list[Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.scripts.append((script, args, d))
        return d

    def execute_command(self, *args: Any) -> Deferred[Any]:
        return succeed(1)

    def answer(self, script: bytes, result: Any) -> list[Any]:
        """Answer the oldest call of ``script`` still waiting: its arguments."""
        for i, (called, args, d) in enumerate(self.scripts):
            if called is script:
                del self.scripts[i]
                d.callback(result)
                return args
        raise AssertionError("no such call waiting")


def linked(**config: Any) -> tuple[World, Link, FakeRedis]:
    world = World(room_events=True, **config)
    link = Link(world.hub, Target(path="/nowhere"), world.clock, node="here")
    link.redis = redis = FakeRedis()
    link.leased = link.subscribed = True
    link.probe_seen = world.clock.seconds() + 1e6
    world.hub.cluster = link
    return world, link, redis


def claimed(world: World, redis: FakeRedis, peer_id: str, seq: int,
            members: list[str]) -> FakeTransport:
    transport = world.connect(peer_id)
    redis.answer(CLAIM, [b"ok", b"", b"", 0, seq, [m.encode() for m in members]])
    return transport


def bus(link: Link, *message: Any) -> None:
    link.received(b"ps:ev", msgspec.msgpack.encode(list(message)))


def test_news_heard_while_a_claim_is_answered_is_told_to_the_newcomer_after_peers() -> None:
    world, link, redis = linked()
    early = claimed(world, redis, "early", 2, ["early"])
    early.take()
    late = world.connect("late")  # its claim goes out (number 5, below)
    bus(link, "joined", "room1", "z", "there", True, 4)  # before the claim: PEERS lists z
    bus(link, "left", "room1", "y", "there", True, True, None, -1, 7)  # after it
    bus(link, "left", "room1", "w", "there", True, True, None, -1, 5)  # the claim's number
    assert early.types() == ["JOIN", "LEAVE", "PART", "LEAVE", "PART"]
    assert late.frames == []
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 5, [b"early", b"z", b"y", b"late"]])
    assert late.messages() == [{"type": "OPEN"},
                               {"type": "PEERS", "payload": {"peers": ["early", "z", "y"]}},
                               {"type": "LEAVE", "src": "y"}, {"type": "PART", "src": "y"}]
    assert link.catch_up == {}  # nothing kept once the claim is answered


def test_a_departure_here_while_a_claim_is_answered_is_told_to_the_newcomer() -> None:
    world, _, redis = linked()
    gone = claimed(world, redis, "gone", 2, ["gone"])
    late = world.connect("late")
    world.close(gone)  # its release goes out after the claim: PEERS will list it
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 3, [b"gone", b"late"]])
    assert late.types() == ["OPEN", "PEERS", "LEAVE", "PART"]


def test_a_departure_heard_while_a_roster_is_read_is_told_again_after_peers() -> None:
    world, link, redis = linked(room_by="key")
    a = world.connect("a", "t1", key="app")
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 3, [b"a", b"x"]])
    again = world.connect("a", "t1", key="app")  # the same token: a takeover here
    assert again.types() == ["OPEN"] and a.closed is not None
    bus(link, "left", "app", "x", "there", True, True, None, -1, 9)  # after the roster
    assert again.types() == ["OPEN", "LEAVE", "PART"]
    redis.answer(ROSTER, [[b"a", b"x"], b"8"])
    assert again.types()[3:] == ["PEERS", "LEAVE", "PART"]
    bus(link, "joined", "app", "v", "there", True, 8)  # the roster's number: not news
    bus(link, "joined", "app", "u", "there", True, 10)
    assert again.messages()[-1] == {"type": "JOIN", "src": "u"} and len(again.frames) == 7
    assert link.catch_up == {}


def test_a_claim_that_fails_keeps_no_news() -> None:
    world, link, redis = linked()
    world.connect("late")
    bus(link, "joined", "room1", "z", "there", True, 4)
    redis.scripts[0][2].errback(TimeoutError())
    assert link.catch_up == {}


def test_a_claim_that_goes_out_after_a_departure_here_is_not_told_of_it() -> None:
    world, link, redis = linked()
    gone = claimed(world, redis, "gone", 2, ["gone"])
    first = world.connect("first")  # in flight when gone leaves: its PEERS will list gone
    world.close(gone)
    second = world.connect("second")  # goes out after gone's release
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 3, [b"gone", b"first"]])
    redis.answer(RELEASE, 1)  # one connection: in the order they went out
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 5, [b"first", b"second"]])
    assert first.types() == ["OPEN", "PEERS", "LEAVE", "PART", "JOIN"]
    assert second.types() == ["OPEN", "PEERS"]
    assert link.catch_up == {}


def test_a_claim_given_back_is_told_as_a_part_to_whoever_listed_it() -> None:
    world, _, redis = linked()
    before = claimed(world, redis, "before", 2, ["before"])
    newcomer = world.connect("b")
    after = world.connect("after")
    world.hub.withdraw(newcomer)  # b leaves before its claim is answered
    pending = world.connect("pending")
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 5, [b"before", b"b"]])  # b's: given back
    release = redis.answer(RELEASE, 1)
    # Elsewhere: PART, to the members whose PEERS came after b's claim (5) only.
    assert msgspec.msgpack.decode(release[3] + msgspec.msgpack.encode(9)) == \
        ["left", "room1", "b", "here", False, True, None, 5, 9]
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 6, [b"before", b"b", b"after"]])
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 7, [b"before", b"b", b"after", b"pending"]])
    assert before.types() == ["OPEN", "PEERS", "JOIN", "JOIN"]  # never heard of b
    assert after.types() == ["OPEN", "PEERS", "PART", "JOIN"]
    assert pending.types() == ["OPEN", "PEERS", "PART"] and pending.messages()[2]["src"] == "b"
    # A takeover given back: the former holder elsewhere was displaced, so its id is gone
    # for everyone, here too.
    again = world.connect("x")
    world.hub.withdraw(again)
    redis.answer(CLAIM, [b"takeover", b"there", b"e1", 0, 8, [b"before", b"after", b"x"]])
    assert before.types()[-1] == "PART" and "LEAVE" not in before.types()  # it may come back
    release = redis.answer(RELEASE, 1)
    assert msgspec.msgpack.decode(release[3] + msgspec.msgpack.encode(9))[4:] == \
        [False, True, None, -1, 9]  # PART to every member elsewhere


def test_part_of_a_claim_given_back_elsewhere_goes_to_who_listed_it() -> None:
    world, link, redis = linked()
    early = claimed(world, redis, "early", 2, ["early"])
    late = claimed(world, redis, "late", 6, ["early", "b", "late"])
    early.take(), late.take()
    bus(link, "left", "room1", "b", "there", False, True, None, 5, 7)  # b's claim was 5
    assert early.take() == [] and late.types() == ["PART"]


def test_a_fenced_node_tells_its_room_mates_elsewhere_part() -> None:
    world, link, redis = linked()
    claimed(world, redis, "a", 2, ["a"])
    link.fence()
    release = redis.answer(RELEASE, 1)
    assert msgspec.msgpack.decode(release[3] + msgspec.msgpack.encode(9))[4:6] == [False, True]
    # Reaped while away (quiet): the reaper told them.
    link.leased = True
    claimed(world, redis, "b", 3, ["b"])
    link.fence(quiet=True)
    assert redis.answer(RELEASE, 1)[3] == b""


def test_a_claim_whose_answer_is_lost_is_given_back_with_part_to_everyone() -> None:
    world, _, redis = linked()
    world.connect("b")
    redis.scripts[0][2].errback(TimeoutError())
    release = redis.answer(RELEASE, 1)
    assert msgspec.msgpack.decode(release[3] + msgspec.msgpack.encode(9))[4:] == \
        [False, True, None, -1, 9]


def test_a_newcomer_registered_when_its_setup_fails_leaves_as_any_peer() -> None:
    world, link, redis = linked()
    mate = claimed(world, redis, "mate", 2, ["mate"])
    mate.take()
    broken = world.connect("b")

    def attach(session: Any) -> None:
        raise RuntimeError("attach failed")

    broken.attach = attach  # type: ignore[method-assign]
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 3, [b"mate", b"b"]])
    assert broken.closed is not None and broken.closed[0] == 1011
    assert mate.types() == ["JOIN", "LEAVE", "PART"]  # once each
    assert world.hub.sessions == {mate.session} and set(link.rows) == {mate.session}
    release = redis.answer(RELEASE, 1)
    assert msgspec.msgpack.decode(release[3] + msgspec.msgpack.encode(9))[4:6] == [True, True]
    assert redis.scripts == []  # one release, no displace or second release


def test_a_dead_nodes_row_taken_and_given_back_is_part_to_everyone() -> None:
    world, _, redis = linked()
    newcomer = world.connect("x")  # back from a drained node, whose row it replaces
    world.hub.withdraw(newcomer)
    redis.answer(CLAIM, [b"ok", b"dead", b"e0", 0, 5, [b"x"]])
    release = redis.answer(RELEASE, 1)
    assert msgspec.msgpack.decode(release[3] + msgspec.msgpack.encode(9))[4:] == \
        [False, True, None, -1, 9]  # everyone had it listed


def test_a_newcomer_whose_setup_fails_before_it_is_announced_gives_its_row_back() -> None:
    world, link, redis = linked()
    mate = claimed(world, redis, "mate", 2, ["mate"])
    mate.take()
    broken = world.connect("b")

    def fail(*_: Any) -> None:
        raise RuntimeError("PEERS failed")

    world.hub._tell_room = fail  # type: ignore[method-assign]
    redis.answer(CLAIM, [b"ok", b"", b"", 0, 3, [b"mate", b"b"]])
    assert broken.closed is not None and broken.closed[0] == 1011
    assert world.hub.sessions == {mate.session} and set(link.rows) == {mate.session}
    release = redis.answer(RELEASE, 1)
    assert release[1].startswith("here|")  # the claim's row goes back
    assert msgspec.msgpack.decode(release[3] + msgspec.msgpack.encode(9))[4:] == \
        [False, True, None, 3, 9]  # never announced: PART to whoever listed it


def test_news_from_other_nodes_counts_as_activity_and_the_bus_probe_does_not() -> None:
    """Stats.activity tells the reactor a server at rest (upstream.twisted): what other
    nodes say should not wait, the subscriber's own probe is not news."""
    world, link, _redis = linked()
    before = world.hub.stats.activity
    link.received(b"ps:in:here", msgspec.msgpack.encode(["probe"]))
    assert world.hub.stats.activity == before
    bus(link, "broadcast", "room1", "there", b'{"type":"X"}')
    bus(link, "close", "room1", "there", "over")
    assert world.hub.stats.activity == before + 2
