"""Every place peersig relies on a dependency's private internals: the one list of them.

peersig prefers public API. Where a benchmark figure paid for more, the reach lives in one
module per dependency (``upstream/autobahn.py``, ``upstream/twisted.py``), says what it
assumes, and has a direct test of that assumption in ``tests/test_upstream.py``, named
after it: a release that changes what a reach assumes fails that test, by name.

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
    assumes: str
    buys: str  # the figure, from docs/benchmarks.md (measured with the reach off)
    optional: bool  # False: peersig has no public road without it


REACHES = {
    # -- Autobahn -------------------------------------------------------------------------
    "open_state": Reach(
        "autobahn",
        "after peersig's own opening handshake, setting state, websocket_version, "
        "websocket_protocol_in_use, websocket_extensions_in_use, inside_message and "
        "current_frame as succeedHandshake leaves them makes Autobahn read frames",
        "the opening handshake is peersig's (handshake.py): the allowlist alone judges an "
        "Origin, and every refusal keeps its code",
        False),
    "close_codes": Reach(
        "autobahn",
        "sendCloseFrame(code, reason, False) starts Autobahn's closing handshake with any "
        "code (sendClose takes 1000 and 3000-4999 only)",
        "close codes 1001, 1003, 1008 and 1011, which RFC 6455 gives a server",
        False),
    "fast_frames": Reach(
        "autobahn",
        "between frames (state OPEN, data empty, current_frame None, not inside_message) "
        "Autobahn holds nothing of the stream, and frames written to the transport need "
        "none of its send state",
        "figure: see docs/benchmarks.md, Private reaches",
        True),
    "close_frame_hook": Reach(
        "autobahn",
        "onCloseFrame(code, reason) is called with each close frame received, before the "
        "connection is lost",
        "a newcomer that closes while its join waits on a probe withdraws at once",
        False),
    "class_options": Reach(
        "autobahn",
        "_connectionMade copies into each connection only the CONFIG_ATTRS it lacks",
        "figure: see docs/benchmarks.md, Private reaches",
        True),
    "lean_connection": Reach(
        "autobahn",
        "the per-connection attributes dropped once a connection is open are None (or "
        "unused) until it closes, and nothing waits on is_open",
        "figure: see docs/benchmarks.md, Private reaches",
        True),
    # -- Twisted --------------------------------------------------------------------------
    "lean_reactor": Reach(
        "twisted",
        "EPollReactor.doPoll is _poller.poll, then _doReadOrWrite under callWithLogger per "
        "ready descriptor",
        "figure: see docs/benchmarks.md, Private reaches",
        True),
    "write_now": Reach(
        "twisted",
        "tcp.Server keeps unsent bytes in dataBuffer and _tempDataBuffer only",
        "figure: see docs/benchmarks.md, Private reaches",
        True),
    "take_transport": Reach(
        "twisted",
        "a tcp.Connection reads into its protocol attribute (a ProtocolWrapper into its "
        "wrappedProtocol), as Autobahn's WebSocketResource also assumes",
        "upgrades parsed once, by peersig, and the HTTP channel freed after them",
        False),
    "raise_on_listen_error": Reach(
        "twisted",
        "StreamServerEndpointService raises from startService when _raiseSynchronously is "
        "set (documented ivar since 10.2, what strports.service sets)",
        "a port in use stops twistd with the reason instead of serving nothing",
        False),
    "tls_transport": Reach(
        "twisted",
        "a tcp.Server subclass may read and write through doRead, doWrite, writeSomeData "
        "and connectionLost (tls.TLSServer)",
        "figure: see docs/benchmarks.md, Private reaches",
        False),
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
