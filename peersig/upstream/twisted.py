"""Every reach into Twisted's private internals (the list: ``peersig.upstream``).

Each function or class here says what it assumes of Twisted and what it buys; its direct
test is in ``tests/test_upstream.py`` under the same name.
"""

from __future__ import annotations

import errno
import time
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IConsumer, IProtocol
from twisted.internet.tcp import Server
from twisted.protocols.policies import ProtocolWrapper
from twisted.python import log

from . import on

# -- lean_reactor ----------------------------------------------------------------------------


class LeanEPollReactor(EPollReactor):
    """The epoll reactor, minus the per-event log context.

    Twisted's ``EPollReactor.doPoll`` wraps every ready descriptor's ``doRead``/``doWrite``
    in ``log.callWithLogger``, which copies a context dict and pushes it on a stack so that
    log lines written during the call name the connection. Peersig logs nothing per frame,
    so that wrapper is pure cost on its hottest path (every frame in, every pong); this
    calls the same ``_doReadOrWrite`` directly, and keeps the wrapper's other duty: an error
    that escapes it (from a ``connectionLost``) is logged, naming the connection, and the
    other ready descriptors are still served. With ``coalesce`` (``--poll-coalesce``) it also
    gathers the arrivals of a server at rest (``doPoll``).

    Assumes ``EPollReactor.doPoll`` is: ``self._poller.poll(timeout, len(self._selectables))``,
    then for each (fd, event) ``self._doReadOrWrite(self._selectables[fd], fd, event)``
    under ``log.callWithLogger``.
    """

    # Seconds the arrivals of a server at rest may gather before they are served (doPoll);
    # 0 = none. Set by ``lighten``.
    coalesce = 0.0
    # ``Stats``, set by ``lighten``: the reactor reads ``stats.activity``, a count that grows
    # with every message or join that should not wait, and counts its gathering in
    # ``stats.gathering`` (``round``s served after gathering; gatherings ended by a
    # ``message`` or join, or by a ``connection``).
    stats: Any = None
    _gathering = False
    # What ``stats.activity`` and the number of descriptors were after the last round, and
    # when the server was last stirred (time.monotonic()): a message or a join stirs it
    # then, a new connection ``QUIET - SETTLE`` s before then.
    _activity = 0
    _descriptors = 0
    _stirred = float("-inf")

    def doPoll(self, timeout: float | None) -> None:
        """One poll and the handling of its events.

        With ``coalesce``, a server at rest gathers arrivals. It is at rest when, for
        ``QUIET`` s, no message but liveness (heartbeats, pongs) came and no peer joined
        (``stats.activity`` did not grow), and for ``SETTLE`` s no connection came (the
        number of descriptors did not grow; one that goes expects no answer).
        Then a poll that waited at least ``REST`` s, but less than ``coalesce``, for a single
        event (the heartbeats of independent peers, each waking the server on its own,
        coming faster than one per ``coalesce``) starts gathering: each later round sleeps
        ``coalesce`` (never past the next timer) and then serves whatever arrived, in one
        wakeup. Gathering ends when a round brings activity or a connection (what follows
        it, an ANSWER to the OFFER, a handshake's next flights, is served as it comes), when
        a whole round brings nothing (the next poll waits again), or when the server is
        busy: more than ``coalesce * BUSY`` ready descriptors, or serving them took half a
        round. An event waits at most ``coalesce`` plus the serving of one round, and only
        the first message or connection after rest waits at all."""
        coalesce = self.coalesce
        gathering = self._gathering
        slept = 0.0
        if gathering and (timeout is None or timeout > 0):
            slept = coalesce if timeout is None else min(coalesce, timeout)
            time.sleep(slept)
            timeout = 0
        started = time.monotonic() if coalesce else 0.0
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        if coalesce:
            ready = len(events)
            if not gathering:
                self._gathering = (ready == 1 and started - self._stirred >= QUIET
                                   and REST <= time.monotonic() - started < coalesce)
            else:
                self.stats.gathering["round"] += 1
                if ready > coalesce * BUSY or (ready == 0 and slept == coalesce):
                    self._gathering = gathering = False
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.err(system=_prefix(selectable))
        if coalesce:
            activity, descriptors = self.stats.activity, len(selectables)
            if activity != self._activity or descriptors > self._descriptors:
                now = time.monotonic()
                if activity != self._activity:
                    self._stirred, cause = now, "message"
                else:
                    # A health check every second (contrib/haproxy.cfg) leaves time to gather.
                    self._stirred, cause = max(self._stirred, now - QUIET + SETTLE), "connection"
                if gathering:
                    self.stats.gathering[cause] += 1
                self._gathering = False
            elif gathering and time.monotonic() - started > coalesce / 2:
                self._gathering = False
            self._activity, self._descriptors = activity, descriptors

    doIteration = doPoll


