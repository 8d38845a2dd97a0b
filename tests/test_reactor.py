"""The lean epoll reactor: same dispatch and error handling, without the log context."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from peersig.reactor import LeanEPollReactor, lighten


class Reader:
    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.read: list[bytes] = []
        self.lost: list[object] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self) -> None:
        self.read.append(self.sock.recv(100))
        if self.fail:
            raise RuntimeError("boom")

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)


def test_only_a_plain_epoll_reactor_is_changed() -> None:
    reactor = EPollReactor()
    try:
        assert lighten(reactor)
        assert type(reactor) is LeanEPollReactor
        assert not lighten(reactor)
        assert not lighten(Clock())
    finally:
        reactor._poller.close()


@pytest.mark.parametrize("fail", [False, True])
def test_reads_are_dispatched_and_a_failing_reader_is_dropped(fail: bool) -> None:
    reactor = EPollReactor()
    lighten(reactor)
    a, b = socket.socketpair()
    reader = Reader(a, fail)
    try:
        reactor.addReader(reader)  # type: ignore[arg-type]
        b.send(b"hello")
        reactor.doIteration(1.0)
        assert reader.read == [b"hello"]
        if fail:
            # As in Twisted's own loop: the error is logged, the descriptor dropped.
            assert reader.lost and reader not in reactor.getReaders()
        else:
            assert not reader.lost and reader in reactor.getReaders()
    finally:
        reactor.removeAll()
        reactor._poller.close()
        a.close()
        b.close()


def test_an_error_from_connection_lost_is_logged_and_the_others_served() -> None:
    class BadLoser(Reader):
        def connectionLost(self, reason: object) -> None:
            super().connectionLost(reason)
            raise RuntimeError("connectionLost failed")

    reactor = EPollReactor()
    lighten(reactor)
    errors: list[dict[str, object]] = []
    observer = errors.append
    globalLogPublisher.addObserver(observer)
    pairs = [socket.socketpair() for _ in range(2)]
    bad, good = BadLoser(pairs[0][0], fail=True), Reader(pairs[1][0])
    try:
        reactor.addReader(bad)  # type: ignore[arg-type]
        reactor.addReader(good)  # type: ignore[arg-type]
        for _, far in pairs:
            far.send(b"x")
        reactor.doIteration(1.0)
        assert good.read == [b"x"] and bad.lost
        assert any(e.get("isError") and e.get("system") == "Reader" for e in errors)
    finally:
        globalLogPublisher.removeObserver(observer)
        reactor.removeAll()
        reactor._poller.close()
        for a, b in pairs:
            a.close()
            b.close()
