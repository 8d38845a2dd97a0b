"""Pieces for driving stock PeerJS clients in headless Chromium against `twistd -n peersig`.

A loopback-only network namespace, a tiny HTTP server for the test page and the npm bundle, the
server subprocess, and PeerTab: a typed wrapper around one page that holds one Peer (window.T in
page/harness.js). conftest.py turns these into fixtures.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from playwright.sync_api import Page

from tests.serverproc import ServerProcess

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUNDLE = HERE / "node_modules" / "peerjs" / "dist" / "peerjs.min.js"
ARTIFACTS = HERE / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--ignore-certificate-errors",
]
LOOPBACK_ADDRESSES = {"127.0.0.1", "::1"}
WAIT_MS = 5000  # bound for any single wait; the happy paths take well under 1 s here

_CLONE_NEWNET = 0x40000000


# --- network -------------------------------------------------------------------------------


def interfaces() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def isolate_to_loopback() -> None:
    """Put this process, and so every child it starts (server, Chromium), into a network namespace
    whose only interface is loopback, so no ICE candidate can name another address.

    A no-op apart from bringing `lo` up when already inside one (e.g. under `unshare -n`).
    Call it from the main thread before starting threads or subprocesses: unshare() moves only the
    calling thread, and children inherit the namespace of the thread that starts them.
    """
    if interfaces() != ["lo"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(
                err,
                f"unshare(CLONE_NEWNET): {os.strerror(err)}; the browser suite "
                "needs root, or run it inside `unshare -n`",
            )
    link = subprocess.run(
        ["ip", "-o", "link", "show", "lo"], capture_output=True, text=True, check=True
    ).stdout
    if ",UP" not in link:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if interfaces() != ["lo"]:
        raise RuntimeError(f"expected only loopback, found {interfaces()}")


def client_ports(server_port: int) -> set[int]:
    """Local ports of the TCP connections established to 127.0.0.1:``server_port``."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"dport = :{server_port}"],
                         capture_output=True, text=True, check=True).stdout
    return {int(line.split()[2].rpartition(":")[2]) for line in out.splitlines() if line}


# --- the test page -------------------------------------------------------------------------


class _PageHandler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[Path, str]]] = {
        "/": (HERE / "page" / "index.html", "text/html; charset=utf-8"),
        "/harness.js": (HERE / "page" / "harness.js", "text/javascript"),
        "/peerjs.min.js": (BUNDLE, "text/javascript"),
        "/serializer.msgpack.mjs": (BUNDLE.parent / "serializer.msgpack.mjs", "text/javascript"),
    }

    def do_GET(self) -> None:
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404)
            return
        body = route[0].read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", route[1])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class StaticSite:
    """Serves the test page and the unmodified npm PeerJS bundle on 127.0.0.1."""

    def __init__(self) -> None:
        if not BUNDLE.exists():
            raise FileNotFoundError(f"{BUNDLE} is missing: run tests/browser/install.sh")
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def file_site(folder: Path) -> str:
    """The test page as a page opened from a file (as Electron, Cordova and a double-click
    open it): copied with its scripts into ``folder``; its file:// URL."""
    for route, (source, _type) in _PageHandler.routes.items():
        shutil.copy(source, folder / (route.lstrip("/") or "index.html"))
    return (folder / "index.html").as_uri()


# --- the server under test -----------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a Peer finds its signaling server: PeerJS's host, port, secure, path and key."""

    port: int
    secure: bool = False
    host: str = "127.0.0.1"
    path: str = "/"
    key: str = "peerjs"

    def peer_options(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "secure": self.secure,
            "path": self.path,
            "key": self.key,
        }


class PeersigServer(ServerProcess):
    """The server of tests/serverproc.py, with the Endpoints a PeerJS page needs."""

    @property
    def ws(self) -> Endpoint:
        return Endpoint(self.port)

    @property
    def wss(self) -> Endpoint | None:
        return None if self.tls_port is None else Endpoint(self.tls_port, secure=True)


# --- one Peer per page ---------------------------------------------------------------------


@dataclass(frozen=True)
class PeerError:
    type: str | None
    message: str


