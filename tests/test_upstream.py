"""One direct test of each reach into a dependency's private internals (``peersig.upstream``).

Each test is named after its reach and checks what the reach assumes, on the dependency
itself where it can: a release that changes the assumption fails here, by name, before
any behaviour test does. ``test_every_reach_has_its_test`` keeps the list and the tests in
step.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from peersig.stats import Stats
from peersig.upstream import REACHES, on
from peersig.upstream.autobahn import (
    NONE_WHILE_OPEN,
    UNUSED_WHILE_OPEN,
    between_frames,
    enter_open,
    lighten_open,
    nvx_unmasker,
    options_on_class,
    prepare_class,
    send_close,
)
from peersig.upstream.twisted import (
    LeanEPollReactor,
    lighten,
    raise_on_listen_error,
    take_transport,
)


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


def test_lean_reactor_changes_only_a_plain_epoll_reactor() -> None:
    reactor = EPollReactor()
    try:
        assert lighten(reactor)
        assert type(reactor) is LeanEPollReactor and reactor.coalesce == 0.0
        assert lighten(reactor, 0.02, Stats()) and reactor.coalesce == 0.02  # retuned
        assert lighten(reactor, 0.02) and reactor.coalesce == 0.0  # no stats: no gathering
        assert not lighten(Clock())
    finally:
        reactor._poller.close()


@pytest.mark.parametrize("fail", [False, True])
def test_lean_reactor_dispatches_and_drops_a_failing_reader(fail: bool) -> None:
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


@pytest.mark.parametrize("outcome", ["reason", "exception"])
def test_lean_reactor_drops_a_reader_as_twisted_does(monkeypatch: pytest.MonkeyPatch,
                                                     outcome: str) -> None:
    # The lean loop's own path for a read: as Twisted's _doReadOrWrite (test_lean_reactor).
    reactor = EPollReactor()
    lighten(reactor)
    a, b = socket.socketpair()
    reader = Reader(a)
    dropped: list[tuple[object, ...]] = []
    monkeypatch.setattr(reactor, "_disconnectSelectable", lambda *args: dropped.append(args))
    failure = RuntimeError("boom")

    def do_read() -> object:
        if outcome == "exception":
            raise failure
        return CONNECTION_DONE

    monkeypatch.setattr(reader, "doRead", do_read)
    errors: list[dict[str, object]] = []
    observer = errors.append
    globalLogPublisher.addObserver(observer)
    try:
        reactor.addReader(reader)  # type: ignore[arg-type]
        b.send(b"x")
        reactor.doIteration(1.0)
        if outcome == "exception":
            assert dropped == [(reader, failure, False)]
            assert any(e.get("isError") and e.get("system") == "Reader" for e in errors)
        else:
            assert dropped == [(reader, CONNECTION_DONE, True)]
            assert not any(e.get("isError") for e in errors)
    finally:
        globalLogPublisher.removeObserver(observer)
        reactor.removeAll()
        reactor._poller.close()
        a.close()
        b.close()


def test_lean_reactor_logs_an_error_from_connection_lost_and_serves_the_others() -> None:
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


class FakeTime:
    """``time`` for the gathering reactor: sleeps are recorded, not slept; each poll seems to
    wait ``waited`` s (``Poller``), and a ``SlowReader`` takes ``serving`` s."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waited = 0.0
        self.serving = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Poller:
    """The reactor's epoll, answering at once, with each timeout asked recorded."""

    def __init__(self, real: Any, fake: FakeTime) -> None:
        self.real, self.fake = real, fake
        self.timeouts: list[float] = []

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        self.timeouts.append(timeout)
        self.fake.now += self.fake.waited
        return list(self.real.poll(0, maxevents))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class SlowReader(Reader):
    fake: FakeTime

    def doRead(self) -> None:
        super().doRead()
        self.fake.now += self.fake.serving


