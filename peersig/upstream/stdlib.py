"""Every reach into the standard library's private internals (the list: ``peersig.upstream``).

Its direct test is in ``tests/test_upstream.py`` under the same name.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from . import on

# -- ssl_object --------------------------------------------------------------------------------


def server_tls(context: ssl.SSLContext, sock: socket.socket) -> tuple[Any, socket.socket]:
    """A server-side TLS object on the accepted ``sock``, and the socket its transport keeps.

    With ``ssl_object``: ``SSLContext._wrap_socket``, the C object that ``SSLSocket`` wraps,
    on the socket itself: ``read``, ``write``, ``pending`` and ``do_handshake`` are one C
    call each, without ``SSLSocket``'s Python methods around them, and the socket stays the
    one accepted. Without it: the public ``wrap_socket``, whose ``SSLSocket`` replaces the
    socket (the accepted one is detached into it). Assumes ``_wrap_socket(sock,
    server_side=True)`` returns an object with those methods and ``shutdown`` (close_notify).
    """
    if on("ssl_object"):
        tls = context._wrap_socket(sock, server_side=True)  # type: ignore[attr-defined]
        return tls, sock
    wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False,
                                  suppress_ragged_eofs=False)
    return wrapped, wrapped


def close_notify(tls: Any) -> None:
    """Send TLS's close_notify on a ``server_tls`` object (the client's is not awaited)."""
    if isinstance(tls, ssl.SSLSocket):
        tls.unwrap()
    else:
        tls.shutdown()
