"""Run every benchmark scenario against peersig and the reference server; write the report.

Usage (from the repository root)::

    python -m bench                 # full suite + generator comparison + profile, writes
                                    # docs/benchmarks.md (~35 min on a quiet machine)
    python -m bench --quick         # smoke run (< 2 min), writes bench/results/quick.md
    python -m bench --scenarios relay,latency --servers peersig --relay-seconds 5
    python -m bench --profile-only  # py-spy profile of peersig under the relay load
    python -m bench --compare-only  # generator CPU per message: uvloop, asyncio, Node ws

Each scenario gets a fresh server process pinned to CPU 0 (``taskset``-style affinity); the
orchestrator and the load generator workers (``bench/loadgen.py``) run on CPU 1. Server CPU
is utime+stime from ``/proc/PID/stat`` over the measured window, RSS is ``VmRSS`` from
``/proc/PID/status``. All traffic goes to 127.0.0.1; every phase is bounded in time.
The reference server (npm ``peer@1.0.2``) is installed by this command into
``bench/.node`` (git-ignored); raw results and server logs go to ``bench/results``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import vanish
from bench.haproxy import free_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NODE_DIR = BENCH / ".node"
RESULTS = BENCH / "results"
# One folder of server logs per run: several runs (several people) may share bench/results.
RUN_ID = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
LOGS = RESULTS / "logs" / RUN_ID
TLS_DIR = RESULTS / "tls"
# What runs again over wss (issue 12): the production path, against the reference's TLS.
WSS_SCENARIOS = ("connect", "relay", "latency", "idle")
DOC = ROOT / "docs" / "benchmarks.md"
PEER_VERSION = "1.0.2"
WS_VERSION = "8"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
SOURCES = ",".join(f"127.0.0.{i}" for i in range(2, 10))

SERVERS = ("peersig", "reference")
SCENARIOS = ("connect", "relay", "latency", "idle", "churn")
# The idle scenario's heartbeat models (loadgen --heartbeats) and the suffix of each one's
# results: independent timers (as browsers, the headline), one sliced ticker, none at all.
IDLE_MODELS = {"independent": "", "sliced": "-sliced", "off": "-silent"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- environment -------------------------------------------------------------------------


def run_appendix(main: Any, prefix: str, doc: Path, render: Any, no_doc: bool) -> dict:
    """Run the coroutine ``main`` of a benchmark whose report is appended to
    docs/benchmarks.md (bench/soak.py, bench/storm.py); kill what it started whatever
    happens; save its raw results as bench/results/PREFIX-DATE.json; unless ``no_doc``,
    write ``render(results)`` to ``doc`` and refresh the appendices."""
    res = run_owning(main)
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    res["raw"] = str(raw.relative_to(ROOT))
    raw.write_text(json.dumps(res, indent=1))
    log(f"raw results: {raw}")
    if not no_doc:
        render_appendix(doc, render, res)
        log(f"wrote {doc} and refreshed docs/benchmarks.md")
    return res


def run_owning(main: Any) -> Any:
    """``asyncio.run(main)``, after which every process it started and left running (in
    ``OWN_PIDS``: servers, generators) is killed, whatever ended it: its end, an error,
    Ctrl-C, or SIGTERM (which Python's default handler answers by exiting at once, with no
    cleanup: a benchmark stopped with ``kill`` left its servers behind)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        return asyncio.run(main)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for pid in list(OWN_PIDS):
            if _parent(pid) == os.getpid():  # ours still (a pid is reused once reaped)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def render_appendix(doc: Path, render: Any, res: dict) -> None:
    from bench import report

    doc.write_text(render(res))
    report.refresh_appendices()


def raise_nofile(n: int = 262_144) -> int:
    """Raise RLIMIT_NOFILE (inherited by servers and workers); returns the limit in force.
    Raising the hard limit needs CAP_SYS_RESOURCE, which some sandboxes withhold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# Descriptors a server keeps besides its peers' sockets (twistd ~12, node ~21), with room.
SERVER_FD_MARGIN = 64
WORKER_FD_MARGIN = 256


def peers_that_fit(n: int, args) -> int:
    """A server process holds one descriptor per peer: cap ``n`` to what the limit allows."""
    return min(n, args.fd_limit - SERVER_FD_MARGIN)


def ensure_node_packages(with_ws: bool) -> None:
    """npm install peer@1.0.2 (and ws, for --compare-generators) into bench/.node."""
    pkg = NODE_DIR / "node_modules" / "peer" / "package.json"
    need = []
    if not pkg.exists() or json.loads(pkg.read_text())["version"] != PEER_VERSION:
        need.append(f"peer@{PEER_VERSION}")
    if with_ws and not (NODE_DIR / "node_modules" / "ws" / "package.json").exists():
        need.append(f"ws@{WS_VERSION}")
    if not need:
        return
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    if not (NODE_DIR / "package.json").exists():
        (NODE_DIR / "package.json").write_text('{"private": true}\n')
    log(f"npm install {' '.join(need)} into {NODE_DIR}")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR),
                    *need], check=True)


def ensure_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401

        return True
    except ImportError:
        pass
    log("uvloop missing: pip install uvloop")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uvloop"])
    if r.returncode != 0:
        log("uvloop could not be installed; the generator falls back to asyncio's loop")
        return False
    return True


def ensure_pyspy() -> str | None:
    # pip puts the binary beside this Python (a virtual environment's bin/), which need
    # not be on PATH.
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    exe = shutil.which("py-spy", path=path)
    if exe:
        return exe
    log("py-spy missing: pip install py-spy")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"])
    return shutil.which("py-spy", path=path)


# Processes of this benchmark (servers, generator workers, py-spy): CPU they use is ours.
OWN_PIDS: set[int] = set()


def proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def cpu_times() -> dict:
    """/proc/stat ticks per CPU (user nice system idle iowait irq softirq steal), plus the
    ticks used so far by this benchmark's own processes and the time."""
    out: dict = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                name, *vals = line.split()
                out[name] = [int(v) for v in vals[:8]]
    t = os.times()
    out["own"] = sum(proc_ticks(p) for p in list(OWN_PIDS)) + round(
        (t.user + t.system) * CLK_TCK)
    out["t"] = time.monotonic()
    return out


def other_pct(a: dict, b: dict) -> float:
    """CPU used by processes outside this benchmark during the window, in % of one CPU
    (other people's test runs on a shared machine distort every figure)."""
    # user + nice + system only: softirq time (loopback traffic, ours) is not charged to
    # any process, so counting it would blame our own packets on others.
    busy = sum(y - x for x, y in zip(a["cpu"][:3], b["cpu"][:3], strict=False))
    secs = b["t"] - a["t"]
    if secs <= 0:
        return 0.0
    return max(0.0, (busy - (b["own"] - a["own"])) / CLK_TCK / secs * 100)


def softirq_pct(a: dict, b: dict) -> float:
    """Softirq time on all CPUs during the window, in % of one CPU: loopback packets and
    kernel timers (TCP keepalive probes among them) are charged there, to no process."""
    secs = b["t"] - a["t"]
    return (b["cpu"][6] - a["cpu"][6]) / CLK_TCK / secs * 100 if secs > 0 else 0.0


