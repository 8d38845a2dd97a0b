"""``--auth jwt``: an app's own identity tokens (JWT, RFC 7519) as PeerJS join tokens.

The PeerJS ``token`` is ``ROOM~JWT``: the room stays readable before ``~``, for the
``token`` room mode and for HAProxy's pinning (``url_param(token),field(1,~)``); in ``key``
and ``none`` modes the JWT alone will do. PyJWT verifies the signature and the registered
claims: ``exp`` is required, ``nbf`` honoured (both with ``LEEWAY`` seconds of clock
skew), ``aud`` and ``iss`` checked against ``--jwt-audience``/``--jwt-issuer`` when set (a
token with an ``aud`` claim needs ``--jwt-audience``). Then ``sub`` must be the peer id and
``room`` the room of the room mode (the key in ``none`` mode; ``match:NAME`` for a quick
match). An optional ``room_size`` claim (a positive integer) sets the size of a room its
holder creates, ``--room-size`` being the cap. A valid JWT takes its id over at once, as a
signed ``hmac`` token does; every failure is ERROR ``Invalid token provided``.

Keys come from ``--jwt-key-file`` (``KeyFile``: an HS256 secret, or a PEM public key or
certificate for RS256/384/512, ES256/384/512 or EdDSA) or from ``--jwks-url`` (``JWKS``:
an identity provider's JSON Web Key Set, RFC 7517, fetched with Twisted's HTTP client and
never on the reactor's time). The algorithm is the key's, never the token's choice:
``alg: none`` and HS256 with a public key are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from . import tokens
from .auth import IPeerAuthorizer, Verdict
from .httpclient import make_agent, read_body

if TYPE_CHECKING:
    from .config import Config
    from .rooms import JoinRequest

log = Logger()

# Seconds of clock skew allowed on exp, nbf and iat.
LEEWAY = 30
# The longest JWT looked at (an upgrade's head is bounded anyway).
MAX_JWT = 8192
# The shortest HS256 secret: RFC 7518 section 3.2 asks for a key as long as the hash.
MIN_SECRET = 32
# JWKS: seconds after which keys are fetched again (in the background; the cached ones keep
# working), the fewest seconds between two fetches made for an unknown kid, the seconds one
# fetch may take, and its largest body.
JWKS_MAX_AGE = 600.0
JWKS_MIN_INTERVAL = 5.0
JWKS_TIMEOUT = 10.0
MAX_JWKS = 1 << 20

REFUSED = Verdict(False)

# A public key and the algorithms it verifies.
KeyEntry = tuple[Any, list[str]]


class UnusableKey(ValueError):
    """A key file or JWKS that cannot be used."""


def public_key_algorithms(key: Any) -> list[str]:
    """The JWS algorithms (RFC 7518) a public key verifies."""
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        if key.curve.name in by_curve:
            return [by_curve[key.curve.name]]
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ["EdDSA"]
    raise UnusableKey(f"unsupported public key type {type(key).__name__}")


class KeyFile:
    """One key from a file: PEM (``BEGIN PUBLIC KEY`` or ``BEGIN CERTIFICATE``) is a public
    key; anything else is an HS256 secret of at least ``MIN_SECRET`` bytes (surrounding
    whitespace stripped)."""

    def __init__(self, data: bytes) -> None:
        text = data.strip()
        if text.startswith(b"-----BEGIN"):
            try:
                if b"CERTIFICATE-----" in text.split(b"\n", 1)[0]:
                    key: Any = x509.load_pem_x509_certificate(text).public_key()
                else:
                    key = serialization.load_pem_public_key(text)
            except ValueError as e:
                raise UnusableKey(f"not a PEM public key or certificate ({e})") from None
            self.entry: KeyEntry = (key, public_key_algorithms(key))
        else:
            if len(text) < MIN_SECRET:
                raise UnusableKey(f"an HS256 secret needs {MIN_SECRET} bytes or more")
            self.entry = (text, ["HS256"])

    def key_for(self, header: dict[str, Any], now: float) -> KeyEntry | Deferred[None] | None:
        return self.entry


Fetch = Callable[[bytes], "Deferred[bytes]"]


class JWKS:
    """An identity provider's key set, by ``kid``.

    Fetched at startup and every ``JWKS_MAX_AGE`` (in the background, the cached keys
    serving meanwhile). A token whose ``kid`` is unknown starts a fetch, if none started or
    ended within ``JWKS_MIN_INTERVAL``, and its join waits for it (``Verdict.later``); one
    that comes while a fetch is under way waits for that one. A key that has left the set is dropped
    with the next fetch. While the provider is unreachable the cached keys keep working and
    unknown kids are refused.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.keys: dict[str | None, KeyEntry] = {}
        self.fetched_at = -1e18  # last good fetch
        self.attempted_at = -1e18  # last fetch started or ended
        self.in_flight: Deferred[None] | None = None
        self.failing = False
        self.clock: IReactorTime | None = None
        self.fetch: Fetch | None = None

    def start(self, clock: IReactorTime, fetch: Fetch | None = None) -> None:
        """Begin with a fetch; ``fetch`` (url -> body) defaults to Twisted's HTTP client."""
        self.clock = clock
        self.fetch = fetch or http_fetch(clock)
        self._refresh()

    def key_for(self, header: dict[str, Any], now: float) -> KeyEntry | Deferred[None] | None:
        kid = header.get("kid")
        entry = self.keys.get(kid) if isinstance(kid, str) else None
        if entry is None and kid is None and len(self.keys) == 1:
            entry = next(iter(self.keys.values()))  # a set of one key, a token without kid
        if entry is not None:
            if now - self.fetched_at > JWKS_MAX_AGE and now - self.attempted_at \
                    >= JWKS_MIN_INTERVAL:
                self._refresh()
            return entry
        if self.in_flight is not None:
            return self.in_flight
        if now - self.attempted_at >= JWKS_MIN_INTERVAL and self.clock is not None:
            return self._refresh()
        return None

    def _refresh(self) -> Deferred[None]:
        if self.in_flight is not None:
            return self.in_flight
        assert self.clock is not None and self.fetch is not None
        self.attempted_at = self.clock.seconds()
        done: Deferred[None] = Deferred()
        self.in_flight = done
        try:
            fetched = self.fetch(self.url.encode())
        except Exception:
            fetched = Deferred()
            fetched.errback()

        def finish(_: object) -> None:
            # The interval counts from the end of a fetch too: a join that waited on this
            # one and still finds no key is refused, not made to wait on another.
            assert self.clock is not None
            self.attempted_at = self.clock.seconds()
            self.in_flight = None
            done.callback(None)

        fetched.addCallbacks(self._loaded, self._failed).addBoth(finish)
        return done

    def _loaded(self, body: bytes) -> None:
        try:
            keys = parse_jwks(body)
        except UnusableKey as e:
            self._failed(Failure(e))
            return
        assert self.clock is not None
        self.keys = keys
        self.fetched_at = self.clock.seconds()
        if self.failing:
            log.info("JWKS {url} fetched again: {n} keys", url=self.url, n=len(keys))
        self.failing = False

    def _failed(self, failure: Failure) -> None:
        if not self.failing:
            log.warn("JWKS {url} not fetched ({why}); {n} cached keys stay in use",
                     url=self.url, why=failure.getErrorMessage() or failure.type.__name__,  # type: ignore[union-attr]
                     n=len(self.keys))
        self.failing = True


