"""The lean epoll reactor: same dispatch and error handling, without the log context."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock

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