# Seconds without a message other than liveness or a join, after which a server is at rest
# and may gather (a PeerJS connection's OFFER, ANSWER and trickled candidates come within
# about a second of each other).
QUIET = 2.0
# Seconds without a new connection, after which the same (a TLS handshake and its upgrade
# take a few round trips; a health check, one).
SETTLE = 0.5
# A poll that waited this long (seconds) for its one event finds the server at rest.
REST = 0.001
# Ready descriptors per second above which a gathering round finds the server busy (a
# round of ``coalesce`` s bringing more than ``coalesce * BUSY`` of them ends gathering).
BUSY = 5000


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"


def lighten(reactor: Any, coalesce: float = 0.0, stats: Any = None) -> bool:
    """Make a running plain ``EPollReactor`` a ``LeanEPollReactor`` (only its class changes),
    gathering the arrivals of a server at rest for ``coalesce`` seconds (0 = never, or
    without ``stats``), at rest meaning that for ``QUIET`` s ``stats.activity`` (a count of
    messages and joins that should not wait) stayed the same, and for ``SETTLE`` s the
    number of connections did not grow. Any other reactor is left alone, as is every reactor
    with ``lean_reactor`` off. True if the reactor is lean (now or already)."""
    if type(reactor) is EPollReactor and on("lean_reactor"):
        reactor.__class__ = LeanEPollReactor
    if isinstance(reactor, LeanEPollReactor):
        reactor.coalesce = coalesce if stats is not None else 0.0
        reactor.stats = stats
        return True
    return False


# -- write_now -------------------------------------------------------------------------------

# Connections whose writeSomeData may be called directly: TCP, and TCP carrying TLS in the
# socket's own SSL object (tls.TLSServer, a subclass).
_DIRECT_WRITE = Server


def _write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but on a TCP connection (with or without TLS, see
    ``tls.py``) with nothing buffered the data goes to the socket at once.

    Twisted's write() registers the socket with epoll, waits for the next poll, sends, and
    unregisters it: two epoll_ctl calls and a dispatch per relayed message. Whatever the
    kernel does not take at once is handed to write(), behind which everything else then
    queues. Assumes a ``tcp.Server`` buffers unsent data in ``dataBuffer`` and
    ``_tempDataBuffer`` and nowhere else, and that ``writeSomeData`` returns the bytes the
    socket took (or an exception for a lost connection).
    """
    if (isinstance(transport, _DIRECT_WRITE) and transport.connected
            and not transport.disconnecting and not transport.dataBuffer
            and not transport._tempDataBuffer and not transport.TLS):
        sent = transport.writeSomeData(data)
        if sent == len(data):
            return
        if isinstance(sent, int):
            data = data[sent:]
    transport.write(data)


def _write(transport: Any, data: bytes) -> None:
    transport.write(data)


write_now = _write_now if on("write_now") else _write


# -- take_transport --------------------------------------------------------------------------


def take_transport(transport: Any, protocol: IProtocol, channel: Any) -> None:
    """Give the connection ``transport``, which the HTTP ``channel`` had, to ``protocol``:
    reads go to it from now on, and it is connected to the transport.

    Twisted has no public way to change the protocol of a connection (its ticket 3204); as
    Autobahn's WebSocketResource does it, a ``tcp.Connection`` reads into its ``protocol``
    attribute, and a TLS wrapper (``ProtocolWrapper``) into its ``wrappedProtocol``. The
    channel was the transport's producer; unregistered, and its ``requests`` list (where a
    request that never finishes stays) emptied, the channel and its request are not kept
    alive by the socket for as long as the peer stays (some 4 KB a peer).
    """
    consumer: IConsumer = transport
    consumer.unregisterProducer()
    channel.transport = None
    channel.requests.clear()
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)


# -- raise_on_listen_error -------------------------------------------------------------------


def raise_on_listen_error(service: Any) -> Any:
    """``service`` (a ``StreamServerEndpointService``) raises from ``startService`` when its
    port cannot listen, so that twistd stops with the reason (a port in use) instead of
    serving nothing. The ivar ``_raiseSynchronously``, documented on the class since Twisted
    10.2, is what ``strports.service`` sets for the same purpose."""
    service._raiseSynchronously = True
    return service
