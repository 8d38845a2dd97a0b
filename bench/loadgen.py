"""PeerJS load generator worker: one process drives a fleet of WebSocket peers.

It speaks just enough WebSocket (RFC 6455) and PeerJS to look like the stock browser client
to a server: the upgrade request, ``{"type":"OPEN"}``, ``HEARTBEAT`` every 5 s, answering
server pings with pongs, OFFER/ANSWER relays, clean closes. It is written to cost as little
CPU per message as possible, so that the server, not the generator, is what is measured:

* raw ``asyncio.Protocol`` objects on uvloop (no streams, no futures per message);
* every frame a peer ever sends is built once, masked with one per-process masking key,
  and written as ready-made bytes (the mask does not change the server's work);
* incoming frames are unmasked (server to client), so reading one is a few byte reads and
  one slice; relay frames are recognised by their first bytes, and JSON-decoded only for
  the first relay each peer receives (a full check of ``src``, ``dst`` and ``payload``);
  later relays are checked by length;
* heartbeats: by default (``--heartbeats independent``) each peer has its own 5-s timer,
  started at a random phase, as independent browsers have, so each heartbeat wakes the
  server on its own; ``--heartbeats sliced`` sends them from one ticker in 50 slices of
  100 ms, a slice's peers together; ``--heartbeats off`` sends none (silent peers, which
  only answer the server's pings).

The worker is driven by the orchestrator (``bench/run.py``) with one JSON command per line
on stdin and answers one JSON line per command on stdout; every answer carries the
worker's own CPU time (``getrusage``), so the orchestrator can show what the generator
cost per message. Several workers can share a run; rooms are dealt out among them.

Run by hand: ``python bench/loadgen.py --port 9000`` and type
``{"cmd":"connect","rooms":[0,1],"per_room":4}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import os
import random
import resource
import socket
import sys
import time
from collections import deque

perf_counter = time.perf_counter

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MASK = os.urandom(4)
TYPE_PREFIX = b'{"type":"'
SDP_LEN = 1000

# Peer states
CONNECTING, UPGRADING, WS_OPEN, JOINED, CLOSING, CLOSED = range(6)


def mask_bytes(data: bytes, mask: bytes = MASK) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, unfragmented client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + MASK + mask_bytes(payload)


def text_frame(obj: object) -> bytes:
    return client_frame(1, json.dumps(obj, separators=(",", ":")).encode())


HEARTBEAT_FRAME = text_frame({"type": "HEARTBEAT"})
EMPTY_PONG = client_frame(10, b"")
# 1001 (going away): what a browser sends when its page closes, reloads or navigates away,
# and so what tells peersig that the peer left for good (docs/protocol.md, Departures).
CLOSE_FRAME = client_frame(8, (1001).to_bytes(2, "big"))

# A plausible SDP-ish string of exactly SDP_LEN bytes.
_SDP_SEED = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "a=group:BUNDLE 0\r\na=msid-semantic: WMS\r\nm=application 9 UDP/DTLS/SCTP "
    "webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:Xk2p\r\na=ice-pwd:"
    "d3b07384d113edec49eaa6238ad5ff00\r\na=fingerprint:sha-256 "
)
SDP = (_SDP_SEED + "AB:CD:" * 200)[:SDP_LEN]


def relay_payload(kind: str, conn: str) -> dict:
    return {
        "sdp": {"type": kind.lower(), "sdp": SDP},
        "type": "data",
        "connectionId": conn,
        "label": conn,
        "reliable": True,
        "serialization": "binary",
        "metadata": None,
    }


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_split() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


class Fleet:
    """Counters and settings shared by all peers of this worker (a singleton)."""

    def __init__(self, host: str, port: int, sources: list[str], path: str) -> None:
        self.host = host
        self.port = port
        self.sources = sources
        self.path = path
        self.tls = None  # an ssl.SSLContext for wss
        self.peers: dict[str, Peer] = {}
        self.rooms: dict[int, list[Peer]] = {}
        self.buckets: list[list[Peer]] = [[] for _ in range(50)]
        self.tick = 0
        self.heartbeats = True
        self.independent = True  # a timer per peer (--heartbeats independent)
        self.answer_pings = True
        # relay state
        self.closed_loop = False
        self.generic = False  # churn: answer any OFFER to its sender (JSON-decoded)
        self.recording = False
        self.rtts: list[float] = []
        # counters
        self.rx_relay = 0
        self.tx_relay = 0
        self.rx_other: dict[str, int] = {}
        self.pings = 0
        self.heartbeats_sent = 0
        self.drops = 0  # joined peers the server disconnected
        self.drop_reasons: dict[str, int] = {}
        self.bad_relays = 0
        self.verified = 0
        self.proto_errors = 0
        self.errors: dict[str, int] = {}
        self.src_index = 0
        self.max_lag = 0.0  # worst lateness of the 100 ms heartbeat tick: the loop's delay

    def count_error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


F: Fleet  # set in main()


class Peer(asyncio.Protocol):
    __slots__ = (
        "answer_frame",
        "bucket",
        "buf",
        "close_reason",
        "id",
        "joined_at",
        "offer_frame",
        "on_done",
        "opened",
        "partner",
        "port",
        "room",
        "rx_len",
        "sec_accept",
        "sent_q",
        "silent",
        "started_at",
        "state",
        "token",
        "transport",
        "wants_close",
    )

    def __init__(self, peer_id: str, room: int, token: str, port: int = 0) -> None:
        self.id = peer_id
        self.room = room
        self.token = token
        self.port = port or F.port
        self.transport: asyncio.Transport | None = None
        self.state = CONNECTING
        self.buf = b""
        self.opened: asyncio.Future | None = None
        self.on_done: asyncio.Future | None = None
        self.partner: Peer | None = None
        self.offer_frame: bytes | None = None
        self.answer_frame: bytes | None = None
        self.sent_q: deque[float] = deque()
        self.rx_len = 0
        self.started_at = 0.0
        self.joined_at = 0.0
        self.sec_accept = b""
        self.silent = False
        self.wants_close = False
        self.close_reason = ""
        self.bucket = -1

    # -- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.state = UPGRADING
        key = base64.b64encode(os.urandom(16))
        self.sec_accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        req = (
            f"GET {F.path}peerjs?key=peerjs&id={self.id}&token={self.token}&version=1.5.5 "
            f"HTTP/1.1\r\nHost: {F.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: http://localhost\r\n"
            f"User-Agent: peersig-bench\r\n\r\n"
        ).encode()
        transport.write(req)

    def connection_lost(self, exc: Exception | None) -> None:
        prev = self.state
        self.state = CLOSED
        if prev in (JOINED, CLOSING) and not self.wants_close and not self.silent:
            F.drops += 1
            reason = self.close_reason or ("reset" if exc else "eof")
            F.drop_reasons[reason] = F.drop_reasons.get(reason, 0) + 1
        if self.opened is not None and not self.opened.done():
            self.opened.set_result(self.close_reason or "closed_before_open")
        if self.on_done is not None and not self.on_done.done():
            self.on_done.set_result(None)
        if F.peers.get(self.id) is self:
            del F.peers[self.id]

    def eof_received(self) -> bool:
        return False

    def _handshake(self, data: bytes) -> None:
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        head = buf[:end]
        rest = buf[end + 4 :]
        self.buf = b""
        status = head[: head.find(b"\r\n")]
        if b" 101 " not in status + b" ":
            F.count_error("http_" + status[9:12].decode("latin-1", "replace"))
            self._fail("http_" + status[9:12].decode("latin-1", "replace"))
            return
        if self.sec_accept not in head:
            self._fail("bad_accept")
            return
        self.state = WS_OPEN
        if rest:
            self.data_received(rest)

    def _fail(self, reason: str) -> None:
        self.close_reason = reason
        if self.opened is not None and not self.opened.done():
            self.opened.set_result(reason)
        self.wants_close = True
        if self.transport is not None:
            self.transport.abort()

    # -- frames in ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state < WS_OPEN:
            self._handshake(data)
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        n = len(data)
        i = 0
        while n - i >= 2:
            ln = data[i + 1]
            if ln < 126:
                s = i + 2
            elif ln == 126:
                if n - i < 4:
                    break
                ln = (data[i + 2] << 8) | data[i + 3]
                s = i + 4
            else:  # 127, or the mask bit set (a protocol error from the server)
                if ln > 127:
                    F.proto_errors += 1
                    self._fail("masked_frame")
                    return
                if n - i < 10:
                    break
                ln = int.from_bytes(data[i + 2 : i + 10], "big")
                s = i + 10
            e = s + ln
            if e > n:
                break
            b0 = data[i]
            if b0 == 0x81:
                self.on_text(data[s:e])
            elif b0 == 0x89:
                F.pings += 1
                if F.answer_pings and not self.silent:
                    if e == s:
                        self.transport.write(EMPTY_PONG)
                    else:
                        self.transport.write(client_frame(10, data[s:e]))
            elif b0 == 0x88:
                self._on_close_frame(data[s:e])
            elif b0 == 0x8A:
                pass
            else:
                F.proto_errors += 1
            i = e
            if self.state == CLOSED:
                return
        if i < n:
            self.buf = data[i:]

    def on_text(self, msg: bytes) -> None:
        if msg.startswith(TYPE_PREFIX) and not F.generic:
            c = msg[9]
            if c == 79 and msg[10] == 70:  # OFFER
                F.rx_relay += 1
                if len(msg) != self.rx_len:
                    self._check_relay(msg, "OFFER")
                af = self.answer_frame
                if af is not None:
                    self.transport.write(af)
                    F.tx_relay += 1
                return
            if c == 65:  # ANSWER
                F.rx_relay += 1
                if len(msg) != self.rx_len:
                    self._check_relay(msg, "ANSWER")
                q = self.sent_q
                if q:
                    t0 = q.popleft()
                    if F.recording:
                        F.rtts.append(perf_counter() - t0)
                if F.closed_loop and self.offer_frame is not None:
                    self.transport.write(self.offer_frame)
                    q.append(perf_counter())
                    F.tx_relay += 1
                return
        self.on_other(msg)

    def _check_relay(self, msg: bytes, mtype: str) -> None:
        """Full check of the first relay a peer receives (and of any with a new length)."""
        try:
            obj = json.loads(msg)
        except ValueError:
            F.bad_relays += 1
            return
        partner = self.partner
        if partner is None:
            F.bad_relays += 1
            return
        conn = f"dc_{partner.id}_{self.id}" if mtype == "OFFER" else f"dc_{self.id}_{partner.id}"
        ok = (
            obj.get("type") == mtype
            and obj.get("src") == partner.id
            and obj.get("dst", self.id) == self.id
            and obj.get("payload") == relay_payload("offer" if mtype == "OFFER" else "answer", conn)
        )
        if ok:
            if self.rx_len:
                F.bad_relays += 1  # right content, but a different length than before
            self.rx_len = len(msg)
            F.verified += 1
        else:
            F.bad_relays += 1

    def beat(self) -> None:
        """One heartbeat of this peer's own timer, and the next in 5 s."""
        if self.state != JOINED:
            return
        if F.heartbeats and not self.silent:
            self.transport.write(HEARTBEAT_FRAME)
            F.heartbeats_sent += 1
        asyncio.get_running_loop().call_later(5.0, self.beat)

    def on_other(self, msg: bytes) -> None:
        try:
            obj = json.loads(msg)
            mtype = obj.get("type")
        except (ValueError, AttributeError):
            F.proto_errors += 1
            return
        F.rx_other[str(mtype)] = F.rx_other.get(str(mtype), 0) + 1
        if mtype == "OPEN":
            if self.state == WS_OPEN:
                self.state = JOINED
                self.joined_at = perf_counter()
                F.peers[self.id] = self
                if F.independent:  # its own timer, at a random phase of the 5 s
                    asyncio.get_running_loop().call_later(random.uniform(0, 5.0), self.beat)
                else:
                    b = (F.tick + 49) % 50  # first heartbeat ~5 s after open, as the browser
                    self.bucket = b
                    F.buckets[b].append(self)
                if self.opened is not None and not self.opened.done():
                    self.opened.set_result("ok")
        elif mtype in ("ERROR", "ID-TAKEN"):
            text = ""
            payload = obj.get("payload")
            if isinstance(payload, dict):
                text = str(payload.get("msg", ""))
            reason = f"{mtype}: {text}" if text else str(mtype)
            self.close_reason = reason
            if self.state != JOINED and self.opened is not None and not self.opened.done():
                self.opened.set_result(reason)
        elif mtype in ("OFFER", "ANSWER") and F.generic:
            F.rx_relay += 1
            src = obj.get("src")
            payload = obj.get("payload")
            conn = payload.get("connectionId", "") if isinstance(payload, dict) else ""
            # The offerer named the connection dc_<offerer>_<answerer>.
            expect = f"dc_{src}_{self.id}" if mtype == "OFFER" else f"dc_{self.id}_{src}"
            if conn != expect or obj.get("dst", self.id) != self.id:
                F.bad_relays += 1
            else:
                F.verified += 1
            if mtype == "OFFER" and self.state == JOINED:
                self.transport.write(text_frame(
                    {"type": "ANSWER", "dst": src, "payload": relay_payload("answer", conn)}))
                F.tx_relay += 1
        elif mtype in ("OFFER", "ANSWER", "CANDIDATE"):
            # A relay with an unexpected layout (e.g. keys in another order).
            F.rx_relay += 1
            F.bad_relays += 1

    def _on_close_frame(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        if not self.close_reason:
            self.close_reason = f"close_{code}"
        if self.state != CLOSING:
            # The server started the close: echo it, as a browser does.
            with contextlib.suppress(Exception):
                self.transport.write(CLOSE_FRAME)
        self.state = CLOSING
        # The server closes TCP after the handshake; do not wait for it forever.
        asyncio.get_running_loop().call_later(2.0, self._force_close)

    def _force_close(self) -> None:
        if self.state != CLOSED and self.transport is not None:
            self.transport.abort()

    # -- actions --------------------------------------------------------------------------

    def close(self, abrupt: bool = False) -> None:
        self.wants_close = True
        if self.state == CLOSED or self.transport is None:
            return
        if abrupt or self.state < JOINED:
            self.transport.abort()
            return
        if self.state == JOINED:
            self.state = CLOSING
            self.transport.write(CLOSE_FRAME)
            asyncio.get_running_loop().call_later(5.0, self._force_close)


async def open_peer(peer: Peer, timeout: float) -> str:
    """Connect, upgrade and wait for OPEN; returns "ok" or a failure reason."""
    loop = asyncio.get_running_loop()
    peer.opened = loop.create_future()
    peer.started_at = perf_counter()
    src = F.sources[F.src_index % len(F.sources)]
    F.src_index += 1
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((src, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (F.host, peer.port)), timeout)
        if F.tls is None:
            await loop.create_connection(lambda: peer, sock=sock)
        else:  # wss: the TLS handshake counts in the join time
            await asyncio.wait_for(loop.create_connection(
                lambda: peer, sock=sock, ssl=F.tls, server_hostname="localhost"), timeout)
    except (TimeoutError, OSError) as e:
        sock.close()
        if isinstance(e, OSError) and e.errno:
            reason = "connect_" + os.strerror(e.errno)
        else:
            reason = "connect_" + type(e).__name__
        peer.state = CLOSED
        return reason
    try:
        return await asyncio.wait_for(asyncio.shield(peer.opened), timeout)
    except TimeoutError:
        peer._fail("join_timeout")
        return "join_timeout"


def percentiles(values: list[float], ps=(50, 90, 99, 99.9)) -> dict:
    if not values:
        return {}
    v = sorted(values)
    out = {f"p{p:g}": v[min(len(v) - 1, int(len(v) * p / 100))] for p in ps}
    out["max"] = v[-1]
    out["mean"] = sum(v) / len(v)
    out["n"] = len(v)
    return out


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.rate_task: asyncio.Task | None = None
        self.churn_stats: dict = {}
        self.background: set[asyncio.Future] = set()
        self.out = sys.stdout
        self.gen = 0

    def reply(self, cmd: str, **fields) -> None:
        ut, st = cpu_split()
        fields.update(cmd=cmd, cpu=ut + st, cpu_user=ut, cpu_sys=st, t=time.time())
        self.out.write(json.dumps(fields) + "\n")
        self.out.flush()

    # -- heartbeats -----------------------------------------------------------------------

    def heartbeat_tick(self) -> None:
        now = perf_counter()
        lag = now - self.next_tick
        if lag > F.max_lag:
            F.max_lag = lag
        self.next_tick = now + 0.1
        F.tick = (F.tick + 1) % 50
        bucket = F.buckets[F.tick]
        if bucket:
            live = [p for p in bucket if p.state == JOINED]
            if len(live) != len(bucket):
                bucket[:] = live
            if F.heartbeats:
                frame = HEARTBEAT_FRAME
                for p in live:
                    if not p.silent:
                        p.transport.write(frame)
                F.heartbeats_sent += len(live)
        self.loop.call_later(0.1, self.heartbeat_tick)

    # -- commands -------------------------------------------------------------------------

    def make_room(self, room: int, per_room: int, gen: int,
                  spread: list[int] | None = None) -> list[Peer]:
        """A room's peers; with ``spread`` (ports of cluster nodes), slot j dials
        ``spread[j % len(spread)]``, so that both peers of a pair are on different nodes."""
        token = f"room{room}"
        ports = spread or [0]
        peers = [Peer(f"p{gen}r{room}s{j}", room, token, ports[j % len(ports)])
                 for j in range(per_room)]
        return peers

    async def connect_many(self, peers: list[Peer], concurrency: int, timeout: float) -> dict:
        results: dict[str, int] = {}
        join_ms: list[float] = []
        it = iter(peers)

        async def runner() -> None:
            for p in it:
                r = await open_peer(p, timeout)
                results[r] = results.get(r, 0) + 1
                if r == "ok":
                    join_ms.append((p.joined_at - p.started_at) * 1000)
                elif p.transport is not None and p.state != CLOSED:
                    p.close(abrupt=True)

        t0 = time.time()
        if os.environ.get("BENCH_PROGRESS"):
            async def progress() -> None:
                while True:
                    await asyncio.sleep(2)
                    print(f"progress {time.time() - t0:.0f}s ok={results.get('ok', 0)} "
                          f"lag={F.max_lag * 1000:.0f}ms", file=sys.stderr, flush=True)
            ptask = asyncio.ensure_future(progress())
        await asyncio.gather(*(runner() for _ in range(max(1, concurrency))))
        if os.environ.get("BENCH_PROGRESS"):
            ptask.cancel()
        t1 = time.time()
        ok = results.pop("ok", 0)
        return {"ok": ok, "failed": sum(results.values()), "failures": results,
                "join_ms": percentiles(join_ms), "t0": t0, "t1": t1}

    async def cmd_connect(self, c: dict) -> None:
        per_room = c.get("per_room", 4)
        gen = c.get("gen", 0)
        peers: list[Peer] = []
        for room in c["rooms"]:
            rp = self.make_room(room, per_room, gen, c.get("spread"))
            self.pair_up(rp)
            F.rooms[room] = rp
            peers.extend(rp)
        F.max_lag = 0.0  # building the frames above blocks the loop; that is not lag
        self.next_tick = perf_counter() + 0.1
        res = await self.connect_many(peers, c.get("concurrency", 32), c.get("timeout", 15.0))
        gc.collect()
        gc.freeze()
        self.reply("connect", **res)

    @staticmethod
    def pair_up(rp: list[Peer]) -> None:
        """Slots (0,1) and (2,3) of a room are pairs; the first of a pair offers."""
        for a, b in zip(rp[0::2], rp[1::2], strict=False):
            a.partner, b.partner = b, a
            conn = f"dc_{a.id}_{b.id}"
            a.offer_frame = text_frame(
                {"type": "OFFER", "payload": relay_payload("offer", conn), "dst": b.id})
            b.answer_frame = text_frame(
                {"type": "ANSWER", "payload": relay_payload("answer", conn), "dst": a.id})

    def offerers(self) -> list[Peer]:
        out = []
        for rp in F.rooms.values():
            for p in rp[0::2]:
                if p.offer_frame is not None and p.state == JOINED and \
                        p.partner is not None and p.partner.state == JOINED:
                    out.append(p)
        return out

    def cmd_mark(self, c: dict) -> None:
        if c.get("record") is not None:
            F.recording = bool(c["record"])
            if F.recording:
                F.rtts = []
        self.reply("mark", rx_relay=F.rx_relay, tx_relay=F.tx_relay, rtts_n=len(F.rtts),
                   pings=F.pings, heartbeats=F.heartbeats_sent, drops=F.drops,
                   connected=len(F.peers))

    def cmd_relay(self, c: dict) -> None:
        mode = c.get("mode", "closed")
        starters = self.offerers()
        if mode == "closed":
            F.closed_loop = True
            for p in starters:
                p.transport.write(p.offer_frame)
                p.sent_q.append(perf_counter())
                F.tx_relay += 1
        else:
            F.closed_loop = False
            self.rate_task = asyncio.ensure_future(self.rate_loop(starters, c["rate"]))
        self.reply("relay", pairs=len(starters))

    async def rate_loop(self, starters: list[Peer], rate: float) -> None:
        """Open loop: ``rate`` OFFERs per second, round robin over the pairs."""
        if not starters:
            return
        n = len(starters)
        k = 0
        sent = 0
        t0 = perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = perf_counter()
            due = int((now - t0) * rate) - sent
            for _ in range(due):
                p = starters[k]
                k += 1
                if k == n:
                    k = 0
                if p.state == JOINED:
                    p.transport.write(p.offer_frame)
                    p.sent_q.append(now)
                    F.tx_relay += 1
            sent += max(due, 0)

    async def cmd_relay_stop(self, c: dict) -> None:
        F.closed_loop = False
        if self.rate_task is not None:
            self.rate_task.cancel()
            self.rate_task = None
        deadline = perf_counter() + c.get("drain", 5.0)
        while perf_counter() < deadline:
            inflight = sum(len(p.sent_q) for p in F.peers.values())
            if not inflight:
                break
            await asyncio.sleep(0.05)
        inflight = sum(len(p.sent_q) for p in F.peers.values())
        rtts = F.rtts
        F.recording = False
        F.rtts = []
        self.reply("relay_stop", inflight=inflight, rx_relay=F.rx_relay, tx_relay=F.tx_relay,
                   rtt_us=[round(x * 1e6) for x in rtts] if c.get("send_rtts") else [],
                   rtt=percentiles([x * 1000 for x in rtts]))

    def cmd_status(self, c: dict) -> None:
        self.reply("status", connected=len(F.peers), drops=F.drops,
                   max_loop_lag_ms=F.max_lag * 1000,
                   drop_reasons=F.drop_reasons, errors=F.errors, proto_errors=F.proto_errors,
                   bad_relays=F.bad_relays, verified=F.verified, rx_other=F.rx_other,
                   pings=F.pings, heartbeats=F.heartbeats_sent, rx_relay=F.rx_relay,
                   tx_relay=F.tx_relay)

    async def close_peers(self, peers: list[Peer], abrupt: bool = False,
                          timeout: float = 10.0) -> int:
        loop = self.loop
        waits = []
        for p in peers:
            if p.state != CLOSED:
                p.on_done = loop.create_future()
                waits.append(p.on_done)
                p.close(abrupt=abrupt)
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            return len(pending)
        return 0

    async def cmd_close_all(self, c: dict) -> None:
        peers = [p for rp in F.rooms.values() for p in rp]
        t0 = time.time()
        stuck = await self.close_peers(peers, abrupt=c.get("abrupt", False))
        F.rooms.clear()
        self.reply("close_all", closed=len(peers), stuck=stuck, t0=t0, t1=time.time())

    async def cmd_silent(self, c: dict) -> None:
        """A peer that joins, then neither heartbeats nor answers pings (a vanished tab).
        Answers with when its last frame went out and when the server closed it."""
        room = c.get("room", 999999)
        p = Peer(f"silent{room}", room, f"room{room}")
        p.silent = True
        r = await open_peer(p, 15.0)
        if r != "ok":
            self.reply("silent", ok=False, reason=r)
            return
        p.on_done = self.loop.create_future()
        t_open = time.time()
        wait = c.get("wait", 70.0)
        try:
            await asyncio.wait_for(asyncio.shield(p.on_done), wait)
            dropped_after = time.time() - t_open
        except TimeoutError:
            dropped_after = None
        p.wants_close = True
        if p.state != CLOSED:
            p.close(abrupt=True)
        self.reply("silent", ok=True, dropped_after=dropped_after, waited=wait,
                   reason=p.close_reason)

    async def cmd_vanish_peer(self, c: dict) -> None:
        """A peer that joins and sends one HEARTBEAT, then nothing. Answers with its address,
        so the orchestrator can cut its network (bench/vanish.py) and watch the server."""
        room = c.get("room", 999998)
        p = Peer(f"vanish{room}", room, f"room{room}")
        p.silent = True
        r = await open_peer(p, 15.0)
        if r != "ok" or p.transport is None:
            self.reply("vanish_peer", ok=False, reason=r)
            return
        p.transport.write(HEARTBEAT_FRAME)
        address, port = p.transport.get_extra_info("sockname")[:2]
        self.reply("vanish_peer", ok=True, address=address, port=port)

    async def cmd_churn(self, c: dict) -> None:
        """For ``duration`` s, ``rate`` times a second: a random joined peer leaves (a close
        1001 as a closed page sends, or with ``abrupt_share`` a bare TCP close, whose seat
        peersig keeps for the reconnect grace) and a newcomer with a fresh id joins the same
        room (retrying each second while the room is full, up to ``retry_seconds``), then
        sends an OFFER to a room-mate, who answers."""
        duration = c["duration"]
        rate = c["rate"]
        abrupt_share = c.get("abrupt_share", 0.1)
        cycle = c.get("cycle", 1)
        timeout = c.get("timeout", 15.0)
        rng = random.Random(c.get("seed", 1))
        stats = {"left": 0, "left_abrupt": 0, "joined": 0, "failed": 0, "failures": {},
                 "offers": 0, "retried": 0}
        F.generic = True
        join_ms: list[float] = []
        inflight: set[asyncio.Task] = set()
        gen_counter = [0]
        max_inflight = c.get("max_inflight", 200)

        async def replace(room: int, slot: int, old: Peer) -> None:
            abrupt = rng.random() < abrupt_share
            old.on_done = self.loop.create_future()
            old.close(abrupt=abrupt)
            stats["left_abrupt" if abrupt else "left"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(old.on_done), 10.0)
            gen_counter[0] += 1
            new = Peer(f"c{cycle}n{gen_counter[0]}r{room}s{slot}", room, f"room{room}")
            F.rooms[room][slot] = new
            r = await open_peer(new, timeout)
            retry_until = perf_counter() + c.get("retry_seconds", 15.0)
            tries = 0
            while r.startswith("ERROR: Room is full") and perf_counter() < retry_until:
                # The server may not have seen the leaver go yet, or keeps the seat of one
                # whose connection dropped for a reconnect (peersig's --reconnect-grace):
                # try again each second, as an app would.
                stats["retried"] += 1
                tries += 1
                await asyncio.sleep(0.2 if tries == 1 else 1.0)
                new = Peer(f"c{cycle}n{gen_counter[0]}r{room}s{slot}x{tries}", room,
                           f"room{room}")
                F.rooms[room][slot] = new
                r = await open_peer(new, timeout)
            if r == "ok":
                stats["joined"] += 1
                join_ms.append((new.joined_at - new.started_at) * 1000)
                mates = [p for p in F.rooms[room] if p is not new and p.state == JOINED]
                if mates:
                    mate = rng.choice(mates)
                    conn = f"dc_{new.id}_{mate.id}"
                    # A one-off exchange: new offers, mate answers (generic mode).
                    new.transport.write(text_frame({"type": "OFFER", "dst": mate.id,
                                                    "payload": relay_payload("offer", conn)}))
                    stats["offers"] += 1
            else:
                stats["failed"] += 1
                stats["failures"][r] = stats["failures"].get(r, 0) + 1

        t0 = perf_counter()
        done_n = 0
        while perf_counter() - t0 < duration:
            await asyncio.sleep(0.005)
            due = int((perf_counter() - t0) * rate) - done_n
            for _ in range(due):
                if len(inflight) >= max_inflight:
                    break
                room = rng.choice(list(F.rooms.keys())) if F.rooms else None
                if room is None:
                    break
                rp = F.rooms[room]
                slot = rng.randrange(len(rp))
                old = rp[slot]
                if old.state != JOINED:
                    done_n += 1
                    continue
                task = asyncio.ensure_future(replace(room, slot, old))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                done_n += 1
        if inflight:
            await asyncio.wait(list(inflight), timeout=30.0)
        await asyncio.sleep(0.5)  # let the last answers arrive
        F.generic = False
        stats["join_ms"] = percentiles(join_ms)
        stats["connected"] = len(F.peers)
        self.reply("churn", **stats)

    async def run(self) -> None:
        self.next_tick = perf_counter() + 0.1
        self.loop.call_later(0.1, self.heartbeat_tick)
        reader = asyncio.StreamReader(limit=1 << 20)
        await self.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                          sys.stdin)
        self.reply("hello", pid=os.getpid(), loop=type(self.loop).__module__,
                   python=sys.version.split()[0])
        while True:
            line = await reader.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            c = json.loads(line)
            name = c["cmd"]
            if name == "exit":
                break
            handler = getattr(self, "cmd_" + name, None)
            if handler is None:
                self.reply("error", error=f"unknown command {name}")
                continue
            r = handler(c)
            if asyncio.iscoroutine(r):
                if name == "silent":
                    # Runs for up to a minute beside the other commands; answers when done.
                    self.background.add(asyncio.ensure_future(r))
                else:
                    await r
        for p in list(F.peers.values()):
            if p.transport is not None:
                p.transport.abort()
        self.reply("bye")


def raise_nofile(n: int = 200_000) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("--sources", default="127.0.0.1",
                    help="comma-separated loopback source addresses to spread sockets over")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--heartbeats", choices=("independent", "sliced", "off"),
                    default="independent",
                    help="a 5-s timer per peer at a random phase, one ticker in 50 slices, "
                         "or none (peers that only answer pings)")
    ap.add_argument("--tls", action="store_true",
                    help="wss: TLS 1.3 without certificate checks (the server's is self-signed)")
    args = ap.parse_args()
    raise_nofile()
    gc.set_threshold(100_000, 50, 50)
    global F
    F = Fleet(args.host, args.port, args.sources.split(","), args.path)
    F.independent = args.heartbeats == "independent"
    F.heartbeats = args.heartbeats != "off"
    if args.tls:
        import ssl

        F.tls = ssl.create_default_context()
        F.tls.check_hostname = False
        F.tls.verify_mode = ssl.CERT_NONE
    if args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run

    async def amain() -> None:
        await Worker(args).run()

    runner(amain())


if __name__ == "__main__":
    main()
