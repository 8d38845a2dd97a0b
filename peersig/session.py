"""One connected peer: liveness, rate limit and frame handling, independent of Autobahn.

A ``Session`` exists from registration (OPEN sent) until departure. It talks to its socket
only through ``PeerTransport``; the WebSocket protocol in ``websocket.py`` is one
implementation, the fakes in the tests are another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .messages import HEARTBEAT, BadFrame, parse_frame

if TYPE_CHECKING:
    from .rooms import Hub, Room


class PeerTransport(Protocol):
    """What the core needs from a peer's socket."""

    def send_frame(self, frame: bytes) -> None:
        """Send one text frame (UTF-8 JSON)."""

    def attach(self, session: Session) -> None:
        """The join this transport made, left pending by ``Hub.join``, has opened."""

    def send_ping(self) -> None:
        """Send a WebSocket ping; the browser answers it without any page code."""

    def close_with(self, code: int, reason: str) -> None:
        """Start a clean WebSocket close."""

    def abort_connection(self) -> None:
        """Drop the TCP connection at once (the peer is presumed gone)."""


OPEN = 1
CLOSED = 2
# Its socket closed, but it may come back: it keeps its id and seat for the reconnect grace
# (``Hub.socket_closed``), with no transport.
AWAY = 3


class Detached:
    """The transport of a peer whose socket is gone: what the core sends it goes nowhere."""

    def send_frame(self, frame: bytes) -> None:
        pass

    def attach(self, session: Session) -> None:
        pass

    def send_ping(self) -> None:
        pass

    def close_with(self, code: int, reason: str) -> None:
        pass

    def abort_connection(self) -> None:
        pass


DETACHED = Detached()

# Peers a session remembers having talked to, for LEAVE in ``none`` mode.
MAX_CONTACTS = 64


class Session:
    __slots__ = (
        "_seen",
        "address",
        "bad_until",
        "connected_at",
        "contacts",
        "drop_reasons",
        "hub",
        "id",
        "last_drop",
        "limited_since",
        "pinged_at",
        "refilled_at",
        "room",
        "slot",
        "state",
        "token",
        "tokens",
        "transport",
    )

    def __init__(
        self,
        hub: Hub,
        transport: PeerTransport,
        room: Room,
        peer_id: str,
        token: str,
        address: str,
        now: float,
    ) -> None:
        self.hub = hub
        self.transport = transport
        self.room = room
        self.id = peer_id
        self.token = token
        self.address = address
        self.state = OPEN
        self.connected_at = now
        # Its last sign of life: in ``hub.seen[slot]`` while connected (``Hub.sweep`` reads
        # them all there), here otherwise.
        self.slot: int | None = None
        self._seen = now
        self.pinged_at = -1e18  # when the server last pinged it: never yet
        self.tokens = hub.config.rate_limit
        self.refilled_at = now
        self.limited_since = 0.0
        self.last_drop = -1e18
        self.bad_until = now
        self.contacts: set[str] | None = None
        self.drop_reasons: set[str] | None = None

    def __repr__(self) -> str:
        return f"<Session {self.id!r} in {self.room.name!r}>"

    @property
    def last_seen(self) -> float:
        """When it last gave a sign of life (a frame, a pong), on the hub's clock, s."""
        slot = self.slot
        return self._seen if slot is None else self.hub.seen[slot]

    @last_seen.setter
    def last_seen(self, when: float) -> None:
        slot = self.slot
        if slot is None:
            self._seen = when
        else:
            self.hub.seen[slot] = when

    def alive(self) -> None:
        """Any sign of life (a pong) other than a frame."""
        hub = self.hub
        self.last_seen = hub.clock.seconds()
        if hub.probed:  # a probe may be waiting for this very pong
            hub.heard(self)

    def received(self, data: bytes) -> None:
        """One text frame from the peer."""
        hub = self.hub
        now = hub.clock.seconds()
        slot = self.slot
        if slot is None:  # no longer connected
            self._seen = now
            return
        hub.seen[slot] = now  # last_seen, without the property's call: every frame
        rate = hub.config.rate_limit
        if rate:
            tokens = self.tokens + (now - self.refilled_at) * rate
            self.refilled_at = now
            if tokens > rate:
                tokens = rate
            if tokens < 1.0:
                self.tokens = tokens
                self._over_limit(now)
                return
            self.tokens = tokens - 1.0
        try:
            msg = parse_frame(data, hub.config.app_message_types)
        except BadFrame as e:
            hub.bad_frame(self, e.reason, now)
            return
        if msg.type == HEARTBEAT:
            hub.stats.received[HEARTBEAT] += 1
            return
        hub.route(self, msg)

    def _over_limit(self, now: float) -> None:
        # Drops less than a second apart make one spell of flooding; a peer still
        # flooding after ``rate_limit_grace`` seconds of it is cut off.
        if now - self.last_drop > 1.0:
            self.limited_since = now
        self.last_drop = now
        self.hub.rate_limited(self, now - self.limited_since)
