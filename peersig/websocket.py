"""The only Autobahn code: WebSocket frames in, ``Hub``/``Session`` calls; frames out.

Each ``PeerProtocol`` is also the ``PeerTransport`` of its session. The opening handshake
is peersig's own (``handshake.py``); Autobahn reads the frames peersig's fast path leaves to
it (control frames, fragments, the close), through the reaches of ``upstream/autobahn.py``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from time import perf_counter
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from .framing import PING_FRAME, PONG, split_frames, text_frame
from .handshake import (
    MAX_HEAD,
    Refusal,
    Request,
    accept_response,
    judge,
    parse_head,
    refusal_response,
)
from .messages import CLOSE_INTERNAL, CLOSE_UNSUPPORTED, E_INTERNAL
from .rooms import Hub, JoinRequest
from .session import Session
from .stats import TIMING_SAMPLE
from .upstream import on
from .upstream.autobahn import (
    between_frames,
    enter_open,
    lighten_open,
    options_on_class,
    prepare_class,
    send_close,
)
from .upstream.twisted import write_now

log = Logger()


def client_address(peer_host: str, headers: Mapping[str, str], trusted_proxies: int) -> str:
    """The client's address: the TCP peer, or with ``trusted_proxies`` N the address N hops
    back in X-Forwarded-For (each trusted proxy appended the one before it).

    Every address is in one canonical form, however a proxy wrote it, so that a client
    counts once against ``--max-peers-per-ip``: a hop may carry a port (``ip:port``,
    ``[ipv6]:port``), quotes or brackets, upper-case or uncompressed IPv6, or an IPv4 client
    as IPv4-mapped IPv6 (as a dual-stack socket also gives it). A hop that is not an
    address (``unknown``, an RFC 7239 obfuscated name) gives the TCP peer, logged once.
    """
    if trusted_proxies > 0:
        forwarded = headers.get("x-forwarded-for", "")
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        if hops:
            hop = hops[-trusted_proxies] if len(hops) >= trusted_proxies else hops[0]
            address = canonical_address(hop)
            if address is not None:
                return address
            _unreadable_hop(hop)
    if peer_host.startswith("::ffff:"):
        return canonical_address(peer_host) or peer_host
    return peer_host


def canonical_address(text: str) -> str | None:
    """The IP address in one X-Forwarded-For hop, as ``ipaddress`` writes it, or None."""
    text = text.strip('"')
    if text.startswith("["):  # [2001:db8::7] or [2001:db8::7]:50001
        text, bracket, _port = text[1:].partition("]")
        if not bracket:
            return None
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # 203.0.113.7:50001
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)


_hop_logged = False


def _unreadable_hop(hop: str) -> None:
    global _hop_logged
    if not _hop_logged:
        _hop_logged = True
        log.warn("an X-Forwarded-For hop is not an address ({hop}): the TCP peer counts as "
                 "the client instead (logged once; check --trusted-proxies)", hop=hop[:80])



def _first(params: Mapping[str, list[str]], name: str) -> str:
    values = params.get(name)
    return values[0] if values else ""


# Frames a newcomer whose join waits on a probe may send before its OPEN, kept for it.
MAX_EARLY_FRAMES = 16

_HEAD_TOO_LARGE = Refusal(431, "Request Header Fields Too Large",
                          f"The request head is over {MAX_HEAD} bytes")


class PeerFactory(WebSocketServerFactory):
    """Keeps the open WebSocket connections, so a stopping server can wait for them."""

    open_connections: set[PeerProtocol]


class PeerProtocol(WebSocketServerProtocol):
    hub: Hub
    factory: PeerFactory
    session: Session | None = None
    # Set by the HTTP channel that handed this connection over (web.GuardedChannel): a
    # web.Deadline.
    handshake_deadline: Any = None
    # The request head read so far, until it is whole; then the 101 of the handshake,
    # until the first frame takes it along (one send where there were two).
    _head = b""
    _opening = b""
    _refused = False
    # Autobahn's protocol option, which make_factory puts on the class.
    maxMessagePayloadSize: int

    # -- the connection ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.factory.open_connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.open_connections.discard(self)
        self._stop_handshake_deadline()
        super().connectionLost(reason)
        # The session and this protocol point at each other, and so does Autobahn's
        # is_closed, resolved with this protocol. Unlinked, they are freed now, by
        # reference counting, instead of piling up as garbage for the cycle collector's
        # rare full passes (under churn, more dead peers than live ones).
        self.session = None
        self.is_closed.addCallback(lambda _: None)

    def dataReceived(self, data: bytes) -> None:
        """Complete, unfragmented, masked text frames go straight to the session; anything
        else (control frames, fragments, partial or oversize frames) and all that follows
        it in this read goes through Autobahn, which stays the judge of the protocol.
        Before that, the bytes are the request head (``_read_head``).

        Autobahn's generic frame path costs several times what a signaling message needs
        (docs/benchmarks.md); this is the same parsing, done once for the common case.
        """
        if self.session is None or not between_frames(self):
            if self.state == self.STATE_CONNECTING:
                self._read_head(data)
            else:
                super().dataReceived(data)
            return
        pos = 0
        for payload, end in split_frames(data, self.maxMessagePayloadSize):
            pos = end
            if payload is PONG:
                self.onPong(b"")
                continue
            self.onMessage(payload, False)
            if not between_frames(self):
                break  # closing: Autobahn reads the rest (the client's close reply)
        if pos < len(data):
            super().dataReceived(data[pos:] if pos else data)

    # -- the opening handshake ---------------------------------------------------------------

    def _read_head(self, data: bytes) -> None:
        if self._refused:
            return
        known = len(self._head)
        head = self._head + data if known else data
        end = head.find(b"\r\n\r\n", max(0, known - 3))
        if end < 0 or end + 4 > MAX_HEAD:
            if len(head) > MAX_HEAD:
                self.refuse(_HEAD_TOO_LARGE)  # not buffered without end
            else:
                self._head = head
            return
        self.__dict__.pop("_head", None)
        request = parse_head(head[:end])
        if isinstance(request, Refusal):
            self.refuse(request)
        else:
            self.upgrade(request, head[end + 4:])

    def upgrade(self, request: Request, rest: bytes = b"") -> None:
        """Answer the opening handshake ``request`` (its head read here, or by Twisted's
        HTTP parser for ``web.Root``): refused with an HTTP error (``handshake.judge``), or
        opened, joined, and ``rest`` (what came after the head) read as frames."""
        hub = self.hub
        cfg = hub.config
        verdict = judge(request, hub.draining, cfg.origin_allowed)
        if isinstance(verdict, Refusal):
            self.refuse(verdict)
            return
        assert self.transport is not None
        address = client_address(getattr(self.transport.getPeer(), "host", ""),
                                 {"x-forwarded-for": verdict.forwarded_for},
                                 cfg.trusted_proxies)
        params = verdict.params
        req = JoinRequest(_first(params, "key"), _first(params, "id"),
                          _first(params, "token"), address, verdict.origin or "")
        self._stop_handshake_deadline()
        self._opening = accept_response(verdict.key)
        enter_open(self)
        # The handshake is over: what Autobahn keeps for a closing connection goes until
        # then (upstream.autobahn.lighten_open), some hundreds of bytes of each peer.
        lighten_open(self)
        try:
            joined = hub.join(self, req)
            if joined is not None:  # else it waits, or attach() already gave it its session
                self.session = joined
        except Exception:
            log.failure("join failed")
            self.close_with(CLOSE_INTERNAL, E_INTERNAL)
        finally:
            self._write_opening()
        if rest:
            self.dataReceived(rest)

    def refuse(self, refusal: Refusal) -> None:
        """Answer the handshake with an HTTP error and close."""
        self._refused = True
        self.__dict__.pop("_head", None)
        self._stop_handshake_deadline()
        assert self.transport is not None
        self.transport.write(refusal_response(refusal))
        self.transport.loseConnection()

    def _write_opening(self, then: bytes = b"") -> bytes:
        """``then``, after the 101 if that has not gone out yet."""
        opening = self._opening
        if not opening:
            return then
        del self._opening
        if not then:
            write_now(self.transport, opening)
        return opening + then

    # -- frames in ---------------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            # Its join waits on a probe: PeerJS sends what it queued as soon as the socket
            # opens, before OPEN. A few frames wait for the session too.
            if not isBinary and self in self.hub.waiting:
                early = self.__dict__.setdefault("early", [])
                if len(early) < MAX_EARLY_FRAMES:
                    early.append(payload)
            return
        if isBinary:
            self.hub.stats.drops["binary"] += 1
            self.hub.depart(session, "binary")
            self.close_with(CLOSE_UNSUPPORTED, "Binary frames are not supported")
            return
        try:
            stats = self.hub.stats
            tick = stats.timing_tick = stats.timing_tick + 1
            if tick % TIMING_SAMPLE:
                session.received(payload)
            else:
                started = perf_counter()
                session.received(payload)
                stats.relay_seconds.observe(perf_counter() - started)
        except Exception:
            log.failure("handling a frame failed")
            self.hub.internal_error(session)

    def onPong(self, payload: bytes) -> None:
        session = self.session
        if session is not None:
            session.alive()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session = self.session
        if session is not None:
            self.hub.socket_closed(session, code, wasClean)
        elif self.hub.waiting:
            self.hub.withdraw(self)  # gave up while its join waited on a probe

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> Any:
        if self.session is None and self.hub.waiting:
            self.hub.withdraw(self)  # closing before its probe ended: the holder stays
        return super().onCloseFrame(code, reasonRaw)

    # -- PeerTransport -----------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        self.session = session
        for frame in self.__dict__.pop("early", ()):
            if self.session is not None:
                self.onMessage(frame, False)

    def send_frame(self, frame: bytes) -> None:
        # A peer whose close is under way still sits in its room until its onClose runs
        # (two peers of a room closing in one reactor turn): it gets nothing more.
        if self.state == self.STATE_OPEN:
            # One unmasked, unfragmented text frame: the header is all Autobahn's
            # sendMessage would add, at a fraction of its cost.
            data = text_frame(frame)
            if self._opening:
                data = self._write_opening(data)
            write_now(self.transport, data)

    def send_ping(self) -> None:
        # An empty ping frame, written directly: Autobahn's sendPing formats debug log
        # lines whether or not anyone logs at debug level.
        if self.state == self.STATE_OPEN:
            write_now(self.transport, PING_FRAME)

    def close_with(self, code: int, reason: str) -> None:
        if self.state == self.STATE_CONNECTING:
            # Still in its handshake (a drain can find it so): no close frame to send yet.
            self._abort_handshake()
            return
        self._write_opening()
        # At most 123 bytes (RFC 6455 section 5.5), cut where a character ends: a browser
        # fails the connection (1006) on a reason that is not UTF-8.
        send_close(self, code, reason.encode()[:123].decode("utf-8", "ignore").encode())

    def abort_connection(self) -> None:
        self.dropConnection(abort=True)

    # -- a handshake deadline to the second (Autobahn's timers round down to whole seconds)

    def handshake_expired(self) -> None:
        self.handshake_deadline = None
        if self.state == self.STATE_CONNECTING:
            self._abort_handshake()

    def _abort_handshake(self) -> None:
        self._refused = True
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _stop_handshake_deadline(self) -> None:
        deadline = self.__dict__.pop("handshake_deadline", None)
        if deadline is not None:
            deadline.cancel()


class _AutobahnSends(PeerProtocol):
    """With ``fast_frames`` off: frames out through Autobahn's public sendMessage and
    sendPing (frames in then always go through Autobahn, see ``between_frames``)."""

    def send_frame(self, frame: bytes) -> None:
        if self.state == self.STATE_OPEN:
            self._write_opening()
            self.sendMessage(frame, False)

    def send_ping(self) -> None:
        if self.state == self.STATE_OPEN:
            self.sendPing()


def make_factory(hub: Hub, **kwargs: Any) -> PeerFactory:
    """A factory whose protocols all share ``hub``; frame limits come from its config."""
    factory = PeerFactory(**kwargs)
    factory.open_connections = set()
    size = hub.config.max_message_size
    factory.setProtocolOptions(
        maxFramePayloadSize=size,
        maxMessagePayloadSize=size,
        # Our JSON decoder rejects invalid UTF-8 itself.
        utf8validateIncoming=False,
        # Protocol failures (1009 for an oversize frame) send a close frame, not a bare RST.
        failByDrop=False,
        # The opening handshake is peersig's, with its own deadline (web.GuardedChannel).
        openHandshakeTimeout=0,
        closeHandshakeTimeout=2,
    )
    base = PeerProtocol if on("fast_frames") else _AutobahnSends
    cls = options_on_class(factory, base)
    cls.hub = hub  # type: ignore[attr-defined]
    prepare_class(cls)
    factory.protocol = cls  # type: ignore[assignment]
    return factory