@pytest.fixture
def gathering(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gathering]:
    """A lean reactor gathering for 10 ms, on fake time, with a way to make N descriptors
    readable and one to count a message that should not wait."""
    from peersig.upstream import twisted as reach

    fake = FakeTime()
    monkeypatch.setattr(reach, "time", fake)
    reactor = EPollReactor()
    real = reactor._poller
    poller = Poller(real, fake)
    reactor._poller = poller
    stats = Stats()
    lighten(reactor, 0.010, stats)
    pairs = [socket.socketpair() for _ in range(60)]
    SlowReader.fake = fake
    for a, _ in pairs:
        reactor.addReader(SlowReader(a))  # type: ignore[arg-type]

    def arrive(n: int) -> None:
        for _, far in pairs[:n]:
            far.send(b"x")

    def stir() -> None:
        stats.activity += 1

    try:
        yield Gathering(reactor, fake, poller, arrive, stir)
    finally:
        reactor.removeAll()
        real.close()
        for a, b in pairs:
            a.close()
            b.close()


class Gathering(NamedTuple):
    reactor: Any
    fake: FakeTime
    poller: Poller
    arrive: Callable[[int], None]
    stir: Callable[[], None]


def start_gathering(gathering: Gathering) -> None:
    """One event after a short wait, at rest: the reactor gathers from the next round."""
    from peersig.upstream.twisted import REST

    gathering.arrive(1)
    gathering.fake.waited = REST
    gathering.reactor.doPoll(1.0)
    assert gathering.reactor._gathering
    gathering.fake.waited = 0.0


def test_lean_reactor_gathers_the_arrivals_of_a_server_at_rest(gathering: Gathering) -> None:
    from peersig.upstream.twisted import REST

    reactor, fake, poller, arrive, _stir = gathering
    for waited in (REST / 2, 0.050):  # a busy moment; arrivals sparser than one per round
        arrive(1)
        fake.waited = waited
        reactor.doPoll(1.0)
        assert not reactor._gathering and fake.sleeps == []
    arrive(1)
    fake.waited = REST  # one event after a short wait: the server at rest, gathering
    reactor.doPoll(1.0)
    assert reactor._gathering and fake.sleeps == []
    fake.waited = 0.0
    arrive(3)  # the next round sleeps first, then takes all three without waiting
    reactor.doPoll(1.0)
    assert fake.sleeps == [0.010] and poller.timeouts[-1] == 0 and reactor._gathering
    reactor.doPoll(0.004)  # never past the next timer; a round cut short ends nothing
    assert fake.sleeps == [0.010, 0.004] and reactor._gathering
    reactor.doPoll(0.0)  # a timer due: no sleep, and gathering goes on
    assert fake.sleeps == [0.010, 0.004] and reactor._gathering
    reactor.doPoll(None)  # no timer at all: a whole round, and it brought nothing
    assert fake.sleeps == [0.010, 0.004, 0.010] and poller.timeouts[-1] == 0
    assert not reactor._gathering
    reactor.doPoll(0.001)  # the next poll waits again
    assert fake.sleeps == [0.010, 0.004, 0.010] and poller.timeouts[-1] == 0.001


@pytest.mark.parametrize("busy", ["ready descriptors", "serving time"])
def test_lean_reactor_stops_gathering_when_busy(gathering: Gathering, busy: str) -> None:
    from peersig.upstream.twisted import BUSY

    reactor, fake, poller, arrive, _stir = gathering
    start_gathering(gathering)
    if busy == "ready descriptors":
        arrive(int(0.010 * BUSY) + 1)
    else:
        arrive(2)
        fake.serving = 0.003  # 6 ms of a 10 ms round
    reactor.doPoll(1.0)
    assert fake.sleeps == [0.010] and not reactor._gathering
    arrive(1)
    reactor.doPoll(1.0)  # no sleep while busy
    assert fake.sleeps == [0.010] and poller.timeouts[-1] == 1.0


