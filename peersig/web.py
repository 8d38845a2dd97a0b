"""HTTP beside the WebSocket on one port: banner, id, peers, health, metrics, CORS.

One leaf resource routes every request, so each URL of ``docs/protocol.md`` is found here.
A request for ``{path}peerjs`` is a WebSocket opening handshake, answered by a
``PeerProtocol`` (``handshake.py``): the connection is handed to it.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, ILoggingContext, IProtocolFactory
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer_only

from . import __version__, demo, handshake
from .messages import E_INTERNAL, E_RATE_LIMIT
from .metrics import CONTENT_TYPE, make_registry, render, summary
from .rooms import Hub, JoinRequest, Pending, Refusal
from .stats import Stats
from .turn import AddressRate, ice_configuration
from .upstream.twisted import take_transport
from .websocket import PeerFactory, PeerProtocol, client_address

log = Logger()

BANNER = {
    "name": "peersig",
    "description": "A PeerJS-compatible WebRTC signaling server.",
    "version": __version__,
}


# GET {path}{key}/ice per client address: a burst of 10, then one a second.
ICE_BURST = 10
ICE_RATE = 1.0


class Root(Resource):
    isLeaf = True

    def __init__(self, hub: Hub, websocket: PeerFactory) -> None:
        super().__init__()
        self.hub = hub
        self.websocket = websocket
        self.path = hub.config.path
        self.metrics = make_registry(hub)
        # A page asks once per Peer it creates, and again on a reconnect.
        self.ice_rate = AddressRate(ICE_RATE, ICE_BURST)
        self.demo = demo.page(hub.config) if hub.config.demo else None

    def render(self, request: Request) -> Any:
        raw = request.path.decode("utf-8", "replace")
        if not raw:
            # "GET ?x" has no path, and an origin-form target starts with "/" at least
            # (RFC 9112 section 3.2.1); Twisted passes it on with an empty path.
            request.setResponseCode(400)
            return b""
        if raw == self.path + "peerjs":
            return self._upgrade(request)
        self._cors(request)
        if request.method == b"OPTIONS":
            request.setResponseCode(204)
            return b""
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD, OPTIONS")
            return b""
        if raw.rstrip("/") == "/health":
            return self._health(request)
        if raw.rstrip("/") == "/demo" and self.demo is not None:
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"x-content-type-options", b"nosniff")
            request.setHeader(b"referrer-policy", b"no-referrer")
            return self.demo
        if raw.rstrip("/") == "/metrics":
            if b"application/json" in (request.getHeader(b"accept") or b""):
                return _json(request, summary(self.hub))
            request.setHeader(b"content-type", CONTENT_TYPE.encode())
            return render(self.metrics)
        if raw == self.path or raw + "/" == self.path:
            return _json(request, BANNER)
        if raw.startswith(self.path):
            parts = raw[len(self.path):].rstrip("/").split("/")
            if len(parts) == 2 and parts[0]:
                key, what = parts
                if what == "id":
                    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                    return self.hub.new_id(key).encode()
                if what == "peers":
                    return self._peers(request, key)
                if what == "ice":
                    return self._ice(request, key)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Not found"

    def _upgrade(self, request: Request) -> Any:
        """A request for ``{path}peerjs`` that Twisted's HTTP parser read (HTTP/1.0, a
        later request on a kept-alive connection): the connection goes to a
        ``PeerProtocol``, which answers it as it answers one it read itself."""
        channel = request.channel
        transport = channel.transport
        assert transport is not None
        protocol = cast(PeerProtocol, self.websocket.buildProtocol(transport.getPeer()))
        # What the client sent after the head (frames, on a kept-alive connection) is the
        # protocol's; the channel reads no more.
        rest = channel.clearLineBuffer()
        take_transport(transport, protocol, channel)
        fields = tuple((name.decode("iso-8859-1").lower(), value.decode("iso-8859-1"))
                       for name, values in request.requestHeaders.getAllRawHeaders()
                       for value in values)
        protocol.upgrade(handshake.Request(request.method.decode("iso-8859-1"),
                                           request.uri.decode("iso-8859-1"),
                                           request.clientproto.decode("iso-8859-1"), fields),
                         rest)
        return NOT_DONE_YET

    def _cors(self, request: Request) -> None:
        raw_origin = request.getHeader(b"origin")
        if raw_origin is None:
            return
        origin = raw_origin.decode("latin-1")
        if not self.hub.config.origin_allowed(origin):
            return
        request.setHeader(b"access-control-allow-origin", raw_origin)
        request.setHeader(b"vary", b"Origin")
        if request.method == b"OPTIONS":
            request.setHeader(b"access-control-allow-methods", b"GET, HEAD, OPTIONS")
            asked = request.getHeader(b"access-control-request-headers")
            if asked:
                request.setHeader(b"access-control-allow-headers", asked)
            request.setHeader(b"access-control-max-age", b"600")

    def _health(self, request: Request) -> bytes:
        hub = self.hub
        draining = hub.draining
        # --cluster without Redis: new joins are refused (Hub._claim), so the balancer
        # should send them elsewhere; its connected peers go on.
        if draining or (hub.cluster is not None and not hub.cluster.ok):
            request.setResponseCode(503)
        return _json(request, {
            "status": "draining" if draining else "ok",
            "timestamp": int(time.time() * 1000),
            "version": __version__,
            "peers": len(hub.sessions),
            "rooms": len(hub.rooms),
            "uptime": round(hub.clock.seconds() - hub.started, 3),
            **({} if hub.cluster is None else
               {"cluster": "ok" if hub.cluster.ok else "degraded", "node": hub.cluster.node}),
        })

    def _ice(self, request: Request, key: str) -> Any:
        """``GET {path}{key}/ice?id=ID&token=TOKEN``: an RTCConfiguration with the
        configured STUN/TURN servers and TURN credentials for this peer (``turn.py``),
        behind the same checks as a join (``Hub.gate``), the origin allowlist and a rate
        limit per client address. A refusal is a 4xx with ``{"error": TEXT}``."""
        hub = self.hub
        cfg = hub.config
        request.setHeader(b"cache-control", b"no-store")
        raw_origin = request.getHeader(b"origin")
        origin = raw_origin.decode("latin-1") if raw_origin is not None else ""
        # Every X-Forwarded-For line, as Autobahn joins them for the WebSocket.
        forwarded = b", ".join(request.requestHeaders.getRawHeaders(b"x-forwarded-for", []))
        headers = {"x-forwarded-for": forwarded.decode("latin-1")}
        peer = getattr(request.getClientAddress(), "host", "")
        address = client_address(peer, headers, cfg.trusted_proxies)
        now = hub.clock.seconds()
        if not cfg.ice_servers:
            return _refuse(request, hub, 404, "not_configured", "No ICE servers configured")
        # A browser leaves Origin out of a same-origin GET; a page of another origin sends
        # it, and the allowlist judges it as it judges an upgrade.
        if raw_origin is not None and not cfg.origin_allowed(origin):
            return _refuse(request, hub, 403, "origin", "Origin not allowed")
        if not self.ice_rate.allow(address, now):
            return _refuse(request, hub, 429, "rate_limit", E_RATE_LIMIT)
        args = request.args
        req = JoinRequest(key, _arg(args, b"id"), _arg(args, b"token"), address, origin)
        return self._ice_answer(request, req, now)

    def _ice_answer(self, request: Request, req: JoinRequest, now: float) -> Any:
        hub = self.hub
        cfg = hub.config
        admitted = hub.gate(req, now)
        if isinstance(admitted, Pending):  # the authorizer fetches keys: answer after
            gone: list[object] = []
            request.notifyFinish().addErrback(gone.append)  # the client went away

            def again(_: object) -> None:
                if request.finished or gone:
                    return
                try:
                    answer = self._ice_answer(request, req, hub.clock.seconds())
                except Exception:
                    log.failure("answering /ice after a wait failed")
                    request.setResponseCode(500)
                    answer = _json(request, {"error": E_INTERNAL})
                if answer is not NOT_DONE_YET:
                    request.write(answer)
                    request.finish()

            admitted.later.addBoth(again)
            return NOT_DONE_YET
        if isinstance(admitted, Refusal):
            outcome, message = admitted
            if outcome == "missing_params":  # the join's text names the WebSocket
                missing = [n for n, v in (("id", req.id), ("token", req.token)) if not v]
                message = f"Missing query parameters: {', '.join(missing)}"
            status = (400 if outcome in ("missing_params", "invalid_id", "invalid_room")
                      else 403 if outcome == "banned" else 401)
            return _refuse(request, hub, status, outcome, message)
        hub.stats.ice["issued"] += 1
        return _json(request, ice_configuration(cfg.ice_servers, cfg.turn_secret,
                                                cfg.turn_ttl, req.id, now))

    def _peers(self, request: Request, key: str) -> bytes:
        if not self.hub.config.allow_discovery:
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Unauthorized"
        token = request.args.get(b"token", [b""])[0].decode("utf-8", "replace")
        cluster = self.hub.cluster
        if cluster is None:
            return _json(request, self.hub.list_peers(key, token))
        # --cluster: every node's peers of the room, from Redis.
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)

        def listed(members: dict[str, str]) -> bytes:
            return _json(request, list(members))

        def failed(failure: Failure) -> bytes:
            request.setResponseCode(503)
            return _json(request, {"error": "The cluster's Redis did not answer"})

        def write(body: bytes) -> None:
            if not finished.called:
                request.write(body)
                request.finish()

        cluster.members(self.hub.http_room_name(key, token)).addCallbacks(
            listed, failed).addCallback(write)
        return NOT_DONE_YET  # type: ignore[return-value]


def _arg(args: dict[bytes, list[bytes]], name: bytes) -> str:
    values = args.get(name)
    return values[0].decode("utf-8", "replace") if values else ""


def _refuse(request: Request, hub: Hub, status: int, outcome: str, message: str) -> bytes:
    hub.stats.ice[outcome] += 1
    request.setResponseCode(status)
    return _json(request, {"error": message})


def _json(request: Request, value: object) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value).encode()


# How much of a request line starting like an upgrade is held before it must be complete.
MAX_REQUEST_LINE = 8192


class Deadline:
    """A handshake's deadline, which can change hands: when it passes it calls whatever
    ``action`` then is (the HTTP channel's, or that of the protocol the connection went to),
    so that a cancelled timer, which the reactor may keep a while, holds neither. Neither
    does it hold its timer once over, so no reference cycle waits for the collector."""

    __slots__ = ("action", "call")

    def __init__(self, call_later: Any, seconds: float, action: Any) -> None:
        self.action = action
        self.call: IDelayedCall | None = call_later(seconds, self._passed)

    def _passed(self) -> None:
        action, self.action, self.call = self.action, None, None
        if action is not None:
            action()

    def active(self) -> bool:
        return self.call is not None and self.call.active()

    def cancel(self) -> None:
        call, self.action, self.call = self.call, None, None
        if call is not None and call.active():
            call.cancel()


class GuardedChannel(HTTPChannel):
    """An HTTP connection that must deliver a whole request head within the site's
    ``timeOut``: idle timeouts alone let a client trickle one byte at a time forever.

    A connection that opens with ``GET {path}peerjs?`` and HTTP/1.1 is a PeerJS client's
    upgrade: it is handed to a ``PeerProtocol`` as it arrives, so the request is parsed
    once, by ``handshake.parse_head``, instead of by Twisted's HTTP parser first. Anything
    else (and any later request on the connection) is plain HTTP for ``Root``.
    """

    site: QuietSite
    _deadline: Deadline | None = None
    _got_head = False
    _sniffing = True
    _start = b""

    def connectionMade(self) -> None:
        # Until the connection shows it is plain HTTP the deadline bounds it, and an
        # upgrade never needs HTTP's idle timeout: it is started then, not here.
        timeout, self.timeOut = self.timeOut, None
        super().connectionMade()
        self.timeOut = timeout
        self._deadline = Deadline(self.callLater, timeout or 0, self._deadline_passed)

    def dataReceived(self, data: bytes) -> None:
        if self._sniffing:
            data = self._start + data
            prefix = self.site.upgrade_prefix
            line_end = data.find(b"\r\n")
            if data[:len(prefix)] == prefix[:len(data)]:  # one begins the other
                if line_end < 0 and len(data) < MAX_REQUEST_LINE:
                    self._start = data  # not enough to tell yet
                    return
                if data[:line_end].endswith(b" HTTP/1.1") and self.site.websocket is not None:
                    self._sniffing = False
                    self._start = b""
                    self._hand_over(self.site.websocket, data)
                    return
            self._sniffing = False
            self._start = b""
            self.setTimeout(self.timeOut)
        super().dataReceived(data)

    def _hand_over(self, factory: PeerFactory, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        protocol = cast(PeerProtocol, factory.buildProtocol(transport.getPeer()))
        # The handshake deadline goes with the connection, to the second: the same timer,
        # which now ends the protocol's handshake (and which it cancels once open).
        if self._deadline is not None and self._deadline.active():
            self._deadline.action = protocol.handshake_expired
            protocol.handshake_deadline = self._deadline
        self._deadline = None
        take_transport(transport, protocol, self)
        protocol.dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._got_head = True
        # Cancel now: after a WebSocket upgrade this channel never sees connectionLost,
        # and a pending call would keep it (and its request) alive until the deadline.
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        super().allHeadersReceived()

    def _deadline_passed(self) -> None:
        self._deadline = None
        if not self._got_head and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        super().connectionLost(reason)


@implementer_only(IProtocolFactory, ILoggingContext)
class QuietSite(Site):
    """No access log: upgrade URLs carry tokens, and per-request lines cost CPU.

    It offers no ALPN protocols of its own (Site does, through IProtocolNegotiationFactory):
    Twisted before 26.4 then sets them on the shared TLS context for every connection, which
    pyOpenSSL 25 and later refuse once a connection exists, and every wss connection was
    reset. The context offers HTTP/1.1 itself (``tls.ALPN``).
    """

    protocol = GuardedChannel  # type: ignore[assignment]
    # Set by make_site: PeerJS upgrades go to this factory (see GuardedChannel and Root).
    websocket: PeerFactory | None = None
    upgrade_prefix = b"GET /peerjs?"
    # Set by make_site: where connections accepted are counted (Stats.accepted).
    stats: Stats | None = None

    def buildProtocol(self, addr: Any) -> Any:
        if self.stats is not None:
            self.stats.accepted += 1
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        pass
