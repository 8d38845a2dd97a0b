"""The only Autobahn code: WebSocket frames in, ``Hub``/``Session`` calls; frames out.

Each ``PeerProtocol`` is also the ``PeerTransport`` of its session.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from time import perf_counter
from typing import Any
from urllib.parse import parse_qs, urlsplit

import autobahn.util
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.internet.tcp import Server
from twisted.logger import Logger
from twisted.python.failure import Failure

from .framing import PING_FRAME, PONG, accept_key, split_frames, text_frame
from .messages import CLOSE_INTERNAL, CLOSE_UNSUPPORTED, E_INTERNAL
from .rooms import Hub, JoinRequest
from .session import Session
from .stats import TIMING_SAMPLE
from .tls import TLSServer

log = Logger()

# Autobahn builds the arguments of its debug log calls even with debug off, and colours
# them with ANSI escapes through click whenever click happens to be importable: 16 calls
# and some 40 µs per connection, and escape codes in any line that is written. Plain text.
autobahn.util._HAS_CLICK = False


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


# Connections whose writeSomeData may be called directly: TCP, and TCP carrying TLS in
# the socket's own SSL object (tls.TLSServer).
_DIRECT_WRITE = (Server, TLSServer)


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but on a TCP connection (with or without TLS, see
    ``tls.py``) with nothing buffered the data goes to the socket at once.

    Twisted's write() registers the socket with epoll, waits for the next poll, sends,
    and unregisters it: two epoll_ctl calls and a dispatch per relayed message, a quarter
    of the server's CPU in the relay benchmark (docs/benchmarks.md). Whatever the kernel
    does not take at once is handed to write(), behind which everything else then queues.
    Should Twisted's private buffer attribute ever change, this falls back to write().
    """
    if (transport.__class__ in _DIRECT_WRITE and transport.connected
            and not transport.disconnecting and not transport.dataBuffer
            and not getattr(transport, "_tempDataBuffer", True) and not transport.TLS):
        sent = transport.writeSomeData(data)
        if sent == len(data):
            return
        if isinstance(sent, int):
            data = data[sent:]
    transport.write(data)


def _first(params: Mapping[str, list[str]], name: str) -> str:
    values = params.get(name)
    return values[0] if values else ""


def not_an_upgrade(params: Mapping[str, list[str]]) -> str:
    """What a plain HTTP request for ``{path}peerjs`` is told, with status 400: the query
    parameters a PeerJS client sends that it lacks, or that a WebSocket upgrade is needed."""
    missing = [name for name in ("key", "id", "token") if not _first(params, name)]
    if missing:
        return (f"Missing query parameters: {', '.join(missing)} "
                "(a PeerJS client's WebSocket connects here)")
    return "Expected a WebSocket upgrade (a PeerJS client's WebSocket connects here)"


# HTTP ends a header line at CRLF only (RFC 9112 section 2.2); str.splitlines, with which
# Autobahn reads a request head, also ends one at these, and at a bare CR or LF. A byte such as
# 0x85 (in a UTF-8 cookie, or put in X-Forwarded-For by a client behind nginx) would split a
# header in two there, and the client's own part could become the forwarded address.
_FALSE_LINE_END_CHARS = "\x0b\x0c\x1c\x1d\x1e\x85"
_FALSE_LINE_ENDS = str.maketrans(dict.fromkeys(_FALSE_LINE_END_CHARS, " "))
_BARE_CR_OR_LF = "\r(?!\n)|(?<!\r)\n"
_NOT_CRLF = re.compile(f"[{_FALSE_LINE_END_CHARS}]|{_BARE_CR_OR_LF}")
_BARE_CR_OR_LF_RE = re.compile(_BARE_CR_OR_LF)


