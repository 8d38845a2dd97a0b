"""The WebSocket opening handshake of a PeerJS client, as pure functions on bytes and text.

No I/O and no state, in the way of wsproto's handshake: ``websocket.py`` collects a request
head from the socket and hands it here; ``web.py`` hands the requests Twisted's HTTP parser
read first (an upgrade on a kept-alive connection, HTTP/1.0). ``parse_head`` reads a head by
RFC 9112's rules, ``judge`` decides by RFC 6455's (section 4.2.1) and peersig's own (a
draining server, the origin allowlist), and ``accept_response`` / ``refusal_response`` make
the bytes that answer. Every refusal is a status code and a text that says what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple
from urllib.parse import parse_qs

from .framing import accept_key

# The largest request head taken (request line and header lines with their CRLFs). Browsers
# send well under 2 KiB; cookies of the page's site come along and may make it several.
MAX_HEAD = 20480

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 section 5.5: a field value is VCHAR, obs-text (0x80-0xFF), SP and HTAB.
_NOT_FIELD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 section 3.2: a request-target has no whitespace or control characters.
_NOT_TARGET = re.compile(r"[\x00-\x20\x7f-\xff]")
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
# RFC 9110 section 7.2: Host = uri-host [ ":" port ]; port = *DIGIT.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/?#@\s]*)(:[0-9]*)?")


class Request(NamedTuple):
    """A request head: its request line and its header fields in order, each name in lower
    case (ISO-8859-1 text, as RFC 9110 section 5.5 reads octets above 0x7F)."""

    method: str
    target: str
    version: str
    fields: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        """Every value of the field ``name`` (lower case), in order."""
        return [value for field, value in self.fields if field == name]


class Refusal(NamedTuple):
    """An HTTP error answer: status, reason phrase, a text body (what was wrong), and extra
    header fields."""

    status: int
    reason: str
    body: str
    headers: tuple[tuple[str, str], ...] = ()


class Upgrade(NamedTuple):
    """An accepted opening handshake: what the join needs of it."""

    key: str  # Sec-WebSocket-Key, for Sec-WebSocket-Accept
    params: dict[str, list[str]]  # the query, URL-decoded
    origin: str | None  # the Origin header, None without one
    forwarded_for: str  # every X-Forwarded-For line, joined with ", "


def _bad(text: str) -> Refusal:
    return Refusal(400, "Bad Request", text)


def parse_head(head: bytes) -> Request | Refusal:
    """Read a request head, ``head`` being every byte before the empty line that ends it.

    RFC 9112's rules, strictly, for a head that may have come through proxies: lines end
    at CRLF only (a bare CR or LF is refused: a proxy that splits lines otherwise would see
    other headers than peersig, section 2.2), no folded lines (section 5.2), a field name
    is a token directly followed by its colon (section 5.1), a field value has no control
    characters (RFC 9110 section 5.5). Optional whitespace around a value is dropped.
    """
    text = head.decode("iso-8859-1")
    if "\r" in text.replace("\r\n", "") or "\n" in text.replace("\r\n", ""):
        return _bad("Bare CR or LF in the request head")
    line, *lines = text.split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] \
            or _NOT_TARGET.search(parts[1]) or not _VERSION.fullmatch(parts[2]):
        return _bad("Malformed request line")
    fields = []
    for field_line in lines:
        name, colon, value = field_line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            return _bad("Malformed header field" if field_line[:1] not in (" ", "\t")
                        else "Folded header field")
        value = value.strip(" \t")
        if _NOT_FIELD_VALUE.search(value):
            return _bad("Control character in a header field")
        fields.append((name.lower(), value))
    return Request(parts[0], parts[1], parts[2], tuple(fields))


def _tokens(values: Iterable[str]) -> set[str]:
    """The comma-separated tokens of a list-valued field (Upgrade, Connection), in lower
    case (RFC 9110 section 5.6.1)."""
    return {item.strip(" \t").lower() for value in values for item in value.split(",")}


def not_an_upgrade(params: dict[str, list[str]]) -> str:
    """What a plain HTTP request for ``{path}peerjs`` is told, with status 400: the query
    parameters a PeerJS client sends that it lacks, or that a WebSocket upgrade is needed."""
    missing = [name for name in ("key", "id", "token") if not params.get(name, [""])[0]]
    if missing:
        return (f"Missing query parameters: {', '.join(missing)} "
                "(a PeerJS client's WebSocket connects here)")
    return "Expected a WebSocket upgrade (a PeerJS client's WebSocket connects here)"


def judge(request: Request, draining: bool,
          origin_allowed: Callable[[str | None], bool]) -> Upgrade | Refusal:
    """Accept a request for ``{path}peerjs`` as a WebSocket opening handshake, or refuse it.

    In this order: 503 while the server drains (whatever else the request holds: a load
    balancer retries a 503 on another node); 400 naming the missing query parameters for a
    request that is no upgrade (an address bar); RFC 6455 section 4.2.1's checks (405 for a
    method other than GET, 505 below HTTP/1.1, 400 for a missing or repeated Host, a
    Connection without ``upgrade``, a bad Sec-WebSocket-Key, 426 with the version spoken
    for a Sec-WebSocket-Version other than 13), and 400 for a body (whose bytes would be
    read as frames on one route and as HTTP on the other); 400 for two Origin headers; then
    403 for an
    Origin the allowlist does not hold (``origin_allowed``, called with None when there is
    none: the allowlist alone judges, ``null`` and ``file://`` included).

    Extension offers are declined (the answer names none) and subprotocol offers are
    answered without one, as section 4.2.2 allows: peersig speaks plain RFC 6455 frames.
    """
    if draining:
        return Refusal(503, "Service Unavailable", "Server is draining")
    path, _, query = request.target.partition("?")
    query, hash_mark, _ = query.partition("#")
    params = parse_qs(query)
    if "websocket" not in _tokens(request.values("upgrade")):
        return _bad(not_an_upgrade(params))
    if request.method != "GET":
        return Refusal(405, "Method Not Allowed", "A WebSocket upgrade is a GET",
                       (("Allow", "GET"),))
    if request.version != "HTTP/1.1":
        return Refusal(505, "HTTP Version Not Supported",
                       "A WebSocket upgrade needs HTTP/1.1")
    if hash_mark or not path.startswith("/"):
        return _bad("A WebSocket URL has a path and no fragment")
    hosts = request.values("host")
    if len(hosts) != 1 or not _HOST.fullmatch(hosts[0]):
        return _bad("One Host header is needed")
    if "upgrade" not in _tokens(request.values("connection")):
        return _bad("The Connection header must hold Upgrade")
    keys = request.values("sec-websocket-key")
    if len(keys) != 1 or not _key_ok(keys[0]):
        return _bad("One Sec-WebSocket-Key of 16 bytes in base64 is needed")
    if request.values("sec-websocket-version") != ["13"]:
        return Refusal(426, "Upgrade Required", "Sec-WebSocket-Version 13 is spoken here",
                       (("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")))
    if request.values("transfer-encoding") or request.values("content-length") not in ([], ["0"]):
        return _bad("An opening handshake has no body")
    origins = request.values("origin")
    if len(origins) > 1:
        return _bad("More than one Origin header")
    origin = origins[0] if origins else None
    if not origin_allowed(origin):
        return Refusal(403, "Forbidden", "Origin not allowed")
    return Upgrade(keys[0], params, origin, ", ".join(request.values("x-forwarded-for")))


def _key_ok(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept_response(key: str) -> bytes:
    """The 101 that completes a handshake (RFC 6455 section 4.2.2)."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
            % accept_key(key).encode())


def refusal_response(refusal: Refusal) -> bytes:
    """A whole HTTP/1.1 answer for ``refusal``, after which the connection closes."""
    body = refusal.body.encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in refusal.headers)
    return (f"HTTP/1.1 {refusal.status} {refusal.reason}\r\nContent-Type: text/plain; "
            f"charset=utf-8\r\nContent-Length: {len(body)}\r\n{extra}Connection: close\r\n"
            "\r\n").encode("iso-8859-1") + body
