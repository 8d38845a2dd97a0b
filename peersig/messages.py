"""The PeerJS wire format: frame parsing, frame encoding, id and room-name rules.

Pure functions, no Twisted. Incoming frames are decoded once here; everything past
``parse_frame`` works with typed values. Outgoing frames are built as bytes directly,
because every id that reaches an encoder has passed ``valid_id`` (no JSON escaping needed)
and relay payloads are passed through as already-encoded JSON.
"""

from __future__ import annotations

import json
import re
from typing import Final, cast

import msgspec

# Types a client may send.
HEARTBEAT: Final = "HEARTBEAT"
OFFER: Final = "OFFER"
ANSWER: Final = "ANSWER"
CANDIDATE: Final = "CANDIDATE"
LEAVE: Final = "LEAVE"
EXPIRE: Final = "EXPIRE"
RELAYED: Final = frozenset({OFFER, ANSWER, CANDIDATE, LEAVE, EXPIRE})
# Relays that are queued for an offline destination (LEAVE and EXPIRE never are).
QUEUED: Final = frozenset({OFFER, ANSWER, CANDIDATE})
CLIENT_TYPES: Final = frozenset({HEARTBEAT}) | RELAYED
# Every type the stock client (peerjs 1.5.5) acts on, and the ones peersig sends besides:
# never an app message type (--app-message-type), compared without case.
PEERJS_TYPES: Final = frozenset({"OPEN", "LEAVE", "CANDIDATE", "OFFER", "ANSWER", "EXPIRE",
                                 "HEARTBEAT", "ID-TAKEN", "INVALID-KEY", "ERROR"})
PEERSIG_TYPES: Final = frozenset({"PEERS", "JOIN", "PART"})
_APP_TYPE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,31}")


def app_type_problem(name: str) -> str | None:
    """Why ``name`` cannot be an app message type (``--app-message-type``), or None.

    A type is 1-32 characters, a letter then letters, digits and ``_ . : -``, and is none
    of the types the stock client acts on or peersig sends, in any case: a frame of such a
    type, without ``connectionId`` in its payload, reaches the stock client's default branch,
    which only logs it (``_handleMessage`` in peerjs's lib/peer.ts)."""
    if _APP_TYPE_RE.fullmatch(name) is None:
        return "1 to 32 characters: a letter, then letters, digits and _ . : -"
    if name.upper() in PEERJS_TYPES | PEERSIG_TYPES:
        return "a type of PeerJS's own or of peersig's, which the client acts on"
    return None

# Error texts (payload.msg of an ERROR frame).
E_MISSING_PARAMS: Final = "No id, token, or key supplied to websocket server"
E_INVALID_KEY: Final = "Invalid key provided"
E_INVALID_TOKEN: Final = "Invalid token provided"
E_INVALID_ID: Final = "Invalid id"
E_INVALID_ROOM: Final = "Invalid room name"
E_SERVER_FULL: Final = "Server has reached its concurrent user limit"
E_ADDRESS_FULL: Final = "Too many connections from your address"
E_RATE_LIMIT: Final = "Rate limit exceeded"
E_INTERNAL: Final = "Internal server error"
E_ID_TAKEN: Final = "ID is taken"
# --cluster: Redis cannot be asked who holds an id (docs/scaling.md); sent with close 1013.
E_CLUSTER: Final = "Server is unavailable, try again later"


def room_full_text(size: int) -> str:
    return f"Room is full ({size} peers)"


# WebSocket close codes.
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_UNSUPPORTED: Final = 1003
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_TRY_AGAIN: Final = 1013

MAX_ID_LENGTH: Final = 64
MAX_ROOM_LENGTH: Final = 128
_ID_RE: Final = re.compile(r"[A-Za-z0-9]+(?:[ _-][A-Za-z0-9]+)*")
_ROOM_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def valid_id(value: str) -> bool:
    """The stock client's own id rule, bounded to 64 characters."""
    return len(value) <= MAX_ID_LENGTH and _ID_RE.fullmatch(value) is not None


def valid_room(value: str) -> bool:
    return _ROOM_RE.fullmatch(value) is not None


