"""Operating a real ``twistd peersig`` process: wss and certificate reload, socket
activation, systemd units, draining on SIGTERM, JSON logs (SPEC §6, §7)."""

from __future__ import annotations

import configparser
import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from peersig.tls import BACKLOG, with_backlog

from .serverproc import REPO, ServerProcess, free_port, make_self_signed_cert
from .wssclient import insecure, wss_connect


def recv_json(ws: ClientConnection, timeout: float = 5) -> dict[str, object]:
    return json.loads(ws.recv(timeout=timeout))  # type: ignore[no-any-return]


def served_cert(ws: ClientConnection) -> bytes:
    sock = ws.socket
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(pem_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_path.read_text())


def test_wss_and_certificate_reload_on_sighup(tmp_path: Path) -> None:
    key, cert = make_self_signed_cert(tmp_path, "-live")
    tls_port = free_port()
    proc = ServerProcess(tmp_path, ["--port", f"ssl:{tls_port}:interface=127.0.0.1"
                                    f":privateKey={key}:certKey={cert}"])
    proc.start()
    url = f"wss://127.0.0.1:{tls_port}/peerjs?key=peerjs&id={{}}&token={{}}&version=1.5.5"
    try:
        # A browser offers ALPN; only HTTP/1.1 is taken (once every connection was reset
        # on Twisted 24.7 with a current pyOpenSSL; issue 17).
        for offered, chosen in ((["h2", "http/1.1"], "http/1.1"), (["http/1.1"], "http/1.1"),
                                ([], None)):
            context = insecure()
            if offered:
                context.set_alpn_protocols(offered)
            with wss_connect(url.format("alpn", f"alpn{len(offered)}"), context) as ws:
                assert recv_json(ws) == {"type": "OPEN"}
                assert ws.socket.selected_alpn_protocol() == chosen  # type: ignore[attr-defined]
        old_a = wss_connect(url.format("a", "tls"))
        old_b = wss_connect(url.format("b", "tls"))
        recv_json(old_a), recv_json(old_b)
        first = served_cert(old_a)
        assert first == der_of(cert)

        new_key, new_cert = make_self_signed_cert(tmp_path, "-renewed")
        shutil.copy(new_key, key)
        shutil.copy(new_cert, cert)
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while True:
            with wss_connect(url.format("c", "probe")) as fresh:
                recv_json(fresh)
                if served_cert(fresh) == der_of(new_cert):
                    break
            assert time.monotonic() < deadline, "new certificate not served after SIGHUP"
            time.sleep(0.1)

        old_a.send(json.dumps({"type": "OFFER", "dst": "b", "payload": {"still": "here"}}))
        assert recv_json(old_b) == {"type": "OFFER", "src": "a", "dst": "b",
                                    "payload": {"still": "here"}}
        assert served_cert(old_a) == first

        # A broken file on reload keeps the old certificate and the server up.
        cert.write_text("garbage")
        proc.signal(signal.SIGHUP)
        time.sleep(0.3)
        with wss_connect(url.format("d", "probe")) as fresh:
            recv_json(fresh)
            assert served_cert(fresh) == der_of(new_cert)
        assert "certificate not reloaded" in proc.log_path.read_text()
        old_a.close(), old_b.close()
    finally:
        proc.stop()


