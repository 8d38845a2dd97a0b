"""Signed join tokens and the client address behind proxies (SPEC §3, §6)."""

from __future__ import annotations

import pytest

from peersig import tokens
from peersig.auth import HMACAuthorizer
from peersig.websocket import client_address

from .fakes import World

SECRET = b"0123456789abcdef0123456789abcdef"


def test_mint_and_verify() -> None:
    token = tokens.mint(SECRET, "room:1", "alice", 2000)
    assert token.startswith("room:1~2000~")
    signed = tokens.split(token)
    assert signed is not None
    assert tokens.verify(SECRET, signed, "room:1", "alice", 1999.5)
    assert not tokens.verify(SECRET, signed, "room:1", "alice", 2000.5)  # expired
    assert not tokens.verify(SECRET, signed, "room:2", "alice", 1000)  # other room
    assert not tokens.verify(SECRET, signed, "room:1", "bob", 1000)  # other id
    assert not tokens.verify(b"another secret of 32 bytes......", signed, "room:1", "alice",
                             1000)
    forged = tokens.split("room:1~2000~" + "A" * 43)
    assert forged is not None and not tokens.verify(SECRET, forged, "room:1", "alice", 1000)


@pytest.mark.parametrize("bad", ["", "room", "room~x~sig", "a~1~b~c", "room~" + "9" * 13 + "~s",
                                 "room~1~\udcff"])
def test_malformed_tokens(bad: str) -> None:
    signed = tokens.split(bad)
    assert signed is None or not tokens.verify(SECRET, signed, "room", "alice", 0)


def test_hub_with_secret_checks_tokens_and_lets_signed_tokens_take_over() -> None:
    w = World(secret=SECRET, authorizer=HMACAuthorizer())
    now = w.clock.seconds()
    good = tokens.mint(SECRET, "r1", "alice", int(now) + 60)
    first = w.connect("alice", token=good)
    assert first.types() == ["OPEN"]
    bob = w.connect("bob", token=tokens.mint(SECRET, "r1", "bob", int(now) + 60))
    bob.take()
    second = w.connect("alice", token=good)  # a valid signature takes the id over at once
    assert second.types() == ["OPEN"] and first.closed is not None and bob.frames == []
    for bad in (tokens.mint(SECRET, "r1", "alice", int(now) - 1),
                tokens.mint(b"x" * 32, "r1", "alice", int(now) + 60),
                tokens.mint(SECRET, "r1", "mallory", int(now) + 60),
                "r1"):
        t = w.connect("alice", token=bad)
        assert t.messages() == [{"type": "ERROR", "payload": {"msg": "Invalid token provided"}}]


def test_read_secret_rejects_short_secrets(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "s"
    path.write_bytes(b"short\n")
    with pytest.raises(ValueError):
        tokens.read_secret(str(path))
    path.write_bytes(SECRET + b"\n")
    assert tokens.read_secret(str(path)) == SECRET


def test_token_command(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "s"
    path.write_bytes(SECRET)
    assert tokens.main(["--secret-file", str(path), "--room", "r1", "--id", "alice"]) == 0
    signed = tokens.split(capsys.readouterr().out.strip())
    assert signed is not None and tokens.verify(SECRET, signed, "r1", "alice", 0)


@pytest.mark.parametrize(("trusted", "header", "expected"), [
    (0, "1.1.1.1", "10.0.0.9"),
    (1, "1.1.1.1", "1.1.1.1"),
    (1, "6.6.6.6, 1.1.1.1", "1.1.1.1"),
    (2, "6.6.6.6, 1.1.1.1, 2.2.2.2", "1.1.1.1"),
    (3, "1.1.1.1", "1.1.1.1"),
    (1, "", "10.0.0.9"),
    (1, None, "10.0.0.9"),
    # However a proxy writes a hop, one client is one address (issue 17).
    (1, "203.0.113.7:50001", "203.0.113.7"),
    (2, "6.6.6.6:1, 1.1.1.1:2, 2.2.2.2:3", "1.1.1.1"),
    (1, "[2001:db8::7]:50001", "2001:db8::7"),
    (1, "[2001:db8::7]", "2001:db8::7"),
    (1, '"[2001:db8::7]:50001"', "2001:db8::7"),
    (1, "2001:DB8:0:0:0:0:0:7", "2001:db8::7"),
    (1, "::ffff:203.0.113.7", "203.0.113.7"),
    (1, "[::ffff:cb00:7107]:443", "203.0.113.7"),
    (1, " 1.1.1.1 ", "1.1.1.1"),
    (1, "fe80::1%eth0", "fe80::1%eth0"),
    # Not an address: the TCP peer.
    (1, "unknown", "10.0.0.9"),
    (1, "_hidden", "10.0.0.9"),
    (1, "1.1.1", "10.0.0.9"),
    (1, "[2001:db8::7", "10.0.0.9"),
    (1, "1.1.1.1:80:90", "10.0.0.9"),
    (1, "example.com:80", "10.0.0.9"),
])
def test_client_address(trusted: int, header: str | None, expected: str) -> None:
    headers = {} if header is None else {"x-forwarded-for": header}
    assert client_address("10.0.0.9", headers, trusted) == expected


def test_an_ipv4_client_of_a_dual_stack_socket_is_its_ipv4_address() -> None:
    assert client_address("::ffff:10.0.0.9", {}, 0) == "10.0.0.9"
    assert client_address("2001:db8::9", {}, 0) == "2001:db8::9"
