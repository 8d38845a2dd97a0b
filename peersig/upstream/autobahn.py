"""Every reach into Autobahn's private internals (the list: ``peersig.upstream``).

Each function here says what it assumes of Autobahn's ``WebSocketProtocol`` and what it
buys; its direct test is in ``tests/test_upstream.py`` under the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol

from . import on

STATE_OPEN = WebSocketProtocol.STATE_OPEN

# -- open_state ------------------------------------------------------------------------------


def enter_open(protocol: Any) -> None:
    """Leave ``protocol`` as Autobahn's ``succeedHandshake`` leaves a connection whose
    opening handshake went through: RFC 6455 (version 13), no subprotocol, no extension,
    OPEN, between frames. peersig did the handshake itself (``handshake.py``); from here
    Autobahn reads what the fast path does not (control frames, fragments, the close)."""
    protocol.websocket_version = 13
    protocol.websocket_protocol_in_use = None
    protocol.websocket_extensions_in_use = []
    protocol.state = STATE_OPEN
    protocol.inside_message = False
    protocol.current_frame = None


# -- fast_frames -----------------------------------------------------------------------------


def _between_frames(protocol: Any) -> bool:
    """Whether Autobahn holds nothing of the incoming stream: the next byte starts a frame
    that peersig may read itself (``framing.split_frames``)."""
    return (protocol.state == STATE_OPEN and not protocol.data
            and protocol.current_frame is None and not protocol.inside_message)


def _never(protocol: Any) -> bool:
    return False


between_frames = _between_frames if on("fast_frames") else _never

# -- close_codes -----------------------------------------------------------------------------


def send_close(protocol: Any, code: int, reason: bytes) -> None:
    """Start Autobahn's closing handshake with ``code`` and ``reason`` (UTF-8, at most 123
    bytes): ``sendClose`` takes only 1000 and 3000-4999, and a server sends 1001, 1003,
    1008 and 1011 too (RFC 6455 section 7.4.1)."""
    protocol.sendCloseFrame(code, reason, False)


# -- class_options ---------------------------------------------------------------------------


def options_on_class(factory: Any, cls: type) -> type:
    """A subclass of ``cls`` carrying the factory's protocol options as class attributes.

    Autobahn copies every protocol option from the factory into each new connection (and
    pretty-prints the lot for a debug line, logged or not); it skips an option the
    connection already has, so a class that has them all, with ``CONFIG_ATTRS`` empty,
    copies nothing. With ``class_options`` off, the subclass is plain."""
    if not on("class_options"):
        return type(cls.__name__, (cls,), {})
    options = {name: getattr(factory, name) for name in cls.CONFIG_ATTRS}  # type: ignore[attr-defined]
    # A function as a class attribute would be bound to the connection when looked up.
    options = {k: staticmethod(v) if callable(v) else v for k, v in options.items()}
    return type(cls.__name__, (cls,), {"CONFIG_ATTRS": (), **options})


# -- lean_connection -------------------------------------------------------------------------

# What an open connection does not need of what _connectionMade gave it: state that is None
# until a close (or never used by a server that sends no pings of Autobahn's own), the
# incoming UTF-8 validator (unused with utf8validateIncoming off: the JSON decoder checks
# UTF-8), Autobahn's event listeners (nothing listens), and is_open, which nothing
# waits on for a server's connections. Each reads as None from the class once dropped.
NONE_WHILE_OPEN = (
    "localCloseCode", "localCloseReason", "remoteCloseCode", "remoteCloseReason",
    "wasNotCleanReason", "websocket_protocol_in_use", "_perMessageCompress",
    "trackedTimings", "openHandshakeTimeoutCall", "closeHandshakeTimeoutCall",
    "autoPingTimeoutCall", "autoPingPending", "autoPingPendingCall", "autoPingPendingSent",
)
UNUSED_WHILE_OPEN = ("utf8validator", "is_open", "_valid_events", "_results")


class _SendQueue(list[tuple[bytes, bool]]):
    """The part of a deque Autobahn's send queue uses, at the size of a list."""

    __slots__ = ()

    def popleft(self) -> tuple[bytes, bool]:
        return self.pop(0)


def prepare_class(cls: type) -> None:
    """Give ``cls`` the None that ``lighten_open`` drops from its connections."""
    for name in NONE_WHILE_OPEN + UNUSED_WHILE_OPEN:
        setattr(cls, name, None)


def lighten_open(protocol: Any) -> None:
    """Drop what an open connection of a ``prepare_class`` class does not need, and rebuild
    its attribute dict at its new size (a dict never shrinks by itself). Autobahn's send
    queue stays empty (peersig's frames are written at once): a list costs 56 bytes where
    an empty deque costs 760."""
    if not on("lean_connection"):
        return
    attrs = protocol.__dict__
    for name in NONE_WHILE_OPEN:
        if name in attrs and attrs[name] is None:
            del attrs[name]
    for name in UNUSED_WHILE_OPEN:
        attrs.pop(name, None)
    if not protocol.send_queue:
        protocol.send_queue = _SendQueue()
    protocol.__dict__ = dict(attrs)


# -- nvx_unmask ------------------------------------------------------------------------------

# From this many bytes on the compiled masker is the faster (measured with timeit: 0.59 us for
# the big integer against 0.66 us compiled at 100 bytes, 1.08 against 0.74 at 300 bytes).
NVX_MIN = 128


def nvx_unmasker() -> Callable[[bytes, bytes], bytes] | None:
    """Autobahn's compiled XOR masker (NVX, its SIMD C code built with CFFI) as a function
    (mask: 4 bytes, payload) -> unmasked bytes, or None where that module is missing
    (Autobahn before 25, or a build that skipped it), Autobahn's own switch turns NVX off
    (``AUTOBAHN_USE_NVX=0``: ``autobahn.websocket.USES_NVX``), or the reach is off.

    Assumes the top-level CFFI module ``_nvx_xormasker`` that Autobahn's wheels ship, with
    ``lib.nvx_xormask_new(mask) -> masker`` (reading 4 bytes; NULL when out of memory),
    ``lib.nvx_xormask_process(masker, data, n)`` XORing ``data`` in place from the mask's
    first byte on, and ``lib.nvx_xormask_free``.
    """
    if not on("nvx_unmask"):
        return None
    import autobahn.websocket

    if not getattr(autobahn.websocket, "USES_NVX", False):
        return None
    try:
        from _nvx_xormasker import ffi, lib  # type: ignore[import-not-found]
    except ImportError:
        return None
    new, process, free, from_buffer, null = (lib.nvx_xormask_new, lib.nvx_xormask_process,
                                             lib.nvx_xormask_free, ffi.from_buffer, ffi.NULL)

    def unmask(mask: bytes, payload: bytes) -> bytes:
        data = bytearray(payload)
        masker = new(mask)
        if masker == null:
            raise MemoryError("nvx_xormask_new")
        try:
            process(masker, from_buffer(data), len(data))
        finally:
            free(masker)
        return bytes(data)

    return unmask