def test_missing_certificate_is_a_clear_error(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path, ["--port", f"ssl:1:privateKey={tmp_path}/none.pem"],
                         ports=False)
    result = subprocess.run(proc.command(), env=proc.environment(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0
    assert f"cannot read private key {tmp_path}/none.pem" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


class SocketActivated(ServerProcess):
    """Started the way systemd does: the listening socket as fd 3, LISTEN_FDS, LISTEN_FDNAMES
    and LISTEN_PID set to the server's own pid."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, ["--port", "systemd:domain=INET:index=0"], ports=False)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(50)
        self.port = self.listener.getsockname()[1]

    def command(self) -> list[str]:
        fd = self.listener.fileno()
        inner = " ".join(f"'{part}'" for part in super().command())
        setup = f"exec 3<&{fd}; LISTEN_FDS=1 LISTEN_FDNAMES=peersig.socket LISTEN_PID=$$"
        return ["bash", "-c", f"{setup} exec {inner}"]

    def start(self, timeout_s: float = 20.0, **popen: object) -> None:
        super().start(timeout_s, pass_fds=(self.listener.fileno(),))


def test_socket_activation(tmp_path: Path) -> None:
    proc = SocketActivated(tmp_path)
    proc.start()
    try:
        proc.listener.close()  # only the server holds it now
        with connect(proc.ws_url("a")) as a, connect(proc.ws_url("b")) as b:
            recv_json(a), recv_json(b)
            a.send(json.dumps({"type": "OFFER", "dst": "b", "payload": 1}))
            assert recv_json(b)["src"] == "a"
    finally:
        proc.stop()


@pytest.mark.parametrize(("description", "expected"), [
    ("tcp:9000", f"tcp:9000:backlog={BACKLOG}"),
    ("tcp6:9000:interface=\\:\\:1", f"tcp6:9000:interface=\\:\\:1:backlog={BACKLOG}"),
    ("tcp:9000:backlog=77", "tcp:9000:backlog=77"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ("unix:/run/peersig.sock", "unix:/run/peersig.sock"),
])
def test_tcp_ports_get_the_storm_backlog_unless_they_say_otherwise(description: str,
                                                                  expected: str) -> None:
    assert with_backlog(description) == expected


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: tests/install-and-run.sh installs systemd"
    # The twistd of the interpreter running the tests (a venv's, activated or not).
    twistd = shutil.which("twistd", path=str(Path(sys.executable).parent)) \
        or shutil.which("twistd")
    assert twistd
    for name in ("peersig.service", "peersig.socket"):
        text = (REPO / "contrib" / name).read_text()
        # The unit names the venv of an installed VM; here twistd lives elsewhere.
        (tmp_path / name).write_text(text.replace("/opt/peersig/bin/twistd", twistd))
    result = subprocess.run([analyze, "verify", str(tmp_path / "peersig.service"),
                             str(tmp_path / "peersig.socket")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "EnvironmentFile=-/etc/peersig/peersig.env" in (tmp_path / "peersig.service").read_text()


def test_setup_cfg_lists_every_package() -> None:
    """README's install command is a plain (not editable) install: a package that
    setup.cfg does not list is missing from it, and ``twistd peersig`` fails to import
    (as it did without peersig.upstream), while the suite's editable installs still pass.
    Every folder of peersig/ with an ``__init__.py`` must be listed, and every file
    ``package_data`` names must exist."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {".".join(init.parent.relative_to(REPO).parts)
               for init in (REPO / "peersig").rglob("__init__.py")}
    assert on_disk <= listed, f"not in setup.cfg's packages: {sorted(on_disk - listed)}"
    assert "twisted.plugins" in listed
    for package, files in cfg["options.package_data"].items():
        for name in files.split():
            assert (REPO.joinpath(*package.split(".")) / name).is_file(), (package, name)


def test_sigterm_drains_fifty_peers(tmp_path: Path) -> None:
    drain_timeout = 4.0
    proc = ServerProcess(tmp_path, ["--drain-timeout", str(drain_timeout), "--room-size", "0"])
    proc.start()
    peers = [connect(proc.ws_url(f"p{i}", token=f"r{i % 13}")) for i in range(50)]
    for ws in peers:
        assert recv_json(ws) == {"type": "OPEN"}
    codes: list[int | None] = []
    lock = threading.Lock()

    def wait_close(ws: ClientConnection) -> None:
        try:
            while True:
                ws.recv(timeout=drain_timeout + 2)
        except ConnectionClosed as e:
            with lock:
                codes.append(e.rcvd.code if e.rcvd else None)
        except TimeoutError:
            with lock:
                codes.append(-1)

    readers = [threading.Thread(target=wait_close, args=(ws,)) for ws in peers]
    for t in readers:
        t.start()
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    statuses = set()
    while proc.proc is not None and proc.proc.poll() is None:
        with contextlib.suppress(OSError):
            statuses.add(proc.get("/health")[0])
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    for t in readers:
        t.join()
    assert proc.proc is not None and proc.proc.returncode == 0
    assert elapsed < drain_timeout, elapsed
    assert 503 in statuses
    assert codes == [1001] * 50


def test_json_log_lines_and_no_token_in_any_line(tmp_path: Path) -> None:
    token = "SeCrEt-Token-42"
    proc = ServerProcess(tmp_path, ["--log-peers", "--room-by", "key"])
    proc.command = lambda: [  # type: ignore[method-assign]
        *ServerProcess.command(proc)[:4], "--logger", "peersig.logs.json_lines",
        *ServerProcess.command(proc)[4:]]
    proc.start()
    try:
        url = proc.ws_url("a", key="room7", token=token)
        with connect(url) as a, connect(proc.ws_url("b", key="room7", token=token)) as b:
            recv_json(a), recv_json(b)
            a.send("not json")
            a.send(json.dumps({"type": "OFFER", "dst": "b", "payload": {"t": token}}))
            recv_json(b)
            with connect(url) as again:  # same token takes the id over
                recv_json(again)
        with connect(proc.ws_url("c", key="room7", token=token[:4])) as c:
            recv_json(c)
        # In token mode the room name is the token itself.
        with connect(proc.ws_url("d", token=token + "room")) as d:
            recv_json(d)
        time.sleep(0.3)
    finally:
        proc.stop()
    lines = proc.log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(e, dict) and {"time", "level", "text"} <= set(e) for e in events)
    assert not [line for line in lines if "SeCrEt" in line or token[:4] + '"' in line]
    kinds = {e.get("event") for e in events}
    assert {"connect", "disconnect", "drop"} <= kinds
    connect_events = [e for e in events if e.get("event") == "connect"]
    assert {e.get("peer") for e in connect_events} >= {"a", "b", "c", "d"}
    leaving = [e for e in events if e.get("event") == "disconnect"]
    assert all(isinstance(e["duration"], float) and e["reason"] for e in leaving)


def test_logs_name_no_peers_without_log_peers(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path, [])
    proc.start()
    try:
        with connect(proc.ws_url("VisibleId7", token="abc")) as ws:
            recv_json(ws)
        time.sleep(0.2)
    finally:
        proc.stop()
    text = proc.log_path.read_text()
    assert "peer joined room" in text
    assert "VisibleId7" not in text and "127.0.0.1:" not in text.split("Site starting")[-1]

