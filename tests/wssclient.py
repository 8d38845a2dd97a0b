"""A ``websockets.sync`` client over wss that reads the server's session ticket before it
writes its upgrade request.

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
session has its ticket, and only then hands the socket to ``websockets``. peersig sends
one ticket (``num_tickets`` in peersig/tls.py). A server that sent more would send them
in one flight, and the read that finds the first takes those that have arrived with it.
Both threads still share the SSL object afterwards, but nothing else reaches a client
unasked before its request. Browsers are not affected: their TLS stacks use one
connection from one thread.
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

    Raises ``ssl.SSLError`` or ``OSError`` when the handshake fails, ``TimeoutError`` when
    it or the ticket takes more than ``timeout`` s, and what ``connect`` raises for a
    refused upgrade (its ``open_timeout`` is ``timeout`` unless given)."""
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
        while True:
            with contextlib.suppress(ssl.SSLWantReadError):  # takes what has arrived
                if tls.recv(1) == b"":
                    raise ConnectionError(f"{parts.netloc} closed the connection")
                raise AssertionError("the server wrote before the upgrade request")
            if tls.session is not None and tls.session.has_ticket:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no TLS session ticket from {parts.netloc}")
            select.select([tls], [], [], left)
        tls.settimeout(None)
        options.setdefault("open_timeout", timeout)
        # The scheme only tells connect() to add TLS, which this socket already has: the
        # request it writes is the same.
        return connect(parts._replace(scheme="ws").geturl(), sock=tls, **options)
    except BaseException:
        tls.close()
        raise