def hide_origin(head: str) -> tuple[str, str | None, bool]:
    """``head`` (a request head, read as ISO-8859-1) with its one Origin header made a line
    Autobahn's parser skips (one starting with ':'), that header's value, and whether the
    head has an Upgrade header. Lines are split and headers named as Autobahn's parser does
    it. Two Origin headers are left in place, for Autobahn to refuse."""
    lines = head.splitlines(keepends=True)
    origins, upgrade = [], False
    for number, line in enumerate(lines[1:], 1):
        colon = line.find(":")
        if colon > 0:
            name = line[:colon].strip().lower()
            if name == "origin":
                origins.append(number)
            elif name == "upgrade":
                upgrade = True
    if len(origins) != 1:
        return head, None, upgrade
    line = lines[origins[0]]
    lines[origins[0]] = line[line.find(":"):]
    return "".join(lines), line[line.find(":") + 1:].strip(), upgrade


# Frames a newcomer whose join waits on a probe may send before its OPEN, kept for it.
MAX_EARLY_FRAMES = 16

# The largest upgrade request head accepted: Twisted's HTTP parser takes 16 KiB of header
# lines (not counting their line ends) besides the request line; this is a little more.
MAX_HEAD = 20480

_HANDSHAKE_LEFTOVERS = (
    "http_headers", "http_request_data", "http_request_params", "http_response_data",
    "http_status_line", "http_request_uri", "http_request_path", "http_request_host",
    "websocket_protocols", "websocket_extensions", "websocket_origin", "_wskey",
    "utf8validator",
    # Autobahn's event listeners ("message"), which nothing here listens to: fire() looks
    # only for listeners, and finds the class's None.
    "_valid_events", "_results",
)
# Autobahn state that is None for an open connection until it closes: dropped while None.
_NONE_WHILE_OPEN = (
    "join_request", "localCloseCode", "localCloseReason", "remoteCloseCode",
    "remoteCloseReason", "wasNotCleanReason", "websocket_protocol_in_use",
    "_perMessageCompress", "trackedTimings",
)


# What a browser's upgrade request holds, in the form the lean opening handshake takes; any
# other value goes to Autobahn, which judges it.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")
_PLAIN_EXTENSIONS = ("permessage-deflate; client_max_window_bits", "permessage-deflate")


class _SendQueue(list[tuple[bytes, bool]]):
    """The part of a deque Autobahn's send queue uses, at the size of a list."""

    __slots__ = ()

    def popleft(self) -> tuple[bytes, bool]:
        return self.pop(0)


class PeerFactory(WebSocketServerFactory):
    """Keeps the open WebSocket connections, so a stopping server can wait for them."""

    open_connections: set[PeerProtocol]


