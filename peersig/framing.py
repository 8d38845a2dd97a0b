"""RFC 6455 framing for the frames a PeerJS peer exchanges, as pure functions on bytes.

No I/O and no state: ``websocket.py`` feeds it what a socket read and writes what it builds
(``unmask`` picks Autobahn's compiled masker for long frames once, at import).
Only the common case is handled here: complete, unfragmented, masked text frames and empty
pongs from the client; unmasked text frames, pings and the opening handshake's accept key
from the server. Anything else (fragments, control frames with a body, a close, a frame cut
by the end of a read, a length not minimally encoded) stops ``split_frames`` where it
starts, and Autobahn, the judge of the protocol, reads it from there.
"""

from __future__ import annotations

import base64
import hashlib

from .upstream.autobahn import NVX_MIN, nvx_unmasker

# RFC 6455 section 1.3.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# An empty ping, FIN set (section 5.5.2).
PING_FRAME = b"\x89\x00"
# What ``split_frames`` yields for an empty pong (section 5.5.3).
PONG = None


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


_native_unmask = nvx_unmasker()


def unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR a client frame's payload with its 4-byte mask (section 5.3): from ``NVX_MIN``
    bytes on in Autobahn's compiled masker where it has one (``upstream.autobahn``), below
    that (and without it) as one big-integer operation, which is as fast for short frames."""
    size = len(payload)
    if size >= NVX_MIN and _native_unmask is not None:
        return _native_unmask(mask, payload)
    key = int.from_bytes((mask * ((size >> 2) + 1))[:size], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(size, "little")


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented server text frame (section 5.2)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65536:
        head = bytes((0x81, 126, size >> 8, size & 0xFF))
    else:
        head = b"\x81\x7f" + size.to_bytes(8, "big")
    return head + payload


def split_frames(data: bytes, limit: int) -> list[tuple[bytes | None, int]]:
    """The complete client frames at the start of ``data`` that take the common path, each
    as (what it holds, the offset just past it): the unmasked payload of a masked,
    unfragmented text frame of at most ``limit`` bytes (0: no limit), or ``PONG`` for an
    empty masked pong. The first other frame (or an incomplete one) starts at the offset of
    the last one (0 when the list is empty).
    """
    frames: list[tuple[bytes | None, int]] = []
    end = len(data)
    pos = 0
    while pos + 6 <= end:
        opcode = data[pos]
        if opcode == 0x8A and data[pos + 1] == 0x80:  # FIN, pong, masked, empty
            pos += 6
            frames.append((PONG, pos))
            continue
        if opcode != 0x81:  # FIN, text
            break
        size = data[pos + 1] ^ 0x80  # must be masked: the mask bit flips off
        if size < 126:
            start = pos + 6
        elif size == 126 and pos + 8 <= end:
            size = (data[pos + 2] << 8) | data[pos + 3]
            if size < 126:
                break  # not minimally encoded: Autobahn fails the connection
            start = pos + 8
        else:
            break  # unmasked, 64-bit length, or header not all here
        stop = start + size
        if stop > end or (limit and size > limit):
            break
        frames.append((unmask(data[start - 4:start], data[start:stop]), stop))
        pos = stop
    return frames
