"""Outgoing HTTP (webhooks, JWKS) on Twisted's own client, with every body bounded."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss


class BodyTooLarge(Exception):
    """A response body passed the limit its reader was given."""


class _BoundedBody(Protocol):
    """Reads a response body into memory up to ``limit`` bytes. Past that it stops the
    connection and fails with ``BodyTooLarge`` (``keep``) or throws the body away
    (not ``keep``: the answer is in the status code)."""

    def __init__(self, limit: int, keep: bool) -> None:
        self.limit = limit
        self.keep = keep
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False
        # Cancelled (a timeout) while the body still comes: the connection goes.
        self.finished: Deferred[bytes] = Deferred(self._stop)

    def _stop(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.too_large:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.too_large = True
            self.chunks.clear()
            self._stop(self.finished)
        elif self.keep:
            self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.finished.called:
            return
        if self.too_large and self.keep:
            self.finished.errback(BodyTooLarge(f"body over {self.limit} bytes"))
        elif reason is not None and not self.too_large and not (
                # A body without Content-Length or chunks ends with its connection
                # (HTTP/1.0, Connection: close): complete, as far as anyone can tell.
                reason.check(ResponseDone, PotentialDataLoss)):
            self.finished.errback(reason)
        else:
            self.finished.callback(b"".join(self.chunks))


def read_body(response: Any, limit: int, keep: bool = True) -> Deferred[bytes]:
    """The body of an ``IResponse``: at most ``limit`` bytes (see ``_BoundedBody``)."""
    body = _BoundedBody(limit, keep)
    response.deliverBody(body)
    return body.finished


def make_agent(reactor: Any, connect_timeout: float, per_host: int) -> Agent:
    """An Agent keeping up to ``per_host`` idle connections to each host. It never
    retries a request by itself: retrying is the caller's decision."""
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = per_host
    pool.retryAutomatically = False
    return Agent(reactor, connectTimeout=connect_timeout, pool=pool)
