"""Room events POSTed to an app's HTTP receivers, signed, off the signaling path.

Each event is a JSON object::

    {"id": "<32 hex digits>", "type": "peer_left", "room": "lobby-7", "peer": "alice",
     "reason": "closed", "timestamp": 1796000000123}

``type`` is ``room_started``, ``peer_joined``, ``peer_left`` or ``room_finished``; ``peer``
is absent from the room events and ``reason`` (``Hub.depart``'s reason) is only in
``peer_left``; ``timestamp`` is Unix time in milliseconds. ``id`` is the same on every
attempt, for a receiver to drop a duplicate. Every attempt carries::

    X-Peersig-Signature: t=<Unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

the scheme of Stripe's webhook signatures, so that a receiver can refuse old replays.

Delivery (``Destination``): per receiver, events of one room go one at a time and in order;
rooms go in parallel, up to ``MAX_IN_FLIGHT`` requests. A connection error, a timeout, a
429 or a 5xx is retried after 0.5 s, then twice as long each time up to ``MAX_BACKOFF``,
for ``retry_for`` seconds from the first attempt; then the event is given up (``failed``)
and its room's next one goes. Another 4xx gives it up at once (``rejected``). At most
``limit`` events wait per receiver: past that, new events are dropped (``dropped``). Counts
are in ``Stats.webhooks`` (``peersig_webhook_events_total``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections import deque
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from . import __version__
from .httpclient import make_agent, read_body

log = Logger()

# Requests in flight per receiver (rooms in parallel; one per room).
MAX_IN_FLIGHT = 8
# Seconds before the first retry; each retry doubles it, up to MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# Seconds a request (connect, send, response head and body) may take before it counts as
# an error, and bytes of a response body read (the rest is dropped with the connection).
REQUEST_TIMEOUT = 10.0
MAX_RESPONSE_BODY = 65536

# (url, body, headers) -> a Deferred firing with the response's status code.
Post = Callable[[bytes, bytes, dict[bytes, bytes]], "Deferred[int]"]


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Peersig-Signature`` value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def retryable(status: int) -> bool:
    return status == 429 or status >= 500


class Destination:
    """One receiver: a queue per room, each delivered in order, a bound on them all."""

    def __init__(self, url: str, owner: Webhooks) -> None:
        self.url = url.encode()
        self.owner = owner
        self.rooms: dict[str, deque[bytes]] = {}  # the head of each may be in flight
        # Rooms whose head may go now: (room, its first attempt's time or None, the next
        # wait should it fail).
        self.ready: deque[tuple[str, float | None, float]] = deque()
        self.queued = 0  # events in self.rooms
        self.in_flight = 0

    def enqueue(self, room: str, body: bytes) -> None:
        owner = self.owner
        if self.queued >= owner.limit:
            owner.counts["dropped"] += 1
            owner.warn(self.url, "dropped", f"{owner.limit} events wait already")
            return
        self.queued += 1
        queue = self.rooms.get(room)
        if queue is None:
            queue = self.rooms[room] = deque()
            self.ready.append((room, None, FIRST_BACKOFF))
        queue.append(body)
        self.pump()

    def pump(self) -> None:
        while self.ready and self.in_flight < MAX_IN_FLIGHT:
            room, first, backoff = self.ready.popleft()
            self._attempt(room, self.owner.clock.seconds() if first is None else first, backoff)

    def _attempt(self, room: str, first: float, backoff: float) -> None:
        owner = self.owner
        body = self.rooms[room][0]
        headers = {
            b"content-type": b"application/json",
            b"user-agent": b"peersig/" + __version__.encode(),
            b"x-peersig-signature":
                signature(owner.secret, body, int(owner.clock.seconds())).encode(),
        }
        self.in_flight += 1
        try:
            sent = owner.post(self.url, body, headers)
        except Exception:
            sent = Deferred()
            sent.errback()

        def done(status: int) -> None:
            self.in_flight -= 1
            if 200 <= status < 300:
                self._next(room, "delivered")
            elif retryable(status):
                self._retry(room, first, backoff, f"status {status}")
            else:
                self._next(room, "rejected", f"status {status}")
            self.pump()  # the slot this request held

        def failed(failure: Failure) -> None:
            self.in_flight -= 1
            self._retry(room, first, backoff, failure.getErrorMessage() or
                        failure.type.__name__)  # type: ignore[union-attr]
            self.pump()

        def broken(failure: Failure) -> None:
            log.failure("webhook bookkeeping failed", failure)

        sent.addCallbacks(done, failed).addErrback(broken)

    def _retry(self, room: str, first: float, backoff: float, why: str) -> None:
        owner = self.owner
        if owner.clock.seconds() + backoff - first > owner.retry_for:
            self._next(room, "failed", why)
            return
        owner.counts["retries"] += 1
        owner.clock.callLater(backoff, self._again, room, first, min(backoff * 2, MAX_BACKOFF))

    def _again(self, room: str, first: float, backoff: float) -> None:
        if self.in_flight < MAX_IN_FLIGHT:
            self._attempt(room, first, backoff)
        else:
            self.ready.append((room, first, backoff))  # with the next free slot

    def _next(self, room: str, outcome: str, why: str = "") -> None:
        owner = self.owner
        owner.counts[outcome] += 1
        if why:
            owner.warn(self.url, outcome, why)
        queue = self.rooms[room]
        queue.popleft()
        self.queued -= 1
        if queue:
            self.ready.append((room, None, FIRST_BACKOFF))
        else:
            del self.rooms[room]
        self.pump()


class Webhooks:
    """The ``EventSink`` of a hub with ``--webhook`` receivers: each event is made once,
    and queued for every receiver."""

    def __init__(self, urls: tuple[str, ...], secret: bytes, clock: IReactorTime, post: Post,
                 counts: dict[str, int], limit: int, retry_for: float) -> None:
        self.secret = secret
        self.clock = clock
        self.post = post
        self.counts = counts
        self.limit = limit
        self.retry_for = retry_for
        self.destinations = [Destination(url, self) for url in urls]
        self._warned: set[tuple[bytes, str]] = set()

    def event(self, kind: str, room: str, peer: str | None = None,
              reason: str | None = None) -> None:
        fields: dict[str, Any] = {"id": uuid.uuid4().hex, "type": kind, "room": room}
        if peer is not None:
            fields["peer"] = peer
        if reason is not None:
            fields["reason"] = reason
        fields["timestamp"] = int(self.clock.seconds() * 1000)
        body = json.dumps(fields, separators=(",", ":")).encode()
        for destination in self.destinations:
            destination.enqueue(room, body)

    def queued(self) -> int:
        return sum(d.queued for d in self.destinations)

    def warn(self, url: bytes, outcome: str, why: str) -> None:
        # Once per receiver and outcome: a receiver that is down must not flood the log.
        if (url, outcome) not in self._warned:
            self._warned.add((url, outcome))
            log.warn("webhook {url}: an event was {outcome} ({why}); further ones are "
                     "counted in peersig_webhook_events_total", url=url.decode(),
                     outcome=outcome, why=why)


def agent_post(reactor: Any) -> Post:
    """``Post`` through Twisted's HTTP client, keeping connections to each receiver."""
    agent = make_agent(reactor, REQUEST_TIMEOUT, MAX_IN_FLIGHT)

    def post(url: bytes, body: bytes, headers: dict[bytes, bytes]) -> Deferred[int]:
        sent = agent.request(b"POST", url, Headers({k: [v] for k, v in headers.items()}),
                             FileBodyProducer(BytesIO(body)))

        def read(response: Any) -> Deferred[int]:
            # The answer is the status code: a body cut short changes nothing.
            body = read_body(response, MAX_RESPONSE_BODY, keep=False)
            return body.addBoth(lambda _: response.code)

        status = sent.addCallback(read)
        status.addTimeout(REQUEST_TIMEOUT, reactor)
        return status

    return post
