"""``--auth jwt`` (jwtauth.py) and ``--room-events`` in the core, on a fake clock; a JWKS
fetched from a fake and, in the process tests, from a local HTTP server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.defer import Deferred

from peersig.jwtauth import JWKS, JWKS_MIN_INTERVAL, JWTAuthorizer, KeyFile, UnusableKey, parse_jwks

from .fakes import World
from .localhttp import LocalServer

SECRET = b"an-hs256-secret-of-32-bytes-long!!"
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()


def pem(private: Any) -> bytes:
    return private.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(sub: str = "alice", room: str | None = "room1", ttl: float = 300,
           **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "room": room, "exp": now + ttl, "iat": now, **extra}


def mint(key: Any, alg: str, kid: str | None = None, **claim: Any) -> str:
    body = claims(**claim)
    for name in [k for k, v in body.items() if v is None]:
        del body[name]
    headers = {"kid": kid} if kid else None
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def jwt_world(keys: Any, **config: Any) -> World:
    return World(authorizer=JWTAuthorizer(), jwt_keys=keys, **config)


def join(world: World, token: str, peer_id: str = "alice", room: str = "room1") -> list[str]:
    t = world.connect(peer_id, token=f"{room}~{token}")
    return t.types() if t.closed is None else [f"closed {t.closed}"]


OPENED = ["OPEN"]
REFUSED = ["closed (1008, 'Invalid token provided')"]


@pytest.mark.parametrize("key, verify, alg", [
    (SECRET, SECRET, "HS256"),
    (RSA, pem(RSA), "RS256"),
    (EC, pem(EC), "ES256"),
    (ED, pem(ED), "EdDSA"),
])
def test_a_valid_jwt_opens_and_takes_its_id_over(key: Any, verify: bytes, alg: str) -> None:
    world = jwt_world(KeyFile(verify))
    assert join(world, mint(key, alg)) == OPENED
    assert join(world, mint(key, alg)) == OPENED  # a reconnect: taken over at once
    assert world.hub.stats.takeovers["authorizer"] == 1


def test_refusals() -> None:
    world = jwt_world(KeyFile(pem(RSA)), jwt_audience="my-app", jwt_issuer="https://idp")
    good = {"aud": "my-app", "iss": "https://idp"}
    assert join(world, mint(RSA, "RS256", **good)) == OPENED
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    cases = {
        "bad signature": mint(other, "RS256", **good),
        "expired": mint(RSA, "RS256", ttl=-120, **good),
        "wrong room": mint(RSA, "RS256", room="room2", **good),
        "sub is another id": mint(RSA, "RS256", sub="bob", **good),
        "no exp": mint(RSA, "RS256", exp=None, **good),
        "no room claim": mint(RSA, "RS256", room=None, **good),
        "not yet valid": mint(RSA, "RS256", nbf=now + 120, **good),
        "wrong audience": mint(RSA, "RS256", aud="other", iss="https://idp"),
        "wrong issuer": mint(RSA, "RS256", aud="my-app", iss="https://evil"),
        "alg none": jwt.encode(claims(**good), None, algorithm="none"),
        "HS256 keyed with the public key": _hs256_with(pem(RSA), claims(**good)),
        "garbage": "not.a.jwt",
        "empty": "",
    }
    for name, token in cases.items():
        assert join(world, token, peer_id=f"p{len(name)}") == REFUSED, name
    assert world.connect("alice", token=mint(RSA, "RS256", **good)).closed is not None  # no room~


def _hs256_with(key: bytes, body: dict[str, Any]) -> str:
    """A token signed with HMAC keyed by the PEM text (the classic algorithm confusion);
    made by hand, as PyJWT refuses to sign it."""
    import base64
    import hashlib
    import hmac as hmac_

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(body).encode())
    mac = hmac_.new(key, head + b"." + payload, hashlib.sha256).digest()
    return (head + b"." + payload + b"." + b64(mac)).decode()


def test_in_key_and_none_modes_the_room_claim_is_the_key_and_the_jwt_may_come_alone() -> None:
    world = jwt_world(KeyFile(SECRET), room_by="none", key="game")
    token = mint(SECRET, "HS256", room="game")
    assert world.connect("alice", key="game", token=token).types() == OPENED
    world = jwt_world(KeyFile(SECRET), room_by="key")
    assert world.connect("alice", key="lobby", token=mint(SECRET, "HS256",
                                                          room="lobby")).types() == OPENED


@pytest.mark.parametrize("data, error", [
    (b"short", "32 bytes"),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM"),
    (RSA.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                       serialization.NoEncryption()), "not a PEM"),
])
def test_unusable_key_files_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(UnusableKey, match=error):
        KeyFile(data)


# -- JWKS ---------------------------------------------------------------------------------

def jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.get_algorithm_by_name(alg)
    key = json.loads(algorithm.to_jwk(private.public_key()))
    return {**key, "kid": kid, "alg": alg, "use": "sig"}


EC2 = ec.generate_private_key(ec.SECP256R1())


class FakeProvider:
    """A fake ``Fetch``: each request waits on a Deferred the test fires."""

    def __init__(self) -> None:
        self.requests: list[Deferred[bytes]] = []

    def __call__(self, url: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.requests.append(d)
        return d

    def serve(self, *keys: dict[str, Any]) -> None:
        self.requests[-1].callback(json.dumps({"keys": list(keys)}).encode())


def jwks_world() -> tuple[World, JWKS, FakeProvider]:
    jwks = JWKS("https://idp.example/.well-known/jwks.json")
    world = jwt_world(jwks)
    provider = FakeProvider()
    jwks.start(world.clock, provider)
    return world, jwks, provider


def test_joins_wait_for_the_first_fetch_then_open() -> None:
    world, _jwks, provider = jwks_world()
    waiting = world.connect("alice", token="room1~" + mint(RSA, "RS256", kid="k1"))
    assert waiting.frames == [] and waiting.closed is None
    provider.serve(jwk(RSA, "k1", "RS256"))
    assert waiting.types() == OPENED and waiting.session is not None
    assert world.hub.waiting == {}


def test_a_new_kid_is_fetched_at_a_bounded_rate_and_picked_up() -> None:
    world, _jwks, provider = jwks_world()
    provider.serve(jwk(RSA, "k1", "RS256"))
    rotated = "room1~" + mint(EC2, "ES256", kid="k2", sub="bob")
    world.clock.advance(1)
    assert join(world, rotated.partition("~")[2], "bob") == REFUSED  # too soon after a fetch
    assert len(provider.requests) == 1
    world.clock.advance(JWKS_MIN_INTERVAL)
    waiting = world.connect("bob", token=rotated)
    also = world.connect("carol", token="room1~" + mint(EC2, "ES256", kid="k2", sub="carol"))
    assert len(provider.requests) == 2  # one fetch for both
    provider.serve(jwk(EC2, "k2", "ES256"))  # k1 is gone from the set
    assert waiting.types() == OPENED and also.types() == OPENED
    assert join(world, mint(RSA, "RS256", kid="k1", sub="dave"), "dave") == REFUSED


def test_with_the_provider_down_cached_keys_work_and_unknown_kids_are_refused() -> None:
    world, _jwks, provider = jwks_world()
    provider.serve(jwk(RSA, "k1", "RS256"))
    world.clock.advance(JWKS_MIN_INTERVAL)
    waiting = world.connect("bob", token="room1~" + mint(EC2, "ES256", kid="k9", sub="bob"))
    provider.requests[-1].errback(ConnectionRefusedError())
    assert waiting.closed == (1008, "Invalid token provided")
    assert join(world, mint(RSA, "RS256", kid="k1")) == OPENED
    assert world.hub.waiting == {}


def test_a_join_waits_on_one_fetch_at_most() -> None:
    world, _jwks, provider = jwks_world()
    provider.serve(jwk(RSA, "k1", "RS256"))
    world.clock.advance(JWKS_MIN_INTERVAL)
    waiting = world.connect("bob", token="room1~" + mint(EC2, "ES256", kid="k9", sub="bob"))
    world.clock.advance(JWKS_MIN_INTERVAL * 2)  # a slow provider
    provider.serve(jwk(RSA, "k1", "RS256"))  # without k9
    assert waiting.closed == (1008, "Invalid token provided")
    assert len(provider.requests) == 2


def test_a_waiting_join_that_closes_is_forgotten() -> None:
    world, _jwks, provider = jwks_world()
    waiting = world.connect("alice", token="room1~" + mint(RSA, "RS256", kid="k1"))
    world.hub.withdraw(waiting)
    provider.serve(jwk(RSA, "k1", "RS256"))
    assert waiting.frames == [] and waiting.session is None and "room1" not in world.hub.rooms


def test_a_jwks_keeps_only_usable_signature_keys() -> None:
    keys = parse_jwks(json.dumps({"keys": [
        jwk(RSA, "r", "RS256"), jwk(ED, "e", "EdDSA"),
        {"kty": "oct", "k": "c2VjcmV0", "kid": "o"},
        {**jwk(EC, "x", "ES256"), "use": "enc"},
        {"kty": "RSA", "kid": "broken"},
        {**jwk(RSA, "mismatch", "RS256"), "alg": "ES256"},
        "nonsense",
    ]}).encode())
    assert sorted(k for k in keys if k) == ["e", "r"]
    for body in (b"[]", b"{}", b"nope", json.dumps({"keys": [{"kty": "oct", "k": "eA"}]}).encode()):
        with pytest.raises(UnusableKey):
            parse_jwks(body)


# -- room events ----------------------------------------------------------------------------

def test_room_events_tell_a_newcomer_who_is_there_and_the_room_who_came() -> None:
    world = World(room_events=True)
    a = world.connect("alice")
    assert a.take() == [{"type": "OPEN"}, {"type": "PEERS", "payload": {"peers": []}}]
    b = world.connect("bob")
    c = world.connect("carol")
    assert c.take() == [{"type": "OPEN"}, {"type": "PEERS", "payload": {"peers": ["alice", "bob"]}}]
    assert a.take() == [{"type": "JOIN", "src": "bob"}, {"type": "JOIN", "src": "carol"}]
    assert b.take()[2:] == [{"type": "JOIN", "src": "carol"}]
    world.close(b)
    assert a.take() == [{"type": "LEAVE", "src": "bob"}, {"type": "PART", "src": "bob"}]


def test_a_reconnect_that_takes_its_id_over_gets_peers_and_nobody_hears_join() -> None:
    world = World(room_events=True, room_by="key")
    world.connect("alice", token="ta")
    c = world.connect("carol", token="tc")
    c.take()
    again = world.connect("alice", token="ta")  # the same token in key mode: a takeover
    assert again.take() == [{"type": "OPEN"}, {"type": "PEERS", "payload": {"peers": ["carol"]}}]
    assert c.take() == []


def test_without_room_events_nothing_new_is_sent() -> None:
    world = World()
    a = world.connect("alice")
    world.connect("bob")
    assert a.types() == ["OPEN"]


# -- a real twistd with a JWKS served over HTTP ---------------------------------------------

class Provider(LocalServer):
    """An identity provider's JWKS."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        super().__init__(_JWKSHandler)

    @property
    def url(self) -> str:
        return self.address("/.well-known/jwks.json")


