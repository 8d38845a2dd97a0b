"""Rooms and the registry: who may join, who can reach whom, offline queues, departures.

``Hub`` is the whole signaling core of one process, free of Twisted's networking: it is
handed transports (``PeerTransport``) and a clock, so tests drive it synchronously with
``twisted.internet.task.Clock`` and fake transports.
"""

from __future__ import annotations

import hashlib
import uuid
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import msgspec
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from . import tokens
from .auth import Verdict
from .config import Config
from .messages import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    E_ADDRESS_FULL,
    E_CLUSTER,
    E_INTERNAL,
    E_INVALID_ID,
    E_INVALID_KEY,
    E_INVALID_ROOM,
    E_MISSING_PARAMS,
    E_RATE_LIMIT,
    E_SERVER_FULL,
    ID_TAKEN_FRAME,
    OPEN_FRAME,
    QUEUED,
    Inbound,
    error_frame,
    expire_frame,
    join_frame,
    leave_frame,
    part_frame,
    peers_frame,
    relay_frame,
    room_full_text,
    valid_id,
    valid_room,
)
from .session import AWAY, CLOSED, DETACHED, MAX_CONTACTS, OPEN, PeerTransport, Session
from .stats import Stats

if TYPE_CHECKING:
    from .cluster import Claim, Link

log = Logger()


# Tokens (the room part, before any ~) that ask --quick-match for a room of a queue.
MATCH_PREFIX = "match:"


class JoinRequest(NamedTuple):
    """The query of a WebSocket upgrade, URL-decoded; empty strings when absent."""

    key: str
    id: str
    token: str
    address: str
    origin: str = ""


class Pending(NamedTuple):
    """The authorizer has not decided yet: ask again once ``later`` fires."""

    later: Deferred[Any]


class Refusal(NamedTuple):
    """Why a join (or a request for TURN credentials) is refused."""

    outcome: str  # the peersig_connections_total label
    message: str  # the ERROR text


class OfflineQueue:
    """Messages for one id that is not connected (yet) in its room."""

    __slots__ = ("created", "frames", "nbytes", "origins", "told")

    def __init__(self, now: float) -> None:
        self.created = now
        self.frames: list[tuple[str, bytes]] = []  # (sender id, ready frame)
        self.nbytes = 0
        self.told: set[str] = set()  # senders already sent their EXPIRE
        # --cluster: the node of each sender connected elsewhere (who gets its EXPIRE).
        self.origins: dict[str, str] | None = None


# PeerJS's heartbeat interval (peerjs 1.5.5, PeerOptions.pingInterval, 5000 ms): a member of a
# full room silent for longer has missed a heartbeat, and is probed when a newcomer knocks.
HEARTBEAT_INTERVAL = 5.0
# Newcomers that may wait on one probe; more get their refusal at once.
MAX_CONTENDERS = 4
# A holder heard from within this part of the probe window is alive without a ping. Kept
# small: a page that reconnects right after its last signaling frame (its network changed
# a moment later) must still be able to take its id back.
FRESH = 0.1
# What a free slot of ``Hub.seen`` holds: never idle.
INF = float("inf")


class Probe:
    """Peers that may be dead, asked with a WebSocket ping each because newcomers contend
    for their place (their id, or a seat in their full room): ``asked`` maps each to when
    its ping went out. A frame or pong since then is its answer; none within
    ``Config.takeover_probe`` presumes it dead.
    """

    __slots__ = ("asked", "call", "contenders", "key")

    def __init__(self, key: tuple[str, str], asked: dict[Session, float]) -> None:
        self.key = key  # (room name, id), or (room name, "") for a seat in a full room
        self.asked = asked
        self.contenders: list[tuple[PeerTransport, JoinRequest]] = []
        self.call: IDelayedCall | None = None

    def answered(self, session: Session) -> bool:
        return session.last_seen >= self.asked[session]


class Room:
    __slots__ = ("away", "created", "match", "name", "peers", "queued", "queues", "size", "tag")

    def __init__(self, name: str, created: float = 0.0, size: int = 0,
                 match: str | None = None) -> None:
        self.name = name
        self.created = created
        # Members at most, 0 = unlimited: --room-size, or a token's room_size below it; kept
        # while the room lives.
        self.size = size
        # The quick-match queue the room was made for (``Hub.match_room``), if any.
        self.match = match
        # Logs name a room by this digest: in token mode the room name is the token.
        self.tag = hashlib.sha256(name.encode()).hexdigest()[:12]
        # The members: connected ones, and those whose socket closed within their grace
        # (``Hub.socket_closed``), who keep their id and seat but are reached only by queue.
        self.peers: dict[str, Session] = {}
        self.away: dict[str, Session] = {}
        self.queues: dict[str, OfflineQueue] = {}
        self.queued = 0  # messages in all queues of this room

    def members(self) -> list[str]:
        """Every member's id: the connected ones in the order they joined, then the away."""
        return [*self.peers, *self.away]

    def full(self) -> bool:
        return bool(self.size) and len(self.peers) + len(self.away) >= self.size


class EventSink(Protocol):
    """Who hears of rooms starting and finishing and of peers joining and leaving
    (``webhooks.Webhooks``). Called on the reactor thread, in the order things happen; it
    must not block."""

    def event(self, kind: str, room: str, peer: str | None = None,
              reason: str | None = None) -> None:
        """``kind``: room_started, peer_joined, peer_left (with the departure's reason) or
        room_finished; ``room`` as the admin API names it (``Hub.public_name``)."""

    def queued(self) -> int:
        """Events not yet delivered."""


