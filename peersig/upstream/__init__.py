"""Every place peersig relies on a dependency's private internals: the one list of them.

peersig prefers public API. Where a benchmark figure (or a behaviour) paid for more, the reach
lives in one module per dependency (``upstream/autobahn.py``, ``upstream/twisted.py``,
``upstream/stdlib.py``), but
for three that are a class's own code (the TLS transport of ``tls.py``, and two overridden
hooks); each entry says where, what it assumes and what it buys, and has a direct test of that
assumption in ``tests/test_upstream.py``, named after it: a release that changes what a reach
assumes fails that test, by name.

An optional reach can be switched off with the environment variable
``PEERSIG_WITHOUT_REACH`` (names separated by commas): peersig then takes the public road,
slower or bigger as the figure says. It is how ``bench`` measures each figure
(``PEERSIG_WITHOUT_REACH=write_now python -m bench ...``), and a way to keep serving on a
release that broke one before a fix is out. A required reach has no public road.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class Reach(NamedTuple):
    dependency: str
    where: str  # the code that relies on it
    assumes: str
    buys: str  # measured with the reach off (bench.reaches, docs/benchmarks.md)
    optional: bool  # False: peersig has no public road without it


REACHES = {
    # -- Autobahn -------------------------------------------------------------------------
    "open_state": Reach(
        "autobahn", "upstream/autobahn.py enter_open",
        "after peersig's own opening handshake, setting state, websocket_version, "
        "websocket_protocol_in_use, websocket_extensions_in_use, inside_message and "
        "current_frame as succeedHandshake leaves them makes Autobahn read frames",
        "the opening handshake is peersig's (handshake.py): the allowlist alone judges an "
        "Origin, every refusal keeps its code; connect CPU as the lean path it replaced "
        "(0.217 vs 0.228 ms ws, 1.10 vs 1.14 ms wss, paired)",
        False),
    "close_codes": Reach(
        "autobahn", "upstream/autobahn.py send_close",
        "sendCloseFrame(code, reason, False) starts Autobahn's closing handshake with any "
        "code (sendClose takes 1000 and 3000-4999 only)",
        "close codes 1001, 1003, 1008 and 1011, which RFC 6455 gives a server",
        False),
    "close_frame_hook": Reach(
        "autobahn", "websocket.py PeerProtocol.onCloseFrame",
        "onCloseFrame(code, reason) is called with each close frame received, before the "
        "connection is lost",
        "a newcomer that closes while its join waits on a probe withdraws at once",
        False),
    "fast_frames": Reach(
        "autobahn", "upstream/autobahn.py _between_frames; websocket.py send_frame",
        "between frames (state OPEN, data empty, current_frame None, not inside_message) "
        "Autobahn holds nothing of the stream, and frames written to the transport need "
        "none of its send state",
        "relay CPU per message 30.4 -> 61.0 us ws (x2.0), 41.2 -> 99.5 us wss (x2.4); idle "
        "CPU with 4,000 peers 0.75% -> 2.25%",
        True),
    "class_options": Reach(
        "autobahn", "upstream/autobahn.py options_on_class",
        "_connectionMade copies into each connection only the CONFIG_ATTRS it lacks",
        "CPU per connect 0.280 -> 0.493 ms ws, 1.21 -> 1.51 ms wss; RSS per peer +0.74 KiB",
        True),
    "lean_connection": Reach(
        "autobahn", "upstream/autobahn.py lighten_open, prepare_class",
        "the per-connection attributes dropped once a connection is open are None (or "
        "unused) until it closes, and nothing waits on is_open",
        "RSS per peer 3.36 -> 5.50 KiB ws, 17.6 -> 19.8 KiB wss",
        True),
    "nvx_unmask": Reach(
        "autobahn", "upstream/autobahn.py nvx_unmasker; framing.py unmask",
        "Autobahn ships the CFFI module _nvx_xormasker, whose lib.nvx_xormask_new, "
        "nvx_xormask_process and nvx_xormask_free XOR a buffer in place with a 4-byte mask, "
        "and autobahn.websocket.USES_NVX says whether to use it (absent before Autobahn 25: "
        "the big-integer XOR is used)",
        "unmasking a 1,000-byte frame 0.82 -> 2.81 us, 4,000 bytes 0.97 -> 9.24 us; wss "
        "server CPU at 10,000 relayed 1 KB msg/s 35% -> 37% (medians of 4 paired runs); "
        "without it the big-integer conversions are 12% of perf's samples under the wss "
        "relay load",
        True),
    # -- Twisted --------------------------------------------------------------------------
    "lean_reactor": Reach(
        "twisted", "upstream/twisted.py LeanEPollReactor",
        "EPollReactor.doPoll is _poller.poll, then _doReadOrWrite under callWithLogger per "
        "ready descriptor",
        "relay CPU per message x1.71 ws (23.4 -> 41.1 us), x1.25 wss (38.3 -> 41.8 us), "
        "medians of 4 paired runs; and --poll-coalesce: wss idle CPU 4.8% -> 2.9% at 20 ms",
        True),
    "write_now": Reach(
        "twisted", "upstream/twisted.py _write_now",
        "tcp.Server keeps unsent bytes in dataBuffer and _tempDataBuffer only",
        "relay CPU per message x1.20 ws (34.1 -> 39.1 us), x1.42 wss (36.8 -> 53.2 us), "
        "medians of 4 paired runs",
        True),
    "take_transport": Reach(
        "twisted", "upstream/twisted.py take_transport",
        "a tcp.Connection reads into its protocol attribute (a ProtocolWrapper into its "
        "wrappedProtocol), as Autobahn's WebSocketResource also assumes; an HTTPChannel "
        "keeps unfinished requests in its requests list",
        "upgrades parsed once, by peersig, and the HTTP channel freed after them",
        False),
    "head_received_hook": Reach(
        "twisted", "web.py GuardedChannel.allHeadersReceived",
        "HTTPChannel.allHeadersReceived is called once a request's header block is whole",
        "a client must send a whole request head within --handshake-timeout",
        False),
    "raise_on_listen_error": Reach(
        "twisted", "upstream/twisted.py raise_on_listen_error",
        "StreamServerEndpointService raises from startService when _raiseSynchronously is "
        "set (documented ivar since 10.2, what strports.service sets)",
        "a port in use stops twistd with the reason instead of serving nothing",
        False),
    "tls_transport": Reach(
        "twisted", "tls.py TLSServer, TLSPort",
        "a tcp.Server subclass may read and write through doRead, doWrite, writeSomeData "
        "and connectionLost (tls.TLSServer), with bufferSize and SEND_LIMIT, and a tcp.Port "
        "makes its connections with its transport class",
        "TLS records in C on the socket: wss relay CPU per message 54.3 -> 29.8 us when it "
        "replaced Twisted's own TLS (docs/benchmarks.md)",
        False),
    # -- the standard library ---------------------------------------------------------------
    "ssl_object": Reach(
        "stdlib", "upstream/stdlib.py server_tls",
        "SSLContext._wrap_socket(sock, server_side=True) returns the C SSL object, with "
        "read, write, pending, do_handshake and shutdown, on the socket itself",
        "wss relay CPU per message 48.9 -> 51.5 us (x1.06), CPU per connect 1.09 -> 1.22 ms, "
        "RSS per peer +0.37 KiB with SSLSocket (medians of 4 paired runs)",
        True),
}

OFF = frozenset(filter(None, (name.strip() for name in
                              os.environ.get("PEERSIG_WITHOUT_REACH", "").split(","))))


def on(name: str) -> bool:
    """Whether the reach ``name`` is in use (read once, as each module is imported)."""
    if name not in REACHES:
        raise KeyError(name)
    return name not in OFF


def unknown_off() -> list[str]:
    """Names in PEERSIG_WITHOUT_REACH that are not optional reaches (a usage error)."""
    return sorted(n for n in OFF if n not in REACHES or not REACHES[n].optional)


def optional() -> list[str]:
    return [name for name, reach in REACHES.items() if reach.optional]
