"""ICE servers and TURN credentials (issue 13): the TURN REST scheme, GET {path}{key}/ice
and its refusals in memory, and the credentials against a real coturn on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address

from peersig import tokens
from peersig.config import Config
from peersig.rooms import Hub
from peersig.service import make_site
from peersig.turn import AddressRate, credential, ice_configuration, valid_ice_url
from peersig.websocket import make_factory

from .fakes import World
from .serverproc import ServerProcess, free_port, stop_process
from .test_websocket import TCPLikeTransport

SECRET = b"coturn-static-auth-secret-0123456789"
URLS = ("stun:turn.example.com:3478", "turn:turn.example.com:3478?transport=udp",
        "turns:turn.example.com:5349?transport=tcp")


def coturn_password(secret: bytes, username: str) -> str:
    """coturn's own rule (README.turnserver, --use-auth-secret), written out again."""
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()


# -- the scheme -----------------------------------------------------------------------------

def test_credentials_follow_the_turn_rest_scheme() -> None:
    config = ice_configuration(URLS, SECRET, 86400, "alice", 1_800_000_000.7)
    assert config == {"iceServers": [
        {"urls": ["stun:turn.example.com:3478"]},
        {"urls": list(URLS[1:]), "username": "1800086400:alice",
         "credential": coturn_password(SECRET, "1800086400:alice")},
    ], "ttl": 86400}
    assert credential(SECRET, "1800086400:alice") == coturn_password(SECRET, "1800086400:alice")


@pytest.mark.parametrize(("peer_id", "name"), [
    ("alice", "alice"), ("p1_x-2", "p1_x-2"),
    ("a b", hashlib.sha256(b"a b").hexdigest()[:32]),
    ("reUNION-SELECTion", hashlib.sha256(b"reUNION-SELECTion").hexdigest()[:32]),
])
def test_the_username_names_the_peer_as_coturn_takes_it(peer_id: str, name: str) -> None:
    relay = ice_configuration(URLS[1:2], SECRET, 60, peer_id, 100.0)["iceServers"][0]
    assert relay["username"] == f"160:{name}"


def test_without_a_secret_the_servers_come_without_credentials() -> None:
    assert ice_configuration(URLS, None, 600, "alice", 0.0) == {"iceServers": [
        {"urls": ["stun:turn.example.com:3478"]}, {"urls": list(URLS[1:])}], "ttl": 600}
    assert ice_configuration(URLS[:1], SECRET, 600, "a", 0.0)["iceServers"] == [
        {"urls": ["stun:turn.example.com:3478"]}]


@pytest.mark.parametrize(("url", "valid"), [
    ("stun:stun.example.com", True), ("stun:192.0.2.1:3478", True), ("stuns:x.example:5349", True),
    ("turn:x.example:3478?transport=udp", True), ("turns:x.example?transport=tcp", True),
    ("turn:[2001:db8::1]:3478", True), ("stun:x.example?transport=udp", False),
    ("turn:x.example?transport=sctp", False), ("http://x.example", False), ("turn:", False),
    ("turn:x.example:123456", False), ("turn:user@x.example", False), ("", False),
])
def test_ice_urls_are_rfc_7064_and_7065_uris(url: str, valid: bool) -> None:
    assert valid_ice_url(url) == valid