class Hub:
    def __init__(self, config: Config, clock: IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.rooms: dict[str, Room] = {}
        self.sessions: set[Session] = set()
        # The last sign of life of each connected session (``Session.last_seen``), side by
        # side in slots, so that the sweep reads them without visiting every session
        # (``sweep``); a free slot holds +inf. ``slot_of`` is the session in each slot.
        self.seen = array("d")
        self.slot_of: list[Session | None] = []
        self.free_slots: list[int] = []
        self.per_address: dict[str, int] = {}
        self.queued_bytes = 0
        self.rooms_with_queues: set[Room] = set()
        self.stats = Stats()
        # Contention (see ``_contend``): open probes by key, the probes each asked peer is in
        # (its id's, its room's seat's), and the probe each waiting newcomer is in. All empty
        # while nobody contends.
        self.probes: dict[tuple[str, str], Probe] = {}
        self.probed: dict[Session, list[Probe]] = {}
        # A newcomer waiting on the authorizer (``Pending``) is in ``waiting`` with no probe.
        self.waiting: dict[PeerTransport, Probe | None] = {}
        self.started = clock.seconds()
        self.draining = False
        # Set by the service when webhooks are configured.
        self.events: EventSink | None = None
        # Ids an operator removed with a ban: (room name, id) -> (until, the ERROR text).
        self.bans: dict[tuple[str, str], tuple[float, str]] = {}
        # Members whose socket closed, within their grace: session -> (its end, the reason).
        self.away: dict[Session, tuple[float, str]] = {}
        # Quick match: each queue's live rooms, oldest first, and the number of the last
        # room made (one count for all queues: no two rooms ever share a name).
        self.matches: dict[str, list[Room]] = {}
        self.match_number = 0
        # LEAVE on departure goes to the whole room, except in ``none`` mode, where the
        # "room" is everyone and only the peers one talked to are told.
        self._track_contacts = config.room_by == "none"
        # --cluster (cluster.Link, set by the service): the questions one process cannot
        # answer alone. None: this process is the whole server.
        self.cluster: Link | None = None
        # (room, id) of the joins waiting on a cluster claim.
        self.claiming: set[tuple[str, str]] = set()

    # -- joining ---------------------------------------------------------------------------

    def _who(self, peer_id: str, address: str) -> dict[str, Any]:
        """Log fields naming a peer: only with --log-peers."""
        return {"peer": peer_id, "address": address} if self.config.log_peers else {}

    def _reject(self, transport: PeerTransport, req: JoinRequest, outcome: str,
                msg: str) -> None:
        self.stats.connections[outcome] += 1
        log.info("join rejected: {reason}", event="reject", reason=outcome,
                 **self._who(req.id, req.address))
        transport.send_frame(error_frame(msg))
        transport.close_with(CLOSE_POLICY, msg)

    def room_name(self, req: JoinRequest) -> str:
        mode = self.config.room_by
        if mode == "key":
            return req.key
        if mode == "none":
            return ""
        # "~" cannot occur in a room name: what follows it is a signature or the like.
        return req.token.partition(tokens.SEP)[0]

    def gate(self, req: JoinRequest, now: float) -> tuple[str, Verdict] | Refusal | Pending:
        """The checks a join passes before the registry is looked at, in their order
        (docs/protocol.md, Joining): the parameters, the key, the room name and the id
        rules of the room mode, then the authorizer. The room name and the authorizer's
        verdict, why not, or that the authorizer has yet to decide. ``/ice`` asks the same
        of a request for TURN credentials."""
        cfg = self.config
        if not (req.id and req.token and req.key):
            return Refusal("missing_params", E_MISSING_PARAMS)
        if cfg.room_by != "key" and req.key != cfg.key:
            return Refusal("invalid_key", E_INVALID_KEY)
        name = self.room_name(req)
        if cfg.room_by != "none" and not valid_room(name):
            return Refusal("invalid_room", E_INVALID_ROOM)
        if not valid_id(req.id):
            return Refusal("invalid_id", E_INVALID_ID)
        ban = self._ban(name, req.id, now)
        if ban is not None:
            return Refusal("banned", ban)
        verdict = cfg.authorizer.authorize(req, name, cfg, now)
        if verdict.later is not None:
            return Pending(verdict.later)
        if not verdict.allowed:
            return Refusal("unauthorized", verdict.message)
        return name, verdict

    def _ban(self, room: str, peer_id: str, now: float) -> str | None:
        """The reason ``peer_id`` is banned from ``room`` now, or None."""
        ban = self.bans.get((room, peer_id)) if self.bans else None
        return ban[1] if ban is not None and now < ban[0] else None

    def join(self, transport: PeerTransport, req: JoinRequest) -> Session | None:
        """Register a peer, or reject it with an ERROR frame and a close."""
        self.stats.activity += 1
        cfg = self.config
        now = self.clock.seconds()
        admitted = self.gate(req, now)
        if isinstance(admitted, Refusal):
            self._reject(transport, req, *admitted)
            return None
        if isinstance(admitted, Pending):
            self._await_verdict(transport, req, admitted.later)
            return None
        name, verdict = admitted
        size = self._room_size(verdict)
        match = None
        if cfg.quick_match and name.startswith(MATCH_PREFIX):
            match = name[len(MATCH_PREFIX):]
            if ":" in match or not match:
                self._reject(transport, req, "invalid_room", E_INVALID_ROOM)
                return None
            name = self.match_room(match, req.id, size)
            ban = self._ban(name, req.id, now)
            if ban is not None:
                self._reject(transport, req, "banned", ban)
                return None
        room = self.rooms.get(name)
        holder = room.peers.get(req.id) if room is not None else None
        if room is not None and room.away and req.id in room.away:
            away = room.away[req.id]
            until, reason = self.away[away]
            if until <= now:  # its grace is over, though the sweep has yet to say so
                self.depart(away, reason, leave=False)
                return self.join(transport, req)
            if not (verdict.takeover or away.token == req.token):
                self._refuse(transport, req, (name, req.id))  # its token keeps the id
                return None
            if req.address != away.address and self._address_full(req.address):
                self._reject(transport, req, "address_full", E_ADDRESS_FULL)
                return None
            return self._resume(away, transport, req, now)
        if holder is not None:
            assert room is not None
            cause = "authorizer" if verdict.takeover else self._may_take_over(holder, req, now)
            if cause is None:
                self._contend(transport, req, (name, req.id), [holder], now)
                return None
            if req.address != holder.address and self._address_full(req.address):
                self._reject(transport, req, "address_full", E_ADDRESS_FULL)
                return None
            return self._take_over(holder, transport, req, now, cause)
        if self._over_limits(req, transport):
            return None
        if room is not None and room.full():
            silent = [s for s in room.peers.values() if now - s.last_seen > HEARTBEAT_INTERVAL]
            self._contend(transport, req, (name, ""), silent, now)
            return None
        if self.cluster is not None:
            self._claim(transport, req, name, size, verdict)
            return None
        if room is None:
            room = self._open_room(name, now, size, match)
        session = Session(self, transport, room, req.id, req.token, req.address, now)
        self._register(session, "opened")
        return session

    def _claim(self, transport: PeerTransport, req: JoinRequest, name: str, size: int,
               verdict: Verdict, dead_epoch: str = "") -> None:
        """--cluster: a place no local peer holds is asked of Redis (``cluster.Link.claim``),
        where another node's peer may hold the id or fill the room. The newcomer waits as
        on the authorizer. Redis unreachable: ERROR and close 1013, so the client (or the
        load balancer) tries again; the decided policy of docs/scaling.md.

        A holder on another node is asked as a local one would be (``_contend``): its
        node pings it (``remote_probe``); found dead, the newcomer claims again, replacing
        only that holder (``dead_epoch``)."""
        link = self.cluster
        assert link is not None
        key = (name, req.id)
        if key in self.claiming:
            self._refuse(transport, req, key)  # a newcomer on this node asked first
            return
        if not link.ok:
            self._unavailable(transport, req)
            return
        mode = self.config.room_by
        # Who may replace a holder on another node: the authorizer's grant, else (not in
        # token mode, where the token names the room) a newcomer with the holder's token.
        takeover = "2" if verdict.takeover else "3" if dead_epoch else \
            "0" if mode == "token" else "1"
        self.claiming.add(key)
        self.waiting[transport] = None
        d = link.claim(name, req.id, req.token, size, takeover,
                       self.config.room_events and mode != "none", dead_epoch)

        def answered(claim: Claim) -> None:
            self.claiming.discard(key)
            won = claim.outcome in ("ok", "takeover")
            if won and claim.first and self.events is not None:
                # Said even if the place is given back at once: the release that empties
                # the room again says room_finished.
                self.events.event("room_started", self._public(name))
            here = transport in self.waiting and self.waiting[transport] is None
            if here:
                del self.waiting[transport]
            if won and (not here or self.draining or self._over_limits(req)):
                link.withdraw(name, req.id, claim)
                won = False
            if not here:
                return  # the newcomer left meanwhile
            if self.draining:
                transport.close_with(CLOSE_GOING_AWAY, "Server shutting down")
            elif claim.outcome in ("ok", "takeover") and not won:
                self._over_limits(req, transport)
            elif claim.outcome == "taken" and claim.old is not None and not dead_epoch \
                    and self.config.takeover_probe:
                self._probe_remote(transport, req, name, size, verdict, claim.old)
            elif claim.outcome == "taken":
                self._refuse(transport, req, key)
            elif claim.outcome == "full":
                self._reject(transport, req, "room_full", room_full_text(size))
            elif claim.outcome == "banned":
                self._reject(transport, req, "banned", claim.row)
            elif not won:
                self._unavailable(transport, req)
            else:
                try:
                    self._claimed(transport, req, name, size, claim)
                except Exception:
                    log.failure("cluster: registering a claimed place failed")
                    room = self.rooms.get(name)
                    session = room.peers.get(req.id) if room is not None else None
                    if session is not None and session.transport is not transport:
                        session = None
                    announced = session is not None and session in link.rows
                    if session is not None:
                        self.depart(session, "internal_error")  # registered: it leaves
                    if not announced:  # its row was not released by depart
                        link.withdraw(name, req.id, claim)
                    transport.close_with(CLOSE_INTERNAL, E_INTERNAL)

        def failed(failure: Any) -> None:
            self.claiming.discard(key)
            log.warn("cluster: a claim failed: {e}", e=failure.getErrorMessage())
            if self.waiting.get(transport, False) is None:
                del self.waiting[transport]
                self._unavailable(transport, req)

        d.addCallbacks(answered, failed).addErrback(
            lambda f: log.failure("cluster: a claim's answer failed", failure=f))

    def _probe_remote(self, transport: PeerTransport, req: JoinRequest, name: str,
                      size: int, verdict: Verdict, old: tuple[str, str]) -> None:
        assert self.cluster is not None
        key = (name, req.id)
        self.claiming.add(key)
        self.waiting[transport] = None
        self.stats.probes["started"] += 1

        def answered(alive: bool) -> None:
            self.claiming.discard(key)
            self.stats.probes["holder_alive" if alive else "holder_dead"] += 1
            if self.waiting.get(transport, False) is not None:
                return  # the newcomer left meanwhile
            del self.waiting[transport]
            if alive:
                self._refuse(transport, req, key)
            else:
                self._claim(transport, req, name, size, verdict, dead_epoch=old[1])

        self.cluster.probe(old, name, req.id).addCallback(answered).addErrback(
            lambda f: log.failure("cluster: a probe's answer failed", failure=f))

    def remote_probe(self, room_name: str, peer_id: str, epoch: str,
                     answer: Callable[[bool], None]) -> None:
        """Another node's newcomer asks for ``peer_id``, held here with ``epoch``: alive if
        heard from within the last tenth of the probe window, or if it answers a ping
        within the window; dead if it does not, or is not here (a row left behind)."""
        room = self.rooms.get(room_name)
        cluster = self.cluster
        if (room_name, peer_id) in self.claiming:
            answer(True)  # a newcomer here is claiming it again: not a row left behind
            return
        if room is None or cluster is None:
            answer(False)
            return
        away = room.away.get(peer_id)
        if away is not None:
            answer(cluster.epoch_of(away) == epoch)  # its place is kept for its grace
            return
        holder = room.peers.get(peer_id)
        if holder is None or cluster.epoch_of(holder) != epoch:
            answer(False)
            return
        now = self.clock.seconds()
        window = self.config.takeover_probe
        if now - holder.last_seen < window * FRESH:
            answer(True)
            return
        holder.pinged_at = now
        holder.transport.send_ping()

        def verdict() -> None:
            # Whoever holds the id now: a reconnect here (or the holder going away)
            # keeps the row, and its epoch, for a live connection.
            room = self.rooms.get(room_name)
            current = (room.peers.get(peer_id) or room.away.get(peer_id)) if room else None
            if current is None or cluster.epoch_of(current) != epoch:
                answer(False)
            elif current is not holder or current.state != OPEN:
                answer(True)
            else:
                answer(holder.last_seen >= now)

        self.clock.callLater(window, verdict)

    def _claimed(self, transport: PeerTransport, req: JoinRequest, name: str, size: int,
                 claim: Claim) -> None:
        assert self.cluster is not None
        now = self.clock.seconds()
        room = self.rooms.get(name)
        if room is None:
            room = self._open_room(name, now, size, None, announce=False)
        session = Session(self, transport, room, req.id, req.token, req.address, now)
        # A row replaced (a holder elsewhere, or a dead or draining node's: the same client
        # back) is a takeover: nobody was told it left, nobody is told it joined.
        outcome = "takeover" if claim.replaced else "opened"
        if claim.old is not None:
            self.stats.takeovers["cluster"] += 1
        self._register(session, outcome, claim.members if claim.members else None)
        self.cluster.joined(session, claim)
        transport.attach(session)

    def _over_limits(self, req: JoinRequest, transport: PeerTransport | None = None) -> bool:
        """Whether --max-peers or --max-peers-per-ip is reached now (asked at a join, and
        again when a cluster claim comes back: the count may have moved while Redis
        answered); with ``transport``, refuse it."""
        if len(self.sessions) + len(self.away) >= self.config.max_peers:
            if transport is not None:
                self._reject(transport, req, "server_full", E_SERVER_FULL)
            return True
        if self._address_full(req.address):
            if transport is not None:
                self._reject(transport, req, "address_full", E_ADDRESS_FULL)
            return True
        return False

    def _unavailable(self, transport: PeerTransport, req: JoinRequest) -> None:
        self.stats.connections["cluster_unavailable"] += 1
        log.info("join rejected: {reason}", event="reject", reason="cluster_unavailable",
                 **self._who(req.id, req.address))
        transport.send_frame(error_frame(E_CLUSTER))
        transport.close_with(CLOSE_TRY_AGAIN, E_CLUSTER)

    def _room_size(self, verdict: Verdict) -> int:
        """The size of a room this join would create: --room-size, or a token's smaller
        ``room_size``; 0 (unlimited) in ``none`` mode."""
        cap = self.config.room_size
        if self.config.room_by == "none":
            return 0
        if verdict.room_size is None:
            return cap
        return min(verdict.room_size, cap) if cap else verdict.room_size

    def _open_room(self, name: str, now: float, size: int, match: str | None,
                   announce: bool = True) -> Room:
        """A room gets its first member here; ``announce``: and on any node (with
        --cluster, only the claim that found the room empty in Redis says so)."""
        room = self.rooms[name] = Room(name, now, size, match)
        if match is not None:
            self.matches.setdefault(match, []).append(room)
        if announce and self.events is not None:
            self.events.event("room_started", self.public_name(room))
        return room

    def match_room(self, queue: str, peer_id: str, size: int) -> str:
        """``--quick-match``: the room a join with token ``match:QUEUE`` goes to. The room of
        the queue that has ``peer_id`` as a member (a reconnect goes back to its room); else
        the oldest of the queue's rooms of ``size`` with a free seat; else a new room,
        ``match:QUEUE:N``, which no token can name directly (a queue has no ``:``). The
        rooms of a queue are looked through in turn: a join costs a dict look-up per live
        room of its queue."""
        rooms = self.matches.get(queue, ())
        for room in rooms:
            if peer_id in room.peers or peer_id in room.away:
                return room.name
        for room in rooms:
            if room.size == size and not room.full() and (room.name, peer_id) not in self.bans:
                return room.name
        self.match_number += 1
        return f"{MATCH_PREFIX}{queue}:{self.match_number}"

    def _await_verdict(self, transport: PeerTransport, req: JoinRequest,
                       later: Deferred[Any]) -> None:
        """The join waits, as a contender does (``waiting``, with no probe), until the
        authorizer can decide; a newcomer that closes meanwhile is simply forgotten."""
        self.waiting[transport] = None

        def again(_: object) -> None:
            if transport in self.waiting and self.waiting[transport] is None:
                del self.waiting[transport]
                self._join_later(transport, req)

        later.addBoth(again)

    def _join_later(self, transport: PeerTransport, req: JoinRequest) -> None:
        """A join that waited (on a probe or the authorizer) is tried again."""
        if self.draining:
            transport.close_with(CLOSE_GOING_AWAY, "Server shutting down")
            return
        try:
            joined = self.join(transport, req)
            if joined is not None:
                transport.attach(joined)
        except Exception:
            log.failure("a join that waited failed")
            transport.close_with(CLOSE_INTERNAL, E_INTERNAL)

    def _address_full(self, address: str) -> bool:
        cap = self.config.max_peers_per_ip
        return bool(cap) and self.per_address.get(address, 0) >= cap

    def _may_take_over(self, holder: Session, req: JoinRequest, now: float) -> str | None:
        """Why the newcomer may replace the holder at once (the cause of the takeover), or
        None: then the holder is asked (``_contend``)."""
        cfg = self.config
        if now - holder.last_seen > cfg.dead_after:
            return "silent"
        if cfg.room_by != "token" and holder.token == req.token:
            return "token"
        return None

    def _take_over(self, holder: Session, transport: PeerTransport, req: JoinRequest,
                   now: float, cause: str) -> Session:
        # Not a departure: the room hears nothing, so the reconnecting client's peer
        # connections survive.
        self._forget(holder)
        holder.transport.close_with(CLOSE_NORMAL, "Replaced by a new connection")
        session = Session(self, transport, holder.room, req.id, req.token, req.address, now)
        session.contacts = holder.contacts
        if self.cluster is not None:
            self.cluster.inherit(holder, session)
        self.stats.takeovers[cause] += 1
        self._register(session, "takeover")
        self._settle(holder)
        return session

    def _resume(self, away: Session, transport: PeerTransport, req: JoinRequest,
                now: float) -> Session:
        """A member back within its grace takes its place again, unseen by its room: no
        LEAVE went out, no JOIN goes out; what was queued for it is delivered after OPEN."""
        del self.away[away]
        del away.room.away[away.id]
        away.state = CLOSED
        self._uncount(away.address)  # the new connection counts for its own address
        session = Session(self, transport, away.room, req.id, req.token, req.address, now)
        session.contacts = away.contacts
        if self.cluster is not None:
            self.cluster.inherit(away, session)
        self._register(session, "resumed")
        return session

    # -- contention: is the holder of a place still there? ---------------------------------

    def _contend(self, transport: PeerTransport, req: JoinRequest, key: tuple[str, str],
                 suspects: list[Session], now: float) -> None:
        """A newcomer wants a place that is held: ``req.id`` (key ``(room, id)``), or a seat
        in a full room (key ``(room, "")``, ``suspects`` its members silent past a
        heartbeat). Refused at once (ID-TAKEN, Room is full) when nobody may be dead;
        otherwise it waits, without OPEN, on a probe of the suspects, and the probe decides
        (``_decide``). Issue 16: contention decides liveness, so that a reconnect after a
        network change needs no wait for the old socket's timeout.

        A suspect heard from within the last tenth of the probe window, or since a ping within the
        window, is alive. A probe costs one ping per suspect and none for one pinged within
        the window (that ping is the question); further contenders wait on the same probe
        (never two takeovers).
        """
        window = self.config.takeover_probe
        probe = self.probes.get(key)
        if probe is None:
            asked: dict[Session, float] = {}
            ping: list[Session] = []
            for session in suspects if window else ():
                if now - session.pinged_at < window:
                    if session.last_seen < session.pinged_at:
                        asked[session] = session.pinged_at  # a ping is on its way
                elif now - session.last_seen >= window * FRESH:
                    asked[session] = now
                    ping.append(session)
            if not asked:
                self._refuse(transport, req, key)
                return
            probe = self.probes[key] = Probe(key, asked)
            for session in asked:
                self.probed.setdefault(session, []).append(probe)
            probe.contenders.append((transport, req))
            self.waiting[transport] = probe
            self.stats.probes["started"] += 1
            probe.call = self.clock.callLater(window, self._window_passed, probe)
            for session in ping:
                session.pinged_at = now
                session.transport.send_ping()  # its pong may decide the probe at once
            return
        if len(probe.contenders) >= MAX_CONTENDERS:
            self._refuse(transport, req, key)
            return
        probe.contenders.append((transport, req))
        self.waiting[transport] = probe

    def _refuse(self, transport: PeerTransport, req: JoinRequest, key: tuple[str, str]) -> None:
        if key[1]:
            self.stats.connections["id_taken"] += 1
            log.info("join rejected: {reason}", event="reject", reason="id_taken",
                     **self._who(req.id, req.address))
            transport.send_frame(ID_TAKEN_FRAME)
            transport.close_with(CLOSE_POLICY, "ID is taken")
        else:
            room = self.rooms.get(key[0])
            size = room.size if room is not None else self.config.room_size
            self._reject(transport, req, "room_full", room_full_text(size))

    def heard(self, session: Session) -> None:
        """A pong from ``session``: decide each probe of it whose asked peers all answered."""
        for probe in list(self.probed.get(session, ())):
            if self.probes.get(probe.key) is probe and all(map(probe.answered, probe.asked)):
                self._decide(probe)

    def withdraw(self, transport: PeerTransport) -> None:
        """A waiting newcomer closed: it leaves its probe, and a probe nobody waits on ends
        without a verdict (a holder is never dropped for nobody)."""
        probe = self.waiting.pop(transport, None)
        if probe is not None:
            probe.contenders = [c for c in probe.contenders if c[0] is not transport]
            if not probe.contenders:
                self._end(probe)

    def _end(self, probe: Probe) -> list[tuple[PeerTransport, JoinRequest]]:
        """Forget ``probe``; its contenders, in the order they came."""
        if probe.call is not None and probe.call.active():
            probe.call.cancel()
        probe.call = None  # the call holds the probe: no cycle left for the collector
        del self.probes[probe.key]
        for session in probe.asked:
            probes = self.probed[session]
            probes.remove(probe)
            if not probes:
                del self.probed[session]
        for transport, _req in probe.contenders:
            self.waiting.pop(transport, None)
        return probe.contenders

    def _window_passed(self, probe: Probe) -> None:
        # The verdict waits for one more turn of the reactor: it runs timers before it reads
        # the sockets, and after a busy second a pong may be waiting, unread, for this probe.
        probe.call = self.clock.callLater(0, self._decide, probe, True)

    def _decide(self, probe: Probe, window_passed: bool = False) -> None:
        """The verdict, when every asked peer answered, the window passed, or one left.

        Only the window's end presumes anyone dead. For an id: a holder that answered keeps
        it (ID-TAKEN to every contender); a silent one is replaced by the first contender,
        as a takeover (no LEAVE); a holder gone meanwhile leaves an ordinary join. For a
        seat: the silent members are dropped, with LEAVE (but not one whose own id is being
        probed: that probe replaces it without a LEAVE), and the contenders join anew in
        order; a member silent past a heartbeat by then is asked in turn, so a seat's
        newcomer may wait a window a member.
        """
        contenders = self._end(probe)
        now = self.clock.seconds()
        dead = [s for s in probe.asked if s.state == OPEN and not probe.answered(s)
                and window_passed]
        here = any(s.state == OPEN for s in probe.asked)
        self.stats.probes["holder_dead" if dead else "holder_alive" if here else "holder_gone"] += 1
        if probe.key[1]:
            holder, = probe.asked
            if here and not dead:
                for transport, req in contenders:
                    self._refuse(transport, req, probe.key)
                return
            while dead and contenders:
                (transport, req), *contenders = contenders
                if req.address != holder.address and self._address_full(req.address):
                    self._reject(transport, req, "address_full", E_ADDRESS_FULL)
                    continue
                try:
                    transport.attach(self._take_over(holder, transport, req, now, "probe"))
                finally:
                    holder.transport.abort_connection()
                break
        else:
            for session in dead:
                if not any(p.key[1] for p in self.probed.get(session, ())):
                    self.depart(session, "probe")
                    session.transport.abort_connection()
        for transport, req in contenders:
            self._join_later(transport, req)

    def _settle(self, session: Session) -> None:
        """``session`` is no longer its place's holder: a probe asking it decides now."""
        if self.probed:
            for probe in list(self.probed.get(session, ())):
                if self.probes.get(probe.key) is probe:
                    self._decide(probe)

    def _register(self, session: Session, outcome: str,
                  members: list[str] | None = None) -> None:
        room = session.room
        room.peers[session.id] = session
        self._take_slot(session)
        self.per_address[session.address] = self.per_address.get(session.address, 0) + 1
        self.stats.connections[outcome] += 1
        log.info("peer joined room {room} ({outcome})", event="connect", outcome=outcome,
                 room=room.tag, peers=len(room.peers), **self._who(session.id, session.address))
        session.transport.send_frame(OPEN_FRAME)
        if self.config.room_events:
            self._tell_room(session, outcome, members)
        if self.events is not None and outcome == "opened":
            self.events.event("peer_joined", self.public_name(room), session.id)
        queue = room.queues.pop(session.id, None)
        if queue is not None:
            self._drop_queue(room, queue)
            for _sender, frame in queue.frames:
                session.transport.send_frame(frame)

    def _tell_room(self, session: Session, outcome: str,
                   members: list[str] | None = None) -> None:
        """``--room-events``: the newcomer gets PEERS (its room-mates' ids, in the order
        they joined; with --cluster, ``members``, every node's, as Redis lists them), and
        they get JOIN, unless it took its own id over (a reconnect: nobody was told it
        left). With --cluster and no ``members`` (a takeover or resume on this node), PEERS
        follows when Redis has listed them (this node's, if it cannot)."""
        peers = session.room.peers
        if members is None and self.cluster is not None:
            def listed(ids: list[str]) -> None:
                if session.state == OPEN:
                    session.transport.send_frame(
                        peers_frame([i for i in ids if i != session.id]))

            self.cluster.roster(session, listed)
        else:
            others = [i for i in members or session.room.members() if i != session.id]
            session.transport.send_frame(peers_frame(others))
        if outcome == "opened":
            frame = join_frame(session.id)
            for other in peers.values():
                if other is not session:
                    other.transport.send_frame(frame)

    # -- relaying --------------------------------------------------------------------------

    def route(self, sender: Session, msg: Inbound) -> None:
        stats = self.stats
        mtype = msg.type
        stats.received[mtype] += 1
        stats.activity += 1
        room = sender.room
        dst = msg.dst
        if dst is None:  # an app message to the whole room
            self._broadcast(sender, msg)
            return
        target = room.peers.get(dst)
        if target is not None:
            target.transport.send_frame(relay_frame(mtype, sender.id, dst, msg.payload))
            stats.relayed[mtype] += 1
            if self._track_contacts:
                _remember(sender, dst)
                _remember(target, sender.id)
            return
        if self.cluster is not None and dst not in room.away and valid_id(dst):
            # Perhaps connected to another node: cluster.Link.relay comes back to _offline
            # when nobody holds dst anywhere.
            self.cluster.relay(sender, room, dst, mtype,
                               relay_frame(mtype, sender.id, dst, msg.payload))
            return
        self._offline(sender, room, dst, mtype, None, msg.payload)

    def _offline(self, sender: Session, room: Room, dst: str, mtype: str,
                 frame: bytes | None, payload: msgspec.Raw | bytes = b"") -> None:
        """A message for ``dst``, connected nowhere: queued for it (EXPIRE if it does not
        come), or for what is never queued, dropped (EXPIRE for app messages)."""
        stats = self.stats
        if mtype not in QUEUED:
            stats.drops["offline"] += 1
            if mtype in self.config.app_message_types:
                self._expire(sender, dst)  # app messages are never queued
            return
        if not valid_id(dst):
            # No peer can ever hold this id: say so at once.
            stats.drops["invalid_dst"] += 1
            self._expire(sender, dst)
            return
        if frame is None:
            frame = relay_frame(mtype, sender.id, dst, payload)
        self._enqueue(room, dst, sender.id, frame, sender)

    def _broadcast(self, sender: Session, msg: Inbound) -> None:
        """An app message without ``dst``: to every other connected member of the room (not
        in ``none`` mode, which has no rooms: dropped there)."""
        if self.config.room_by == "none":
            self.stats.drops["no_dst"] += 1
            return
        frame = relay_frame(msg.type, sender.id, None, msg.payload)
        others = [p for p in sender.room.peers.values() if p is not sender]
        for other in others:
            other.transport.send_frame(frame)
        if self.cluster is not None:
            self.cluster.broadcast(sender.room.name, frame)
        self.stats.relayed[msg.type] += 1
        if others and self.config.rate_limit:
            # A frame to N peers costs the sender's bucket N: a room without a size cap must
            # not multiply what one peer may make the server send.
            sender.tokens -= len(others) - 1

    def _enqueue(self, room: Room, dst: str, sender_id: str, frame: bytes,
                 sender: Session | None, origin: str | None = None) -> None:
        """Queue ``frame`` from ``sender_id`` for ``dst``: ``sender`` its session here, or
        None for a sender connected to node ``origin`` (--cluster)."""
        cfg = self.config
        queue = room.queues.get(dst)
        room_cap = cfg.room_queue_limit if cfg.room_by != "none" else 0
        if (
            (queue is not None and len(queue.frames) >= cfg.queue_limit)
            or (room_cap and room.queued >= room_cap)
            or self.queued_bytes + len(frame) > cfg.total_queue_bytes
        ):
            # Keep the oldest messages; the sender learns at once, once per pair.
            self.stats.drops["queue_full"] += 1
            if sender is not None:
                self._log_drop(sender, "queue_full")
            if queue is None and len(room.queues) < cfg.room_queue_limit * 2:
                # An empty queue remembers that this pair was told, until it expires.
                queue = room.queues[dst] = OfflineQueue(self.clock.seconds())
                self.rooms_with_queues.add(room)
            if queue is None:  # past even that bound: told again, not stored
                self._tell_expired(room, sender_id, origin, dst)
            elif sender_id not in queue.told:
                queue.told.add(sender_id)
                self._tell_expired(room, sender_id, origin, dst)
            return
        if queue is None:
            queue = room.queues[dst] = OfflineQueue(self.clock.seconds())
            self.rooms_with_queues.add(room)
        if origin is not None:
            if queue.origins is None:
                queue.origins = {}
            queue.origins[sender_id] = origin
        queue.frames.append((sender_id, frame))
        queue.nbytes += len(frame)
        room.queued += 1
        self.queued_bytes += len(frame)

    def _drop_queue(self, room: Room, queue: OfflineQueue) -> None:
        room.queued -= len(queue.frames)
        self.queued_bytes -= queue.nbytes
        if not room.queues:
            self.rooms_with_queues.discard(room)

    def _expire(self, sender: Session, unreachable: str) -> None:
        self.stats.expiries += 1
        sender.transport.send_frame(expire_frame(unreachable, sender.id))

    def _tell_expired(self, room: Room, sender_id: str, origin: str | None, dst: str) -> None:
        """EXPIRE to ``sender_id``: here, or through the bus to its node ``origin``."""
        if origin is not None:
            if self.cluster is not None:
                self.cluster.expired(origin, room.name, sender_id, dst)
            return
        sender = room.peers.get(sender_id)
        if sender is not None:
            self._expire(sender, dst)

    def expire_queues(self, now: float) -> None:
        deadline = now - self.config.expire_timeout
        for room in list(self.rooms_with_queues):
            for dst, queue in list(room.queues.items()):
                if queue.created > deadline or dst in room.away:
                    continue  # a member within its grace gets its queue when it comes back
                del room.queues[dst]
                self._drop_queue(room, queue)
                for sender_id, _frame in queue.frames:
                    if sender_id in queue.told:
                        continue
                    queue.told.add(sender_id)
                    origins = queue.origins
                    self._tell_expired(room, sender_id,
                                       origins.get(sender_id) if origins else None, dst)
                self.stats.drops["expired"] += len(queue.frames)

    # -- other nodes (--cluster: cluster.Link) ------------------------------------------------

    def remote_relay(self, room_name: str, dst: str, src: str, origin: str,
                     frame: bytes) -> None:
        """A frame from ``src`` on node ``origin`` for ``dst``, which Redis says is here: to
        its socket, to its queue while it is away, else EXPIRE back."""
        room = self.rooms.get(room_name)
        target = room.peers.get(dst) if room is not None else None
        if target is not None:
            target.transport.send_frame(frame)
            if self._track_contacts:
                _remember(target, src)
        elif room is not None and dst in room.away:
            self._enqueue(room, dst, src, frame, None, origin)
        elif self.cluster is not None:
            self.cluster.expired(origin, room_name, src, dst)

    def remote_broadcast(self, room_name: str, frame: bytes) -> None:
        """An app message to the whole room from a member on another node."""
        room = self.rooms.get(room_name)
        if room is not None:
            for other in room.peers.values():
                other.transport.send_frame(frame)

    def remote_expire(self, room_name: str, src: str, dst: str) -> None:
        room = self.rooms.get(room_name)
        sender = room.peers.get(src) if room is not None else None
        if sender is not None:
            self._expire(sender, dst)

    def remote_takeover(self, room_name: str, peer_id: str, epoch: str) -> None:
        """A newcomer on another node took ``peer_id`` over (its token, or the
        authorizer's grant): the local holder with ``epoch`` gives way, unseen by its room."""
        room = self.rooms.get(room_name)
        if room is None or self.cluster is None:
            return
        holder = room.peers.get(peer_id) or room.away.get(peer_id)
        if holder is not None and self.cluster.epoch_of(holder) == epoch:
            self.replaced(holder)

    def _public(self, room_name: str) -> str:
        return self.config.key if self.config.room_by == "none" else room_name

    def room_finished(self, room_name: str) -> None:
        """--cluster: the room's last member on any node left (webhook room_finished,
        sent by the node whose release emptied it)."""
        if self.events is not None:
            self.events.event("room_finished", self._public(room_name))

    def node_lost(self, room_name: str, peer_id: str, emptied: bool) -> None:
        """--cluster: this node reaped ``peer_id`` of a dead node (webhook peer_left,
        reason node_lost; room_finished when that emptied the room)."""
        if self.events is not None:
            self.events.event("peer_left", self._public(room_name), peer_id, "node_lost")
            if emptied:
                self.events.event("room_finished", self._public(room_name))

    def remote_close(self, room_name: str, reason: str) -> None:
        """The admin API of another node closes ``room_name``: its members here go."""
        room = self.rooms.get(room_name)
        if room is not None:
            self.close_room(room, reason)

    def remote_remove(self, room_name: str, peer_id: str, reason: str) -> None:
        """The admin API of another node removes ``peer_id`` (``remove``)."""
        room = self.rooms.get(room_name)
        session = (room.peers.get(peer_id) or room.away.get(peer_id)) if room else None
        if session is not None:
            self.remove(session, reason)

    def replaced(self, session: Session) -> None:
        """``session``'s row belongs to another node's peer now: it leaves without a word
        to its room (that peer is its reconnect) and closes 1000."""
        if self.cluster is not None:
            self.cluster.forget(session)
        self.depart(session, "replaced", notify=False)
        session.transport.close_with(CLOSE_NORMAL, "Replaced by a new connection")

    def remote_joined(self, room_name: str, peer_id: str, node: str, fresh: bool,
                      seq: int, only: Session | None = None) -> None:
        """``peer_id`` joined ``room_name`` on ``node`` (claim number ``seq``): JOIN to the
        members here whose PEERS did not list it (with --room-events, for a fresh join),
        and what was queued here for it goes there. ``only``: a newcomer catching up on
        it (``cluster.Link.joined``), the others having been told."""
        room = self.rooms.get(room_name)
        if room is None or self.cluster is None:
            return
        if fresh and self.config.room_events and self.config.room_by != "none":
            frame = join_frame(peer_id)
            news = self.cluster.told
            for other in (only,) if only is not None else room.peers.values():
                if news(other, seq):
                    other.transport.send_frame(frame)
        queue = room.queues.pop(peer_id, None) if only is None else None
        if queue is not None:
            self._drop_queue(room, queue)
            origins = queue.origins or {}
            for sender_id, frame in queue.frames:
                self.cluster.forward(node, room_name, peer_id, sender_id,
                                     origins.get(sender_id, self.cluster.node), frame)

    def remote_left(self, room_name: str, peer_id: str, leave: bool, part: bool,
                    contacts: list[str] | None, seq: int, since: int = -1,
                    only: Session | None = None) -> None:
        """``peer_id`` of another node left ``room_name`` (release number ``seq``): LEAVE
        to the members here it would have told (in none mode, its ``contacts``; None when
        its node died and the reaper speaks: then whoever here talked to it), PART with
        --room-events; neither to a member whose PEERS came after it left, nor (``since``,
        a claim given back) to one whose PEERS came before that claim. ``only``: one
        member catching up on it."""
        room = self.rooms.get(room_name)
        if room is None or self.cluster is None:
            return
        news = self.cluster.told
        members = {only.id: only} if only is not None else room.peers
        peers = {i: s for i, s in members.items() if news(s, seq, since)}
        if leave:
            if not self._track_contacts:
                told = list(peers.values())
            elif contacts is not None:
                told = [peers[i] for i in contacts if i in peers]
            else:
                told = [s for s in peers.values() if s.contacts and peer_id in s.contacts]
            frame = leave_frame(peer_id)
            for other in told:
                other.transport.send_frame(frame)
        if part and self.config.room_events and self.config.room_by != "none":
            frame = part_frame(peer_id)
            for other in peers.values():
                other.transport.send_frame(frame)

    # -- bad input -------------------------------------------------------------------------

    def _log_drop(self, session: Session, reason: str) -> None:
        # Once per peer and reason: a flood of bad frames must not become a flood of logs.
        seen = session.drop_reasons
        if seen is None:
            seen = session.drop_reasons = set()
        if reason not in seen:
            seen.add(reason)
            log.info("dropped a message: {reason}", event="drop", reason=reason,
                     room=session.room.tag, **self._who(session.id, session.address))

    def bad_frame(self, session: Session, reason: str, now: float) -> None:
        """A frame that is not a message we accept. A spell of them cuts the peer off; the
        odd one over an hours-long session never does. The allowance is a bucket of
        ``bad_frame_limit`` (10) frames that refills at limit/``bad_frame_window`` (one a
        second): 11 in quick succession cut, one a second never does.

        Kept as ATM's generic cell rate algorithm (the token bucket as one timestamp): each
        bad frame moves ``session.bad_until`` on by one step (window/limit seconds) from no
        earlier than now, and a peer more than a window ahead is cut (half a step of slack
        absorbs rounding). One float a peer.
        """
        self.stats.drops[reason] += 1
        self._log_drop(session, reason)
        window = self.config.bad_frame_window
        step = window / self.config.bad_frame_limit
        session.bad_until = max(session.bad_until, now) + step
        if session.bad_until - now > window + step / 2:
            self.depart(session, "bad_frames")
            session.transport.close_with(CLOSE_POLICY, "Too many invalid messages")

    def rate_limited(self, session: Session, limited_for: float) -> None:
        self.stats.drops["rate_limit"] += 1
        self.stats.rate_limited += 1
        self._log_drop(session, "rate_limit")
        if limited_for >= self.config.rate_limit_grace:
            self.depart(session, "rate_limit")
            session.transport.send_frame(error_frame(E_RATE_LIMIT))
            session.transport.close_with(CLOSE_POLICY, E_RATE_LIMIT)

    def internal_error(self, session: Session) -> None:
        self.depart(session, "internal_error")
        session.transport.send_frame(error_frame(E_INTERNAL))
        session.transport.close_with(CLOSE_INTERNAL, E_INTERNAL)

    # -- leaving ---------------------------------------------------------------------------

    def _forget(self, session: Session) -> None:
        session.state = CLOSED
        self._free_slot(session)
        self._uncount(session.address)

    def _take_slot(self, session: Session) -> None:
        """``session`` is connected: in ``sessions``, its last sign of life in a slot."""
        self.sessions.add(session)
        seen = session.last_seen
        if self.free_slots:
            slot = self.free_slots.pop()
            self.seen[slot] = seen
            self.slot_of[slot] = session
        else:
            slot = len(self.seen)
            self.seen.append(seen)
            self.slot_of.append(session)
        session.slot = slot

    def _free_slot(self, session: Session) -> None:
        """``session`` is no longer connected; it keeps its last sign of life itself."""
        self.sessions.discard(session)
        slot = session.slot
        if slot is not None:
            session._seen = self.seen[slot]
            session.slot = None
            self.seen[slot] = INF
            self.slot_of[slot] = None
            self.free_slots.append(slot)

    def _uncount(self, address: str) -> None:
        left = self.per_address[address] - 1
        if left:
            self.per_address[address] = left
        else:
            del self.per_address[address]

    def socket_closed(self, session: Session, code: int | None, clean: bool) -> None:
        """The peer's socket closed: ``clean`` with a close frame carrying ``code`` (None
        for none), else without one. Issue 22 and docs/protocol.md, Departures:

        - close 1001 (a browser closes a page's sockets so: closed, reloaded, navigated
          away): the page is gone, and its room gets LEAVE at once;
        - no close frame after ``keepalive`` - 1 s of silence (the kernel's keepalive gave
          up: the network vanished): LEAVE at once;
        - anything else (``peer.disconnect()`` and ``peer.destroy()`` close without a code;
          a proxy or a network blip cuts the socket while the peer talks): the peer may
          come back, and keeps its place for ``reconnect_grace`` (``go_away``). No LEAVE,
          then or after: the stock client keeps its peer-to-peer connections when it leaves
          the server, and LEAVE would make its room-mates close theirs.
        """
        if session.state != OPEN:
            return
        keepalive = self.config.keepalive
        if clean and code == CLOSE_GOING_AWAY:
            self.depart(session, "closed")
        elif not clean and keepalive and \
                self.clock.seconds() - session.last_seen >= keepalive - 1:
            self.depart(session, "vanished")
        else:
            self.go_away(session, "left" if clean else "lost")

    def go_away(self, session: Session, reason: str) -> None:
        """``session``'s socket is gone but its place is kept for ``reconnect_grace``: its
        id and seat are its own, messages for it are queued (and EXPIRE as usual), and a
        join with its id and token takes it back (``_resume``). When the grace ends the
        membership ends, without LEAVE (``sweep``)."""
        if not self.config.reconnect_grace:
            self.depart(session, reason, leave=False)
            return
        room = session.room
        # Out of the connected set, but still counted for its address (--max-peers-per-ip):
        # a place kept is a place taken, until the grace ends or a reconnect takes it back.
        session.state = AWAY
        self._free_slot(session)
        session.transport = DETACHED
        if room.peers.get(session.id) is session:
            del room.peers[session.id]
        room.away[session.id] = session
        self.away[session] = (self.clock.seconds() + self.config.reconnect_grace, reason)
        log.info("peer away from room {room}: {reason}", event="away", reason=reason,
                 room=room.tag, **self._who(session.id, session.address))
        self._settle(session)

    def depart(self, session: Session, reason: str, notify: bool = True,
               leave: bool = True) -> None:
        """The peer's membership ends (closed, timed out, cut off, or its grace is over):
        tell its room once: LEAVE if ``leave``, and with room events PART, both unless
        ``notify`` is false (the room is closing as well)."""
        if session.state == CLOSED:
            return
        room = session.room
        if session.state == AWAY:
            session.state = CLOSED
            del self.away[session]
            del room.away[session.id]
            self._uncount(session.address)
        else:
            self._forget(session)
            if room.peers.get(session.id) is session:
                del room.peers[session.id]
        self.stats.disconnections[reason] += 1
        if self.cluster is not None:
            self.cluster.left(session, notify and leave, notify and self.config.room_events)
        log.info("peer left room {room}: {reason}", event="disconnect", reason=reason,
                 room=room.tag, duration=round(self.clock.seconds() - session.connected_at, 3),
                 **self._who(session.id, session.address))
        if notify and leave:
            frame = leave_frame(session.id)
            for other in self._told_of_departure(session):
                other.transport.send_frame(frame)
        if notify and self.config.room_events:
            frame = part_frame(session.id)
            for other in room.peers.values():
                other.transport.send_frame(frame)
        events = self.events
        if events is not None and (self.cluster is None or not self.cluster.quiet):
            events.event("peer_left", self.public_name(room), session.id, reason)
        if not room.peers and not room.away:
            # Nobody left to deliver to or to tell: forget the room and its queues.
            del self.rooms[room.name]
            if room.match is not None:
                self._forget_match(room)
            for queue in room.queues.values():
                self.queued_bytes -= queue.nbytes
            room.queues.clear()
            self.rooms_with_queues.discard(room)
            if events is not None and self.cluster is None:
                # With --cluster, the release that empties the room in Redis says so
                # (room_finished below).
                events.event("room_finished", self.public_name(room))
        self._settle(session)

    def _forget_match(self, room: Room) -> None:
        assert room.match is not None
        rooms = self.matches[room.match]
        rooms.remove(room)
        if not rooms:
            del self.matches[room.match]

    def _told_of_departure(self, session: Session) -> list[Session]:
        """The room, or in ``none`` mode the peers it exchanged messages with."""
        peers = session.room.peers
        if not self._track_contacts:
            return list(peers.values())
        return [peers[i] for i in session.contacts or () if i in peers]

    # -- operator control (admin.py) ----------------------------------------------------------

    def public_name(self, room: Room) -> str:
        """A room as the admin API and webhooks name it: in ``none`` mode the one namespace
        is named by the key."""
        return self._public(room.name)

    def room_key(self, name: str) -> str | None:
        """The registry's name for the room the admin API calls ``name`` (the inverse of
        ``public_name``), or None where no room can be called that (in ``none`` mode,
        anything but the key)."""
        if self.config.room_by == "none":
            return "" if name == self.config.key else None
        return name

    def room_named(self, name: str) -> Room | None:
        """The room the admin API calls ``name``, if it has peers."""
        key = self.room_key(name)
        return None if key is None else self.rooms.get(key)

    def remove(self, session: Session, reason: str, notify: bool = True) -> None:
        """An operator removes a peer: ERROR with ``reason``, LEAVE to its room (unless
        ``notify`` is false), then close 1008."""
        session.transport.send_frame(error_frame(reason))
        self.depart(session, "removed", notify)
        session.transport.close_with(CLOSE_POLICY, reason)

    def ban(self, room: str, peer_id: str, until: float, reason: str) -> None:
        """Refuse ``peer_id`` in the room the admin API calls ``room`` until ``until``
        (server clock), with ERROR ``reason``; the sweep forgets bans past their time."""
        key = self.room_key(room)
        if key is None:
            raise ValueError(f"no room can be called {room!r} in none mode")
        self.bans[(key, peer_id)] = (until, reason)

    def close_room(self, room: Room, reason: str) -> int:
        """Remove every peer of ``room`` (nobody is left to hear a LEAVE); how many."""
        peers = [*room.peers.values(), *room.away.values()]
        for session in peers:
            self.remove(session, reason, notify=False)
        return len(peers)

    # -- liveness --------------------------------------------------------------------------

    def sweep(self) -> None:
        """Ping idle peers, drop silent ones, expire queues. Never raises for one peer.

        The sessions idle over ``ping_interval`` are found in ``seen``, in one pass over an
        array, and only they are visited; a pass that finds the oldest sign of life recent
        enough goes no further. A walk of every session each second took 3.5 ms at rest
        with 10,000 wss peers, cold in the caches (docs/benchmarks-idle.md)."""
        cfg = self.config
        now = self.clock.seconds()
        started = now
        ping_after = cfg.ping_interval
        dead_after = cfg.dead_after
        seen = self.seen
        idle_ones: list[Session | None] = []
        if seen and now - min(seen) > ping_after:  # now - t only grows as t falls
            slot_of = self.slot_of
            idle_ones = [slot_of[i] for i, t in enumerate(seen) if now - t > ping_after]
        for session in idle_ones:
            if session is None or session.slot is None:
                continue  # gone meanwhile (a departure this sweep caused)
            idle = now - session.last_seen
            try:
                if idle > dead_after:
                    self.depart(session, "timeout")
                    session.transport.abort_connection()
                elif idle > ping_after and now - session.pinged_at >= ping_after:
                    session.pinged_at = now
                    session.transport.send_ping()
            except Exception:
                self.stats.sweep_errors += 1
                log.failure("sweep failed for one peer")
        if self.away:
            for session, (until, reason) in list(self.away.items()):
                if until <= now:
                    try:
                        self.depart(session, reason, leave=False)  # the grace is over
                    except Exception:
                        self.stats.sweep_errors += 1
                        log.failure("ending a reconnect grace failed")
        if self.bans:
            for key in [k for k, (until, _reason) in self.bans.items() if until <= now]:
                del self.bans[key]
        try:
            self.expire_queues(now)
        except Exception:
            self.stats.sweep_errors += 1
            log.failure("queue expiry failed")
        stats = self.stats
        stats.sweep_seconds.observe(self.clock.seconds() - started)
        stats.history.append((now, sum(stats.received.values())))

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "Server shutting down") -> None:
        for probe in list(self.probes.values()):
            for transport, _req in self._end(probe):
                transport.close_with(code, reason)
        for transport in [t for t, probe in self.waiting.items() if probe is None]:
            del self.waiting[transport]  # on the authorizer: its verdict comes to nothing
            transport.close_with(code, reason)
        for session in [*self.sessions, *self.away]:
            self.depart(session, "shutdown", notify=False)
            session.transport.close_with(code, reason)

    # -- HTTP helpers ----------------------------------------------------------------------

    def http_room_name(self, key: str, token: str) -> str:
        """The room an HTTP request's key and token name (``/peers``, ``/id``)."""
        mode = self.config.room_by
        return key if mode == "key" else "" if mode == "none" else token

    def _http_room(self, key: str, token: str) -> Room | None:
        return self.rooms.get(self.http_room_name(key, token))

    def new_id(self, key: str) -> str:
        """A UUID4 no peer of the key's namespace holds (in ``token`` mode the room is
        unknown to this request, and 122 random bits have to do)."""
        room = self._http_room(key, "")
        while True:
            candidate = str(uuid.uuid4())
            if room is None or (candidate not in room.peers and candidate not in room.away):
                return candidate

    def list_peers(self, key: str, token: str) -> list[str]:
        room = self._http_room(key, token)
        return [] if room is None else room.members()


def _remember(session: Session, other_id: str) -> None:
    contacts = session.contacts
    if contacts is None:
        contacts = session.contacts = set()
    if len(contacts) < MAX_CONTACTS:
        contacts.add(other_id)