class _JWKSHandler(BaseHTTPRequestHandler):
    server: Provider

    def do_GET(self) -> None:
        self.server.fetches += 1
        self.server.hold()
        body = json.dumps({"keys": self.server.keys}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def provider() -> Iterator[Provider]:
    p = Provider()
    p.keys = [jwk(RSA, "k1", "RS256")]
    yield p
    p.stop()


def test_a_real_server_verifies_jwts_from_a_jwks_through_rotation_and_outage(
        tmp_path: Path, provider: Provider) -> None:
    from websockets.sync.client import connect

    from .serverproc import ServerProcess
    from .test_process import close_code, recv_json

    server = ServerProcess(tmp_path, ["--auth", "jwt", "--jwks-url", provider.url,
                                      "--room-events", "--rate-limit", "0"])
    server.start()
    started = time.monotonic()
    try:
        def url(peer: str, token: str) -> str:
            return server.ws_url(peer, token="lobby~" + token)

        with connect(url("alice", mint(RSA, "RS256", kid="k1", sub="alice",
                                       room="lobby"))) as a:
            assert recv_json(a) == {"type": "OPEN"}
            assert recv_json(a) == {"type": "PEERS", "payload": {"peers": []}}
            with connect(url("mallory", mint(RSA, "RS256", kid="k1", sub="alice",
                                             room="lobby"))) as m:
                assert recv_json(m)["payload"] == {"msg": "Invalid token provided"}
                assert close_code(m) == 1008
            # rotation: the provider now signs with k2, which the server has not seen
            provider.keys = [jwk(RSA, "k1", "RS256"), jwk(EC2, "k2", "ES256")]
            time.sleep(max(0.0, JWKS_MIN_INTERVAL + 0.5 - (time.monotonic() - started)))
            with connect(url("bob", mint(EC2, "ES256", kid="k2", sub="bob",
                                         room="lobby"))) as b:
                assert recv_json(b) == {"type": "OPEN"}
                assert recv_json(b) == {"type": "PEERS", "payload": {"peers": ["alice"]}}
                assert recv_json(a) == {"type": "JOIN", "src": "bob"}
                # the provider hangs: a join with an unknown kid waits on its fetch, and
                # meanwhile everything else goes on
                provider.hang.set()
                time.sleep(JWKS_MIN_INTERVAL + 0.2)
                with connect(url("carol", mint(EC, "ES256", kid="k3", sub="carol",
                                               room="lobby"))) as c:
                    for n in range(200):
                        a.send(json.dumps({"type": "CANDIDATE", "dst": "bob",
                                           "payload": {"n": n}}))
                    for n in range(200):
                        assert recv_json(b)["payload"] == {"n": n}
                    assert server.get_json("/health")["status"] == "ok"
                    with connect(url("dave", mint(EC2, "ES256", kid="k2", sub="dave",
                                                  room="lobby"))) as d:
                        assert recv_json(d) == {"type": "OPEN"}  # cached keys still work
                    assert recv_json(a) == {"type": "JOIN", "src": "dave"}
                    with pytest.raises(TimeoutError):
                        c.recv(timeout=0.5)  # still waiting on the hung fetch
                    # the fetch gives up after 10 s: carol is refused, not made to wait again
                    assert recv_json(c, timeout=15) == {
                        "type": "ERROR", "payload": {"msg": "Invalid token provided"}}
            assert provider.fetches == 3
    finally:
        server.stop()


@pytest.mark.parametrize("args, error", [
    (["--auth", "jwt"], "--auth jwt needs --jwt-key-file or --jwks-url"),
    (["--jwks-url", "http://idp.example/jwks.json"], "an https:// URL"),
    (["--jwt-key-file", "KEY", "--jwks-url", "https://idp.example/j"], "one or the other"),
    (["--jwt-key-file", "SHORT"], "32 bytes"),
    (["--room-events", "--room-by", "none"], "--room-events has no rooms"),
])
def test_jwt_and_room_event_options_are_checked_at_startup(tmp_path: Path, args: list[str],
                                                           error: str) -> None:
    import subprocess

    from .serverproc import ServerProcess

    (tmp_path / "key").write_bytes(SECRET)
    (tmp_path / "short").write_bytes(b"short")
    args = [{"KEY": str(tmp_path / "key"), "SHORT": str(tmp_path / "short")}.get(a, a)
            for a in args]
    server = ServerProcess(tmp_path, args)
    result = subprocess.run(server.command(), cwd=tmp_path, env=server.environment(),
                            capture_output=True, timeout=60)
    assert result.returncode == 1
    assert error in result.stderr.decode()


def test_a_jwt_key_file_alone_chooses_the_jwt_authorizer(tmp_path: Path) -> None:
    from peersig.tap import Options

    (tmp_path / "key").write_bytes(pem(EC))
    options = Options()
    options.parseOptions(["--jwt-key-file", str(tmp_path / "key")])
    assert options.built.authorizer.name == "jwt"
    assert options.built.jwt_keys.entry[1] == ["ES256"]


def test_ice_waits_for_the_keys_then_answers() -> None:
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from peersig.service import make_site
    from peersig.websocket import make_factory

    jwks = JWKS("https://idp.example/jwks.json")
    world = jwt_world(jwks, ice_servers=("stun:stun.example.net",))
    provider = FakeProvider()
    jwks.start(world.clock, provider)
    site = make_site(world.hub, make_factory(world.hub))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    channel = site.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    token = "room1~" + mint(RSA, "RS256", kid="k1")
    channel.dataReceived(f"GET /peerjs/ice?id=alice&token={token} HTTP/1.1\r\n"
                         "Host: x\r\n\r\n".encode())
    assert transport.value() == b""  # waiting on the fetch
    provider.serve(jwk(RSA, "k1", "RS256"))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"stun:stun.example.net" in body