class BadFrame(Exception):
    """A text frame that is not a message we accept; ``reason`` names the metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_encode = json.JSONEncoder(separators=(",", ":")).encode
# Marks a frame without a payload (a Raw of no bytes is never valid JSON).
_ABSENT: Final = msgspec.Raw(b"")


class Inbound(msgspec.Struct, frozen=True):
    """A client frame, as ``parse_frame`` decodes it and the core reads it: other fields are
    ignored. ``type`` is a client type (``CLIENT_TYPES``, or an app message type), ``dst``
    the destination's id, or None for an app message to the whole room, and ``payload`` the
    payload's JSON as the client wrote it, never decoded (``msgspec.Raw``, empty when the
    frame has none).

    The object msgspec decodes is the one the core gets: neither it nor its payload is
    copied on the per-message path (``parse_frame`` of a 1.2 KB OFFER, 1.32 -> 0.76 us,
    docs/benchmarks-idle.md). A frame its typed fields refuse is judged again with loose
    ones (``_parse_loose``): only refused and unusual frames pay a second decoding.
    """

    type: str = ""  # absent: refused as bad_type, as null is
    dst: str | None = None
    payload: msgspec.Raw = _ABSENT


class _Loose(msgspec.Struct):
    """A client frame's fields as any JSON values (``_parse_loose``)."""

    type: object = None
    dst: object = None
    payload: msgspec.Raw = _ABSENT


class _TypeOnly(msgspec.Struct):
    type: object = None


_frame_decoder = msgspec.json.Decoder(Inbound)
# The frame the stock client sends every 5 s (PEERJS-PROTOCOL.md), byte for byte.
_HEARTBEAT_FRAME: Final = b'{"type":"HEARTBEAT"}'
_HEARTBEAT: Final = Inbound(HEARTBEAT)
_type_decoder = msgspec.json.Decoder(_TypeOnly)
_loose_decoder = msgspec.json.Decoder(_Loose)


def parse_frame(data: bytes, app_types: frozenset[str] = frozenset()) -> Inbound:
    """Decode one text frame. Raises ``BadFrame`` for anything we do not accept.

    ``app_types``: the app message types accepted besides PeerJS's own; their ``dst`` may
    be absent (a message to the whole room). Invalid UTF-8 fails here too, so the transport
    need not validate it separately.
    """
    if data == _HEARTBEAT_FRAME:  # most frames at rest: the decoder's 0.67 us, skipped
        return _HEARTBEAT
    # msgspec checks the UTF-8 of the strings it decodes, not of a payload it skips.
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadFrame("bad_json") from None
    try:
        frame = _frame_decoder.decode(data)
    except (msgspec.MsgspecError, RecursionError):
        return _parse_loose(data, app_types)
    return _HEARTBEAT if _is_heartbeat(frame.type, frame.dst, app_types) else frame


def _parse_loose(data: bytes, app_types: frozenset[str]) -> Inbound:
    """``parse_frame`` for a frame that ``Inbound``'s typed fields refused, or that is not
    JSON: decoded again with every field loose, so that its reason does not depend on which
    bad field msgspec met first. bad_type comes before no_dst, and of a repeated key the
    last wins (as in JSON.parse)."""
    try:
        frame = _loose_decoder.decode(data)
    except msgspec.ValidationError as e:
        # Not an object, or a number beyond a double somewhere in type or dst.
        where = str(e)
        if "`$.dst" in where:  # the type, read alone, says which reason comes first
            try:
                kind = _type_decoder.decode(data).type
            except (msgspec.MsgspecError, RecursionError):
                raise BadFrame("bad_json") from None  # it failed before reaching the end
            if kind == HEARTBEAT:
                return _HEARTBEAT
            known = type(kind) is str and (kind in CLIENT_TYPES or kind in app_types)
            raise BadFrame("no_dst" if known else "bad_type") from None
        raise BadFrame("bad_type" if "`$.type" in where else "not_object") from None
    except msgspec.DecodeError:
        if _SURROGATE_ESCAPE.search(data) is None:
            raise BadFrame("bad_json") from None
        return _parse_lenient(data, app_types)
    except RecursionError:
        raise BadFrame("bad_json") from None
    if _is_heartbeat(frame.type, frame.dst, app_types):
        return _HEARTBEAT
    return Inbound(cast(str, frame.type), cast("str | None", frame.dst), frame.payload)


def _is_heartbeat(mtype: object, dst: object, app_types: frozenset[str]) -> bool:
    """Whether a frame of this ``type`` and ``dst`` is a HEARTBEAT (whatever its ``dst``),
    raising ``BadFrame`` when it is no frame the core takes (checked in the order the
    reasons are defined: bad_type before no_dst)."""
    if type(mtype) is not str or not mtype or (mtype not in CLIENT_TYPES
                                               and mtype not in app_types):
        raise BadFrame("bad_type")  # not mtype: absent, whatever --app-message-type holds
    if mtype == HEARTBEAT:
        return True
    if (type(dst) is not str or not dst) and not (dst is None and mtype in app_types):
        raise BadFrame("no_dst")  # a dst is required but for an app message to the room
    return False


# A \uD800-\uDFFF escape: JSON.stringify writes a lone surrogate so (ECMA-262 since
# ES2019, "well-formed JSON.stringify"), and RFC 8259 (section 8.2) lets a parser take it;
# msgspec refuses it, Python's json module takes it.
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
_skip_whitespace: Final = re.compile(r"[ \t\n\r]*").match


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity and -Infinity


