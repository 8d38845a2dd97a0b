"""The wss transport (peersig/tls.py) through real sockets against a real twistd: TLS
records cut anywhere, a reader too slow for the writer, close_notify both ways, a close in
the middle of a record, a client's alert, a stalled handshake, and kernel TLS detection."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from peersig.tls import OP_ENABLE_KTLS, kernel_tls, load_context

from .serverproc import ServerProcess, make_self_signed_cert
from .test_framing import client_frame
from .test_process import recv_json
from .wssclient import insecure, wss_connect


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("tls"),
                         ["--rate-limit", "0", "--handshake-timeout", "1"], tls=True)
    proc.start()
    yield proc
    proc.stop()


def wss_url(server: ServerProcess, peer_id: str, room: str) -> str:
    return (f"wss://127.0.0.1:{server.tls_port}/peerjs?key=peerjs&id={peer_id}&token={room}"
            "&version=1.5.5")


class WireClient:
    """A TLS client on a memory BIO: the test decides how the records go onto the wire."""

    def __init__(self, server: ServerProcess, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", server.tls_port))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = insecure().wrap_bio(self.incoming, self.outgoing)
        self.plain = b""

    def flush(self, piece: int = 0, pause: float = 0.0) -> None:
        """Send what TLS wrote, in pieces of ``piece`` bytes (all at once for 0)."""
        data = self.outgoing.read()
        step = piece or max(len(data), 1)
        for i in range(0, len(data), step):
            self.sock.sendall(data[i:i + step])
            if pause:
                time.sleep(pause)

    def handshake(self, piece: int = 0, pause: float = 0.0) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self.flush(piece, pause)
                return
            except ssl.SSLWantReadError:
                self.flush(piece, pause)
                self.incoming.write(self.sock.recv(65536))

    def send(self, data: bytes, piece: int = 0, pause: float = 0.0) -> None:
        self.tls.write(data)
        self.flush(piece, pause)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.plain:
            self.more()
        return self.plain

    def more(self) -> None:
        try:
            data = self.tls.read(65536)
        except ssl.SSLWantReadError:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("TCP closed") from None
            self.incoming.write(data)
            return
        if not data:  # Python's ssl reads a close_notify as b""
            raise EOFError("close_notify")
        self.plain += data

    def frame(self) -> bytes:
        """The payload of the next server frame (after the 101 and OPEN)."""
        while True:
            data = self.plain
            if len(data) >= 2:
                size, start = data[1], 2
                if size == 126 and len(data) >= 4:
                    size, start = int.from_bytes(data[2:4], "big"), 4
                elif size == 127 and len(data) >= 10:
                    size, start = int.from_bytes(data[2:10], "big"), 10
                if (size < 126 or start > 2) and len(data) >= start + size:
                    self.plain = data[start + size:]
                    return data[start:start + size]
            self.more()

    def join(self, peer_id: str, room: str, piece: int = 0, pause: float = 0.0) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.send(f"GET /peerjs?key=peerjs&id={peer_id}&token={room}&version=1.5.5 HTTP/1.1"
                  f"\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode(),
                  piece, pause)
        text = self.read_until(b'{"type":"OPEN"}')
        self.plain = text[text.index(b'{"type":"OPEN"}') + 15:]


def test_records_cut_anywhere_are_read_whole(server: ServerProcess) -> None:
    room = "cut" + os.urandom(3).hex()
    with wss_connect(wss_url(server, "b", room)) as b:
        recv_json(b)
        client = WireClient(server)
        client.handshake(piece=7, pause=0.002)  # the ClientHello in pieces: want-read
        client.join("a", room, piece=11, pause=0.001)
        offer = json.dumps({"type": "OFFER", "dst": "b", "payload": {"sdp": "v=0 " * 300}})
        client.send(client_frame(offer.encode()), piece=13, pause=0.0005)
        assert recv_json(b)["payload"] == {"sdp": "v=0 " * 300}
        client.sock.close()


def test_a_reader_too_slow_for_the_writer_gets_everything_in_order(
        server: ServerProcess) -> None:
    # The server's writes fill the socket (want-write) and wait for the reader.
    room = "slow" + os.urandom(3).hex()
    slow = WireClient(server, rcvbuf=4096)
    slow.handshake()
    slow.join("slow", room)
    with wss_connect(wss_url(server, "fast", room)) as fast:
        recv_json(fast)
        for n in range(40):
            fast.send(json.dumps({"type": "CANDIDATE", "dst": "slow",
                                  "payload": {"n": n, "pad": "x" * 60000}}))
        time.sleep(0.5)
        for n in range(40):
            message = json.loads(slow.frame())
            assert message["payload"]["n"] == n and len(message["payload"]["pad"]) == 60000
    slow.sock.close()


def test_close_notify_from_the_client_is_a_clean_departure(server: ServerProcess) -> None:
    room = "notify" + os.urandom(3).hex()
    with wss_connect(wss_url(server, "b", room)) as b:
        recv_json(b)
        away = server.metric("peersig_peers_away")
        client = WireClient(server)
        client.handshake()
        client.join("a", room)
        with pytest.raises(ssl.SSLWantReadError):  # sent; the server's is not awaited
            client.tls.unwrap()  # close_notify, without a WebSocket close
        client.flush()
        # Seen at once: a socket cut while its peer talked keeps its place for the grace.
        server.wait_metric("peersig_peers_away", away + 1)
        with pytest.raises(TimeoutError):
            recv_json(b, timeout=0.5)  # no LEAVE: the peer may come back
        client.sock.close()


def test_the_server_ends_its_side_with_close_notify(server: ServerProcess) -> None:
    # An HTTP/1.0 answer ends with an orderly close. (A WebSocket close handshake the
    # server began ends with Autobahn aborting the TCP connection, as RFC 6455 lets it.)
    client = WireClient(server)
    client.handshake()
    client.send(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
    with pytest.raises(EOFError, match="close_notify"):  # not a bare TCP close
        client.read_until(b"never sent")
    assert b'"status": "ok"' in client.plain
    client.sock.close()


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_a_close_in_the_middle_of_a_record_is_a_lost_peer(server: ServerProcess,
                                                          how: str) -> None:
    room = "mid" + how + os.urandom(3).hex()
    with wss_connect(wss_url(server, "b", room)) as b:
        recv_json(b)
        client = WireClient(server)
        client.handshake()
        client.join("a", room)
        client.tls.write(client_frame(b'{"type":"HEARTBEAT"}' * 50))
        record = client.outgoing.read()
        client.sock.sendall(record[:len(record) // 2])
        if how == "reset":
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        away = server.metric("peersig_peers_away")
        client.sock.close()
        server.wait_metric("peersig_peers_away", away + 1)  # a cut connection: the grace
    assert server.get_json("/health")["status"] == "ok"


def test_a_client_that_refuses_the_certificate_with_an_alert(server: ServerProcess) -> None:
    verifying = ssl.create_default_context()  # the self-signed certificate is unknown
    with pytest.raises(ssl.SSLCertVerificationError), \
            socket.create_connection(("127.0.0.1", server.tls_port)) as raw, \
            verifying.wrap_socket(raw, server_hostname="localhost"):
        pass
    with wss_connect(wss_url(server, "after-alert", "alert")) as ws:
        assert recv_json(ws) == {"type": "OPEN"}
    assert "Traceback" not in server.log_tail(200)


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"])
def test_a_stalled_handshake_is_cut_by_the_handshake_timeout(server: ServerProcess,
                                                             sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.tls_port)) as raw:
        raw.sendall(sent)  # nothing, or the start of a ClientHello
        started = time.monotonic()
        raw.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(100) == b""
        assert 0.8 < time.monotonic() - started < 3  # --handshake-timeout 1


def test_many_records_in_one_read_all_arrive(server: ServerProcess) -> None:
    room = "many" + os.urandom(3).hex()
    with wss_connect(wss_url(server, "b", room)) as b:
        recv_json(b)
        client = WireClient(server)
        client.handshake()
        client.join("a", room)
        for n in range(100):  # 100 records, one TCP send
            client.tls.write(client_frame(json.dumps(
                {"type": "CANDIDATE", "dst": "b", "payload": {"n": n}}).encode()))
        client.flush()
        assert [recv_json(b)["payload"]["n"] for _ in range(100)] == list(range(100))
        client.sock.close()


def test_kernel_tls_is_asked_for_only_where_the_kernel_has_it(tmp_path: Path) -> None:
    ulp = tmp_path / "tcp_available_ulp"
    ulp.write_text("mptcp\n")
    assert not kernel_tls(str(ulp))
    ulp.write_text("mptcp tls\n")
    assert kernel_tls(str(ulp))
    assert not kernel_tls(str(tmp_path / "absent"))
    key, cert = make_self_signed_cert(tmp_path)
    assert load_context(str(key), str(cert), None, ktls=True).options & OP_ENABLE_KTLS
    assert not load_context(str(key), str(cert), None).options & OP_ENABLE_KTLS
    # This machine: whatever /proc says is what the server uses (the file may be missing,
    # as in the network namespace the browser tests move the test process to).
    ulp_here = Path("/proc/sys/net/ipv4/tcp_available_ulp")
    assert kernel_tls() == (ulp_here.exists() and "tls" in ulp_here.read_text().split())



def test_a_drain_closes_wss_peers_with_1001(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path, [], tls=True)
    proc.start()
    try:
        with wss_connect(wss_url(proc, "a", "drain")) as ws:
            recv_json(ws)
            proc.signal()
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert proc.proc is not None and proc.proc.wait(timeout=15) == 0
    finally:
        proc.stop()


def test_a_reconnect_resumes_its_tls_session(server: ServerProcess) -> None:
    context = insecure()

    def open_once(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with socket.create_connection(("127.0.0.1", server.tls_port)) as raw, \
                context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
            while tls.recv(65536):  # the ticket comes after the handshake, with the answer
                pass
            return tls.session, tls.session_reused

    session, reused = open_once(None)
    assert session is not None and not reused
    _, reused = open_once(session)
    assert reused  # no certificate, no signature: a browser's reconnect costs less
