"""A ``websockets.sync`` client over wss that cannot lose its upgrade request.

``websockets.sync`` reads its socket in a thread of its own while the caller's thread
writes, and OpenSSL does not support one SSL object used by two threads at once. Over TLS
1.3 the server's NewSessionTicket arrives just after the handshake, while the caller writes
the upgrade request. About one connect in 800 to a local peersig, with Pythons 3.11 and
3.13 and OpenSSL 3.0, lost the request that way: ``sendall`` returned, but the server's
socket never received a byte (its FIONREAD and ``SSL_read`` both empty when it gave up).
peersig's handshake deadline then closed the connection, and the test failed 5 s later on
"connection closed while reading HTTP status line". Measured in sequential connects: 5 of
4,000 lost with ``connect(url, ssl=...)``, 0 of 4,000 with ``wss_connect``.

``wss_connect`` makes the TCP connection and the TLS handshake itself, reads until the
session has its ticket, and only then hands the socket to ``websockets``. Browsers are
not affected: their TLS stacks use one connection from one thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from websockets.sync.client import ClientConnection, connect


def insecure() -> ssl.SSLContext:
    """A client context that accepts the tests' self-signed certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def wss_connect(url: str, context: ssl.SSLContext | None = None, timeout: float = 10,
                **options: Any) -> ClientConnection:
    """``websockets.sync.client.connect(url, ssl=context, **options)`` for a ``wss://``
    ``url``, with the session ticket read before the upgrade request is written.

    Raises ``ssl.SSLError`` when the handshake fails, ``TimeoutError`` when no ticket
    arrives within ``timeout`` s, and what ``connect`` raises for a refused upgrade."""
    parts = urlsplit(url)
    assert parts.scheme == "wss" and parts.hostname is not None and parts.port is not None
    raw = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    try:
        tls = (context or insecure()).wrap_socket(raw, server_hostname=parts.hostname)
    except BaseException:
        raw.close()
        raise
    try:
        tls.setblocking(False)
        deadline = time.monotonic() + timeout
        while tls.session is None or not tls.session.has_ticket:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no TLS session ticket from {parts.netloc}")
            select.select([tls], [], [], left)
            with contextlib.suppress(ssl.SSLWantReadError):
                if tls.recv(1) == b"":
                    raise ConnectionError(f"{parts.netloc} closed the connection")
                raise AssertionError("the server wrote before the upgrade request")
        tls.settimeout(None)
        # The scheme only tells connect() to add TLS, which this socket already has: the
        # request it writes is the same.
        return connect(parts._replace(scheme="ws").geturl(), sock=tls, **options)
    except BaseException:
        tls.close()
        raise
