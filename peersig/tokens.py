"""Signed join tokens: ``ROOM~EXPIRY~SIGNATURE``.

The room stays readable (the ``token`` room mode and load balancers hash on it, e.g.
HAProxy ``url_param(token),field(1,~)``); ``~`` cannot occur in a room name. The signature
is HMAC-SHA256 over room, peer id and expiry (Unix seconds), so a token is good for one
id in one room until it expires. An app's backend mints them with ``mint`` or the
``peersig-token`` command.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import sys
import time
from typing import NamedTuple

SEP = "~"


class SignedToken(NamedTuple):
    room: str
    expires: int
    signature: str


def _sign(secret: bytes, room: str, peer_id: str, expires: int) -> str:
    msg = f"{room}{SEP}{peer_id}{SEP}{expires}".encode()
    digest = hmac.new(secret, msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def mint(secret: bytes, room: str, peer_id: str, expires: int) -> str:
    """A token letting ``peer_id`` join ``room`` until Unix time ``expires``."""
    return SEP.join((room, str(expires), _sign(secret, room, peer_id, expires)))


def split(token: str) -> SignedToken | None:
    parts = token.split(SEP)
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 12:
        return None
    return SignedToken(parts[0], int(parts[1]), parts[2])


def verify(secret: bytes, token: SignedToken, room: str, peer_id: str, now: float) -> bool:
    if token.room != room or token.expires < now:
        return False
    expected = _sign(secret, room, peer_id, token.expires)
    return hmac.compare_digest(expected.encode(), token.signature.encode("utf-8", "replace"))


def read_secret(path: str) -> bytes:
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError(f"secret in {path} is shorter than 16 bytes")
    return secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="peersig-token", description="Mint a signed peersig join token."
    )
    parser.add_argument("--secret-file", required=True, help="file holding the shared secret")
    parser.add_argument("--room", required=True, help="room name the token is good for")
    parser.add_argument("--id", required=True, dest="peer_id", help="peer id it is good for")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    args = parser.parse_args(argv)
    secret = read_secret(args.secret_file)
    print(mint(secret, args.room, args.peer_id, int(time.time()) + args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
