"""Every reach into Twisted's private internals (the list: ``peersig.upstream``).

Each function or class here says what it assumes of Twisted and what it buys; its direct
test is in ``tests/test_upstream.py`` under the same name.
"""

from __future__ import annotations

import errno
import time
from select import EPOLLIN
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

    An event that is a read alone (``EPOLLIN``, nearly every one) it serves itself, as
    ``_doReadOrWrite`` would, without that call and its checks: 0.24 -> 0.07 us an event
    (relay over wss, docs/benchmarks-idle.md). Its test of ``fileno() == -1`` is among them:
    every selectable leaves ``_selectables`` before its socket is closed.

    Assumes ``EPollReactor.doPoll`` is: ``self._poller.poll(timeout, len(self._selectables))``,
    then for each (fd, event) ``self._doReadOrWrite(self._selectables[fd], fd, event)``
    under ``log.callWithLogger``; and that ``_doReadOrWrite`` of a read alone is, after its
    ``fileno() == -1`` test (skipped here, above), ``doRead()``, then
    ``_disconnectSelectable(selectable, reason, True)`` on a reason it returns, or
    ``_disconnectSelectable(selectable, exception, False)`` on an exception, logged.
    """

    # Seconds the arrivals of a server at rest may gather before they are served (doPoll);
    # 0 = none. Set by ``lighten``.
    coalesce = 0.0
    # ``Stats``, set by ``lighten``: the reactor reads two counts, ``activity`` (messages and
    # joins that should not wait) and ``accepted`` (connections), and counts its gathering
    # in ``gathering``.
    stats: Any = None
    _gathering = False
    # The counts after the last round, and when each last grew (time.monotonic()).
    _activity = 0
    _accepted = 0
    _moved = float("-inf")
    _connected = float("-inf")

    def doPoll(self, timeout: float | None) -> None:
        """One poll and the handling of its events.

        With ``coalesce``, a server at rest gathers arrivals (docs/operations.md, "CPU at
        rest"). It is at rest ``QUIET`` s after the last message or join (``activity``) and
        ``SETTLE`` s after the last new connection (``accepted``). Then a poll that waited at
        least ``REST`` s, but less than ``coalesce``, for a single event (the heartbeats of
        independent peers, each waking the server on its own) starts gathering: each later
        round sleeps ``coalesce`` (never past the next timer) and then serves whatever
        arrived, in one wakeup. Gathering ends with a round that brings a message, a join
        or a connection (what follows it is served as it comes), a full round that brings
        nothing, or a busy round: more than ``coalesce * BUSY`` ready descriptors, or half a
        round spent serving them. An event waits at most ``coalesce`` plus the serving of
        one round."""
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
        stats = self.stats
        if coalesce:
            ready = len(events)
            if not gathering:
                self._gathering = (ready == 1 and started - self._moved >= QUIET
                                   and started - self._connected >= SETTLE
                                   and REST <= time.monotonic() - started < coalesce)
            else:
                if slept:
                    stats.gathering["round"] += 1
                if ready > coalesce * BUSY or (ready == 0 and slept == coalesce):
                    self._gathering = gathering = False
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    if event == EPOLLIN:  # nearly every event: a read and nothing else
                        try:
                            why = selectable.doRead()
                            in_read = True
                        except BaseException as e:
                            why, in_read = e, False
                            log.err(system=_prefix(selectable))
                        if why:
                            self._disconnectSelectable(selectable, why, in_read)
                    else:
                        handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.err(system=_prefix(selectable))
        if coalesce:
            now = time.monotonic()
            moved = stats.activity != self._activity
            connected = stats.accepted != self._accepted
            if moved or connected:
                if moved:
                    self._activity, self._moved = stats.activity, now
                if connected:
                    self._accepted, self._connected = stats.accepted, now
                if gathering:
                    stats.gathering["message" if moved else "connection"] += 1
                self._gathering = False
            elif gathering and now - started > coalesce / 2:
                self._gathering = False

    doIteration = doPoll


# Seconds after a message other than liveness, or a join, before a server is at rest and may
# gather (a PeerJS connection's OFFER, ANSWER and trickled candidates come within about a
# second of each other).
QUIET = 2.0
# Seconds after a new connection, the same (its TLS handshake and upgrade take a few round
# trips; a load balancer's health check every second still leaves half the time to gather).
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
    without ``stats``, whose counts tell it; see ``doPoll``). Any other reactor is left
    alone, as is every reactor with ``lean_reactor`` off. True if the reactor is lean (now
    or already)."""
    if type(reactor) is EPollReactor and on("lean_reactor"):
        reactor.__class__ = LeanEPollReactor
    if isinstance(reactor, LeanEPollReactor):
        reactor.coalesce = coalesce if stats is not None else 0.0
        reactor.stats = stats
        reactor._gathering = False
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