@pytest.mark.parametrize("change", ["a message", "a connection"])
def test_lean_reactor_gathers_only_heartbeats(gathering: Gathering, change: str) -> None:
    """A message that should not wait (an OFFER: ``activity`` grows) or a connection coming
    ends gathering at once, so that what follows it (the ANSWER, the handshake's next
    flights) is served as it comes; gathering starts again only after QUIET s of rest, or
    SETTLE s after a connection."""
    from peersig.upstream.twisted import QUIET, REST, SETTLE

    reactor, fake, poller, arrive, stir = gathering
    start_gathering(gathering)
    arrive(2)
    if change == "a message":
        stir()
    else:
        reactor.stats.accepted += 1
    reactor.doPoll(1.0)
    assert fake.sleeps == [0.010] and not reactor._gathering
    changed = fake.now
    hold = QUIET if change == "a message" else SETTLE
    fake.waited = 2 * REST
    arrive(1)
    reactor.doPoll(1.0)  # an arrival at rest, but too soon after the change
    assert not reactor._gathering
    fake.now = changed + hold - 0.25
    arrive(1)
    reactor.doPoll(1.0)  # still too soon
    assert not reactor._gathering
    fake.now = changed + hold + REST
    arrive(1)
    reactor.doPoll(1.0)
    assert reactor._gathering and fake.sleeps == [0.010] and poller.timeouts[-1] == 1.0
    assert reactor.stats.gathering == {"round": 1, change.split()[1]: 1}


def test_lean_reactor_goes_on_gathering_when_a_connection_goes(gathering: Gathering) -> None:
    """A connection that goes expects no answer: gathering goes on."""

    reactor, fake, _poller, arrive, _stir = gathering
    start_gathering(gathering)
    reactor.removeReader(next(r for r in reactor.getReaders() if isinstance(r, SlowReader)))
    arrive(3)
    reactor.doPoll(1.0)
    assert fake.sleeps == [0.010] and reactor._gathering


def test_lean_reactor_without_coalesce_never_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    from peersig.upstream import twisted as reach

    fake = FakeTime()
    monkeypatch.setattr(reach, "time", fake)
    reactor = EPollReactor()
    lighten(reactor)
    a, b = socket.socketpair()
    try:
        reactor.addReader(Reader(a))  # type: ignore[arg-type]
        for _ in range(3):
            b.send(b"x")
            reactor.doPoll(1.0)
        assert fake.sleeps == [] and not reactor._gathering
    finally:
        reactor.removeAll()
        reactor._poller.close()
        a.close()
        b.close()


def test_lean_reactor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twisted's own doPoll: one poll bounded by the selectables, then _doReadOrWrite of
    each ready one under callWithLogger. The lean loop does the same without the logger."""
    from twisted.internet import epollreactor

    reactor = EPollReactor()
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(epollreactor.log, "callWithLogger",
                        lambda logger, func, *args: calls.append((logger, func, *args)))
    a, b = socket.socketpair()
    reader = Reader(a)
    try:
        assert isinstance(reactor._selectables, dict)
        reactor.addReader(reader)  # type: ignore[arg-type]
        b.send(b"x")
        reactor.doPoll(1.0)
        ((logger, func, selectable, fd, event),) = calls
        assert logger is reader and selectable is reader and fd == a.fileno()
        assert func == reactor._doReadOrWrite and event & reactor._POLL_IN
        # What the lean loop does itself for an event that is a read alone: doRead, then
        # _disconnectSelectable on a reason it returns, or on an exception, logged.
        dropped: list[tuple[object, ...]] = []
        monkeypatch.setattr(reactor, "_disconnectSelectable",
                            lambda *args: dropped.append(args))
        monkeypatch.setattr(reader, "doRead", lambda: CONNECTION_DONE)
        reactor._doReadOrWrite(reader, a.fileno(), select.EPOLLIN)
        assert dropped == [(reader, CONNECTION_DONE, True)]
        failure = RuntimeError("boom")

        def boom() -> None:
            raise failure

        monkeypatch.setattr(reader, "doRead", boom)
        monkeypatch.setattr(epollreactor.log, "err", lambda *args, **kw: None)
        reactor._doReadOrWrite(reader, a.fileno(), select.EPOLLIN)
        assert dropped[1] == (reader, failure, False)
    finally:
        reactor.removeAll()
        reactor._poller.close()
        a.close()
        b.close()


# -- Twisted: write_now, take_transport, tls_transport, raise_on_listen_error ----------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


@contextlib.contextmanager
def tcp_server(protocol: Protocol) -> Iterator[tuple[tcp.Server, socket.socket]]:
    """A Twisted tcp.Server on an accepted loopback socket, its reactor a MemoryReactor, and
    the client's end."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, address = listener.accept()
    port = SimpleNamespace(_realPortNumber=listener.getsockname()[1])
    server = tcp.Server(accepted, protocol, address, port, 1, MemoryReactor())  # type: ignore[arg-type]
    protocol.makeConnection(server)
    try:
        yield server, client
    finally:
        for sock in (accepted, client, listener):
            sock.close()


