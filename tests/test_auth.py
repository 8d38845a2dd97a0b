"""Authorizer plugins, signed tokens through a real server, and handshake timeouts
(SPEC §3, §6)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect

from peersig import tokens

from .serverproc import REPO, ServerProcess

SECRET = b"an example secret of enough bytes"


def first_message(url: str) -> dict[str, object]:
    with connect(url) as ws:
        return json.loads(ws.recv(timeout=5))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def hmac_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("hmac")
    (folder / "secret").write_bytes(SECRET)
    proc = ServerProcess(folder, ["--secret-file", str(folder / "secret")])
    proc.start()
    yield proc
    proc.stop()


def test_hmac_rejects_forged_expired_and_wrong_room(hmac_server: ServerProcess) -> None:
    now = int(time.time())
    bad = {
        "forged": tokens.mint(b"not the server's secret at all!!", "r1", "alice", now + 60),
        "expired": tokens.mint(SECRET, "r1", "alice", now - 5),
        "other id": tokens.mint(SECRET, "r1", "bob", now + 60),
        "unsigned": "r1",
    }
    for what, token in bad.items():
        assert first_message(hmac_server.ws_url("alice", token=token)) == {
            "type": "ERROR", "payload": {"msg": "Invalid token provided"}}, what
    # A token for room r2 presented in room r1: the room comes from the token itself in
    # token mode, so it lands in r2 — where it is valid — and never in r1.
    good = tokens.mint(SECRET, "r1", "alice", now + 60)
    with connect(hmac_server.ws_url("alice", token=good)) as first:
        assert json.loads(first.recv(timeout=5)) == {"type": "OPEN"}
        wrong_room = good.replace("r1~", "r2~", 1)
        assert first_message(hmac_server.ws_url("alice", token=wrong_room))["type"] == "ERROR"
        with connect(hmac_server.ws_url("alice", token=good)) as second:  # takes over at once
            assert json.loads(second.recv(timeout=5)) == {"type": "OPEN"}


def test_hmac_in_key_mode_checks_the_key_as_room(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    proc = ServerProcess(tmp_path, ["--secret-file", str(tmp_path / "secret"),
                                    "--room-by", "key"])
    proc.start()
    try:
        token = tokens.mint(SECRET, "game7", "alice", int(time.time()) + 60)
        assert first_message(proc.ws_url("alice", key="game7", token=token)) == {"type": "OPEN"}
        assert first_message(proc.ws_url("alice", key="game8", token=token))["type"] == "ERROR"
    finally:
        proc.stop()


def doc_example() -> str:
    text = (REPO / "docs" / "auth.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    return next(b for b in blocks if "IPeerAuthorizer" in b)


def test_a_plugin_file_dropped_in_twisted_plugins_is_used(tmp_path: Path) -> None:
    plugins = tmp_path / "site" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "vip_rooms.py").write_text(doc_example())
    proc = ServerProcess(tmp_path, ["--auth", "vip-rooms"],
                         env={"PYTHONPATH": f"{REPO}:{tmp_path / 'site'}"})
    proc.start()
    try:
        assert first_message(proc.ws_url("vip1", token="vip-lounge")) == {"type": "OPEN"}
        assert first_message(proc.ws_url("pleb", token="vip-lounge")) == {
            "type": "ERROR", "payload": {"msg": "This room is for VIPs"}}
        assert first_message(proc.ws_url("pleb", token="lobby")) == {"type": "OPEN"}
    finally:
        proc.stop()


def test_unknown_authorizer_is_a_usage_error(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path, ["--auth", "nonsense"])
    result = subprocess.run(proc.command(), env=proc.environment(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert "--auth nonsense: no such authorizer (found: hmac, jwt, open)" in result.stderr


@pytest.fixture(scope="module")
def quick_handshakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("hs"), ["--handshake-timeout", "1"])
    proc.start()
    yield proc
    proc.stop()


def cut_after(proc: ServerProcess, send: list[bytes], interval: float = 0.0) -> float:
    """Seconds until the server closes a connection that sends ``send`` piece by piece."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
        for piece in send:
            try:
                s.sendall(piece)
            except OSError:
                break
            time.sleep(interval)
        s.settimeout(10)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    return time.monotonic() - started


def test_silent_connection_is_cut(quick_handshakes: ServerProcess) -> None:
    assert cut_after(quick_handshakes, []) < 2.5


def test_half_a_request_is_cut(quick_handshakes: ServerProcess) -> None:
    head = b"GET /peerjs?key=peerjs&id=a&token=r HTTP/1.1\r\nHost: x\r\n"
    assert cut_after(quick_handshakes, [head]) < 2.5


def test_trickled_request_is_cut(quick_handshakes: ServerProcess) -> None:
    trickle = [bytes([c]) for c in b"GET /peerjs?key=peerjs&id=a&token=r HTTP/1.1\r\nX: y"]
    assert cut_after(quick_handshakes, trickle, interval=0.1) < 2.5


def test_an_upgrade_gets_only_what_is_left_of_the_deadline(tmp_path: Path) -> None:
    # The channel hands a PeerJS upgrade to Autobahn as soon as it sees "GET /peerjs?":
    # a client that took most of the deadline to get there must not start a new one.
    # (A fresh 4 s deadline from 3.4 s would cut at 7.4 s.)
    proc = ServerProcess(tmp_path, ["--handshake-timeout", "4"])
    proc.start()
    try:
        slow = [bytes([c]) for c in b"GET /peerjs?"] + [b"k"] * 40
        assert cut_after(proc, slow, interval=0.28) < 5.0  # cut by 4.0
        # And not before: a head begun at once and finished at 3.5 s opens.
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
            s.sendall(b"GET /peerjs?key=peerjs&id=late&token=r HTTP/1.1\r\n")
            time.sleep(3.5)
            s.sendall(b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"Sec-WebSocket-Version: 13\r\n\r\n")
            assert s.recv(12) == b"HTTP/1.1 101"
    finally:
        proc.stop()


def test_completed_upgrade_outlives_the_handshake_timeout(
        quick_handshakes: ServerProcess) -> None:
    with connect(quick_handshakes.ws_url("steady")) as ws:
        assert json.loads(ws.recv(timeout=5)) == {"type": "OPEN"}
        time.sleep(2.5)
        ws.send(json.dumps({"type": "HEARTBEAT"}))
        ws.ping().wait(timeout=5)