def parse_jwks(body: bytes) -> dict[str | None, KeyEntry]:
    """The signature keys of a JWK Set (RFC 7517 section 5) by ``kid``. Keys PyJWT cannot
    use, symmetric (``oct``) keys and keys for encryption (``use: enc``) are skipped."""
    try:
        document = json.loads(body)
    except ValueError:
        raise UnusableKey("the JWKS is not JSON") from None
    found = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(found, list):
        raise UnusableKey('the JWKS has no "keys" list')
    keys: dict[str | None, KeyEntry] = {}
    for item in found:
        if not isinstance(item, dict) or item.get("kty") == "oct" \
                or item.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(item).key
            usable = public_key_algorithms(key)
        except (jwt.PyJWTError, UnusableKey, ValueError, TypeError, KeyError):
            continue
        stated = item.get("alg")
        algorithms = usable if stated is None else [a for a in usable if a == stated]
        if algorithms:
            kid = item.get("kid")
            keys[kid if isinstance(kid, str) else None] = (key, algorithms)
    if not keys:
        raise UnusableKey("the JWKS has no usable signature key")
    return keys


def http_fetch(reactor: Any) -> Fetch:
    """GET a JWKS with Twisted's HTTP client: 200 and at most ``MAX_JWKS`` bytes, within
    ``JWKS_TIMEOUT``."""
    agent = make_agent(reactor, JWKS_TIMEOUT, 1)

    def fetch(url: bytes) -> Deferred[bytes]:
        def read(response: Any) -> Deferred[bytes]:
            body = read_body(response, MAX_JWKS, keep=response.code == 200)
            if response.code != 200:  # read away, so the connection is let go of
                def refuse(_: object) -> bytes:
                    raise UnusableKey(f"status {response.code}")

                return body.addBoth(refuse)
            return body

        got = agent.request(b"GET", url).addCallback(read)
        got.addTimeout(JWKS_TIMEOUT, reactor)
        return got

    return fetch


@implementer(IPlugin, IPeerAuthorizer)
class JWTAuthorizer:
    """``--auth jwt``: see the module's docstring."""

    name = "jwt"

    def authorize(self, request: JoinRequest, room: str, config: Config, now: float) -> Verdict:
        source = config.jwt_keys
        raw = request.token.rpartition(tokens.SEP)[2]
        if source is None or not raw or len(raw) > MAX_JWT:
            return REFUSED
        try:
            header = jwt.get_unverified_header(raw)
        except jwt.PyJWTError:
            return REFUSED
        found = source.key_for(header, now)
        if found is None:
            return REFUSED
        if isinstance(found, Deferred):
            return Verdict(False, later=found)
        key, algorithms = found
        try:
            claims = jwt.decode(raw, key, algorithms=algorithms, audience=config.jwt_audience,
                                issuer=config.jwt_issuer, leeway=LEEWAY,
                                options={"require": ["exp", "sub", "room"]})
        except jwt.PyJWTError:
            return REFUSED
        expected_room = room if config.room_by != "none" else config.key
        if claims["sub"] != request.id or claims["room"] != expected_room:
            return REFUSED
        size = claims.get("room_size")
        if size is not None and (type(size) is not int or size < 1):
            return REFUSED
        return Verdict(True, takeover=True, room_size=size)


def load_key_file(path: str) -> KeyFile:
    with open(path, "rb") as f:
        return KeyFile(f.read())