async def watch_vanished(server_port: int, address: str, port: int, limit: float) -> dict:
    """Cut the network of the peer at ``address``:``port`` (bench/vanish.py) and time how
    long the server keeps its end of the connection established."""
    why = vanish.unusable()
    if why:
        return {"vanished_dropped_after_s": None, "vanished_note": why}
    query = f"( sport = :{server_port} and dst {address}:{port} )"
    with vanish.Vanish(port, address):
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < limit:
            proc = await asyncio.create_subprocess_exec(
                "ss", "-tnH", "state", "established", query,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            out, _ = await proc.communicate()
            if proc.returncode == 0 and not out.strip():
                return {"vanished_dropped_after_s": time.monotonic() - t0}
            await asyncio.sleep(0.05 if elapsed < 10 else 0.5)
    return {"vanished_dropped_after_s": None, "vanished_waited_s": limit}


async def wait_quiet(args) -> float:
    """Wait (bounded) until processes outside the benchmark use less than
    ``--quiet-threshold`` % of a CPU over one second; returns the seconds waited."""
    if args.quiet_max_wait <= 0:
        return 0.0
    t0 = time.monotonic()
    while True:
        a = cpu_times()
        await asyncio.sleep(1.0)
        load = other_pct(a, cpu_times())
        waited = time.monotonic() - t0
        if load < args.quiet_threshold or waited >= args.quiet_max_wait:
            if waited > 1.5:
                log(f"  waited {waited:.0f} s for a quiet machine (other load {load:.0f}%)")
            return waited


def steal_pct(a: dict[str, list[int]], b: dict[str, list[int]], cpu: int | None) -> float:
    """Share of the window the hypervisor ran something else on ``cpu`` (VM steal time)."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    d = [y - x for x, y in zip(a[name], b[name], strict=False)]
    total = sum(d)
    return d[7] / total * 100 if total else 0.0


def cpu_affinity_ok() -> bool:
    return len(os.sched_getaffinity(0)) >= 2 and os.cpu_count() and os.cpu_count() >= 2


# -- server processes --------------------------------------------------------------------


class Server:
    def __init__(self, kind: str, scenario: str, args: argparse.Namespace,
                 extra: list[str] | None = None) -> None:
        self.tls = getattr(args, "tls", False)
        self.kind = kind
        self.scenario = scenario
        self.port = free_port()
        self.args = args
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{kind}-{scenario}.log"

    def command(self) -> list[str]:
        key, cert = bench_certificate() if self.tls else (None, None)
        if self.kind == "peersig":
            port = (f"ssl:{self.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
                    if self.tls else f"tcp:{self.port}:interface=127.0.0.1")
            # This Python's twistd, whether or not its venv is on the PATH.
            twistd = Path(sys.executable).with_name("twistd")
            return [str(twistd) if twistd.exists() else "twistd", "-n", "--pidfile=",
                    "peersig", "--port", port,
                    "--max-peers", "30000", "--max-peers-per-ip", "0", *self.extra,
                    *getattr(self.args, "peersig_args", [])]
        tls = ["--sslkey", str(key), "--sslcert", str(cert)] if self.tls else []
        return ["node", str(NODE_DIR / "node_modules" / "peer" / "dist" / "bin" / "peerjs.js"),
                "--port", str(self.port), "--host", "127.0.0.1",
                "--concurrent_limit", "30000", *tls, *self.extra]

    def display_command(self) -> str:
        cmd = self.command()
        if self.kind == "reference":
            cmd = ["peerjs", *cmd[2:]]
        text = shlex.join(cmd).replace(str(self.port), "PORT")
        return text.replace(str(TLS_DIR) + "/", "") if self.tls else text

    async def start(self) -> None:
        core = self.args.server_cpu
        out = open(self.log_path, "wb")

        def pin() -> None:
            if core is not None:
                os.sched_setaffinity(0, {core})

        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=pin, cwd=ROOT)
        OWN_PIDS.add(self.proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start: see {self.log_path}")
            if await http_get_ok(self.port, "/", self.tls):
                await asyncio.sleep(0.5)
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not answer on port {self.port}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> tuple[float, float]:
        """(user, system) seconds of the whole process, all threads."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def cpu_exact(self) -> float:
        """Seconds on a CPU of all the process's threads, from the scheduler's own clock
        (``/proc/PID/task/*/schedstat``, nanoseconds): exact where utime and stime are
        sampled at each timer tick, which a process waking briefly a few hundred times a
        second can mostly miss or mostly hit."""
        total = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(OSError), \
                    open(f"/proc/{self.pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9

    def _status_kib(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
        return 0

    def rss_kib(self) -> int:
        return self._status_kib("VmRSS:")

    def hwm_kib(self) -> int:
        return self._status_kib("VmHWM:")

    async def metrics(self) -> dict[str, float]:
        if self.kind != "peersig":
            return {}
        text = await http_get(self.port, "/metrics", tls=self.tls)
        out = {}
        for line in (text or "").splitlines():
            if line.startswith("peersig_") and " " in line:
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    async def stop(self) -> dict:
        info: dict = {"log": str(self.log_path.relative_to(ROOT))}
        if self.proc is None:
            return info
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            for _ in range(100):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
                info["killed"] = True
        info["exit"] = self.proc.returncode
        OWN_PIDS.discard(self.proc.pid)
        info.update(scan_log(self.kind, self.log_path))
        return info


def scan_log(kind: str, path: Path) -> dict:
    """Problems the server logged: tracebacks, failures, errors (with a few examples)."""
    problems: list[str] = []
    lines = 0
    try:
        with open(path, errors="replace") as f:
            for line in f:
                lines += 1
                low = line.lower()
                if kind == "peersig":
                    bad = ("traceback" in low or "#critical" in low or "#error" in low
                           or "#failure" in low or "unhandled" in low or "exception" in low)
                else:
                    bad = low.startswith("error") or "exception" in low or "traceback" in low
                if bad:
                    problems.append(line.rstrip()[:300])
    except OSError:
        pass
    return {"log_lines": lines, "log_problems": len(problems), "log_examples": problems[:5]}


def client_tls() -> ssl.SSLContext:
    """A client context for the bench's own self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def bench_certificate() -> tuple[Path, Path]:
    """The wss servers' key and certificate: ECDSA P-256, the usual choice of today's
    certificate authorities (Let's Encrypt issues them), made once per checkout."""
    key, cert = TLS_DIR / "key.pem", TLS_DIR / "cert.pem"
    if not cert.exists():
        TLS_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "3650", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
    return key, cert


async def http_get(port: int, path: str, timeout: float = 5.0,
                   tls: bool = False) -> str | None:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=client_tls() if tls else None), timeout)
    except (TimeoutError, OSError):
        return None
    try:
        w.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = await asyncio.wait_for(r.read(), timeout)
    except (TimeoutError, OSError):
        return None
    finally:
        w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or head[9:12] != b"200":
        return None
    return body.decode("utf-8", "replace")


async def http_get_ok(port: int, path: str, tls: bool = False) -> bool:
    return await http_get(port, path, timeout=1.0, tls=tls) is not None


# -- generator workers -------------------------------------------------------------------


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process, index: int) -> None:
        self.proc = proc
        self.index = index
        self.queues: dict[str, asyncio.Queue] = {}
        self.reader = asyncio.ensure_future(self._read())

    def _q(self, name: str) -> asyncio.Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = asyncio.Queue()
        return q

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                self._q("__eof__").put_nowait({})
                for q in self.queues.values():
                    q.put_nowait({"cmd": "__eof__"})
                return
            try:
                msg = json.loads(line)
            except ValueError:
                log(f"worker {self.index}: {line[:200]!r}")
                continue
            self._q(msg.get("cmd", "?")).put_nowait(msg)

    def send(self, cmd: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    async def reply(self, name: str, timeout: float) -> dict:
        msg = await asyncio.wait_for(self._q(name).get(), timeout)
        if msg.get("cmd") == "__eof__":
            raise RuntimeError(f"worker {self.index} exited")
        return msg


class Fleet:
    """The generator: ``n`` worker processes pinned to the generator CPU."""

    def __init__(self, args: argparse.Namespace, port: int, peers: int = 0) -> None:
        self.args = args
        self.port = port
        self.peers = peers
        self.workers: list[Worker] = []

    async def start(self) -> None:
        # One descriptor per peer in the generator too: enough workers to stay under the limit.
        per = max(self.args.fd_limit - WORKER_FD_MARGIN, 1000)
        n = max(self.args.workers, -(-self.peers // per))
        for i in range(n):
            # Each worker gets its own source addresses (more ephemeral ports).
            srcs = SOURCES.split(",")
            mine = ",".join(srcs[i::n]) if n <= len(srcs) else srcs[i % len(srcs)]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(BENCH / "loadgen.py"), "--port", str(self.port),
                "--sources", mine, "--loop", self.args.loop,
                *(["--tls"] if getattr(self.args, "tls", False) else []),
                "--heartbeats", getattr(self.args, "heartbeats", "independent"),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=256 * 1024 * 1024)
            self.workers.append(Worker(proc, i))
            OWN_PIDS.add(proc.pid)
        hellos = [await w.reply("hello", 30) for w in self.workers]
        self.hello = hellos[0]

    async def all(self, cmd: dict, timeout: float = 120.0, per_worker=None) -> list[dict]:
        for i, w in enumerate(self.workers):
            c = dict(cmd)
            if per_worker is not None:
                c.update(per_worker(i))
            w.send(c)
        return [await w.reply(cmd["cmd"], timeout) for w in self.workers]

    def rooms_for(self, i: int, nrooms: int, offset: int = 0) -> list[int]:
        return list(range(offset + i, offset + nrooms, len(self.workers)))

    async def connect(self, npeers: int, gen: int = 0, offset: int = 0,
                      timeout: float = 600.0) -> dict:
        nrooms = (npeers + 3) // 4
        rs = await self.all(
            {"cmd": "connect", "per_room": 4, "gen": gen,
             "concurrency": self.args.connect_concurrency, "timeout": 15.0},
            timeout=timeout,
            per_worker=lambda i: {"rooms": self.rooms_for(i, nrooms, offset)})
        failures: dict[str, int] = {}
        for r in rs:
            for k, v in r["failures"].items():
                failures[k] = failures.get(k, 0) + v
        return {"ok": sum(r["ok"] for r in rs), "failed": sum(r["failed"] for r in rs),
                "failures": failures, "t0": min(r["t0"] for r in rs),
                "t1": max(r["t1"] for r in rs),
                "join_ms_p50": max(r["join_ms"].get("p50", 0) for r in rs),
                "join_ms_p99": max(r["join_ms"].get("p99", 0) for r in rs),
                "join_ms_max": max(r["join_ms"].get("max", 0) for r in rs)}

    async def mark(self, record: bool | None = None) -> dict:
        cmd: dict = {"cmd": "mark"}
        if record is not None:
            cmd["record"] = record
        rs = await self.all(cmd, timeout=30)
        return {k: sum(r[k] for r in rs)
                for k in ("rx_relay", "tx_relay", "pings", "heartbeats", "drops", "connected",
                          "cpu", "cpu_user", "cpu_sys")}

    async def status(self) -> dict:
        rs = await self.all({"cmd": "status"}, timeout=30)
        out: dict = {}
        for r in rs:
            for k, v in r.items():
                if k in ("cmd", "t"):
                    continue
                if isinstance(v, dict):
                    d = out.setdefault(k, {})
                    for kk, vv in v.items():
                        d[kk] = d.get(kk, 0) + vv
                elif isinstance(v, (int, float)):
                    out[k] = out.get(k, 0) + v
        return out

    async def stop(self) -> None:
        for w in self.workers:
            with contextlib.suppress(ConnectionError, RuntimeError):
                w.send({"cmd": "exit"})
        for w in self.workers:
            try:
                await asyncio.wait_for(w.proc.wait(), 15)
            except TimeoutError:
                w.proc.kill()
                await w.proc.wait()
            w.reader.cancel()
            OWN_PIDS.discard(w.proc.pid)


def merge_counts(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p / 100))] if v else float("nan")


# -- scenarios ---------------------------------------------------------------------------


async def with_server(kind: str, scenario: str, args, extra, body, peers: int = 0):
    if getattr(args, "tls", False):
        scenario = "wss-" + scenario
    srv = Server(kind, scenario, args, extra if kind == "peersig" else [])
    await srv.start()
    fleet = Fleet(args, srv.port, peers)
    result: dict = {"server_command": srv.display_command()}
    if kind == "peersig":
        result["peersig_git"] = git_describe()  # peersig may change between scenarios
    try:
        await fleet.start()
        result["generator_processes"] = len(fleet.workers)
        result["server_fds_at_start"] = len(os.listdir(f"/proc/{srv.pid}/fd"))
        result.update(await body(srv, fleet))
        result["generator_status"] = await fleet.status()
        result["metrics"] = await srv.metrics()
    finally:
        await fleet.stop()
        result["server"] = await srv.stop()
    return result


def peersig_caps(scenario: str) -> list[str]:
    # The rate limit (100 msg/s per peer by default) is turned off only where a peer
    # sends faster than a browser would: the relay and latency scenarios.
    if scenario in ("relay", "latency", "profile"):
        return ["--rate-limit", "0"]
    return []


async def scenario_connect(kind: str, requested: int, args) -> dict:
    n = peers_that_fit(requested, args)

    async def body(srv: Server, fleet: Fleet) -> dict:
        await asyncio.sleep(1.0)
        rss0 = srv.rss_kib()
        u0, s0 = srv.cpu()
        g0 = await fleet.mark()
        st0 = cpu_times()
        c = await fleet.connect(n)
        u1, s1 = srv.cpu()
        st1 = cpu_times()
        g1 = await fleet.mark()
        await asyncio.sleep(args.settle)
        rss1 = srv.rss_kib()
        await asyncio.sleep(args.hold)
        st = await fleet.mark()
        ok = max(c["ok"], 1)
        return {
            "peers": n, "requested": requested, **c,
            "connect_seconds": c["t1"] - c["t0"],
            "connects_per_s": c["ok"] / max(c["t1"] - c["t0"], 1e-9),
            "server_cpu_s": (u1 - u0) + (s1 - s0),
            "cpu_ms_per_connect": ((u1 - u0) + (s1 - s0)) / ok * 1000,
            "rss_base_kib": rss0, "rss_kib": rss1,
            "rss_kib_per_peer": (rss1 - rss0) / ok,
            "gen_cpu_ms_per_connect": (g1["cpu"] - g0["cpu"]) / ok * 1000,
            "dropped_after_open": st["drops"],
            "connected_after_hold": st["connected"],
            "hold_seconds": args.settle + args.hold,
            "steal_pct_server_cpu": steal_pct(st0, st1, args.server_cpu),
            "other_load_pct": other_pct(st0, st1),
            "steal_pct_gen_cpu": steal_pct(st0, st1, args.gen_cpu),
        }

    return await with_server(kind, f"connect{requested}", args, peersig_caps("connect"), body,
                             peers=n)


async def scenario_relay(kind: str, args, scenario: str = "relay", on_window=None) -> dict:
    async def body(srv: Server, fleet: Fleet) -> dict:
        c = await fleet.connect(args.relay_peers)
        await asyncio.sleep(0.5)
        await fleet.all({"cmd": "relay", "mode": "closed"})
        await asyncio.sleep(args.warmup)
        m0 = await fleet.mark(record=True)
        u0, s0 = srv.cpu()
        st0 = cpu_times()
        t0 = time.monotonic()
        if on_window is not None:
            await on_window(srv)
        else:
            await asyncio.sleep(args.relay_seconds)
        u1, s1 = srv.cpu()
        st1 = cpu_times()
        t1 = time.monotonic()
        m1 = await fleet.mark()
        stop = await fleet.all({"cmd": "relay_stop"}, timeout=60)
        msgs = m1["rx_relay"] - m0["rx_relay"]
        secs = t1 - t0
        cpu = (u1 - u0) + (s1 - s0)
        gcpu = m1["cpu"] - m0["cpu"]
        return {
            "peers": c["ok"], "connect_failed": c["failed"], "seconds": secs, "msgs": msgs,
            "msgs_per_s": msgs / secs,
            "server_cpu_pct": cpu / secs * 100,
            "server_us_per_msg": cpu / max(msgs, 1) * 1e6,
            "server_user_us_per_msg": (u1 - u0) / max(msgs, 1) * 1e6,
            "server_sys_us_per_msg": (s1 - s0) / max(msgs, 1) * 1e6,
            "msgs_per_s_at_100pct": msgs / cpu if cpu else float("nan"),
            "gen_cpu_pct": gcpu / secs * 100,
            "gen_us_per_msg": gcpu / max(msgs, 1) * 1e6,
            "gen_user_us_per_msg": (m1["cpu_user"] - m0["cpu_user"]) / max(msgs, 1) * 1e6,
            "gen_sys_us_per_msg": (m1["cpu_sys"] - m0["cpu_sys"]) / max(msgs, 1) * 1e6,
            "closed_loop_rtt_ms_p50": max(r["rtt"].get("p50", 0) for r in stop),
            "closed_loop_rtt_ms_p99": max(r["rtt"].get("p99", 0) for r in stop),
            "rss_kib": srv.rss_kib(),
            "drops": m1["drops"],
            "steal_pct_server_cpu": steal_pct(st0, st1, args.server_cpu),
            "other_load_pct": other_pct(st0, st1),
            "steal_pct_gen_cpu": steal_pct(st0, st1, args.gen_cpu),
        }

    return await with_server(kind, scenario, args, peersig_caps(scenario), body)


async def scenario_latency(kind: str, args) -> dict:
    async def body(srv: Server, fleet: Fleet) -> dict:
        c = await fleet.connect(args.relay_peers)
        await asyncio.sleep(0.5)
        offers = args.latency_rate / 2  # each round trip is an OFFER and an ANSWER
        per = offers / len(fleet.workers)
        await fleet.all({"cmd": "relay", "mode": "rate", "rate": per})
        await asyncio.sleep(args.warmup)
        m0 = await fleet.mark(record=True)
        u0, s0 = srv.cpu()
        st0 = cpu_times()
        t0 = time.monotonic()
        await asyncio.sleep(args.latency_seconds)
        u1, s1 = srv.cpu()
        st1 = cpu_times()
        t1 = time.monotonic()
        m1 = await fleet.mark(record=False)
        stop = await fleet.all({"cmd": "relay_stop", "send_rtts": True}, timeout=60)
        rtts = [x / 1000 for r in stop for x in r["rtt_us"]]
        msgs = m1["rx_relay"] - m0["rx_relay"]
        secs = t1 - t0
        cpu = (u1 - u0) + (s1 - s0)
        return {
            "peers": c["ok"], "offered_msgs_per_s": args.latency_rate, "seconds": secs,
            "msgs_per_s": msgs / secs, "round_trips": len(rtts),
            "rtt_ms_p50": pct(rtts, 50), "rtt_ms_p90": pct(rtts, 90),
            "rtt_ms_p99": pct(rtts, 99), "rtt_ms_p999": pct(rtts, 99.9),
            "rtt_ms_max": max(rtts) if rtts else float("nan"),
            "_rtts": rtts,  # pooled over the rounds by pool_rounds, not saved
            "server_cpu_pct": cpu / secs * 100,
            "server_us_per_msg": cpu / max(msgs, 1) * 1e6,
            "gen_cpu_pct": (m1["cpu"] - m0["cpu"]) / secs * 100,
            "unanswered": sum(r["inflight"] for r in stop),
            "drops": m1["drops"],
            "steal_pct_server_cpu": steal_pct(st0, st1, args.server_cpu),
            "other_load_pct": other_pct(st0, st1),
            "steal_pct_gen_cpu": steal_pct(st0, st1, args.gen_cpu),
        }

    return await with_server(kind, "latency", args, peersig_caps("latency"), body)


async def scenario_idle(kind: str, args) -> dict:
    async def body(srv: Server, fleet: Fleet) -> dict:
        c = await fleet.connect(args.idle_peers)
        await asyncio.sleep(args.idle_settle)
        m0 = await fleet.mark()
        u0, s0 = srv.cpu()
        x0 = srv.cpu_exact()
        rss0 = srv.rss_kib()
        st0 = cpu_times()
        t0 = time.monotonic()
        await asyncio.sleep(args.idle_seconds)
        x1 = srv.cpu_exact()
        u1, s1 = srv.cpu()
        st1 = cpu_times()
        t1 = time.monotonic()
        rss1 = srv.rss_kib()
        m1 = await fleet.mark()
        # After the window, so that every round measures the same rest: a peer whose
        # network vanishes (every packet dropped), and one that goes silent but keeps its
        # TCP connection (no heartbeats, no pongs). When does the server let go of each?
        dead = await dead_peers(srv, fleet, args) if args.dead_peer_checks else {}
        secs = t1 - t0
        return {
            **dead,
            "softirq_pct": softirq_pct(st0, st1),
            "peers": c["ok"], "connect_failed": c["failed"], "seconds": secs,
            "heartbeat_model": args.heartbeats,
            # CPU from schedstat (exact); the user/system split from the tick-sampled stat.
            "server_cpu_pct": (x1 - x0) / secs * 100,
            "server_cpu_ticks_pct": ((u1 - u0) + (s1 - s0)) / secs * 100,
            "server_user_pct": (u1 - u0) / secs * 100,
            "server_sys_pct": (s1 - s0) / secs * 100,
            "rss_kib_start": rss0, "rss_kib": rss1,
            "heartbeats_per_s": (m1["heartbeats"] - m0["heartbeats"]) / secs,
            "pings_per_s": (m1["pings"] - m0["pings"]) / secs,
            "gen_cpu_pct": (m1["cpu"] - m0["cpu"]) / secs * 100,
            "drops": m1["drops"], "connected_end": m1["connected"],
            "steal_pct_server_cpu": steal_pct(st0, st1, args.server_cpu),
            "other_load_pct": other_pct(st0, st1),
        }

    return await with_server(kind, "idle", args, peersig_caps("idle"), body,
                             peers=args.idle_peers + 2)


async def dead_peers(srv: Server, fleet: Fleet, args) -> dict:
    """Idle's dead-peer checks: seconds until the server drops a peer whose packets all
    vanish (bench/vanish.py, needs root and nft) and one silent with its TCP up."""
    fleet.workers[0].send({"cmd": "vanish_peer"})
    v = await fleet.workers[0].reply("vanish_peer", 30)
    vanished = asyncio.ensure_future(
        watch_vanished(srv.port, v["address"], v["port"], args.silent_wait) if v["ok"]
        else asyncio.sleep(0, {"vanished_dropped_after_s": None,
                               "vanished_note": v.get("reason")}))
    fleet.workers[0].send({"cmd": "silent", "wait": args.silent_wait})
    silent = await fleet.workers[0].reply("silent", args.silent_wait + 30)
    return {**await vanished,
            "silent_dropped_after_s": silent.get("dropped_after"),
            "silent_waited_s": silent.get("waited"),
            "silent_close": silent.get("reason")}


async def scenario_churn(kind: str, args) -> dict:
    async def body(srv: Server, fleet: Fleet) -> dict:
        n = args.churn_peers
        c0 = await fleet.connect(n)
        await asyncio.sleep(args.settle)
        rss_before = srv.rss_kib()
        u0, s0 = srv.cpu()
        st0 = cpu_times()
        tc0 = time.monotonic()
        rs = await fleet.all({"cmd": "churn", "duration": args.churn_seconds,
                              "rate": args.churn_rate / len(fleet.workers),
                              "abrupt_share": 0.1},
                             timeout=args.churn_seconds + 120,
                             per_worker=lambda i: {"seed": i + 1})
        u1, s1 = srv.cpu()
        st1 = cpu_times()
        churn_phase = time.monotonic() - tc0
        await asyncio.sleep(args.settle)
        rss_churned = srv.rss_kib()
        connected_churned = sum(r["connected"] for r in rs)
        tc1 = time.monotonic()
        closed = await fleet.all({"cmd": "close_all"}, timeout=120)
        close_phase = time.monotonic() - tc1
        await asyncio.sleep(args.settle)
        rss_empty = srv.rss_kib()
        c1 = await fleet.connect(n, gen=1)
        await asyncio.sleep(args.settle)
        rss_after = srv.rss_kib()
        second: dict = {}
        if args.churn2_seconds > 0:
            # A second, shorter cycle tells a leak (RSS keeps growing) from the allocator
            # keeping its high-water mark (RSS stays put).
            rs2 = await fleet.all({"cmd": "churn", "duration": args.churn2_seconds,
                                   "rate": args.churn_rate / len(fleet.workers),
                                   "abrupt_share": 0.1, "cycle": 2},
                                  timeout=args.churn2_seconds + 120,
                                  per_worker=lambda i: {"seed": 100 + i})
            await fleet.all({"cmd": "close_all"}, timeout=120)
            await asyncio.sleep(args.settle)
            c2 = await fleet.connect(n, gen=2)
            await asyncio.sleep(args.settle)
            second = {"rss_kib_after2": srv.rss_kib(),
                      "churn2_seconds": args.churn2_seconds,
                      "churn2_failed": sum(r["failed"] for r in rs2),
                      "churn2_failures": merge_counts(r["failures"] for r in rs2),
                      "reconnect2_failed": c2["failed"],
                      "reconnect2_failures": c2["failures"]}
        mt = await srv.metrics()
        if mt:
            second["server_peers_gauge"] = mt.get("peersig_peers")
            second["server_rooms_gauge"] = mt.get("peersig_rooms")
        agg: dict = {"failures": {}}
        for r in rs:
            for k in ("left", "left_abrupt", "joined", "failed", "offers", "retried"):
                agg[k] = agg.get(k, 0) + r[k]
            for k, v in r["failures"].items():
                agg["failures"][k] = agg["failures"].get(k, 0) + v
        replacements = agg["left"] + agg["left_abrupt"]
        return {
            "peers": n, "initial_ok": c0["ok"], "initial_failed": c0["failed"],
            "seconds": args.churn_seconds, "rate": args.churn_rate, **agg,
            "join_ms_p50": max(r["join_ms"].get("p50", 0) for r in rs),
            "join_ms_p99": max(r["join_ms"].get("p99", 0) for r in rs),
            "churn_phase_s": churn_phase, "close_all_s": close_phase,
            "server_cpu_pct": ((u1 - u0) + (s1 - s0)) / churn_phase * 100,
            "cpu_ms_per_replacement": ((u1 - u0) + (s1 - s0)) / max(replacements, 1) * 1000,
            "connected_after_churn": connected_churned,
            "close_stuck": sum(r["stuck"] for r in closed),
            "rss_kib_before": rss_before, "rss_kib_churned": rss_churned,
            "rss_kib_empty": rss_empty, "rss_kib_after": rss_after,
            "reconnect_ok": c1["ok"], "reconnect_failed": c1["failed"],
            "reconnect_failures": c1["failures"],
            "rss_growth_pct": (rss_after - rss_before) / max(rss_before, 1) * 100,
            **second,
            "steal_pct_server_cpu": steal_pct(st0, st1, args.server_cpu),
            "other_load_pct": other_pct(st0, st1),
        }

    return await with_server(kind, "churn", args, peersig_caps("churn"), body,
                             peers=args.churn_peers * 2)


async def scenario_profile(args) -> dict:
    """Relay load on peersig with py-spy attached; returns the top functions by own time."""
    pyspy = ensure_pyspy()
    if pyspy is None:
        return {"error": "py-spy not available"}
    out = RESULTS / f"profile-relay-{RUN_ID}.speedscope.json"
    secs = args.profile_seconds

    async def window(srv: Server) -> None:
        proc = await asyncio.create_subprocess_exec(
            pyspy, "record", "--pid", str(srv.pid), "--duration", str(round(secs)), "--rate", "250",
            "-f", "speedscope", "-o", str(out), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        OWN_PIDS.add(proc.pid)
        _, err = await asyncio.wait_for(proc.communicate(), secs + 60)
        OWN_PIDS.discard(proc.pid)
        if proc.returncode != 0:
            log(f"py-spy failed: {err.decode(errors='replace')[-500:]}")

    r = await scenario_relay("peersig", args, scenario="profile", on_window=window)
    r["speedscope"] = str(out.relative_to(ROOT))
    r["transport"] = "wss" if getattr(args, "tls", False) else "ws"
    if out.exists():
        r.update(summarize_speedscope(out))
    return r


def _short_file(file: str) -> str:
    short = re.sub(r".*/site-packages/", "", file)
    short = re.sub(r".*/(peersig/)", r"\1", short)
    return re.sub(r".*/lib/python3\.\d+/", "", short)


def _component(file: str) -> str:
    for name in ("peersig", "autobahn", "twisted", "txaio", "json", "click"):
        if f"/{name}/" in file or file.startswith(f"{name}/"):
            return name
    return "other"


def summarize_speedscope(path: Path, top: int = 25) -> dict:
    """Own and total time per function (lines of one function merged), and own time per
    package, from a py-spy speedscope file."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    keys = [(fr.get("name", "?"), fr.get("file", "")) for fr in frames]
    first_line: dict[tuple[str, str], int] = {}
    for fr, k in zip(frames, keys, strict=False):
        line = fr.get("line") or 0
        if k not in first_line or (line and line < first_line[k]):
            first_line[k] = line
    own: dict[tuple[str, str], float] = {}
    incl: dict[tuple[str, str], float] = {}
    comp: dict[str, float] = {}
    total = 0.0
    for prof in data["profiles"]:
        samples = prof.get("samples", [])
        weights = prof.get("weights") or [1] * len(samples)
        for stack, w in zip(samples, weights, strict=False):
            if not stack:
                continue
            total += w
            leaf = keys[stack[-1]]
            own[leaf] = own.get(leaf, 0) + w
            c = _component(leaf[1])
            comp[c] = comp.get(c, 0) + w
            for k in {keys[f] for f in stack}:
                incl[k] = incl.get(k, 0) + w
    total = total or 1.0
    rows = [{"function": k[0], "file": _short_file(k[1]), "line": first_line.get(k),
             "own_pct": w / total * 100, "total_pct": incl.get(k, 0) / total * 100}
            for k, w in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    inclusive = [{"function": k[0], "file": _short_file(k[1]), "total_pct": w / total * 100}
                 for k, w in sorted(incl.items(), key=lambda kv: -kv[1])
                 if _component(k[1]) == "peersig"][:10]
    nsamples = sum(len(p.get("samples", [])) for p in data["profiles"])
    return {"samples": nsamples, "sampled_seconds": total, "top": rows,
            "by_package": {k: v / total * 100 for k, v in sorted(comp.items(),
                                                                  key=lambda kv: -kv[1])},
            "peersig_inclusive": inclusive}


async def compare_generators(args) -> list[dict]:
    """Generator CPU per relayed message for each candidate, same scenario, same server."""
    ensure_node_packages(with_ws=True)
    target = args.compare_server
    out = []
    for gen in ("uvloop", "asyncio", "node-ws"):
        best = None
        for _attempt in range(args.retries + 1):
            await wait_quiet(args)
            log(f"compare generators: {gen} against {target}")
            if gen == "node-ws":
                g = await _node_gen(target, args)
            else:
                saved = args.loop, args.relay_seconds
                args.loop = gen
                args.relay_seconds = args.compare_seconds
                try:
                    r = await scenario_relay(target, args, scenario=f"gen-{gen}")
                finally:
                    args.loop, args.relay_seconds = saved
                g = {"generator": f"Python {platform.python_version()} + {gen}"
                     + (" (bench/loadgen.py)" if gen == "uvloop" else ""),
                     "msgs_per_s": r["msgs_per_s"], "gen_us_per_msg": r["gen_us_per_msg"],
                     "gen_user_us_per_msg": r["gen_user_us_per_msg"],
                     "gen_sys_us_per_msg": r["gen_sys_us_per_msg"],
                     "gen_cpu_pct": r["gen_cpu_pct"], "server_cpu_pct": r["server_cpu_pct"],
                     "server_us_per_msg": r["server_us_per_msg"],
                     "other_load_pct": r["other_load_pct"]}
            if best is None or g["other_load_pct"] < best["other_load_pct"]:
                best = g
            if g["other_load_pct"] <= args.max_interference:
                break
        out.append(best)
    return out


async def _node_gen(target: str, args) -> dict:
    srv = Server(target, "gen-node-ws", args,
                 peersig_caps("relay") if target == "peersig" else [])
    await srv.start()
    try:
        def pin() -> None:
            if args.gen_cpu is not None:
                os.sched_setaffinity(0, {args.gen_cpu})

        proc = await asyncio.create_subprocess_exec(
            "node", str(BENCH / "wsgen.cjs"), f"--port={srv.port}",
            f"--rooms={args.relay_peers // 4}", f"--warmup={args.warmup}",
            f"--seconds={args.compare_seconds}", stdout=asyncio.subprocess.PIPE,
            cwd=NODE_DIR, preexec_fn=pin)
        OWN_PIDS.add(proc.pid)
        assert proc.stdout is not None
        start = json.loads(await asyncio.wait_for(proc.stdout.readline(), 300))
        assert start["event"] == "start"
        u0, s0 = srv.cpu()
        st0 = cpu_times()
        end = json.loads(await asyncio.wait_for(proc.stdout.readline(), 300))
        u1, s1 = srv.cpu()
        st1 = cpu_times()
        await asyncio.wait_for(proc.wait(), 30)
        OWN_PIDS.discard(proc.pid)
        msgs = max(end["msgs"], 1)
        secs = end["seconds"]
        cpu = (u1 - u0) + (s1 - s0)
        gcpu = end["cpu_user"] + end["cpu_sys"]
        return {"generator": "Node " + platform_node() + " + ws " + ws_version(),
                "msgs_per_s": msgs / secs, "gen_us_per_msg": gcpu / msgs * 1e6,
                "gen_user_us_per_msg": end["cpu_user"] / msgs * 1e6,
                "gen_sys_us_per_msg": end["cpu_sys"] / msgs * 1e6,
                "gen_cpu_pct": gcpu / secs * 100, "server_cpu_pct": cpu / secs * 100,
                "server_us_per_msg": cpu / msgs * 1e6, "other_load_pct": other_pct(st0, st1)}
    finally:
        await srv.stop()


# -- machine facts -----------------------------------------------------------------------


def wakeup_probe(n: int = 2000) -> dict:
    """Round trip of one byte over a socketpair between two processes, on one CPU and
    across the two: the price this VM charges for waking an idle vCPU."""
    res = {}
    for mode in ("same", "cross"):
        a, b = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                os.sched_setaffinity(0, {0 if mode == "same" else 1})
                for _ in range(n):
                    b.send(b.recv(16))
            finally:
                os._exit(0)
        saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {0})
        time.sleep(0.2)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            a.send(b"x")
            a.recv(16)
            ts.append((time.perf_counter() - t) * 1e6)
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, saved)
        a.close()
        b.close()
        res[mode] = {"p50_us": pct(ts, 50), "p99_us": pct(ts, 99), "max_us": max(ts)}
    return res


def platform_node() -> str:
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def ws_version() -> str:
    p = NODE_DIR / "node_modules" / "ws" / "package.json"
    return json.loads(p.read_text())["version"] if p.exists() else "?"


def machine_facts() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    os_name = "?"
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass

    def pyver(mod: str) -> str:
        try:
            from importlib.metadata import version

            return version(mod)
        except Exception:
            return "?"

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem, "os": os_name,
        "kernel": platform.release(), "python": platform.python_version(),
        "node": platform_node(), "peersig": pyver("peersig"), "twisted": pyver("twisted"),
        "autobahn": pyver("autobahn"), "uvloop": pyver("uvloop"),
        "peer": PEER_VERSION, "ws_in_reference": ws_version(),
        "git": git_describe(),
    }


def git_describe() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                           capture_output=True, text=True)
        head = r.stdout.strip() or "no commit"
        r = subprocess.run(["git", "status", "--porcelain", "peersig"], cwd=ROOT,
                           capture_output=True, text=True)
        dirty = " + uncommitted changes in peersig/" if r.stdout.strip() else ""
        return head + dirty
    except OSError:
        return "?"


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: small sizes, short windows (< 2 min), report to "
                         "bench/results/quick.md unless --doc is given")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--connect-sizes", default=None, help="default 1000,4000,20000")
    ap.add_argument("--transports", default="ws,wss",
                    help="ws, wss or both: wss runs connect, relay, latency and idle again "
                         "over TLS, the reference with its own (--sslkey/--sslcert)")
    ap.add_argument("--wss-connect-sizes", default=None, help="default 4000 (quick 1000)")
    ap.add_argument("--connect-concurrency", type=int, default=32,
                    help="WebSocket joins in flight at once (per worker)")
    ap.add_argument("--relay-peers", type=int, default=1000)
    ap.add_argument("--relay-seconds", type=float, default=None,
                    help="window of each relay round (default 10)")
    ap.add_argument("--relay-rounds", type=int, default=None,
                    help="relay rounds per server, alternating which goes first; the "
                         "median round is the figure (default 3)")
    ap.add_argument("--latency-rate", type=float, default=10000,
                    help="offered relayed messages/s (OFFER + ANSWER)")
    ap.add_argument("--latency-seconds", type=float, default=None,
                    help="window of each latency round (default 12)")
    ap.add_argument("--connect-rounds", type=int, default=None,
                    help="ramps per size and server, alternating which goes first (default 3)")
    ap.add_argument("--latency-rounds", type=int, default=None,
                    help="latency rounds per server, alternating which goes first (default 5)")
    ap.add_argument("--idle-peers", type=int, default=None)
    ap.add_argument("--idle-seconds", type=float, default=None,
                    help="window of each idle round (default 10)")
    ap.add_argument("--idle-rounds", type=int, default=None,
                    help="idle rounds per server and heartbeat model, alternating which "
                         "goes first; the median round is the figure (default 3)")
    ap.add_argument("--idle-models", default="independent,sliced",
                    help="heartbeat models the idle scenario runs, in order: independent "
                         "(a timer per peer, the headline), sliced (one ticker, 50 slices), "
                         "off (silent peers: only the server's pings and their pongs)")
    ap.add_argument("--churn-peers", type=int, default=None)
    ap.add_argument("--churn-seconds", type=float, default=None)
    ap.add_argument("--churn-rate", type=float, default=None,
                    help="leave+join replacements per second")
    ap.add_argument("--churn2-seconds", type=float, default=None,
                    help="length of a second churn cycle (0 = none; default 30, quick 0)")
    ap.add_argument("--workers", type=int, default=1, help="load generator processes")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--server-cpu", type=int, default=0, help="CPU the server is pinned to")
    ap.add_argument("--gen-cpu", type=int, default=1,
                    help="CPU the orchestrator and generator are pinned to")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="also profile peersig with py-spy under the relay load "
                         "(default: on for the full suite, off for --quick or a subset)")
    ap.add_argument("--profile-only", action="store_true", help="only the profile")
    ap.add_argument("--profile-seconds", type=float, default=15)
    ap.add_argument("--compare-generators", action=argparse.BooleanOptionalAction,
                    default=None,
                    help="also measure the generator candidates' CPU per message "
                         "(default: on for the full suite, off for --quick or a subset)")
    ap.add_argument("--compare-only", action="store_true")
    ap.add_argument("--compare-server", default="reference", choices=SERVERS)
    ap.add_argument("--compare-seconds", type=float, default=10)
    ap.add_argument("--nice", type=int, default=-10,
                    help="scheduling priority of the benchmark's processes (inherited by "
                         "servers and generator): on a machine shared with other people's "
                         "test runs, the measured processes get their CPU first")
    ap.add_argument("--quiet-threshold", type=float, default=10.0,
                    help="before each scenario, wait until other processes use less than "
                         "this %% of a CPU")
    ap.add_argument("--quiet-max-wait", type=float, default=None,
                    help="longest wait for a quiet machine, s (default 45, quick 0)")
    ap.add_argument("--max-interference", type=float, default=25.0,
                    help="measure a scenario again if other processes used more than this "
                         "%% of a CPU during its window")
    ap.add_argument("--max-steal", type=float, default=1.0,
                    help="measure a scenario again if the hypervisor took more than this "
                         "%% of the server's or the generator's CPU during its window (steal)")
    ap.add_argument("--retries", type=int, default=None,
                    help="extra attempts per scenario (default 2, quick 0)")
    ap.add_argument("--peersig-arg", action="append", default=[], dest="peersig_args",
                    help="one more option for peersig's command line (repeatable), e.g. "
                         "--peersig-arg=--poll-coalesce=5")
    ap.add_argument("--doc", default=None, help="report path (default docs/benchmarks.md)")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    q = a.quick
    defaults = {
        "connect_sizes": "1000" if q else "1000,4000,20000",
        "wss_connect_sizes": "1000" if q else "4000",
        "relay_seconds": 4 if q else 10,
        "relay_rounds": 1 if q else 3,
        "latency_seconds": 4 if q else 12,
        "latency_rounds": 1 if q else 5,
        "connect_rounds": 1 if q else 3,
        "idle_peers": 1000 if q else 10000,
        "idle_seconds": 4 if q else 10,
        "idle_rounds": 1 if q else 3,
        "churn_peers": 600 if q else 4000,
        "churn_seconds": 6 if q else 60,
        "churn_rate": 100 if q else 200,
        "churn2_seconds": 0 if q else 30,
    }
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quiet_max_wait is None:
        a.quiet_max_wait = 0 if q else 45
    if a.retries is None:
        a.retries = 0 if q else 2
    for name in ("relay_rounds", "idle_rounds"):
        if getattr(a, name) % 2 == 0 or getattr(a, name) < 1:
            # The figure is the median round: an odd number of rounds has one.
            ap.error(f"--{name.replace('_', '-')} takes an odd number")
    a.warmup = 2 if q else 3
    a.settle = 1.0 if q else 2.0
    a.hold = 1 if q else 6
    a.idle_settle = 1 if q else 6
    a.silent_wait = 5.5 if q else 65
    full = (not q and not a.profile_only and not a.compare_only
            and a.servers == ",".join(SERVERS) and a.scenarios == ",".join(SCENARIOS)
            and a.transports == "ws,wss" and a.idle_models == "independent,sliced")
    if a.profile is None:
        a.profile = full
    if a.compare_generators is None:
        a.compare_generators = full
    a.servers = [s for s in a.servers.split(",") if s]
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    a.sizes = [int(x) for x in a.connect_sizes.split(",") if x]
    a.wss_sizes = [int(x) for x in a.wss_connect_sizes.split(",") if x]
    a.transports = [t for t in a.transports.split(",") if t]
    if not set(a.transports) <= {"ws", "wss"}:
        ap.error("--transports takes ws, wss or both")
    for s in a.servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s}")
    for s in a.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s}")
    a.idle_models = [m for m in a.idle_models.split(",") if m]
    for m in a.idle_models:
        if m not in IDLE_MODELS:
            ap.error(f"unknown heartbeat model {m}")
    if not a.idle_models or len(set(a.idle_models)) < len(a.idle_models):
        ap.error("--idle-models takes one or more different models")
    if a.doc is None:
        a.doc = str(RESULTS / "quick.md") if q else str(DOC)
    a.argv = argv if argv is not None else sys.argv[1:]
    return a


async def amain(args: argparse.Namespace) -> dict:
    results: dict = {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "args": {k: v for k, v in vars(args).items() if k != "argv"},
                     "command": "python -m bench" + (" " + shlex.join(args.argv)
                                                     if args.argv else "")}
    results["machine"] = machine_facts()
    results["wakeup"] = wakeup_probe()
    log(f"cross-CPU wakeup probe: {results['wakeup']}")
    results["runs"] = {}
    t_start = time.monotonic()
    if args.compare_generators or args.compare_only:
        results["generators"] = await compare_generators(args)
        for g in results["generators"]:
            log(f"  {g['generator']}: {g['gen_us_per_msg']:.1f} us/msg, "
                f"{g['msgs_per_s']:.0f} msg/s, gen {g['gen_cpu_pct']:.0f}% CPU")
    if not (args.compare_only or args.profile_only):
        plan: list[tuple[str, str, object]] = []
        for transport in args.transports:
            wss = transport == "wss"
            targs = argparse.Namespace(**{**vars(args), "tls": wss})
            prefix = "wss-" if wss else ""
            sizes = args.wss_sizes if wss else args.sizes
            for sc in args.scenarios:
                if wss and sc not in WSS_SCENARIOS:
                    continue
                if sc == "connect":
                    # Rounds, as for latency: one ramp per server swings by a quarter here.
                    for i in range(args.connect_rounds):
                        kinds = args.servers if i % 2 == 0 else args.servers[::-1]
                        for n in sizes:
                            for kind in kinds:
                                plan.append((f"{prefix}connect{n}#{i + 1}", kind,
                                             (scenario_connect, kind, n, targs)))
                elif sc in ("relay", "latency", "idle"):
                    # This VM slows and stalls now and then: one window per server let one
                    # slow stretch decide a ratio. Rounds, alternating which server goes
                    # first, each on a fresh server; pool_rounds pools latency's and keeps
                    # the median round of relay and idle. Idle runs each model of
                    # --idle-models (IDLE_MODELS) in the order given.
                    fn, n_rounds = {"relay": (scenario_relay, args.relay_rounds),
                                    "latency": (scenario_latency, args.latency_rounds),
                                    "idle": (scenario_idle, args.idle_rounds)}[sc]
                    models = args.idle_models if sc == "idle" else [None]
                    for model in models:
                        margs = vars(targs) | ({"heartbeats": model} if model else {})
                        suffix = IDLE_MODELS[model] if model else ""
                        for i in range(n_rounds):
                            kinds = args.servers if i % 2 == 0 else args.servers[::-1]
                            # Idle's dead-peer checks take a minute and the report shows
                            # them for ws: once, in the first model's first round.
                            checks = (sc == "idle" and not wss and i == 0
                                      and model == args.idle_models[0])
                            rargs = argparse.Namespace(**margs, dead_peer_checks=checks)
                            for kind in kinds:
                                plan.append((f"{prefix}{sc}{suffix}#{i + 1}", kind,
                                             (fn, kind, rargs)))
                else:
                    for kind in args.servers:
                        plan.append((prefix + sc, kind, (scenario_churn, kind, targs)))
        for name, kind, (fn, *fargs) in plan:  # type: ignore[misc]
            best: dict | None = None
            attempts = 0
            for attempt in range(args.retries + 1):
                attempts += 1
                waited = await wait_quiet(args)
                log(f"{name} / {kind} ..." + (f" (attempt {attempt + 1})" if attempt else ""))
                t0 = time.monotonic()
                try:
                    r = await fn(*fargs)
                except Exception as e:  # keep going; the report shows the failure
                    log(f"{name} / {kind} failed: {e!r}")
                    r = {"error": repr(e)}
                r["wall_seconds"] = time.monotonic() - t0
                r["waited_for_quiet_s"] = waited
                log(f"{name} / {kind}: {summary_line(name, r)}")
                load = r.get("other_load_pct", 0.0)
                steal = max(r.get("steal_pct_server_cpu", 0.0), r.get("steal_pct_gen_cpu", 0.0))
                if best is None or ("error" in best and "error" not in r) or (
                        "error" not in r and load + steal < interference(best)):
                    best = r
                if "error" not in r and load <= args.max_interference \
                        and steal <= args.max_steal:
                    break
                if "error" not in r and attempt < args.retries:
                    log(f"  other processes used {load:.0f}% of a CPU, the hypervisor "
                        f"{steal:.0f}% of ours, during the window: measuring again")
            assert best is not None
            best["attempts"] = attempts
            results["runs"].setdefault(name, {})[kind] = best
    pool_rounds(results["runs"])
    if args.profile or args.profile_only:
        best = None
        for _attempt in range(args.retries + 1):
            await wait_quiet(args)
            log("profile: relay on peersig with py-spy ...")
            # Over wss when it is measured: the production path.
            p = await scenario_profile(argparse.Namespace(
                **{**vars(args), "tls": "wss" in args.transports}))
            if best is None or p.get("other_load_pct", 1e9) < best.get("other_load_pct", 1e9):
                best = p
            if p.get("other_load_pct", 1e9) <= args.max_interference:
                break
        results["profile"] = best
        prof = results["profile"]
        for row in prof.get("top", [])[:15]:
            log(f"  {row['own_pct']:5.1f}% own {row['total_pct']:5.1f}% total  "
                f"{row['function']} ({row['file']}:{row['line']})")
        log(f"  own time by package: {prof.get('by_package')}")
    results["total_seconds"] = time.monotonic() - t_start
    return results


def interference(r: dict) -> float:
    """How much others took of the machine during a window: other processes' CPU plus
    the hypervisor's steal from the server's or the generator's CPU."""
    return r.get("other_load_pct", 0.0) + max(r.get("steal_pct_server_cpu", 0.0),
                                              r.get("steal_pct_gen_cpu", 0.0))


def pool_rounds(runs: dict) -> None:
    """Merge the rounds of each scenario run in rounds (``name#i``) into ``name``: the
    latency percentiles of all round trips together, CPU per connect as total CPU over
    total connects, relay and idle as their median round (MEDIAN_OF); each round's own
    figures kept under ``rounds``. Relay and idle run by both servers also get peersig's
    ``paired_ratio`` of their MEDIAN_OF figure (``paired_key``), by which the report
    judges their targets."""
    names: dict[str, list[str]] = {}
    for n in runs:
        if "#" in n:
            names.setdefault(n.split("#")[0], []).append(n)
    for base, rounds_of in names.items():
        rounds_of.sort(key=lambda n: int(n.split("#")[1]))
        pooled: dict = {}
        scenario = base.removeprefix("wss-").split("-")[0].rstrip("0123456789")
        for kind in {k for n in rounds_of for k in runs[n]}:
            rounds = [runs[n][kind] for n in rounds_of if kind in runs[n]]
            good = [r for r in rounds if "error" not in r]
            merged = dict(good[0] if good else rounds[0])
            if good and scenario in MEDIAN_OF:
                merged = _median_round(good, MEDIAN_OF[scenario])
            elif good:
                merged.update(_pool_latency(good) if scenario == "latency"
                              else _pool_connect(good))
            if scenario in MEDIAN_OF:
                # Whole, as the report reads each round's failures, drops and log errors.
                merged["rounds"] = [dict(r) for r in rounds]
            else:
                keep = {"latency": ("rtt_ms_p50", "rtt_ms_p99", "rtt_ms_max"),
                        "connect": ("cpu_ms_per_connect", "rss_kib_per_peer", "ok",
                                    "failed")}[scenario]
                merged["rounds"] = [{k: r.get(k) for k in (*keep, "other_load_pct",
                                                           "steal_pct_server_cpu",
                                                           "steal_pct_gen_cpu", "attempts",
                                                           "error")}
                                    for r in rounds]
            pooled[kind] = merged
        if scenario in MEDIAN_OF and {"peersig", "reference"} <= pooled.keys():
            key = MEDIAN_OF[scenario]
            ratio = paired_ratio(pooled["peersig"]["rounds"], pooled["reference"]["rounds"],
                                 key)
            if ratio is not None:
                pooled["peersig"].update(paired_ratio=ratio, paired_key=key)
        for n in rounds_of:
            del runs[n]
        runs[base] = pooled


# The figure that picks a scenario's median round, for those pooled that way.
MEDIAN_OF = {"relay": "server_us_per_msg", "idle": "server_cpu_pct"}


def paired_ratio(ours: list[dict], theirs: list[dict], key: str) -> float | None:
    """peersig's ``key`` against the reference's as the median of each pair's ratio: round
    i of one server and round i of the other ran one after the other, so a slow stretch of
    the machine that spans a pair weighs on both sides of its ratio, and the median sets
    aside a pair that one side's slow window skewed. None without a pair both measured."""
    ratios = sorted(a[key] / b[key] for a, b in zip(ours, theirs, strict=False)
                    if "error" not in a and "error" not in b
                    and a.get(key) is not None and b.get(key))
    if not ratios:
        return None
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def _median_round(good: list[dict], key: str) -> dict:
    """The round whose ``key`` is the median (parse_args asks for an odd number of
    rounds), whole, so that its figures stay one window's; what one round alone measured
    (idle's dead-peer checks) is carried over, and the peers dropped and the failed joins
    are those of all the rounds."""
    merged = dict(sorted(good, key=lambda r: r[key])[len(good) // 2])
    for r in good:
        for k, v in r.items():
            merged.setdefault(k, v)
    for k in ("drops", "connect_failed"):
        merged[k] = sum(r.get(k, 0) for r in good)
    return merged


def _pool_latency(good: list[dict]) -> dict:
    rtts = [x for r in good for x in r.pop("_rtts")]
    secs = sum(r["seconds"] for r in good)
    out = {key: sum(r[key] * r["seconds"] for r in good) / secs
           for key in ("msgs_per_s", "server_cpu_pct", "gen_cpu_pct", "other_load_pct",
                       "steal_pct_server_cpu", "steal_pct_gen_cpu")}
    out.update({
        "seconds": secs, "round_trips": len(rtts),
        "rtt_ms_p50": pct(rtts, 50), "rtt_ms_p90": pct(rtts, 90),
        "rtt_ms_p99": pct(rtts, 99), "rtt_ms_p999": pct(rtts, 99.9),
        "rtt_ms_max": max(rtts),
        "unanswered": sum(r["unanswered"] for r in good),
        "drops": sum(r["drops"] for r in good),
    })
    return out


def _pool_connect(good: list[dict]) -> dict:
    ok = sum(r["ok"] for r in good)
    cpu = sum(r["server_cpu_s"] for r in good)
    return {
        "ok": min(r["ok"] for r in good), "failed": sum(r["failed"] for r in good),
        "dropped_after_open": sum(r["dropped_after_open"] for r in good),
        "server_cpu_s": cpu, "cpu_ms_per_connect": cpu / ok * 1000,
        "connects_per_s": ok / sum(r["connect_seconds"] for r in good),
        "rss_kib_per_peer": sum(r["rss_kib_per_peer"] for r in good) / len(good),
        "gen_cpu_ms_per_connect": sum(r["gen_cpu_ms_per_connect"] * r["ok"]
                                      for r in good) / ok,
        "join_ms_p99": max(r["join_ms_p99"] for r in good),
        "other_load_pct": max(r["other_load_pct"] for r in good),
    }


def summary_line(name: str, r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    return _summary(name, r) + f" [other load {r.get('other_load_pct', 0):.0f}%]"


def _summary(name: str, r: dict) -> str:
    name = name.removeprefix("wss-")
    if name.startswith("connect"):
        return (f"ok {r['ok']} failed {r['failed']} dropped {r['dropped_after_open']}, "
                f"{r['cpu_ms_per_connect']:.3f} ms CPU/connect, "
                f"{r['rss_kib_per_peer']:.1f} KiB/peer, join p99 {r['join_ms_p99']:.1f} ms")
    name = name.split("#")[0]
    if name == "relay":
        return (f"{r['msgs_per_s']:.0f} msg/s, {r['server_us_per_msg']:.1f} us/msg, server "
                f"{r['server_cpu_pct']:.0f}% CPU, gen {r['gen_us_per_msg']:.1f} us/msg "
                f"({r['gen_cpu_pct']:.0f}%), steal {r['steal_pct_server_cpu']:.0f}%/"
                f"{r['steal_pct_gen_cpu']:.0f}%")
    if name == "latency":
        return (f"{r['msgs_per_s']:.0f} msg/s, rtt p50 {r['rtt_ms_p50']:.2f} p99 "
                f"{r['rtt_ms_p99']:.2f} max {r['rtt_ms_max']:.2f} ms, server "
                f"{r['server_cpu_pct']:.0f}%")
    if name.startswith("idle"):
        return (f"{r['peers']} peers, {r['server_cpu_pct']:.2f}% CPU "
                f"({r['heartbeats_per_s']:.0f} heartbeats/s, {r['heartbeat_model']}), "
                f"{r['rss_kib'] / 1024:.1f} MiB, drops {r['drops']}"
                + (f", silent peer dropped after {r['silent_dropped_after_s']}"
                   if "silent_dropped_after_s" in r else ""))
    if name == "churn":
        return (f"{r['left'] + r['left_abrupt']} left / {r['joined']} joined, failed "
                f"{r['failed']}, RSS {r['rss_kib_before'] / 1024:.1f} -> "
                f"{r['rss_kib_after'] / 1024:.1f} MiB ({r['rss_growth_pct']:+.1f}%)")
    return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not cpu_affinity_ok():
        log("fewer than 2 CPUs: not pinning server and generator")
        args.server_cpu = args.gen_cpu = None
    args.fd_limit = raise_nofile()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    except OSError as e:
        log(f"cannot set priority {args.nice}: {e}")
    args.nice = os.getpriority(os.PRIO_PROCESS, 0)
    if args.idle_peers + 1 > args.fd_limit - SERVER_FD_MARGIN:
        args.idle_peers = args.fd_limit - SERVER_FD_MARGIN - 1
    if args.gen_cpu is not None:
        os.sched_setaffinity(0, {args.gen_cpu})
    if "reference" in args.servers or args.compare_generators or args.compare_only:
        ensure_node_packages(with_ws=args.compare_generators or args.compare_only)
    if args.loop == "uvloop" and not ensure_uvloop():
        args.loop = "asyncio"
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = run_owning(amain(args))
    raw = RESULTS / f"run-{RUN_ID}.json"
    raw.write_text(json.dumps(results, indent=1, default=str))
    log(f"raw results: {raw.relative_to(ROOT)}")
    if not args.no_doc:
        try:
            from .report import write_report
        except ImportError:  # run as a script: python bench/run.py
            from report import write_report  # type: ignore[no-redef]

        path = Path(args.doc)
        write_report(results, path, raw)
        log(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
