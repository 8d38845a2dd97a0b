"""ICE servers for the clients: STUN/TURN URLs, and time-limited TURN credentials.

The credentials follow the TURN REST scheme that coturn implements with ``use-auth-secret``
and ``static-auth-secret`` (draft-uberti-behave-turn-rest-00; coturn's README.turnserver):
the username is ``EXPIRY:NAME`` (EXPIRY in Unix seconds, NAME the peer id), the credential is
base64(HMAC-SHA1(secret, username)). coturn recomputes it from the shared secret and refuses
it once EXPIRY has passed, so peersig and coturn share nothing but the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Any

# RFC 7064 (stun:, stuns:) and RFC 7065 (turn:, turns:) URIs: a host (a name, an IPv4
# address or a bracketed IPv6 one), an optional port, and for TURN an optional transport.
_ICE_URL = re.compile(
    r"(?:(?P<stun>stuns?)|turns?):"
    r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
    r"(?(stun)|(?:\?transport=(?:udp|tcp))?)"
)


def valid_ice_url(url: str) -> bool:
    """A ``stun:``, ``stuns:``, ``turn:`` or ``turns:`` URI as RTCIceServer.urls takes it."""
    return _ICE_URL.fullmatch(url) is not None


def credential(secret: bytes, username: str) -> str:
    """coturn's password for ``username`` under ``static-auth-secret``."""
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()


def ice_configuration(urls: tuple[str, ...], secret: bytes | None, ttl: int, peer_id: str,
                      now: float) -> dict[str, Any]:
    """An RTCConfiguration for ``new Peer(id, {config})``: the STUN URLs in one entry, the
    TURN URLs in another with a username and credential good for ``ttl`` seconds from
    ``now`` (without ``secret``, none: the TURN server has its own users), and ``ttl``."""
    stun = [u for u in urls if u.startswith("stun")]
    relays = [u for u in urls if u.startswith("turn")]
    servers: list[dict[str, Any]] = []
    if stun:
        servers.append({"urls": stun})
    if relays:
        entry: dict[str, Any] = {"urls": relays}
        if secret is not None:
            username = f"{int(now) + ttl}:{peer_id}"
            entry.update(username=username, credential=credential(secret, username))
        servers.append(entry)
    return {"iceServers": servers, "ttl": ttl}


class AddressRate:
    """A token bucket per client address, for an HTTP route: ``burst`` requests at once,
    then ``rate`` a second. At most ``max_addresses`` buckets: when they are all taken,
    the full ones (addresses that have been quiet) are forgotten, and if none is full the
    request is refused, so that a flood of addresses cannot grow the table."""

    __slots__ = ("buckets", "burst", "max_addresses", "rate")

    def __init__(self, rate: float, burst: int, max_addresses: int = 10000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_addresses = max_addresses
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self.buckets.get(address, (self.burst, now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def allow(self, address: str, now: float) -> bool:
        buckets = self.buckets
        if address not in buckets and len(buckets) >= self.max_addresses:
            for other in [a for a in buckets if self._tokens(a, now) >= self.burst]:
                del buckets[other]
            if len(buckets) >= self.max_addresses:
                return False
        tokens = self._tokens(address, now)
        if tokens < 1:
            buckets[address] = (tokens, now)
            return False
        buckets[address] = (tokens - 1, now)
        return True