class PeerTab:
    """One page holding one stock PeerJS Peer, driven through window.T (page/harness.js)."""

    def __init__(self, page: Page, name: str, url: str) -> None:
        self.page = page
        self.name = name
        self.id: str | None = None
        self.console: list[str] = []
        self.sockets: list[str] = []  # WebSocket URLs the page opened
        self.signal_ports: set[int] = set()  # local ports of its signaling socket, if known
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.responses: list[tuple[str, int]] = []  # (URL path, status) of HTTP responses
        page.on("websocket", lambda ws: self.sockets.append(ws.url))
        page.on("response", lambda r: self.responses.append((urlsplit(r.url).path, r.status)))
        page.goto(url)
        page.wait_for_function("window.T !== undefined && window.Peer !== undefined"
                               " && window.MsgPack !== undefined")

    def _t(self, method: str, *args: Any) -> Any:
        return self.page.evaluate("([m, a]) => T[m](...a)", [method, list(args)])

    def start(self, endpoint: Endpoint, token: str, peer_id: str | None = None,
              config: dict[str, Any] | None = None) -> None:
        """Creates the Peer; `token` is the room under peersig's default --room-by token;
        `config` its RTCConfiguration (default: no ICE servers)."""
        self._t("start", {**endpoint.peer_options(), "token": token, "id": peer_id,
                          "config": config})

    def fetch_ice(self, url: str) -> dict[str, Any]:
        """GET `url` from the page (a cross-origin fetch, as an app makes it)."""
        config: dict[str, Any] = self._t("fetchIce", url)
        return config

    def selected_pairs(self) -> list[dict[str, str]]:
        """(local, remote) candidate types of each open connection's selected pair."""
        pairs: list[dict[str, str]] = self._t("selectedPairs")
        return pairs

    def wait_open(self, ms: int = WAIT_MS) -> str:
        self.id = str(self._t("waitOpen", ms))
        return self.id

    def wait_error(self, ms: int = WAIT_MS) -> PeerError:
        event = self._t("waitError", ms)
        return PeerError(event["type"], event["message"])

    def wait_signal(self, type: str, src: str, ms: int = WAIT_MS) -> int:
        """Epoch ms at which the server's first `type` message with this `src` arrived."""
        return int(self._t("waitSignal", type, src, ms)["t"])

    def events(self, *kinds: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self._t("events")
        return [e for e in events if not kinds or e["kind"] in kinds]

    def errors(self) -> list[PeerError]:
        return [PeerError(e["type"], e["message"]) for e in self.events("error")]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self._t("state")
        return state

    def connect(self, remote: str, serialization: str | None = None) -> None:
        self._t("connect", remote, serialization)

    def wait_conn_open(self, remote: str, ms: int = WAIT_MS) -> None:
        self._t("waitConnOpen", remote, ms)

    def wait_conn_closed(self, remote: str, ms: int = WAIT_MS) -> int:
        """Epoch ms at which the newest data connection with `remote` closed."""
        return int(self._t("waitConnClosed", remote, ms))

    def send(self, remote: str, data: Any) -> None:
        self._t("send", remote, data)

    def wait_data(self, remote: str, data: Any, ms: int = WAIT_MS) -> None:
        self._t("waitData", remote, data, ms)

    def received(self) -> dict[str, list[Any]]:
        received: dict[str, list[Any]] = self._t("received")
        return received

    def connection_peers(self) -> list[str]:
        peers: list[str] = self._t("connectionPeers")
        return peers

    def call(self, remote: str, ms: int = WAIT_MS) -> dict[str, Any]:
        """Calls `remote` with the fake camera and mic; reports the remote media that arrived."""
        report: dict[str, Any] = self._t("call", remote, ms)
        return report

    def answered_call(self, remote: str, ms: int = WAIT_MS) -> dict[str, Any]:
        report: dict[str, Any] = self._t("answeredCall", remote, ms)
        return report

    def ice_addresses(self) -> set[str]:
        """Addresses of all ICE candidates, local and remote, of this page's open connections."""
        found = self._t("iceAddresses")
        return {*found["local"], *found["remote"]}

    def reconnect(self) -> int:
        """Leaves the server and calls the stock ``peer.reconnect()``; the epoch ms of the
        call."""
        return int(self._t("reconnect"))

    def wait_reopen(self, since: int, ms: int = WAIT_MS) -> int:
        """Epoch ms of the first ``open`` at or after ``since``."""
        return int(self._t("waitReopen", since, ms))

    def destroy(self) -> int:
        """Destroys the Peer; returns the epoch ms just before."""
        return int(self._t("destroy"))

    def send_frame(self, frame: dict[str, Any]) -> None:
        """A frame through the stock client's signaling socket (an app message)."""
        self._t("sendFrame", frame)

    def disconnect(self) -> int:
        """The stock ``peer.disconnect()``; the epoch ms just before."""
        return int(self._t("disconnect"))

    def reconnect_only(self) -> int:
        """The stock ``peer.reconnect()`` of a disconnected Peer; the epoch ms just before."""
        return int(self._t("reconnectOnly"))

    def send_set(self, remote: str, name: str) -> int:
        """Sends the values of a set of harness.js's SETS; how many."""
        return int(self._t("sendSet", remote, name))

    def check_set(self, remote: str, name: str, serialization: str) -> list[str]:
        """Mismatches between what arrived of a set and what the serialization gives back."""
        problems: list[str] = self._t("checkSet", remote, name, serialization)
        return problems

    def media_counters(self, remote: str) -> dict[str, Any]:
        counters: dict[str, Any] = self._t("mediaCounters", remote)
        return counters

    def wait_call_closed(self, remote: str, ms: int = WAIT_MS) -> int:
        return int(self._t("waitCallClosed", remote, ms))

    def close_call(self, remote: str) -> None:
        self._t("closeCall", remote)

    def connect_while_disconnected(self, remote: str) -> None:
        self._t("connectWhileDisconnected", remote)

    def try_id(self, endpoint: Endpoint, token: str, peer_id: str) -> str:
        """A second Peer on this page asks for ``peer_id``: "open", or its error type."""
        return str(self._t("tryId", peer_id, {**endpoint.peer_options(), "token": token}))

    def save_artifacts(self, folder: Path) -> None:
        log = [*self.console, "", f"websockets: {self.sockets}", f"http: {self.responses}"]
        try:
            log += ["", "events:", *map(json.dumps, self.events())]
            self.page.screenshot(path=str(folder / f"{self.name}.png"), full_page=True)
        except Exception as exc:  # a crashed page still leaves its console log
            log.append(f"could not read page: {exc}")
        (folder / f"{self.name}.console.log").write_text("\n".join(log) + "\n")


OpenTabs = Callable[..., list[PeerTab]]
"""The `tabs` fixture: ``tabs(n, url=None)`` opens n more tabs with the test page (or the page
at ``url``) in the test's browser context."""


def save_artifacts(
    test_name: str, tabs: Sequence[PeerTab], servers: Sequence[PeersigServer]
) -> Path:
    folder = ARTIFACTS / test_name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for tab in tabs:
        tab.save_artifacts(folder)
    for n, server in enumerate(servers):
        if server.log_path.exists():
            shutil.copy(server.log_path, folder / f"server{n}.log")
    return folder


# --- meshes --------------------------------------------------------------------------------


def open_peers(
    tabs: Sequence[PeerTab], endpoint: Endpoint, room: str, ids: Sequence[str | None]
) -> None:
    for tab, peer_id in zip(tabs, ids, strict=True):
        tab.start(endpoint, room, peer_id)
    for tab in tabs:
        tab.wait_open()


def dial_mesh(tabs: Sequence[PeerTab]) -> None:
    """Opens one data connection per pair; the earlier tab dials."""
    for a, b in itertools.combinations(tabs, 2):
        assert b.id is not None
        a.connect(b.id)


def await_mesh(tabs: Sequence[PeerTab]) -> None:
    for a, b in itertools.permutations(tabs, 2):
        assert b.id is not None
        a.wait_conn_open(b.id)


def exchange(tabs: Sequence[PeerTab], tag: str) -> None:
    """Every tab sends a tagged message to every other; each must arrive."""
    pairs = list(itertools.permutations(tabs, 2))
    for a, b in pairs:
        assert b.id is not None
        a.send(b.id, {"from": a.id, "tag": tag})
    for a, b in pairs:
        assert a.id is not None
        b.wait_data(a.id, {"from": a.id, "tag": tag})
