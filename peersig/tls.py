"""wss on Twisted's TLS transport, with certificate files re-read on SIGHUP.

``ssl:`` port descriptions are parsed here (same syntax and defaults as Twisted's own
``ssl:`` endpoint) so that the listening port holds a ``ReloadingTLS``: new connections use
the certificate loaded last, connections already up keep theirs.
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

# The listen() backlog of tcp: and ssl: ports unless their description says backlog=N.
# Twisted's default, 50, overflows when every peer of a node reconnects at once (a restart,
# a deploy): SYNs are dropped and clients wait for their retransmits, a second and more.
# The kernel caps it at net.core.somaxconn (4096 since Linux 5.4). Issue 16.
BACKLOG = 4096

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


# The one protocol peersig speaks after TLS (WebSocket upgrades are HTTP/1.1), offered in
# ALPN from the context itself: the site offers none of its own (web.QuietSite).
ALPN = [b"http/1.1"]


class CertificateError(Exception):
    """A certificate or key file is missing, unreadable or not PEM."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateError(f"cannot read {what} {path}: {e.strerror}") from None


def load_options(private_key: str, cert_key: str, chain: str | None) -> ssl.CertificateOptions:
    """CertificateOptions from PEM files; the certificate file may hold the whole chain
    (Let's Encrypt's fullchain.pem), the leaf first."""
    key_pem = _read(private_key, "private key")
    certs = _PEM_CERT.findall(_read(cert_key, "certificate"))
    if chain is not None:
        certs += _PEM_CERT.findall(_read(chain, "certificate chain"))
    if not certs:
        raise CertificateError(f"no PEM certificate in {cert_key}")
    try:
        pair = ssl.PrivateCertificate.loadPEM(certs[0] + b"\n" + key_pem)
        extra = [ssl.Certificate.loadPEM(c).original for c in certs[1:]]
        return ssl.CertificateOptions(
            privateKey=pair.privateKey.original,
            certificate=pair.original,
            extraCertChain=extra or None,
            acceptableProtocols=ALPN,
        )
    except (SSL.Error, ValueError) as e:
        raise CertificateError(f"bad certificate or key ({cert_key}, {private_key}): {e}") from None


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingTLS:
    def __init__(self, private_key: str, cert_key: str, chain: str | None = None) -> None:
        self.files = (private_key, cert_key, chain)
        self.options = load_options(*self.files)
        self.options.getContext()  # fail now, not at the first handshake

    def reload(self) -> bool:
        """Re-read the files; on any error keep serving the certificate loaded before."""
        try:
            options = load_options(*self.files)
            options.getContext()
        except CertificateError as e:
            log.error("certificate not reloaded, keeping the old one: {error}", error=str(e))
            return False
        self.options = options
        log.info("certificate reloaded from {cert}", cert=self.files[1])
        return True

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        # A connection on the options' cached context, as Twisted makes one from any
        # context factory: CertificateOptions has its own serverConnectionForTLS only since
        # Twisted 26.4, and calling it on 24.7 reset every TLS connection.
        return SSL.Connection(self.options.getContext(), None)


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


def tls_endpoint(reactor: Any, description: str) -> tuple[SSL4ServerEndpoint, ReloadingTLS]:
    """An endpoint for an ``ssl:`` description, and its reloadable certificate."""
    args, kw = split_description(description)
    names = ["port", "privateKey", "certKey"]
    for name, value in zip(names, args[1:], strict=False):
        kw.setdefault(name, value)
    if "port" not in kw:
        raise CertificateError(f"no port in {description!r}")
    private_key = kw.get("privateKey", "server.pem")
    tls = ReloadingTLS(private_key, kw.get("certKey", private_key), kw.get("extraCertChain"))
    endpoint = SSL4ServerEndpoint(reactor, int(kw["port"]), tls,
                                  backlog=int(kw.get("backlog", BACKLOG)),
                                  interface=kw.get("interface", ""))
    return endpoint, tls
