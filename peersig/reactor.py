"""The epoll reactor, minus the per-event log context.

Twisted's ``EPollReactor.doPoll`` wraps every ready descriptor's ``doRead``/``doWrite`` in
``log.callWithLogger``, which copies a context dict and pushes it on a stack so that log
lines written during the call name the connection. Peersig logs nothing per frame, so that
wrapper is pure cost on its hottest path (every frame in, every pong); ``LeanEPollReactor``
calls the same ``_doReadOrWrite`` directly, and keeps the wrapper's other duty: an error
that escapes it (from a ``connectionLost``) is logged, naming the connection, and the other
ready descriptors are still served. An error inside ``doRead``/``doWrite`` is logged by
``_doReadOrWrite`` as before, without the connection's name.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log


class LeanEPollReactor(EPollReactor):
    def doPoll(self, timeout: float | None) -> None:
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
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

    doIteration = doPoll


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"


def lighten(reactor: Any) -> bool:
    """Make a running plain ``EPollReactor`` a ``LeanEPollReactor`` (it adds no state, only
    a method); any other reactor is left alone. True if it changed."""
    if type(reactor) is EPollReactor:
        reactor.__class__ = LeanEPollReactor
        return True
    return False
