"""wss: TLS records handled in C on each socket, and certificate files re-read on SIGHUP.

Twisted's own TLS (``TLSMemoryBIOProtocol`` on pyOpenSSL) moves every record through
Python: from the socket into a memory BIO, through pyOpenSSL, and out through a second
transport write that waits for the next epoll round. Here an ``ssl:`` port keeps Twisted's
TCP port and connection, and each accepted socket gets an OpenSSL ``SSL`` object of the
stdlib ``ssl`` module on the socket itself (a socket BIO): reading records is one
``SSL_read`` a record and writing them one ``SSL_write``, in C (docs/benchmarks.md). When
the kernel offers TLS offload (``tls`` in ``/proc/sys/net/ipv4/tcp_available_ulp``),
``SSL_OP_ENABLE_KTLS`` asks OpenSSL to hand the records to it after the handshake; OpenSSL
goes on by itself where it cannot (a cipher the kernel lacks, a build without kTLS).

``ssl:`` port descriptions are parsed here (same syntax and defaults as Twisted's own
``ssl:`` endpoint) so that the listening port holds a ``ReloadingTLS``: new connections use
the certificate loaded last, connections already up keep theirs.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import tempfile
from typing import Any

from twisted.internet import defer, error, main, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from .upstream.stdlib import close_notify, server_tls

log = Logger()

# The listen() backlog of tcp: and ssl: ports unless their description says backlog=N.
# Twisted's default, 50, overflows when every peer of a node reconnects at once (a restart,
# a deploy): SYNs are dropped and clients wait for their retransmits, a second and more.
# The kernel caps it at net.core.somaxconn (4096 since Linux 5.4). Issue 16.
BACKLOG = 4096

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)

# The one protocol peersig speaks after TLS (WebSocket upgrades are HTTP/1.1), in ALPN.
ALPN = ["http/1.1"]

# OpenSSL 3's SSL_OP_ENABLE_KTLS (ssl.OP_ENABLE_KTLS from Python 3.12 on).
OP_ENABLE_KTLS = getattr(ssl, "OP_ENABLE_KTLS", 1 << 3)
_ULP = "/proc/sys/net/ipv4/tcp_available_ulp"


def kernel_tls(ulp_path: str = _ULP) -> bool:
    """Whether this kernel offers TLS offload (its ``tls`` upper-layer protocol is loaded)."""
    try:
        with open(ulp_path) as f:
            return "tls" in f.read().split()
    except OSError:
        return False


class CertificateError(Exception):
    """A certificate or key file is missing, unreadable or not PEM."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateError(f"cannot read {what} {path}: {e.strerror}") from None


