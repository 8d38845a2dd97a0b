"""ICE servers for the clients: STUN/TURN URLs, and time-limited TURN credentials.

The credentials follow the TURN REST scheme that coturn implements with ``use-auth-secret``
and ``static-auth-secret`` (draft-uberti-behave-turn-rest-00; coturn's README.turnserver):
the username is ``EXPIRY:NAME`` (EXPIRY in Unix seconds, NAME the peer id), the credential is
base64(HMAC-SHA1(secret, username)). coturn recomputes it from the shared secret and refuses
it once EXPIRY has passed, so peersig and coturn share nothing but the secret.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import re
from collections import OrderedDict
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


# coturn refuses a username with a space in it, and one holding both "union" and "select"
# (its guard against SQL in names): peers whose id it would refuse are named by a digest.
_COTURN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def turn_name(peer_id: str) -> str:
    """The NAME of ``EXPIRY:NAME``: the peer id, or a digest of it where coturn would refuse it."""
    lowered = peer_id.lower()
    if _COTURN_NAME.fullmatch(peer_id) and not ("union" in lowered and "select" in lowered):
        return peer_id
    return hashlib.sha256(peer_id.encode()).hexdigest()[:32]


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
            username = f"{int(now) + ttl}:{turn_name(peer_id)}"
            entry.update(username=username, credential=credential(secret, username))
        servers.append(entry)
    return {"iceServers": servers, "ttl": ttl}


class AddressRate:
    """A token bucket per client, for an HTTP route: ``burst`` requests at once, then
    ``rate`` a second. A client is its IPv4 address, or its IPv6 /64 (what one subscriber
    holds). At most ``max_addresses`` buckets: the least recently used goes first, in O(1)."""

    __slots__ = ("buckets", "burst", "max_addresses", "rate")

    def __init__(self, rate: float, burst: int, max_addresses: int = 10000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_addresses = max_addresses
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, at)

    def allow(self, address: str, now: float) -> bool:
        if ":" in address:  # IPv6: its /64
            with contextlib.suppress(ValueError):  # a scope id: the address itself
                address = str(ipaddress.IPv6Network(f"{address}/64", strict=False))
        buckets = self.buckets
        tokens, at = buckets.pop(address, (self.burst, now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        allowed = tokens >= 1
        buckets[address] = (tokens - 1 if allowed else tokens, now)
        if len(buckets) > self.max_addresses:
            buckets.popitem(last=False)
        return allowed
