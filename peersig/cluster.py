"""``--cluster URL``: several peersig nodes act as one server through Redis 7.0+ or Valkey
7.2+ (issue 23; ``docs/scaling.md``).

Facts live in keys, changed only by the scripts below (one round trip each, atomic);
messages go over pub/sub, which is at most once: every relay path that can lose one ends in
EXPIRE to the sender or in a key a later step reads. News of joins and departures
(JOIN, LEAVE, PART) lost so (a subscriber reconnecting) is not told again.

The rules stay in ``rooms.Hub``: it asks this module only the questions one process cannot
answer alone (who holds an id on another node, is the room full elsewhere, where does a
destination live).

Keys (``ps:`` prefix; ``R`` is a room name as ``Hub.rooms`` keys it, ``""`` in none mode):

- ``ps:node:N``: node N's lease, PX ``LEASE`` ms, refreshed every ``TICK`` s with
  ``SET XX``. A row is valid while its node's lease lives.
- ``ps:nodes``: ZSET node -> Redis time (ms) of its last refresh: who may need reaping.
- ``ps:peers:N``: SET of ``R\\0id``, the rows node N holds (what its reaper removes).
- ``ps:ids:{R}``: HASH id -> ``N|E|T``: the holder's node, its connection epoch (random
  per claim) and a digest of its token.
- ``ps:reap:N``: NX PX 10 s, the node reaping N (one reaper).
- ``ps:seq``: a counter that every claim and every release of a row takes a number from
  (``NUMBER``). A ``joined`` or ``left`` message carries its number, and each local member
  remembers the number of the roster its PEERS gave (``Link.seen``): it is told of a change
  only if the change is newer than that roster. News that arrives while a member's claim
  or roster is still being answered is kept for it (``Link.catch_up``), so the order in
  which the bus and the command connection bring the two does not matter (after a roster,
  departures are told again; joins are not, as PEERS only adds to a page's list).

Channels: ``ps:in:N`` (to node N: relay, expire, takeover, probe) and ``ps:ev`` (to every
node: joined, left). Two subscriptions per node, whatever the number of peers.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

import msgspec
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .messages import QUEUED
from .rooms import _remember
from .session import OPEN

if TYPE_CHECKING:
    from .rooms import Hub, Room
    from .session import Session

log = Logger()

# Seconds between lease refreshes, and the lease's length: a node silent for LEASE is
# dead to the others, whose reaper removes its rows at its next tick (so a killed node's
# room-mates hear LEAVE within LEASE + 2 TICK, about 5 s).
TICK = 1.0
LEASE = 3.0
# Every call to Redis gets an answer or fails within this many seconds.
DEADLINE = 1.0
# Seconds between attempts to reconnect to Redis, at most.
RECONNECT_MAX = 2.0
# The subscriber is deaf unless its own probe came back within this.
PROBE_WINDOW = 4.0

_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.decode

# The next number of ps:seq: one more than the last, and at least Redis's clock in
# microseconds, so that a counter lost or rolled back with Redis's data (a restart, a
# failover to a replica behind) never hands out a number again. Below 2^53: exact in Lua.
NUMBER = b"""
local function number()
  local seq = redis.call('INCR', 'ps:seq')
  local t = redis.call('TIME')
  local now = t[1] * 1000000 + t[2]
  if seq < now then
    seq = now
    redis.call('SET', 'ps:seq', string.format('%d', now))
  end
  return seq
end
"""

CLAIM = NUMBER + b"""
if redis.call('EXISTS', KEYS[3]) == 0 then return {'fenced'} end
local ban = redis.call('GET', KEYS[4])
if ban then return {'banned', ban} end
local old = redis.call('HGET', KEYS[1], ARGV[1])
local result = {'ok', '', '', 0}
if old then
  local node, epoch, digest = string.match(old, '^([^|]*)|([^|]*)|(.*)$')
  if node ~= ARGV[2] and redis.call('EXISTS', 'ps:node:' .. node) == 1 then
    if ARGV[6] == '2' or (ARGV[6] == '1' and digest == ARGV[4])
        or (ARGV[6] == '3' and epoch == ARGV[9]) then
      result = {'takeover', node, epoch, 0}
    else
      return {'taken', node, epoch}
    end
  else
    result = {'ok', node, epoch, 0}  -- a dead node's row, or this node's: replaced
  end
  redis.call('SREM', 'ps:peers:' .. node, ARGV[7])
else
  local members = redis.call('HLEN', KEYS[1])
  if tonumber(ARGV[5]) > 0 and members >= tonumber(ARGV[5]) then return {'full'} end
  if members == 0 then result[4] = 1 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[7])
result[5] = number()
if ARGV[8] == '1' then result[6] = redis.call('HKEYS', KEYS[1]) end
return result
"""

# ARGV[4], unless empty: the ``left`` message without its last item, the release's number
# (published here, so that no claim of the id elsewhere can come between).
RELEASE = NUMBER + b"""
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[3])
  local seq = number()
  if ARGV[4] ~= '' then redis.call('PUBLISH', 'ps:ev', ARGV[4] .. cmsgpack.pack(seq)) end
  if redis.call('EXISTS', KEYS[1]) == 0 then return 2 end
  return 1