def test_write_now() -> None:
    """A tcp.Server holds what the socket did not take in dataBuffer and _tempDataBuffer,
    and nowhere else; writeSomeData returns the bytes the socket took."""
    with tcp_server(Recorder()) as (server, client):
        assert server.dataBuffer == b"" and server._tempDataBuffer == []
        assert server.writeSomeData(b"now") == 3
        assert client.recv(10) == b"now"
        server.write(b"later")  # buffered until the reactor says the socket is writable
        assert server._tempDataBuffer or server.dataBuffer
        server.doWrite()
        assert not server.dataBuffer and not server._tempDataBuffer
        assert client.recv(10) == b"later"
        assert server.connected and not server.disconnecting and not server.TLS


def test_take_transport() -> None:
    """A tcp.Server reads into whatever its protocol attribute holds now; an HTTPChannel
    keeps its requests in its ``requests`` list."""
    from twisted.web.http import HTTPChannel

    assert isinstance(HTTPChannel().requests, list)
    first, second = Recorder(), Recorder()
    channel = SimpleNamespace(transport=object(), requests=[object()])
    with tcp_server(first) as (server, client):
        server.registerProducer(first, True)  # as an HTTP channel is
        take_transport(server, second, channel)
        assert server.producer is None and second.transport is server
        assert channel.transport is None and channel.requests == []
        client.send(b"frames")
        server.doRead()
        assert second.data == [b"frames"] and first.data == []


def test_tls_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """tls.TLSServer overrides doRead, doWrite, writeSomeData and connectionLost of
    tcp.Server: doWrite must still write the buffer through writeSomeData (taking an int
    as the bytes written), and connectionLost close the socket after it."""
    with tcp_server(Recorder()) as (server, client):
        written: list[bytes] = []

        def take(data: bytes) -> int:
            written.append(bytes(data))
            return len(data)

        monkeypatch.setattr(server, "writeSomeData", take)
        server.write(b"through writeSomeData")
        server.doWrite()
        assert b"".join(written) == b"through writeSomeData"
        for name in ("doRead", "doWrite", "writeSomeData", "connectionLost"):
            assert callable(getattr(tcp.Server, name))
        assert isinstance(tcp.Server.SEND_LIMIT, int) and isinstance(server.bufferSize, int)
        server.connectionLost(Failure(ConnectionDone()))
        assert server.socket if hasattr(server, "socket") else True
        client.settimeout(1)
        assert client.recv(10) == b""  # closed


def test_head_received_hook() -> None:
    """HTTPChannel calls allHeadersReceived once the header block is whole, and not
    before."""
    from twisted.web.http import HTTPChannel

    heads: list[int] = []

    class Channel(HTTPChannel):
        def allHeadersReceived(self) -> None:
            heads.append(1)
            super().allHeadersReceived()

    channel = Channel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert heads == []
    channel.dataReceived(b"X-A: 1\r\n\r\n")
    assert heads == [1]


