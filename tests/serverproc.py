"""A real ``twistd -n peersig`` subprocess on free loopback ports, for end-to-end tests.

Only the command line (and ``env`` given here) configures it; it is stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.haproxy import free_port

REPO = Path(__file__).resolve().parents[1]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM to exactly this process (by its pid), SIGKILL if it outlives ``timeout``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def make_self_signed_cert(folder: Path, name: str = "") -> tuple[Path, Path]:
    key, cert = folder / f"key{name}.pem", folder / f"cert{name}.pem"
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    command += ["-subj", f"/CN=localhost{name}", "-addext", san, "-keyout", str(key),
                "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return key, cert


# redis-server for the --cluster tests (tests/test_cluster.py), if this machine has one.
REDIS = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


class Redis:
    """``redis-server`` on a Unix socket only (no TCP port to race for), no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> None:
        assert REDIS is not None
        self.socket.unlink(missing_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [REDIS, "--port", "0", "--unixsocket", str(self.socket), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.05)

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-s", str(self.socket), *args],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip()

    def publish(self, channel: str, message: bytes) -> int:
        """PUBLISH a binary ``message`` (redis-cli -x reads it from stdin): receivers."""
        out = subprocess.run(["redis-cli", "-s", str(self.socket), "-x", "PUBLISH", channel],
                             input=message, capture_output=True, timeout=5)
        return int(out.stdout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)



class ServerProcess:
    """``twistd -n peersig`` listening on 127.0.0.1: ws always, wss when ``tls``."""

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str] = (),
        tls: bool = False,
        env: Mapping[str, str] | None = None,
        ports: bool = True,
    ) -> None:
        self.workdir = workdir
        self.args = list(args)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.extra_env = dict(env or {})
        self.with_ports = ports
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        ports: list[str] = []
        if self.with_ports:
            ports = ["--port", f"tcp:{self.port}:interface=127.0.0.1"]
        if self.tls_port is not None:
            key, cert = make_self_signed_cert(self.workdir)
            ports += ["--port", f"ssl:{self.tls_port}:interface=127.0.0.1:privateKey={key}"
                      f":certKey={cert}"]
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        return [*twistd, "-n", "--pidfile=", "peersig", *ports, *self.args]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEERSIG_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 20.0, **popen: Any) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir,
                                         env=self.environment(), stdout=log,
                                         stderr=subprocess.STDOUT, **popen)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                self.get_json("/health")
                if self.proc.poll() is None:  # ours answered, not another on its port
                    return
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server not ready within {timeout_s} s:\n"
                                       f"{self.log_tail()}") from None
                time.sleep(0.05)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> None:
        """Stops exactly the process this object started, by its pid."""
        if self.proc is not None:
            stop_process(self.proc)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # -- talking to it ---------------------------------------------------------------------

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, peer_id: str, token: str = "room1", key: str = "peerjs",
               path: str = "/") -> str:
        return (f"ws://127.0.0.1:{self.port}{path}peerjs?key={key}&id={peer_id}"
                f"&token={token}&version=1.5.5")

    def get(self, path: str, headers: Mapping[str, str] | None = None,
            method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.http + path, headers=dict(headers or {}),
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.get("/metrics")[2].decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def wait_metric(self, name: str, value: float, timeout: float = 5) -> None:
        """Wait until ``/metrics`` shows ``name`` at ``value``."""
        deadline = time.monotonic() + timeout
        while (now := self.metric(name)) != value:
            assert time.monotonic() < deadline, f"{name} is {now}, not {value}"
            time.sleep(0.05)

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.http + path, timeout=1) as response:
            return json.load(response)