_lenient: Final = json.JSONDecoder(parse_constant=_no_constant)
# Top-level members the fallback reads, one Python loop turn each (PeerJS sends three): a
# 64 KiB frame of 10,000 members cost 16 ms there, against 0.1 ms in msgspec (found in
# review). More are refused as bad_json.
MAX_MEMBERS: Final = 32


def _parse_lenient(data: bytes, app_types: frozenset[str]) -> Inbound:
    """``parse_frame`` for a frame that msgspec refused and that holds a surrogate escape:
    the same verdicts, by Python's json module, and the payload's own bytes.

    Only the envelope is ours to judge: an app's strings (a display name cut in the middle
    of an emoji) are relayed as the browser wrote them.
    """
    text = data.decode("utf-8")  # checked by parse_frame
    try:
        members = _members(text)
    except (ValueError, RecursionError):
        raise BadFrame("bad_json") from None
    if members is None:
        raise BadFrame("not_object")
    mtype = members.get("type", (None, 0, 0))[0]
    dst = members.get("dst", (None, 0, 0))[0]
    if _is_heartbeat(mtype, dst, app_types):
        return _HEARTBEAT
    payload = _ABSENT
    if "payload" in members:
        _, start, end = members["payload"]
        payload = msgspec.Raw(text[start:end].encode())
    return Inbound(cast(str, mtype), cast("str | None", dst), payload)


def _skip(text: str, pos: int) -> int:
    return _skip_whitespace(text, pos).end()  # type: ignore[union-attr]  # always matches


def _members(text: str) -> dict[str, tuple[object, int, int]] | None:
    """The top-level object of a JSON text: each member's name, value, and where the value
    is in ``text`` (start, end); the last of a repeated name wins. None for JSON that is
    not an object. Raises ValueError for text that is not JSON."""
    scan = _lenient.raw_decode
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        _lenient.decode(text)
        return None
    members: dict[str, tuple[object, int, int]] = {}
    count = 0
    pos = _skip(text, pos + 1)
    closed = text.startswith("}", pos)
    while not closed:
        if not text.startswith('"', pos):
            raise ValueError("a member name must be a string")
        name, pos = scan(text, pos)
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise ValueError("':' expected")
        start = _skip(text, pos + 1)
        value, pos = scan(text, start)
        members[name] = (value, start, pos)
        count += 1
        if count > MAX_MEMBERS:
            raise ValueError("too many members")
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif text.startswith("}", pos):
            closed = True
        else:
            raise ValueError("',' or '}' expected")
    if _skip(text, pos + 1) != len(text):
        raise ValueError("text after the object")
    return members


OPEN_FRAME: Final = b'{"type":"OPEN"}'
ID_TAKEN_FRAME: Final = b'{"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}'


def error_frame(msg: str) -> bytes:
    return _encode({"type": "ERROR", "payload": {"msg": msg}}).encode()


def relay_frame(mtype: str, src: str, dst: str | None, payload: msgspec.Raw | bytes) -> bytes:
    """``{"type","src","dst","payload"}``; ``src`` and ``dst`` must be valid ids, and an
    empty ``payload`` (``Inbound``'s when the frame had none) is left out. Without ``dst``
    (an app message to the whole room), ``{"type","src","payload"}``."""
    head = (f'{{"type":"{mtype}","src":"{src}","dst":"{dst}"' if dst is not None
            else f'{{"type":"{mtype}","src":"{src}"').encode()
    if not payload:
        return head + b"}"
    return b"".join((head, b',"payload":', payload, b"}"))


def leave_frame(src: str) -> bytes:
    return f'{{"type":"LEAVE","src":"{src}"}}'.encode()


def join_frame(src: str) -> bytes:
    """``--room-events``: ``src`` (a valid id) joined the room."""
    return f'{{"type":"JOIN","src":"{src}"}}'.encode()


def part_frame(src: str) -> bytes:
    """``--room-events``: ``src`` (a valid id) is no longer a member of the room. It comes
    with every end of membership, LEAVE or not (docs/protocol.md, Departures)."""
    return f'{{"type":"PART","src":"{src}"}}'.encode()


def peers_frame(ids: list[str]) -> bytes:
    """``--room-events``: the other peers in the room, to one that just got OPEN."""
    return _encode({"type": "PEERS", "payload": {"peers": ids}}).encode()


def expire_frame(src: str, dst: str) -> bytes:
    """EXPIRE back to ``dst`` about unreachable ``src``; ``src`` may be any client text."""
    return _encode({"type": EXPIRE, "src": src, "dst": dst}).encode()