def test_raise_on_listen_error() -> None:
    """A StreamServerEndpointService with _raiseSynchronously raises from startService
    when its endpoint fails to listen at once."""

    class Refusing:
        def listen(self, factory: object) -> Deferred[None]:
            return fail(CannotListenError("127.0.0.1", 1, OSError("in use")))

    service = raise_on_listen_error(StreamServerEndpointService(Refusing(), Factory()))
    with pytest.raises(CannotListenError):
        service.startService()
    quiet = StreamServerEndpointService(Refusing(), Factory())
    quiet.startService()  # without it, only logged
    assert quiet.running


# -- Autobahn: open_state, fast_frames, close_codes, close_frame_hook, class_options, ---------
# lean_connection


def masked(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    mask = b"\x01\x02\x03\x04"
    head = bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)])
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class PlainServer(WebSocketServerProtocol):
    """Autobahn's own server protocol, recording its callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[object, ...]] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.events.append(("message", payload))

    def onPing(self, payload: bytes) -> None:
        self.events.append(("ping", payload))
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.events.append(("close", wasClean, code))


class TCPLikeTransport(StringTransport):
    """As Twisted's TCP transports: unregistering no producer is no error."""

    def unregisterProducer(self) -> None:
        self.producer = None


def plain_server(**options: Any) -> tuple[PlainServer, StringTransport]:
    factory = WebSocketServerFactory()
    # peersig's options: no handshake timer of Autobahn's, UTF-8 checked by the JSON decoder
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0,
                               utf8validateIncoming=False, **options)
    factory.protocol = PlainServer
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = TCPLikeTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_open_state() -> None:
    """enter_open sets attributes Autobahn has, and Autobahn then reads frames: a ping gets
    its pong, a fragmented message arrives whole, a close is answered."""
    protocol, transport = plain_server()
    before = dict(vars(protocol))
    enter_open(protocol)
    # What enter_open sets is what succeedHandshake sets, by the same names.
    source = inspect.getsource(WebSocketServerProtocol.succeedHandshake) + inspect.getsource(
        WebSocketServerProtocol.processHandshake)
    for name in set(vars(protocol)) - set(before) | {
            n for n in before if vars(protocol)[n] is not before[n]}:
        assert f"self.{name} = " in source, name
    protocol.dataReceived(masked(b"hi", opcode=9))
    assert transport.value() == b"\x8a\x02hi"
    protocol.dataReceived(masked(b"frag", fin=False) + masked(b"ment", opcode=0))
    assert ("message", b"fragment") in protocol.events
    transport.clear()
    protocol.dataReceived(masked((1000).to_bytes(2, "big"), opcode=8))
    assert transport.value().startswith(b"\x88\x02\x03\xe8")


def test_fast_frames() -> None:
    """Between frames Autobahn's buffer is empty, no frame or message is under way; a frame
    cut short or a fragment leaves one of them set."""
    protocol, _ = plain_server()
    enter_open(protocol)
    assert between_frames(protocol)
    protocol.dataReceived(masked(b"half")[:4])
    assert not between_frames(protocol)
    protocol.dataReceived(masked(b"half")[4:])
    assert between_frames(protocol) and protocol.events == [("message", b"half")]
    protocol.dataReceived(masked(b"part", fin=False))
    assert not between_frames(protocol)
    protocol.dataReceived(masked(b"s", opcode=0))
    assert between_frames(protocol)
    assert not protocol.send_queue and not protocol.triggered  # nothing of ours to wait for


def test_close_codes() -> None:
    """sendCloseFrame takes the codes sendClose refuses, and the closing handshake then
    ends clean when the client answers."""
    protocol, transport = plain_server()
    enter_open(protocol)
    with pytest.raises(Exception):  # noqa: B017 - sendClose's own check, whatever its type
        protocol.sendClose(1008, "policy")
    send_close(protocol, 1008, b"policy")
    assert transport.value() == b"\x88\x08\x03\xf0policy"
    protocol.dataReceived(masked((1008).to_bytes(2, "big"), opcode=8))
    protocol.connectionLost(Failure(ConnectionDone()))
    assert protocol.events[-1] == ("close", True, 1008)