end
return 0
"""

# A row still ours, or free, or held by a dead node: ours again (after an outage).
REASSERT = b"""
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and old ~= ARGV[3] then
  local node = string.match(old, '^([^|]*)')
  if node ~= ARGV[2] and redis.call('EXISTS', 'ps:node:' .. node) == 1 then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"""

# The admin API's DELETE of a peer connected to another node.
REMOVE = b"""
local row = redis.call('HGET', KEYS[1], ARGV[1])
if not row then return 0 end
return redis.call('PUBLISH', 'ps:in:' .. string.match(row, '^([^|]*)'), ARGV[2])
"""

# Every room with a member on some node, and its member count: key, count, key, count...
ROOMS = b"""
local out = {}
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', 'ps:ids:*', 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    table.insert(out, key)
    table.insert(out, redis.call('HLEN', key))
  end
until cursor == '0'
return out
"""

# The cross-node relays of one reactor turn, in order: ARGV = this node, then (room's ids
# key, destination, message) for each. For each, in order: the receivers of its PUBLISH,
# -1 (no holder anywhere) or -2 (held by this node).
RELAYS = b"""
local out = {}
for i = 2, #ARGV, 3 do
  local row = redis.call('HGET', ARGV[i], ARGV[i + 1])
  if not row then
    out[#out + 1] = -1
  else
    local node = string.match(row, '^([^|]*)')
    if node == ARGV[1] then
      out[#out + 1] = -2
    else
      out[#out + 1] = redis.call('PUBLISH', 'ps:in:' .. node, ARGV[i + 2])
    end
  end
end
return out
"""

LEASE_SCRIPT = b"""
local ok
if ARGV[3] == 'XX' then
  ok = redis.call('SET', KEYS[1], '1', 'XX', 'PX', ARGV[2])
else
  ok = redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
end
if not ok then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', 'ps:nodes', t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
if redis.call('EXISTS', 'ps:reaped:' .. ARGV[1]) == 1 then return 2 end
return 1
"""

REAP = NUMBER + b"""
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local gone = {}
local late = redis.call('ZRANGEBYSCORE', 'ps:nodes', '-inf', now - tonumber(ARGV[2]))
for _, node in ipairs(late) do
  if node ~= ARGV[1] and redis.call('EXISTS', 'ps:node:' .. node) == 0
      and redis.call('SET', 'ps:reap:' .. node, ARGV[1], 'NX', 'PX', 10000) then
    for _, member in ipairs(redis.call('SMEMBERS', 'ps:peers:' .. node)) do
      local room, id = string.match(member, '^(.*)%z([^%z]*)$')
      local key = 'ps:ids:{' .. room .. '}'
      local row = redis.call('HGET', key, id)
      if row and string.match(row, '^([^|]*)') == node then
        redis.call('HDEL', key, id)
        -- left: room, id, no node (the reaper speaks), LEAVE and PART, no contacts, news
        -- to every member (since -1)
        redis.call('PUBLISH', 'ps:ev', '\\153' .. cmsgpack.pack('left') .. cmsgpack.pack(room)
          .. cmsgpack.pack(id) .. cmsgpack.pack('') .. '\\195\\195\\192\\255'
          .. cmsgpack.pack(number()))
        table.insert(gone, member)
        table.insert(gone, redis.call('EXISTS', key))
      end
    end
    redis.call('DEL', 'ps:peers:' .. node)
    redis.call('SET', 'ps:reaped:' .. node, '1', 'PX', 3600000)
    redis.call('ZREM', 'ps:nodes', node)
  end
end
return gone
"""


# A room's ids and the number of the latest claim or release (``Link.roster``).
ROSTER = b"""
return {redis.call('HKEYS', KEYS[1]), redis.call('GET', 'ps:seq')}
"""

# The number of this node's own departures in ``Link.catch_up``: news to every claim in
# flight (each was answered before the release).
LATEST = 1 << 62


def _numbered(message: list[Any]) -> bytes:
    """``message`` encoded as the head of a msgpack array one item longer: the script
    that publishes it appends the number it took from ``ps:seq``."""
    assert len(message) < 15
    return bytes((0x90 | (len(message) + 1),)) + _encode(message)[1:]


# A cross-node relay waiting for the end of the reactor turn: sender, room, destination,
# message type, the frame for the destination.
Outgoing = tuple["Session", str, str, str, bytes]


class Claim(NamedTuple):
    """Redis's answer to ``Link.claim``: the ``outcome``, the ``row`` written (for ok and
    takeover), the room's ids when asked for (PEERS), and a former holder's (node, epoch)
    on a takeover."""

    outcome: str
    row: str
    members: list[str]
    old: tuple[str, str] | None
    # The room had no member on any node: this join starts it (webhook room_started).
    first: bool
    # The claim's number from ``ps:seq`` (0 unless ok or takeover).
    seq: int = 0
    # It replaced a row: a live holder's (``old``), a dead node's or this node's.
    replaced: bool = False
    # Joined and left news newer than the claim, heard before its answer (``Link.joined``
    # tells the newcomer).
    news: tuple[list[Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Target:
    """Where Redis is: a TCP ``host``/``port`` (``tls`` for ``rediss://``) or a Unix
    ``path``; ``db`` the database number; ``password`` and ``username`` if given."""

    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_url(url: str) -> Target:
    """``redis://[user:pass@]host[:port][/db]``, ``rediss://…`` or ``unix:/path[?db=N]``.
    Raises ValueError on anything else."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = dict(p.partition("=")[::2] for p in parts.query.split("&") if p)
        if not parts.path:
            raise ValueError("unix: needs a socket path")
        return Target(path=parts.path, db=int(query.get("db", "0")))
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("expected redis://host:port/db, rediss://… or unix:/path")
    db = parts.path.strip("/")
    return Target(host=parts.hostname, port=parts.port or 6379, db=int(db or "0"),
                  tls=parts.scheme == "rediss",
                  username=unquote(parts.username) if parts.username else None,
                  password=unquote(parts.password) if parts.password else None)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _ids_key(room: str) -> str:
    return "ps:ids:{" + room + "}"


def _ban_key(room: str, peer_id: str) -> str:
    return "ps:ban:{" + room + "}:" + peer_id


def _member(room: str, peer_id: str) -> str:
    return room + "\0" + peer_id


class Link(Service):
    """This node's part of the cluster: its lease, its subscriber, its calls to Redis.

    ``ok`` says whether cross-node work can be done now: the command connection is up, the
    subscriber is up and heard its own probe within ``PROBE_WINDOW``. Without it, joins
    that need Redis are refused (``Hub`` sends ERROR and closes 1013) and cross-node sends
    end in EXPIRE; connected peers and same-node relays go on.
    """

    def __init__(self, hub: Hub, target: Target, clock: Any, node: str | None = None) -> None:
        self.hub = hub
        self.target = target
        self.clock = clock
        self.node = node or os.urandom(6).hex()
        self.inbox = "ps:in:" + self.node
        self.lease_key = "ps:node:" + self.node
        self.peers_key = "ps:peers:" + self.node
        self.redis: Any = None
        self.subscriber: Any = None
        self.subscribed = False
        self.probe_seen = -1e9
        # Each local member's row in ps:ids:{R}, as a claim wrote it.
        self.rows: dict[Session, str] = {}
        # Each local member's roster number (``ps:seq``): its PEERS listed the room as it
        # was then, so it hears only of joins and departures numbered after it.
        self.seen: dict[Session, int] = {}
        # Rooms with claims or roster reads in flight here (with --room-events, where
        # PEERS is sent): for each, the joined and left news heard since it went out (and
        # this node's own departures, numbered LATEST), which the newcomer is told once
        # its number is known. Each lives until its call is answered or fails (DEADLINE).
        self.catch_up: dict[str, list[list[list[Any]]]] = {}
        # Set while ``fence`` closes this node's peers.
        self.fencing = False
        # Reaping waits until this node's own lease has held for two leases (after a start
        # or an outage every lease may have lapsed: nobody is reaped for that).
        self.steady_since: float | None = None
        self.last_tick = time.monotonic()
        self.leased = False
        self.leasing = False
        # Rows to give back whose RELEASE has not been answered yet: (room, id) -> row and
        # the ``left`` message to publish with it (b"" for none). Retried every tick: a row
        # left behind would hold its id for as long as this node lives.
        self.releases: dict[tuple[str, str], tuple[str, bytes]] = {}
        # Set when the node drains: its rows stay until the reaper removes them after the
        # lease, so that its peers can take their ids back on another node, unseen.
        self.handing_over = False
        # While true, departures here send no peer_left webhook: another node's reaper
        # sends it (a drain's peers, or this node's when it was reaped).
        self.quiet = False
        self.subscriptions = 0
        # Probes of holders on other nodes awaiting their answer (``probe``), by reference.
        self.probes: dict[str, Deferred[bool]] = {}
        self.probe_number = 0
        # Cross-node relays of this reactor turn, sent together (``_flush``).
        self.outbox: list[Outgoing] = []
        self.ticker = LoopingCall(self.tick)
        self.ticker.clock = clock

    # -- connections ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        import txredisapi

        factory = _persistent(txredisapi.RedisFactory)(None, self.target.db, 1, isLazy=True,
                                          charset=None, password=self.target.password,
                                          replyTimeout=DEADLINE, convertNumbers=False,
                                          username=self.target.username)
        self.redis = _connect(factory, self.target)
        self.subscriber = _subscribe(self, txredisapi)
        self.ticker.start(TICK, now=True)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self.ticker.running:
            self.ticker.stop()
        # Commands run in order on one connection: when the lease's DEL is answered, every
        # release before it (the drain's departures) is done.
        done = self._call("DEL", self.lease_key).addErrback(lambda _: None)
        done.addBoth(lambda _: self._disconnect())
        return done

    def _disconnect(self) -> Deferred[Any]:
        calls = [c.disconnect() for c in (self.redis, self.subscriber) if c is not None]
        return calls[0] if calls else succeed(None)

    @property
    def ok(self) -> bool:
        return (self.leased and self.subscribed
                and self.clock.seconds() - self.probe_seen <= PROBE_WINDOW)

    def _call(self, *args: Any) -> Deferred[Any]:
        """One command with a deadline: a command queued while Redis is unreachable fails
        after DEADLINE instead of waiting for the reconnect."""
        try:
            d: Deferred[Any] = self.redis.execute_command(*args)
        except Exception as e:  # not connected: a failure like any other
            return fail(e)
        return d.addTimeout(DEADLINE, self.clock)

    def _eval(self, script: bytes, keys: list[str], args: list[Any]) -> Deferred[Any]:
        try:
            d: Deferred[Any] = self.redis.eval(script, keys, args)
        except Exception as e:
            return fail(e)
        return d.addTimeout(DEADLINE, self.clock)

    def publish(self, channel: str, message: list[Any]) -> Deferred[Any]:
        if self.outbox:  # relays this turn go first: a LEAVE must not overtake them
            self._flush()
        return self._call("PUBLISH", channel, _encode(message))

    # -- liveness -------------------------------------------------------------------------

    def tick(self) -> None:
        """Every TICK: refresh the lease (or take it again after it lapsed, and write every
        row again), retry releases that failed, send the subscriber its probe, and reap
        dead nodes once steady. Never raises (the LoopingCall would stop)."""
        try:
            self._tick()
        except Exception:
            log.failure("cluster: a tick failed")

    def _tick(self) -> None:
        now = time.monotonic()
        gap = now - self.last_tick
        self.last_tick = now
        if gap > LEASE and self.leased:
            # This process stood still past its lease (SIGSTOP, a swap storm): others may
            # have reaped it and taken its ids. Its peers reconnect and claim afresh.
            log.warn("cluster: this node stalled {s:.1f} s, past its lease: closing its peers",
                     s=gap)
            self.fence()
        for (room, peer_id), (row, message) in list(self.releases.items()):
            self._release(room, peer_id, row, message)
        if not self.leasing:
            # XX while it holds: a lapsed lease shows as 0. Once lost, a plain SET (node ids
            # are unique) takes it back, whatever happened meanwhile.
            mode = "XX" if self.leased else "SET"
            self.leasing = True
            d = self._eval(LEASE_SCRIPT, [self.lease_key], [self.node, int(LEASE * 1000), mode])
            d.addCallbacks(self._leased, self._lease_failed)
            d.addBoth(self._lease_done)
        if self.subscribed:
            self.publish(self.inbox, ["probe"]).addErrback(lambda _: None)

    def _lease_done(self, _: Any) -> None:
        self.leasing = False

    def _leased(self, result: int) -> None:
        try:
            self._on_lease(result)
        except Exception:
            log.failure("cluster: handling the lease's answer failed")

    def _on_lease(self, result: int) -> None:
        if not result:  # SET XX found no lease: it lapsed (Redis was away, or restarted empty)
            log.warn("cluster: this node's lease lapsed; taking it again")
            self.leased = False
            self.steady_since = None
            return
        if not self.leased:
            log.info("cluster: node {node} leased", node=self.node)
            self.leased = True
            self.steady_since = self.clock.seconds()
            if result == 2:
                # Other nodes reaped this one while it could not reach Redis (a partition
                # of this node alone): its peers' room-mates were told LEAVE. They come
                # back as newcomers, whom their room-mates hear of. The marker goes only
                # once they are closed (until then, every lease says so again).
                log.warn("cluster: this node was reaped while away: closing its peers")
                self.fence(quiet=True)
                self._call("DEL", "ps:reaped:" + self.node).addErrback(lambda _: None)
                return
            if self.rows:
                self._reassert()
        elif self.steady_since is not None and \
                self.clock.seconds() - self.steady_since >= 2 * LEASE:
            self._reap()

    def _lease_failed(self, failure: Any) -> None:
        if self.leased:
            log.warn("cluster: Redis unreachable: {e}", e=failure.getErrorMessage())
        self.leased = False
        self.steady_since = None

    def _reassert(self) -> None:
        """After an outage, every local member's row again, unless another live node took
        its id meanwhile (then this node's socket gives way, close 1000)."""
        for session, row in list(self.rows.items()):
            room = session.room.name
            d = self._eval(REASSERT, [_ids_key(room), self.peers_key],
                           [session.id, self.node, row, _member(room, session.id)])

            def done(result: int, session: Session = session) -> None:
                if not result and session in self.rows:
                    self.hub.replaced(session)

            d.addCallbacks(done, lambda _: None)

    def _reap(self) -> None:
        d = self._eval(REAP, [], [self.node, int(LEASE * 1000)])

        def reaped(flat: list[Any]) -> None:
            for i in range(0, len(flat), 2):
                room, _, peer_id = flat[i].decode().rpartition("\0")
                log.info("cluster: reaped a peer of a dead node", room=room)
                # REAP published its ``left``.
                self.hub.node_lost(room, peer_id, emptied=not int(flat[i + 1]))

        d.addCallbacks(reaped, lambda f: log.warn("cluster: reap failed: {e}",
                                                  e=f.getErrorMessage()))

    def fence(self, quiet: bool = False) -> None:
        """Close every peer with 1012 (service restart): they reconnect and claim afresh.
        ``quiet``: the reaper already told of their departure (no peer_left again)."""
        self.leased = False
        self.steady_since = None
        self.quiet = quiet
        self.fencing = True
        try:
            self.hub.close_all(1012, "Service restart")
        finally:
            self.quiet = self.fencing = False

    # -- what the Hub asks ------------------------------------------------------------------

    def claim(self, room: str, peer_id: str, token: str, cap: int, takeover: str,
              members: bool, dead_epoch: str = "") -> Deferred[Claim]:
        """Ask for ``peer_id`` in ``room`` (at most ``cap`` members, 0 = no cap): fires
        with a ``Claim`` whose outcome is ok, takeover, taken, full or fenced (this node's
        lease lapsed). ``takeover``: "0" never, "1" from a holder with the same token,
        "2" from any holder (the authorizer granted it), "3" from the holder whose epoch
        is ``dead_epoch`` (a probe found it dead). For taken, ``old`` is the holder's
        (node, epoch). Fails when Redis does not answer."""
        row = f"{self.node}|{os.urandom(4).hex()}|{token_digest(token)}"
        heard = self._listen(room)
        d = self._eval(CLAIM, [_ids_key(room), self.peers_key, self.lease_key,
                               _ban_key(room, peer_id)],
                       [peer_id, self.node, row, token_digest(token), cap, takeover,
                        _member(room, peer_id), "1" if members else "0", dead_epoch])

        def answered(result: list[Any]) -> Claim:
            outcome = result[0].decode()
            if outcome == "banned":
                return Claim(outcome, result[1].decode(), [], None, False)
            if outcome == "taken" and len(result) == 3:
                return Claim(outcome, row, [], (result[1].decode(), result[2].decode()), False)
            if outcome not in ("ok", "takeover"):
                return Claim(outcome, row, [], None, False)
            old = (result[1].decode(), result[2].decode()) if outcome == "takeover" else None
            ids = [i.decode() for i in result[5]] if members else []
            seq = int(result[4])
            return Claim(outcome, row, ids, old, bool(result[3]), seq, bool(result[1]),
                         tuple(heard or ()))

        def lost(failure: Any) -> Any:
            self.withdraw(room, peer_id, Claim("lost", row, [], None, False))
            return failure

        return d.addCallbacks(answered, lost).addBoth(self._unlisten, room, heard)

    def joined(self, session: Session, claim: Claim) -> None:
        """``session`` holds ``claim.row``; its room-mates on other nodes hear of it
        (JOIN with --room-events, and the queues they hold for it), and a former holder
        elsewhere (``claim.old``: its node and epoch) gives way."""
        room = session.room.name
        self.rows[session] = claim.row
        if self.hub.config.room_events:  # told() of a member without an entry: always
            self.seen[session] = claim.seq
        # First joined (the former holder's node forwards what it queued for the id), then
        # the takeover (which may close that node's last member of the room).
        self.publish("ps:ev", ["joined", room, session.id, self.node, not claim.replaced,
                               claim.seq])
        if claim.old is not None:
            self.displace(room, session.id, claim.old)
        for news in claim.news:  # after its PEERS (Hub._register)
            self._tell(news, session)

    def roster(self, session: Session, tell: Callable[[list[str]], None]) -> None:
        """Call ``tell`` with the ids of ``session``'s room on every node (this node's, if
        Redis does not answer), for its PEERS after a takeover or resume here. Until then
        it hears news as its former connection would; from then on, only news numbered
        after the roster, and a departure told before the roster came is told again."""
        room = session.room.name
        heard = self._listen(room)

        def listed(result: list[Any]) -> None:
            if session in self.seen:
                self.seen[session] = int(result[1] or 0)
            tell([i.decode() for i in result[0]])
            for news in heard or ():
                if news[0] == "left":
                    self._tell(news, session)

        def lost(_: Any) -> None:
            tell(session.room.members())

        d = self._eval(ROSTER, [_ids_key(room)], []).addCallbacks(listed, lost)
        d.addBoth(self._unlisten, room, heard).addErrback(
            lambda f: log.failure("cluster: a roster failed", failure=f))

    def _listen(self, room: str) -> list[list[Any]] | None:
        """A claim or roster of ``room`` goes out: the list that keeps the news heard
        until it is answered (None without room events: no PEERS to catch up with)."""
        config = self.hub.config
        if not config.room_events or config.room_by == "none":
            return None
        heard: list[list[Any]] = []
        self.catch_up.setdefault(room, []).append(heard)
        return heard

    def _unlisten(self, result: Any, room: str, heard: list[list[Any]] | None) -> Any:
        """The call that ``heard`` listened for is answered (or failed): passes
        ``result`` on."""
        if heard is not None:
            lists = self.catch_up[room]
            lists[:] = [other for other in lists if other is not heard]
            if not lists:
                del self.catch_up[room]
        return result

    def _keep(self, room: str, news: list[Any]) -> None:
        for heard in self.catch_up.get(room, ()):
            heard.append(news)

    def _tell(self, news: list[Any], session: Session) -> None:
        """Tell one member ``news`` (a joined or left message) it may have missed: the
        Hub tells it if it is numbered after the member's roster (``told``)."""
        if session not in self.rows:
            return  # gone meanwhile
        if news[0] == "joined":
            _, room, peer_id, node, fresh, seq = news[:6]
            self.hub.remote_joined(room, peer_id, node, fresh, seq, session)
        else:
            _, room, peer_id, node, leave, part, contacts, since, seq = news[:9]
            self.hub.remote_left(room, peer_id, leave, part, contacts, seq, since, session)

    def told(self, session: Session, seq: int, since: int = -1) -> bool:
        """Whether a join or departure numbered ``seq`` is news to ``session``; with
        ``since`` (a claim given back, never announced), only if its roster came after
        that claim."""
        return since < self.seen.get(session, 0) < seq

    def unclaim(self, room: str, peer_id: str, row: str, message: bytes = b"") -> None:
        """Give back ``row`` (a departure, a newcomer that left, or a claim whose answer
        was lost: it may have been written all the same), until Redis has answered. With
        ``message`` (``left`` without its number), the release publishes it."""
        self.releases[(room, peer_id)] = (row, message)
        self._release(room, peer_id, row, message)

    def _release(self, room: str, peer_id: str, row: str, message: bytes) -> None:
        def done(result: int) -> None:
            if self.releases.get((room, peer_id), ("",))[0] == row:
                del self.releases[(room, peer_id)]
            if result == 2:  # the room's last member on any node
                self.hub.room_finished(room)

        if message and self.outbox:  # relays this turn go first: LEAVE must not overtake
            self._flush()
        self._eval(RELEASE, [_ids_key(room), self.peers_key],
                   [peer_id, row, _member(room, peer_id), message]
                   ).addCallbacks(done, lambda _: None)

    def displace(self, room: str, peer_id: str, old: tuple[str, str]) -> None:
        """The former holder of ``peer_id`` (its node and epoch) gives way: its row is no
        longer its own."""
        self.publish("ps:in:" + old[0], ["takeover", room, peer_id, old[1]])

    def probe(self, old: tuple[str, str], room: str, peer_id: str) -> Deferred[bool]:
        """Ask node ``old[0]`` whether its holder of ``peer_id`` (epoch ``old[1]``) is alive:
        it pings it, as one process asks its own holder (``Hub.remote_probe``). Fires
        True (alive) unless the answer is dead: no answer within the probe window and a
        second counts as alive (a holder is never presumed dead on broker silence)."""
        self.probe_number += 1
        ref = f"{self.node}:{self.probe_number}"
        answer: Deferred[bool] = Deferred()
        self.probes[ref] = answer

        def silence() -> None:
            if self.probes.pop(ref, None) is answer:
                answer.callback(True)

        call = self.clock.callLater(self.hub.config.takeover_probe + 1.0, silence)

        def done(alive: bool) -> bool:
            if call.active():
                call.cancel()
            return alive

        answer.addCallback(done)
        self.publish("ps:in:" + old[0], ["probe?", room, peer_id, old[1], self.node, ref]
                     ).addErrback(lambda _: None)
        return answer

    def hand_over(self) -> None:
        """The node drains: its lease ends now, and its rows are left to the other nodes'
        reaper (``handing_over``). Until the reaper comes, about LEASE later, a peer that
        reconnects on another node takes its id back unseen (the row's node is dead);
        room-mates of one that does not come back hear LEAVE from the reaper."""
        self.handing_over = True
        self.quiet = True  # the reaper tells of those that do not come back
        if self.ticker.running:
            self.ticker.stop()
        self._call("DEL", self.lease_key).addErrback(lambda _: None)

    def inherit(self, old: Session, new: Session) -> None:
        """A local takeover or resume: the new connection holds the old one's row."""
        row = self.rows.pop(old, None)
        if row is not None:
            self.rows[new] = row
        seen = self.seen.pop(old, None)
        if seen is not None:
            self.seen[new] = seen

    def forget(self, session: Session) -> str | None:
        """``session`` holds no row any more: its row, if it had one."""
        self.seen.pop(session, None)
        return self.rows.pop(session, None)

    def left(self, session: Session, leave: bool, part: bool) -> None:
        row = self.forget(session)
        if row is None or self.handing_over:
            return
        room = session.room.name
        message = b""
        part = part or (self.fencing and not self.quiet)  # its room-mates elsewhere: PART
        if leave or part:
            contacts = sorted(session.contacts) if session.contacts else None
            news = ["left", room, session.id, self.node, leave, part, contacts, -1]
            message = _numbered(news)
            # A claim or roster in flight here is answered before this release (one
            # connection, in order): its newcomer's PEERS will list this peer, and the Hub
            # told only the members of now.
            self._keep(room, [*news, LATEST])
        self.unclaim(room, session.id, row, message)

    def withdraw(self, room: str, peer_id: str, claim: Claim) -> None:
        """A won claim given back before its newcomer became a member (it left, a limit
        was reached meanwhile, the node drains), or one whose answer was lost (no
        ``claim.seq``: Redis may have run it): the row goes, a former holder elsewhere
        (``claim.old``) gives way all the same, and whoever may have heard of the id is
        told PART: the members whose PEERS came after the claim, or, when it replaced a
        holder (or nobody knows), every member. Not LEAVE: a takeover is the same client
        reconnecting, whose connections may live on."""
        everyone = claim.replaced or not claim.seq
        if claim.old is not None:
            self.displace(room, peer_id, claim.old)
        news = ["left", room, peer_id, self.node, False, True, None,
                -1 if everyone else claim.seq]
        # Claims and rosters in flight here were answered after this one.
        self._keep(room, [*news, LATEST])
        members = self.hub.rooms.get(room)
        if everyone and members is not None:
            # Members here were answered before this claim: only then is it news to them.
            for session in list(members.peers.values()):
                self._tell([*news, LATEST], session)
        self.unclaim(room, peer_id, claim.row, _numbered(news))

    def relay(self, sender: Session, room: Room, dst: str, mtype: str, frame: bytes) -> None:
        """Send ``frame`` to ``dst`` on whichever node holds it. No holder anywhere, or this
        node holds it (away): the Hub's offline path. A holder's node gone, or Redis
        unreachable: EXPIRE to the sender."""
        hub = self.hub
        if not self.ok:
            hub.stats.drops["cluster"] += 1
            hub._expire(sender, dst)
            return
        # The relays of one reactor turn go to Redis as one script call (RELAYS): under
        # load a turn brings many, and a call costs far more than a relay's own work.
        if not self.outbox:
            self.clock.callLater(0, self._flush)
        self.outbox.append((sender, room.name, dst, mtype, frame))

    def _flush(self) -> None:
        batch, self.outbox = self.outbox, []
        if not batch:
            return
        args: list[Any] = [self.node]
        for sender, room, dst, _mtype, frame in batch:
            args += [_ids_key(room), dst,
                     _encode(["relay", room, dst, sender.id, self.node, frame])]
        d = self._eval(RELAYS, [], args)
        d.addCallbacks(self._relayed, self._not_relayed, callbackArgs=(batch,),
                       errbackArgs=(batch,))
        d.addErrback(lambda f: log.failure("cluster: relays' answers failed", failure=f))

    def _relayed(self, results: list[int], batch: list[Outgoing]) -> None:
        hub = self.hub
        for (sender, room, dst, mtype, frame), receivers in zip(batch, results, strict=True):
            if sender.state != OPEN:
                # Gone meanwhile: what no node holds is queued all the same, as when it
                # was here; nobody is left to hear an EXPIRE.
                here = hub.rooms.get(room)
                if receivers < 0 and here is not None and mtype in QUEUED:
                    target = here.peers.get(dst)
                    if target is not None:
                        target.transport.send_frame(frame)
                    else:
                        hub._enqueue(here, dst, sender.id, frame, None)
                continue
            if receivers > 0:
                hub.stats.relayed[mtype] += 1
                if hub._track_contacts:
                    _remember(sender, dst)
            elif receivers < 0:
                target = sender.room.peers.get(dst)
                if target is not None:  # it joined here while Redis answered
                    target.transport.send_frame(frame)
                    hub.stats.relayed[mtype] += 1
                else:
                    hub._offline(sender, sender.room, dst, mtype, frame)
            else:
                hub._expire(sender, dst)

    def _not_relayed(self, failure: Any, batch: list[Outgoing]) -> None:
        hub = self.hub
        for sender, _room, dst, _mtype, _frame in batch:
            if sender.state == OPEN:
                hub.stats.drops["cluster"] += 1
                hub._expire(sender, dst)

    # -- the admin API, for the whole cluster ---------------------------------------------

    def ban(self, room: str, peer_id: str, seconds: float, reason: str) -> Deferred[Any]:
        """Refuse ``peer_id`` in ``room`` on every node for ``seconds``: a key in Redis,
        so the ban outlives a restart of peersig (and of Redis with persistence on)."""
        return self._call("SET", _ban_key(room, peer_id), reason,
                          "PX", max(1, int(seconds * 1000)))

    def remove(self, room: str, peer_id: str, reason: str) -> Deferred[bool]:
        """Ask the node holding ``peer_id`` to remove it; whether a node was there."""
        d = self._eval(REMOVE, [_ids_key(room)], [peer_id, _encode(["remove", room, peer_id,
                                                                       reason])])
        return d.addCallback(lambda receivers: receivers > 0)

    def members(self, room: str) -> Deferred[dict[str, str]]:
        """``room``'s members on every node: id -> node."""
        def rows(flat: list[bytes]) -> dict[str, str]:
            return {flat[i].decode(): flat[i + 1].decode().partition("|")[0]
                    for i in range(0, len(flat), 2)}

        return self._call("HGETALL", _ids_key(room)).addCallback(rows)

    def close_room(self, room: str, reason: str) -> None:
        """Every other node removes its members of ``room`` (admin ``DELETE /rooms/R``)."""
        self.publish("ps:ev", ["close", room, self.node, reason])

    def rooms(self) -> Deferred[dict[str, int]]:
        """Every room with a member on any node: name -> members (away ones included)."""
        def pairs(flat: list[Any]) -> dict[str, int]:
            return {flat[i].decode()[len("ps:ids:{"):-1]: int(flat[i + 1])
                    for i in range(0, len(flat), 2)}

        return self._eval(ROOMS, [], []).addCallback(pairs)

    def broadcast(self, room: str, frame: bytes) -> None:
        """An app message to the whole room: to its members on the other nodes."""
        if self.ok:
            self.publish("ps:ev", ["broadcast", room, self.node, frame])

    def forward(self, node: str, room: str, dst: str, src: str, origin: str,
                frame: bytes) -> None:
        """A frame queued here for ``dst``, now connected on ``node``."""
        self.publish("ps:in:" + node, ["relay", room, dst, src, origin, frame])

    def expired(self, node: str, room: str, src: str, dst: str) -> None:
        self.publish("ps:in:" + node, ["expire", room, src, dst])

    # -- what other nodes say --------------------------------------------------------------

    def received(self, channel: bytes, data: bytes) -> None:
        try:
            message = _decode(data)
            self._dispatch(message)
        except Exception:
            log.failure("cluster: a message from the bus failed")

    def _dispatch(self, message: list[Any]) -> None:
        kind = message[0]
        hub = self.hub
        if kind == "probe":
            self.probe_seen = self.clock.seconds()
            return
        hub.stats.activity += 1  # news from other nodes, like a message, should not wait
        if kind == "relay":
            _, room, dst, src, origin, frame = message
            hub.remote_relay(room, dst, src, origin, frame)
        elif kind == "expire":
            _, room, src, dst = message
            hub.remote_expire(room, src, dst)
        elif kind == "takeover":
            _, room, peer_id, epoch = message
            hub.remote_takeover(room, peer_id, epoch)
        elif kind == "broadcast":
            _, room, node, frame = message
            if node != self.node:
                hub.remote_broadcast(room, frame)
        elif kind == "probe?":
            _, room, peer_id, epoch, node, ref = message

            def reply(alive: bool) -> None:
                self.publish("ps:in:" + node, ["probed", ref, alive])

            hub.remote_probe(room, peer_id, epoch, reply)
        elif kind == "probed":
            _, ref, alive = message
            answer = self.probes.pop(ref, None)
            if answer is not None:
                answer.callback(bool(alive))
        elif kind == "close":
            _, room, node, reason = message
            if node != self.node:
                hub.remote_close(room, reason)
        elif kind == "remove":
            _, room, peer_id, reason = message
            hub.remote_remove(room, peer_id, reason)
        elif kind in ("joined", "left"):
            room, node = message[1], message[3]
            if node == self.node:
                return
            self._keep(room, message)
            # Items a later version appends are ignored.
            if kind == "joined":
                _, room, peer_id, node, fresh, seq = message[:6]
                hub.remote_joined(room, peer_id, node, fresh, seq)
            else:
                _, room, peer_id, node, leave, part, contacts, since, seq = message[:9]
                hub.remote_left(room, peer_id, leave, part, contacts, seq, since)

    def epoch_of(self, session: Session) -> str:
        row = self.rows.get(session, "")
        return row.split("|")[1] if row else ""


def _subscribe(link: Link, txredisapi: Any) -> Any:
    """A subscriber connection to ``link.inbox`` and ``ps:ev`` that subscribes again each
    time it reconnects (txredisapi restores no subscriptions by itself)."""

    class Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        def connectionMade(self) -> Any:
            d = super().connectionMade()

            def ready(_: Any) -> Any:
                return self.subscribe([link.inbox, "ps:ev"]).addCallback(subscribed)

            def subscribed(_: Any) -> None:
                link.subscribed = True
                link.subscriptions += 1
                if link.subscriptions > 1 and link.leased:
                    # What was published meanwhile is lost: a takeover among it would
                    # leave an id two holders. Every row is checked (and written) again.
                    link._reassert()

            if isinstance(d, Deferred):
                d.addCallback(ready).addErrback(lambda f: log.failure("cluster: subscribe",
                                                                      failure=f))
            else:
                ready(None)
            return d

        def connectionLost(self, reason: Any) -> None:
            link.subscribed = False
            super().connectionLost(reason)

        def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
            link.received(channel, message)

    factory = _persistent(txredisapi.SubscriberFactory)(isLazy=True)
    factory.protocol = Subscriber
    factory.charset = None
    factory.convertNumbers = False
    factory.password = link.target.password
    factory.username = link.target.username
    factory.dbid = link.target.db
    return _connect(factory, link.target)


def _persistent(factory_class: Any) -> Any:
    """``factory_class`` that never stops reconnecting. txredisapi 1.6 calls
    ``stopTrying`` when AUTH or SELECT fails, a timeout included, so one connection made
    while Redis hung would end the node's link for good (tests/test_cluster.py, Redis
    hung). A wrong password is retried too, and /health stays 503 meanwhile."""

    class Persistent(factory_class):  # type: ignore[misc]
        def stopTrying(self) -> Deferred[None]:
            return succeed(None)

    return Persistent


def _connect(factory: Any, target: Target) -> Any:
    """Start ``factory``'s connection to ``target``; its handler (the command API).
    Reconnects back off to at most RECONNECT_MAX s, not txredisapi's 10 s: a node must be
    back soon after Redis is."""
    from twisted.internet import reactor

    factory.maxDelay = RECONNECT_MAX
    endpoint: Any
    if target.path:
        endpoint = UNIXClientEndpoint(reactor, target.path, timeout=DEADLINE)
    else:
        endpoint = HostnameEndpoint(reactor, target.host, target.port, timeout=DEADLINE)
        if target.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(target.host), endpoint)
    factory.startConnecting(endpoint)
    return factory.handler