def test_the_rate_per_address_is_a_bounded_token_bucket() -> None:
    rate = AddressRate(rate=1.0, burst=3, max_addresses=2)
    assert [rate.allow("192.0.2.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rate.allow("192.0.2.1", 1.0) and not rate.allow("192.0.2.1", 1.0)
    assert rate.allow("192.0.2.2", 1.0) and rate.allow("192.0.2.3", 1.0)
    assert len(rate.buckets) == 2  # the least recently used went
    # An IPv6 subscriber holds a /64: rotating addresses in it buys nothing.
    v6 = AddressRate(rate=1.0, burst=3)
    assert [v6.allow(f"2001:db8::{n:x}", 0.0) for n in range(1, 6)] == [True] * 3 + [False] * 2
    assert v6.allow("2001:db8:0:1::1", 0.0)


# -- GET {path}{key}/ice in memory --------------------------------------------------------

def ice(world: World, query: str = "id=alice&token=room1", key: str = "peerjs",
        headers: dict[str, str] | None = None, address: str = "127.0.0.1"
        ) -> tuple[int, dict[str, str], Any]:
    site = world.__dict__.get("site") or make_site(world.hub, make_factory(world.hub))
    world.site = site  # type: ignore[attr-defined]  # one site: one rate table
    peer = IPv4Address("TCP", address, 5000)
    transport = TCPLikeTransport(peerAddress=peer)
    channel = site.buildProtocol(peer)
    assert channel is not None
    channel.makeConnection(transport)
    lines = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    channel.dataReceived(f"GET /{key}/ice?{query} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status = int(head.split()[1])
    fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    return status, {k.lower(): v for k, v in fields.items()}, json.loads(body)


def turn_world(**config: Any) -> World:
    return World(ice_servers=URLS, turn_secret=SECRET, turn_ttl=3600, **config)


def test_ice_answers_an_rtc_configuration_with_fresh_credentials() -> None:
    w = turn_world()
    status, headers, body = ice(w, headers={"Origin": "https://game.example"})
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert headers["access-control-allow-origin"] == "https://game.example"
    stun, relay = body["iceServers"]
    assert stun == {"urls": [URLS[0]]} and relay["urls"] == list(URLS[1:])
    expiry, _, name = relay["username"].partition(":")
    assert name == "alice" and int(expiry) == int(w.clock.seconds()) + 3600
    assert relay["credential"] == coturn_password(SECRET, relay["username"])
    assert body["ttl"] == 3600 and w.hub.stats.ice == {"issued": 1}


@pytest.mark.parametrize(("config", "query", "key", "headers", "status", "error", "outcome"), [
    ({}, "id=alice&token=room1", "nope", {}, 401, "Invalid key provided", "invalid_key"),
    ({}, "id=bad%20id%20&token=room1", "peerjs", {}, 400, "Invalid id", "invalid_id"),
    ({}, "id=alice&token=bad%20room", "peerjs", {}, 400, "Invalid room name", "invalid_room"),
    ({}, "id=alice", "peerjs", {}, 400, "Missing query parameters: token", "missing_params"),
    ({}, "", "peerjs", {}, 400, "Missing query parameters: id, token", "missing_params"),
    ({"allowed_origins": ("https://game.example",)}, "id=alice&token=room1", "peerjs",
     {"Origin": "https://evil.example"}, 403, "Origin not allowed", "origin"),
    ({"secret": b"s" * 32, "authorizer": __import__("peersig.auth").auth.HMACAuthorizer()},
     "id=alice&token=room1~9999999999~forged", "peerjs", {}, 401, "Invalid token provided",
     "unauthorized"),
])
def test_ice_refuses_what_a_join_refuses(config: dict[str, Any], query: str, key: str,
                                         headers: dict[str, str], status: int, error: str,
                                         outcome: str) -> None:
    w = turn_world(**config)
    got, _headers, body = ice(w, query, key, headers)
    assert (got, body) == (status, {"error": error})
    assert w.hub.stats.ice == {outcome: 1}


def test_ice_takes_a_valid_signed_token_and_the_listed_origin() -> None:
    from peersig.auth import HMACAuthorizer

    secret = b"s" * 32
    w = turn_world(secret=secret, authorizer=HMACAuthorizer(),
                   allowed_origins=("https://game.example",))
    token = tokens.mint(secret, "room1", "alice", int(w.clock.seconds()) + 60)
    status, _, body = ice(w, f"id=alice&token={token}", headers={"Origin": "https://game.example"})
    assert status == 200 and body["iceServers"][1]["username"].endswith(":alice")
    assert ice(w, f"id=bob&token={token}")[0] == 401  # signed for alice, not bob
    assert ice(w)[0] == 401  # no same-origin exemption from the token


def test_ice_is_rate_limited_per_client_address() -> None:
    w = turn_world()
    statuses = [ice(w, address="192.0.2.7")[0] for _ in range(12)]
    assert statuses == [200] * 10 + [429] * 2
    assert ice(w, address="192.0.2.8")[0] == 200  # another client is not held back
    w.clock.advance(1.0)
    assert ice(w, address="192.0.2.7")[0] == 200
    assert w.hub.stats.ice == {"issued": 12, "rate_limit": 2}
    # Behind a trusted proxy the forwarded address counts, from every header line.
    p = turn_world(trusted_proxies=2)
    for n in range(11):
        headers = {"X-Forwarded-For": f"198.51.100.{n}\r\nX-Forwarded-For: 10.0.0.1"}
        assert ice(p, headers=headers)[0] == 200


def test_ice_without_servers_is_not_found() -> None:
    status, _, body = ice(World())
    assert (status, body) == (404, {"error": "No ICE servers configured"})


# -- a real coturn on loopback ------------------------------------------------------------

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
UCLIENT = shutil.which("turnutils_uclient") or "/usr/bin/turnutils_uclient"


class Coturn:
    """Debian's coturn with --use-auth-secret, listening on 127.0.0.1 only; stopped by pid."""

    def __init__(self, folder: Path, secret: bytes) -> None:
        self.port = free_port()
        relay = free_port()
        self.log = folder / "turnserver.log"
        self.proc = subprocess.Popen(
            [TURNSERVER, "-n", "--listening-ip=127.0.0.1", f"--listening-port={self.port}",
             "--relay-ip=127.0.0.1", f"--min-port={relay}", f"--max-port={relay + 40}",
             "--use-auth-secret", f"--static-auth-secret={secret.decode()}",
             "--realm=peersig.test", "--no-tls", "--no-dtls", "--no-cli",
             "--allow-loopback-peers", "--log-file=stdout", "--simple-log",
             f"--pidfile={folder / 'turnserver.pid'}"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        try:
            while not self.binds():
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, self.log.read_text()
        except BaseException:
            self.stop()  # no coturn outlives a failed start
            raise

    def binds(self) -> bool:
        """A STUN Binding request (RFC 8489) answered with a success response."""
        request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            sock.sendto(request, ("127.0.0.1", self.port))
            try:
                answer = sock.recv(1024)
            except OSError:
                return False
        return answer[:2] == b"\x01\x01" and answer[8:20] == request[8:20]

    def allocate(self, username: str, password: str) -> bool:
        """Two TURN allocations relaying to each other (turnutils_uclient -y): True when
        coturn took the credentials and every packet came back."""
        result = subprocess.run(
            [UCLIENT, "-u", username, "-w", password, "-p", str(self.port), "-y", "-n", "3",
             "-m", "1", "-c", "127.0.0.1"], capture_output=True, text=True, timeout=30)
        return result.returncode == 0 and "Total lost packets 0 " in result.stdout

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    assert Path(TURNSERVER).exists(), "coturn missing: tests/install-and-run.sh installs it"
    server = Coturn(tmp_path_factory.mktemp("coturn"), SECRET)
    yield server
    server.stop()


def peersig_with_turn(folder: Path, coturn: Coturn, *extra: str) -> ServerProcess:
    secret = folder / "turn-secret"
    secret.write_bytes(SECRET + b"\n")
    proc = ServerProcess(folder, ["--ice-server", f"stun:127.0.0.1:{coturn.port}",
                                  "--ice-server", f"turn:127.0.0.1:{coturn.port}?transport=udp",
                                  "--turn-secret-file", str(secret), *extra])
    proc.start()
    return proc


@pytest.mark.slow
def test_credentials_from_ice_complete_a_turn_allocation(tmp_path: Path, coturn: Coturn) -> None:
    proc = peersig_with_turn(tmp_path, coturn)
    try:
        status, _, body = proc.get("/peerjs/ice?id=alice&token=room1")
        assert status == 200
        relay = json.loads(body)["iceServers"][1]
        assert relay["urls"] == [f"turn:127.0.0.1:{coturn.port}?transport=udp"]
        assert coturn.allocate(relay["username"], relay["credential"])
        # Ids coturn would refuse as names (a space; "union" with "select") get a digest.
        for peer_id in ("a%20b", "reunion-selection"):
            other = json.loads(proc.get(f"/peerjs/ice?id={peer_id}&token=room1")[2])
            relay_other = other["iceServers"][1]
            assert coturn.allocate(relay_other["username"], relay_other["credential"]), peer_id
        # The same name and expiry signed with another secret, and an expired username
        # signed with the right one: coturn refuses both.
        assert not coturn.allocate(relay["username"],
                                   coturn_password(b"another-secret-0123456789",
                                                   relay["username"]))
        expired = f"{int(time.time()) - 60}:alice"
        assert not coturn.allocate(expired, coturn_password(SECRET, expired))
    finally:
        proc.stop()


@pytest.mark.slow
def test_credentials_expire_after_turn_ttl(tmp_path: Path, coturn: Coturn) -> None:
    proc = peersig_with_turn(tmp_path, coturn, "--turn-ttl", "2")
    try:
        relay = json.loads(proc.get("/peerjs/ice?id=bob&token=room1")[2])["iceServers"][1]
        assert coturn.allocate(relay["username"], relay["credential"])
        time.sleep(3.1)
        assert not coturn.allocate(relay["username"], relay["credential"])
    finally:
        proc.stop()


@pytest.mark.parametrize(("args", "error"), [
    (["--ice-server", "http://turn.example"], "not a stun:, stuns:, turn: or turns: URL"),
    (["--ice-server", "stun:x.example", "--turn-secret-file", "SECRET"],
     "--turn-secret-file needs a turn: or turns: --ice-server"),
    (["--ice-server", "turn:x.example", "--turn-secret-file", "/nonexistent"],
     "--turn-secret-file"),
])
def test_ice_options_are_checked_at_startup(tmp_path: Path, args: list[str], error: str) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    args = [str(tmp_path / "secret") if a == "SECRET" else a for a in args]
    proc = ServerProcess(tmp_path, args)
    result = subprocess.run(proc.command(), env=proc.environment(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and error in result.stderr, result.stderr


def test_config_and_hub_defaults_have_no_ice_servers() -> None:
    hub = Hub(Config(), World().clock)
    assert hub.config.ice_servers == () and hub.config.turn_secret is None