def load_context(private_key: str, cert_key: str, chain: str | None,
                 ktls: bool = False) -> ssl.SSLContext:
    """A server SSLContext from PEM files; the certificate file may hold the whole chain
    (Let's Encrypt's fullchain.pem), the leaf first, and ``chain`` more of it. TLS 1.2 and
    1.3, no renegotiation, ALPN ``http/1.1``, and kernel TLS when ``ktls``."""
    _read(private_key, "private key")
    certs = _PEM_CERT.findall(_read(cert_key, "certificate"))
    if chain is not None:
        certs += _PEM_CERT.findall(_read(chain, "certificate chain"))
    if not certs:
        raise CertificateError(f"no PEM certificate in {cert_key}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | (OP_ENABLE_KTLS if ktls else 0)
    context.set_alpn_protocols(ALPN)
    # One TLS 1.3 session ticket per connection, not OpenSSL's two: enough for a browser's
    # reconnect to resume (tickets are used once), and a little less CPU per connect
    # (0.624 -> 0.608 ms in bench/, three runs each).
    context.num_tickets = 1
    # load_cert_chain reads files only: the certificates, in order, from a private one.
    with tempfile.NamedTemporaryFile(prefix="peersig-chain-", suffix=".pem") as pem:
        pem.write(b"\n".join(certs) + b"\n")
        pem.flush()
        try:
            context.load_cert_chain(pem.name, private_key)
        except (ssl.SSLError, ValueError) as e:
            raise CertificateError(
                f"bad certificate or key ({cert_key}, {private_key}): {e}") from None
    return context


class ReloadingTLS:
    """The certificate of one ``ssl:`` port, re-read by ``reload`` (SIGHUP)."""

    def __init__(self, private_key: str, cert_key: str, chain: str | None = None) -> None:
        self.files = (private_key, cert_key, chain)
        self.ktls = kernel_tls()
        self.context = load_context(*self.files, ktls=self.ktls)

    def reload(self) -> bool:
        """Re-read the files; on any error keep serving the certificate loaded before."""
        try:
            context = load_context(*self.files, ktls=self.ktls)
        except CertificateError as e:
            log.error("certificate not reloaded, keeping the old one: {error}", error=str(e))
            return False
        self.context = context
        log.info("certificate reloaded from {cert}", cert=self.files[1])
        return True


# Records read in one go before other connections get their turn.
MAX_RECORDS_PER_READ = 16


class TLSServer(tcp.Server):
    """An accepted TCP connection carrying TLS in its socket's own ``SSL`` object.

    Twisted's ``tcp.Server`` with its reads, writes and close done through ``SSL_read``,
    ``SSL_write`` and ``SSL_shutdown``. The handshake runs on the reactor's read and write
    events; until it is over nothing is read or written for the protocol. OpenSSL may need
    to write to go on reading, or to read to go on writing (``SSLWantWriteError`` on a
    read, ``SSLWantReadError`` on a write): the transport then waits for that. A write
    OpenSSL could not finish is retried with the same bytes first (Twisted's write buffer
    only grows at its end), as OpenSSL requires.
    """

    _handshaking = True
    # A read is waiting for the socket to take OpenSSL's pending output, or a write for
    # OpenSSL to read something first.
    _read_wants_write = False
    _write_wants_read = False

    def __init__(self, sock: Any, protocol: Any, client: Any, server: TLSPort, sessionno: int,
                 reactor: Any) -> None:
        # Reads are SSL_read and writes SSL_write on the socket's descriptor, in C.
        self._tls, sock = server_tls(server.tls.context, sock)
        super().__init__(sock, protocol, client, server, sessionno, reactor)

    def _handshake(self) -> Any:
        """One step of the handshake: None while it goes on (or once it is over),
        CONNECTION_LOST when it failed (a bad hello, a client's alert, an early EOF)."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            # Until the client's next handshake message arrives nothing can be written,
            # not even what the protocol buffered: writable events would only spin.
            self.stopWriting()
            return None
        except ssl.SSLWantWriteError:
            self.startWriting()
            return None
        except (ssl.SSLError, OSError, ValueError):
            return main.CONNECTION_LOST
        self._handshaking = False
        # What the protocol wrote meanwhile goes now; with nothing to write, the next
        # doWrite stops writing by itself.
        self.startWriting()
        return None

    def doRead(self) -> Any:
        if self._handshaking:
            lost = self._handshake()
            if lost is not None or self._handshaking:
                return lost
        if self._write_wants_read:  # what the write waited for may have come
            self._write_wants_read = False
            self.startWriting()
        tls = self._tls
        protocol = self.protocol
        size = self.bufferSize
        for _ in range(MAX_RECORDS_PER_READ):
            try:
                data = tls.read(size)
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                self.startWriting()
                return None
            except ssl.SSLZeroReturnError:  # the client's close_notify
                return main.CONNECTION_DONE
            except (ssl.SSLError, OSError):  # an alert, a bad record, EOF mid-record
                return main.CONNECTION_LOST
            if not data:
                return main.CONNECTION_DONE
            protocol.dataReceived(data)
            if self.disconnected or not tls.pending():
                # Records still in the kernel wake the reactor again (epoll is level
                # triggered); OpenSSL reads no further than the record it returns.
                return None
        return None

    def doWrite(self) -> Any:
        if self._handshaking:
            if self.disconnecting:  # closed before the handshake was over: nothing to say
                return main.CONNECTION_DONE
            lost = self._handshake()
            if lost is not None or self._handshaking:
                return lost
        if self._read_wants_write:
            self._read_wants_write = False
            lost = self.doRead()
            if lost is not None:
                return lost
        return super().doWrite()

    def writeSomeData(self, data: Any) -> Any:
        if self._handshaking:
            return 0
        try:
            if len(data) > self.SEND_LIMIT:
                data = memoryview(data)[:self.SEND_LIMIT]
            return self._tls.write(data)
        except ssl.SSLWantWriteError:
            return 0
        except ssl.SSLWantReadError:  # the next read lets the write go on
            self._write_wants_read = True
            self.stopWriting()
            return 0
        except (ssl.SSLError, OSError):
            return main.CONNECTION_LOST

    def connectionLost(self, reason: Any) -> None:
        if not self._handshaking and not reason.check(error.ConnectionAborted) \
                and hasattr(self, "socket"):
            # close_notify; the client's own is not waited for
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                close_notify(self._tls)
        super().connectionLost(reason)


class TLSPort(tcp.Port):
    """A TCP port whose connections are ``TLSServer``s on ``tls``'s current context."""

    transport = TLSServer  # type: ignore[assignment]

    def __init__(self, port: int, factory: Any, tls: ReloadingTLS, backlog: int,
                 interface: str, reactor: Any) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self.tls = tls


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    def __init__(self, reactor: Any, port: int, tls: ReloadingTLS, backlog: int,
                 interface: str) -> None:
        self.reactor = reactor
        self.port = port
        self.tls = tls
        self.backlog = backlog
        self.interface = interface

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        def start() -> TLSPort:
            port = TLSPort(self.port, factory, self.tls, self.backlog, self.interface,
                           self.reactor)
            port.startListening()
            return port

        return defer.execute(start)


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's endpoint syntax: ``:``-separated, ``\\`` escapes, ``name=value`` pairs."""
    fields: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    args = [f for f in fields if "=" not in f]
    kwargs = dict(f.split("=", 1) for f in fields if "=" in f)
    return args, kwargs


def with_backlog(description: str) -> str:
    """A ``tcp:`` or ``tcp6:`` port description, with ``backlog=BACKLOG`` unless it has one."""
    kind = description.partition(":")[0]
    if kind in ("tcp", "tcp6") and "backlog" not in split_description(description)[1]:
        return f"{description}:backlog={BACKLOG}"
    return description


def tls_endpoint(reactor: Any, description: str) -> tuple[TLSServerEndpoint, ReloadingTLS]:
    """An endpoint for an ``ssl:`` description, and its reloadable certificate."""
    args, kw = split_description(description)
    names = ["port", "privateKey", "certKey"]
    for name, value in zip(names, args[1:], strict=False):
        kw.setdefault(name, value)
    if "port" not in kw:
        raise CertificateError(f"no port in {description!r}")
    private_key = kw.get("privateKey", "server.pem")
    tls = ReloadingTLS(private_key, kw.get("certKey", private_key), kw.get("extraCertChain"))
    endpoint = TLSServerEndpoint(reactor, int(kw["port"]), tls,
                                 int(kw.get("backlog", BACKLOG)), kw.get("interface", ""))
    return endpoint, tls