def test_close_frame_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """onCloseFrame is called with each close frame, before the connection is lost."""
    protocol, _transport = plain_server()
    enter_open(protocol)
    seen: list[tuple[int, bytes]] = []
    real = protocol.onCloseFrame

    def hook(code: int, reason: bytes) -> Any:
        seen.append((code, reason))
        return real(code, reason)

    monkeypatch.setattr(protocol, "onCloseFrame", hook)
    protocol.dataReceived(masked((1000).to_bytes(2, "big") + b"bye", opcode=8))
    assert seen == [(1000, b"bye")] and not any(e[0] == "close" for e in protocol.events)


def test_class_options() -> None:
    """Options the class already has are not copied into the connection."""
    factory = WebSocketServerFactory()
    factory.setProtocolOptions(maxMessagePayloadSize=4321)
    cls = options_on_class(factory, PlainServer)
    factory.protocol = cls
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    protocol.makeConnection(StringTransport())
    assert not set(WebSocketServerProtocol.CONFIG_ATTRS) & set(vars(protocol))
    assert protocol.maxMessagePayloadSize == 4321
    plain = WebSocketServerFactory()
    plain.protocol = PlainServer
    other = plain.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    other.makeConnection(StringTransport())
    assert set(WebSocketServerProtocol.CONFIG_ATTRS) <= set(vars(other))  # what it saves


def test_lean_connection() -> None:
    """What lighten_open drops is None (or unused) on an open connection, and a connection
    without it still closes as it should."""
    protocol, _transport = plain_server()
    enter_open(protocol)
    attrs = vars(protocol)
    for name in NONE_WHILE_OPEN:
        assert name in attrs and attrs[name] is None, name
    for name in UNUSED_WHILE_OPEN:
        assert name in attrs, name
    assert not protocol.is_open.called  # nothing resolves it without Autobahn's handshake
    cls = type("Lean", (PlainServer,), {})
    prepare_class(cls)
    protocol.__class__ = cls
    lighten_open(protocol)
    assert not set(NONE_WHILE_OPEN + UNUSED_WHILE_OPEN) & set(vars(protocol))
    protocol.dataReceived(masked(b"still", opcode=1))
    protocol.dataReceived(masked((1000).to_bytes(2, "big"), opcode=8))
    protocol.connectionLost(Failure(ConnectionDone()))
    assert protocol.events == [("message", b"still"), ("close", True, 1000)]


# -- the standard library: ssl_object -----------------------------------------------------


def test_ssl_object(tmp_path: Path) -> None:
    """SSLContext._wrap_socket gives the C object with the methods tls.TLSServer calls, and
    it speaks TLS on the socket itself, without blocking."""
    import ssl
    import threading

    from tests.serverproc import make_self_signed_cert

    key, cert = make_self_signed_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server_sock, client_sock = socket.socketpair()
    server_sock.setblocking(False)
    tls = context._wrap_socket(server_sock, server_side=True)
    for name in ("read", "write", "pending", "do_handshake", "shutdown"):
        assert callable(getattr(tls, name)), name
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    wrapped = client.wrap_socket(client_sock, do_handshake_on_connect=False)

    def talk() -> None:
        wrapped.do_handshake()
        wrapped.sendall(b"over tls")

    done = threading.Thread(target=talk)
    try:
        done.start()
        for _ in range(200):
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                time.sleep(0.01)
        for _ in range(200):
            try:
                assert tls.read(100) == b"over tls"
                break
            except ssl.SSLWantReadError:
                time.sleep(0.01)
        else:
            raise AssertionError("nothing read")
        assert tls.pending() == 0 and server_sock.fileno() >= 0  # still the accepted socket
    finally:
        done.join(5)
        wrapped.close()
        server_sock.close()