class PeerProtocol(WebSocketServerProtocol):
    hub: Hub
    factory: PeerFactory
    session: Session | None = None
    join_request: JoinRequest | None = None
    send_queue: Any
    openHandshakeTimeout: float
    # Set by the HTTP channel that handed this connection over (web.GuardedChannel).
    handshake_deadline: IDelayedCall | None = None
    # The 101 of a lean opening handshake (_open), until the first frame takes it along.
    _opening = b""
    # The Origin header of a request that Autobahn handshakes, until onConnect judges it.
    hidden_origin: str | None = None
    # Autobahn's protocol options, which make_factory puts on the class.
    trustXForwardedFor: int
    maxConnections: int
    autoPingInterval: float

    # -- Autobahn callbacks ----------------------------------------------------------------

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
        if self.is_closed.called:
            self.is_closed.result = None

    def onConnect(self, request: ConnectionRequest) -> None:
        cfg = self.hub.config
        if self.hub.draining:
            raise ConnectionDeny(503, "Server is draining")
        # The allowlist is the only judge of an Origin: any value opens without one, and
        # exactly the listed ones (null and file:// too) with one.
        origin = self.__dict__.pop("hidden_origin", None) or request.origin
        if not cfg.origin_allowed(origin):
            raise ConnectionDeny(403, "Origin not allowed")
        params = request.params
        assert self.transport is not None
        address = client_address(
            getattr(self.transport.getPeer(), "host", ""), request.headers, cfg.trusted_proxies
        )
        self.join_request = JoinRequest(
            _first(params, "key"), _first(params, "id"), _first(params, "token"), address,
            origin,
        )

    def processHandshake(self) -> None:
        """Autobahn's opening handshake, with two things left to peersig.

        Autobahn parses an Origin as a URL and refuses what it cannot parse (``capacitor:``
        without a host, an empty value) and ``null`` (the Origin of a page opened from a
        file); with ``setProtocolOptions`` its null flag is switched off again. So Autobahn
        is shown the request without its Origin header, and ``onConnect`` judges it.
        Header lines end at CRLF alone: a bare CR or LF is refused with a 400, and the other
        characters Python's splitlines ends a line at become spaces (see _FALSE_LINE_ENDS).
        A request without an Upgrade header (a newcomer's address bar) gets a 400 whose body
        says what ``not_an_upgrade`` says, where Autobahn would answer its status page (or,
        with that off, a bare 426 on newer versions and 400 on older).
        """
        end = self.data.find(b"\r\n\r\n")
        if end >= 0:
            head = self.data[:end].decode("iso-8859-1")
            if _BARE_CR_OR_LF_RE.search(head):
                self.failHandshake("Bare CR or LF in the request head")
                return
            head = head.translate(_FALSE_LINE_ENDS)  # one header line stays one line
            head, self.hidden_origin, upgrade = hide_origin(head)
            if not upgrade:
                target = head.partition("\n")[0].split()
                query = urlsplit(target[1]).query if len(target) == 3 else ""
                body = not_an_upgrade(parse_qs(query)).encode()
                self.sendData(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; "
                              b"charset=utf-8\r\nContent-Length: %d\r\nConnection: close"
                              b"\r\n\r\n%s" % (len(body), body))
                self.dropConnection(abort=False)
                return
            self.data = head.encode("iso-8859-1") + self.data[end:]
        super().processHandshake()

    def onOpen(self) -> None:
        req = self.join_request
        assert req is not None
        self.join_request = None
        # The handshake is over: drop what Autobahn kept of it (headers, query, response;
        # some 2 KB a peer, and there are tens of thousands of peers) and the state that is
        # None until a close; a later read finds the class's None. Incoming UTF-8 is
        # checked by the JSON decoder, so its validator goes too. Autobahn's send queue
        # stays empty (our frames are written at once): a list costs 56 bytes where an
        # empty deque costs 760. Then the attribute dict is rebuilt at its new size, as a
        # dict never shrinks by itself: 37 entries fit in 832 bytes, 46 took 1584.
        self._stop_handshake_deadline()
        attrs = self.__dict__
        attrs.pop("openHandshakeTimeout", None)  # the class's, unless the channel set one
        for name in _HANDSHAKE_LEFTOVERS:
            attrs.pop(name, None)
        for name in _NONE_WHILE_OPEN:
            if attrs.get(name, 0) is None:
                del attrs[name]
        if not self.send_queue:
            self.send_queue = _SendQueue()
        self.__dict__ = dict(attrs)
        try:
            joined = self.hub.join(self, req)
            if joined is not None:  # else it waits, or attach() already gave it its session
                self.session = joined
        except Exception:
            log.failure("join failed")
            self.close_with(CLOSE_INTERNAL, E_INTERNAL)

    def dataReceived(self, data: bytes) -> None:
        """Complete, unfragmented, masked text frames go straight to the session; anything
        else (handshake, control frames, fragments, partial or oversize frames) and all that
        follows it in this read goes through Autobahn, which stays the judge of the protocol.

        Autobahn's generic frame path costs several times what a signaling message needs
        (docs/benchmarks.md); this is the same parsing, done once for the common case.
        """
        if (self.session is None or self.state != self.STATE_OPEN or self.data
                or self.current_frame is not None or self.inside_message):
            if self.state == self.STATE_CONNECTING:
                if len(self.data) + len(data) > MAX_HEAD:
                    # Autobahn would buffer a request head without end; the same bound for
                    # a head that arrives whole.
                    self.data = b""
                    self.failHandshake("Request head too large")
                    return
                if not self.data and self._open(data):
                    return
            super().dataReceived(data)
            return
        pos = 0
        for payload, end in split_frames(data, self.maxMessagePayloadSize):
            pos = end
            if payload is PONG:
                self.onPong(b"")
                continue
            self.onMessage(payload, False)
            if self.state != self.STATE_OPEN:
                break  # closing: Autobahn reads the rest (the client's close reply)
        if pos < len(data):
            super().dataReceived(data[pos:] if pos else data)

    def _open(self, data: bytes) -> bool:
        """The opening handshake of a browser's upgrade request that arrived whole in one
        read, done here: Autobahn's generic one (a Deferred, a dozen debug log calls whose
        arguments are built all the same, options for extensions and subprotocols peersig
        never uses) was some 30% of the CPU of a connect (docs/benchmarks.md).

        It makes Autobahn's checks, in Autobahn's way, on requests of the usual form. Any
        other request (incomplete, repeated or unusual headers, a subprotocol, an unusual
        key or extension offer) and any request onConnect refuses is left to
        Autobahn: False, nothing done, and Autobahn answers it as it always has.
        """
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 != len(data) or self.trustXForwardedFor or self.maxConnections \
                or self.autoPingInterval or self.trackedTimings or self.factory.externalPort \
                or self.factory.headers:
            return False
        text = data[:end].decode("iso-8859-1")
        if _NOT_CRLF.search(text):
            return False  # processHandshake makes it a head of CRLF lines, or refuses it
        lines = text.split("\r\n")
        request_line = lines[0].split()
        if len(request_line) != 3 or request_line[0] != "GET" or request_line[2] != "HTTP/1.1":
            return False
        uri = request_line[1]
        if not uri.startswith("/") or uri.startswith("//") or "#" in uri or ";" in uri:
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            i = line.find(":")
            if i > 0:
                name = line[:i].strip().lower()
                if name in headers:
                    return False
                headers[name] = line[i + 1:].strip()
        host = headers.get("host")
        key = headers.get("sec-websocket-key", "")
        origin = headers.get("origin")
        extensions = headers.get("sec-websocket-extensions")
        if (host is None or headers.get("sec-websocket-version") != "13"
                or "sec-websocket-protocol" in headers or not _PLAIN_KEY.fullmatch(key)
                or (extensions is not None and extensions not in _PLAIN_EXTENSIONS)
                or "websocket" not in [v.strip().lower() for v in
                                       headers.get("upgrade", "").split(",")]
                or "upgrade" not in [v.strip().lower() for v in
                                     headers.get("connection", "").split(",")]):
            return False
        name, colon, port = host.rpartition(":")
        if colon and not host.endswith("]") and not port.strip().isdigit():
            return False
        path, _, query = uri.partition("?")
        request = ConnectionRequest(self.peer, headers, host, path, parse_qs(query), 13,
                                    origin or "", [], [])
        try:
            self.onConnect(request)
        except Exception:  # refused (or worse): Autobahn answers it
            return False
        accept = accept_key(key)
        server = self.factory.server
        response = "".join((
            "HTTP/1.1 101 Switching Protocols\r\n",
            f"Server: {server}\r\n" if server else "",
            "Upgrade: WebSocket\r\nConnection: Upgrade\r\n",
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n",
        ))
        # The 101 goes out with the first frame onOpen sends (OPEN, or the ERROR of a
        # refused join): one send where there were two.
        self._opening = response.encode()
        # The state Autobahn's succeedHandshake leaves.
        self.websocket_version = 13
        self.websocket_protocol_in_use = None
        self.websocket_extensions_in_use = []
        self.state = self.STATE_OPEN
        if self.openHandshakeTimeoutCall is not None:
            self.openHandshakeTimeoutCall.cancel()
            self.openHandshakeTimeoutCall = None
        self.inside_message = False
        self.current_frame = None  # type: ignore[assignment]  # None between frames
        try:
            self._onOpen()
        finally:
            self._write_opening()
        # Autobahn's is_open would now fire, for no one: a server's connections are not
        # waited for. It goes, with its 350 bytes a peer.
        del self.is_open
        return True

    def _write_opening(self, then: bytes = b"") -> bytes:
        """``then``, after the 101 if that has not gone out yet."""
        opening = self._opening
        if not opening:
            return then
        del self._opening
        if not then:
            write_now(self.transport, opening)
        return opening + then

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
            self.hub.depart(session, "closed" if wasClean else "lost")
        elif self.hub.waiting:
            self.hub.withdraw(self)  # gave up while its join waited on a probe

    # -- PeerTransport ---------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        self.session = session
        for frame in self.__dict__.pop("early", ()):
            if self.session is not None:
                self.onMessage(frame, False)

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> Any:
        if self.session is None and self.hub.waiting:
            self.hub.withdraw(self)  # closing before its probe ended: the holder stays
        return super().onCloseFrame(code, reasonRaw)

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
        # lines (with terminal colours) whether or not anyone logs at debug level.
        if self.state == self.STATE_OPEN:
            write_now(self.transport, PING_FRAME)

    def close_with(self, code: int, reason: str) -> None:
        if self.state == self.STATE_CONNECTING:
            # Still in its handshake (a drain can find it so): no close frame to send yet.
            self.dropConnection(abort=True)
            return
        # sendClose() admits only the application codes (1000, 3000-4999); a server may
        # send the protocol's own 1001/1003/1008/1011, so write the frame ourselves.
        self._write_opening()
        # At most 123 bytes (RFC 6455 section 5.5), cut where a character ends: a browser
        # fails the connection (1006) on a reason that is not UTF-8.
        raw = reason.encode()[:123].decode("utf-8", "ignore").encode()
        self.sendCloseFrame(code, raw, False)

    def abort_connection(self) -> None:
        self.dropConnection(abort=True)

    # -- a handshake deadline to the second (Autobahn's timers round down to whole seconds)

    def handshake_expired(self) -> None:
        self.handshake_deadline = None
        if self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)

    def _stop_handshake_deadline(self) -> None:
        call = self.__dict__.pop("handshake_deadline", None)
        if call is not None and call.active():
            call.cancel()


# What onOpen drops from each connection reads as None from the class.
for _name in _HANDSHAKE_LEFTOVERS + _NONE_WHILE_OPEN:
    setattr(PeerProtocol, _name, None)


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
        # RFC 6455 only: an older draft's client would be judged by Sec-WebSocket-Origin,
        # which onConnect does not read.
        versions=[13],
        # Protocol failures (1009 for an oversize frame) send a close frame, not a bare RST.
        failByDrop=False,
        openHandshakeTimeout=hub.config.handshake_timeout,
        closeHandshakeTimeout=2,
    )
    # Autobahn copies every protocol option from the factory into each new connection
    # (and pretty-prints the lot for a debug line, logged or not): a third of the CPU of
    # a connect, and a bigger dict per peer. Options the class already has are not
    # copied, so the class takes them, once.
    options = {name: getattr(factory, name) for name in PeerProtocol.CONFIG_ATTRS}
    # A function as a class attribute would be bound to the connection when looked up.
    options = {k: staticmethod(v) if callable(v) else v for k, v in options.items()}
    factory.protocol = type(  # type: ignore[assignment]
        "PeerProtocol", (PeerProtocol,), {"hub": hub, "CONFIG_ATTRS": (), **options})
    return factory