def test_nvx_unmask() -> None:
    """Autobahn's compiled masker XORs with the mask from its first byte on, at any length
    and at any alignment of the buffer, and leaves the bytes around it alone; Autobahn 25 and
    later ship it (24 has none: then there is no unmasker, and framing.unmask stays on big
    integers)."""
    import autobahn

    unmask = nvx_unmasker()
    if not on("nvx_unmask"):
        assert unmask is None
        return
    try:
        from _nvx_xormasker import ffi, lib
    except ImportError:
        version = tuple(int(part) for part in autobahn.__version__.split(".")[:2])
        assert version < (25, 0), f"Autobahn {autobahn.__version__} without _nvx_xormasker"
        assert unmask is None
        return
    rng = random.Random(6455)
    for size in (0, 1, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 1000, 4099):
        mask = rng.randbytes(4)
        payload = rng.randbytes(size)
        expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if unmask is not None:  # None only with AUTOBAHN_USE_NVX=0
            assert unmask(mask, payload) == expected, size
            assert type(unmask(mask, payload)) is bytes
        for offset in range(16):  # the buffer at every alignment of a 16-byte SIMD load
            buffer = bytearray(b"\xaa" * offset + payload + b"\x55" * 16)
            masker = lib.nvx_xormask_new(mask)
            assert masker != ffi.NULL
            try:
                lib.nvx_xormask_process(masker, ffi.from_buffer(buffer) + offset, size)
            finally:
                lib.nvx_xormask_free(masker)
            assert bytes(buffer) == b"\xaa" * offset + expected + b"\x55" * 16, (size, offset)


def test_every_reach_has_its_test() -> None:
    tests = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert set(REACHES) <= tests, set(REACHES) - tests
    assert all(REACHES[name].dependency in ("autobahn", "twisted", "stdlib") for name in REACHES)
    root = Path(__file__).resolve().parents[1] / "peersig"
    for reach in REACHES.values():  # where each is said to live names code that exists
        for place in reach.where.split(";"):
            module, _, names = place.strip().partition(" ")
            text = (root / module).read_text()
            for name in names.replace(",", " ").split():
                assert f"def {name.split('.')[-1]}" in text or \
                    f"class {name.split('.')[-1]}" in text, (reach.where, name)


# -- the public roads: every optional reach off, in a real twistd ---------------------------


@pytest.mark.slow
def test_every_public_road_serves_ws_and_wss(tmp_path: Path) -> None:
    """With PEERSIG_WITHOUT_REACH naming every optional reach, peersig still opens, relays,
    pings and closes over ws and wss (slower and bigger, as the figures say)."""
    from websockets.sync.client import connect

    from peersig.upstream import optional
    from tests.serverproc import ServerProcess
    from tests.test_process import recv_json
    from tests.test_tls import wss_url
    from tests.wssclient import wss_connect

    server = ServerProcess(tmp_path, tls=True,
                           env={"PEERSIG_WITHOUT_REACH": ",".join(optional())})
    server.start()
    try:
        with connect(server.ws_url("a", token="public")) as a, \
                wss_connect(wss_url(server, "b", "public")) as b:
            assert recv_json(a) == {"type": "OPEN"} and recv_json(b) == {"type": "OPEN"}
            for n in range(50):
                a.send(f'{{"type":"CANDIDATE","dst":"b","payload":{n}}}')
            assert [recv_json(b)["payload"] for _ in range(50)] == list(range(50))
            b.ping().wait(5)
            b.send('{"type":"OFFER","dst":"a","payload":"x"}')
            assert recv_json(a)["src"] == "b"
            a.close(1001)
            assert recv_json(b) == {"type": "LEAVE", "src": "a"}
    finally:
        server.stop()
    assert "Traceback" not in server.log_tail(400)


def test_an_unknown_reach_name_is_a_usage_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", "peersig"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**__import__("os").environ, "PEERSIG_WITHOUT_REACH": "open_state"})
    assert result.returncode == 1 and "not an optional reach" in result.stderr
