"""Relays through a --cluster (issue 23): what a cross-node relay costs beside a same-node one,
and three nodes against one.

Usage (from the repository root; needs ``redis-server`` and txredisapi)::

    python bench/cluster.py                     # ~6 min on a quiet machine; writes
                                                # docs/benchmarks-cluster.md
    python bench/cluster.py --rounds 1 --seconds 5 --no-doc
    python bench/cluster.py --setups one,one-before --before-root /tmp/peersig-before

Setups (each run on fresh processes, on free 127.0.0.1 ports, one ``redis-server`` on a
Unix socket with no persistence):

- ``one``: one node without ``--cluster``, every room on it (the single-process figure);
- ``one-before``: the same from another checkout (``--before-root``): what ``--cluster``'s
  hooks cost a process that does not use it;
- ``same-2``: two nodes with ``--cluster``, each room wholly on one of them (rooms dealt
  out alternately): relays stay on their node;
- ``cross-2``: two nodes with ``--cluster``, the peers of each room dealt out alternately,
  so both peers of every OFFER/ANSWER pair are on different nodes: every relay crosses;
- ``rr-3``: three nodes with ``--cluster``, peers dealt out in turn as a round-robin
  balancer would: every pair crosses nodes here too (its two peers are consecutive).

The load is ``bench/loadgen.py``'s closed loop (rooms of 4, two pairs per room, one
exchange in flight per pair, 1000-byte SDP). CPU of every process is read from ``/proc``
over the measured window: peersig nodes, redis-server, the generator. Nothing is pinned:
on a 2-core machine all of them share both cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.haproxy import (
    BENCH,
    ROOT,
    Generator,
    Node,
    log,
    machine_ticks,
    median,
    process_cpu,
    wait_quiet,
)

DOC = ROOT / "docs" / "benchmarks-cluster.md"
SETUPS = {
    "one": (1, False, "1 node, no --cluster"),
    "one-before": (1, False, "1 node, no --cluster, the checkout before it (--before-root)"),
    "same-2": (2, True, "2 nodes, --cluster, each room on one node"),
    "cross-2": (2, True, "2 nodes, --cluster, every pair split across them"),
    "rr-3": (3, True, "3 nodes, --cluster, peers dealt out round robin"),
}
DEFAULT_SETUPS = ["one", "same-2", "cross-2", "rr-3"]


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.socket = workdir / "redis.sock"
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_node(workdir: Path, index: int, extra: list[str], root: Path) -> Node:
    node = Node(workdir, index)
    node.command += extra
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERSIG_")}
    env["PYTHONPATH"] = str(root)
    with node.log_path.open("wb") as out:
        node.proc = subprocess.Popen(node.command, cwd=root, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return node


async def run_setup(name: str, args, workdir: Path) -> dict:
    count, clustered, _ = SETUPS[name]
    workdir.mkdir(parents=True)
    redis = Redis(workdir) if clustered else None
    root = Path(args.before_root) if name == "one-before" else ROOT
    extra = ["--cluster", f"unix:{redis.socket}"] if redis is not None else []
    nodes: list[Node] = []
    gen: Generator | None = None
    try:
        nodes = [start_node(workdir, i, extra, root) for i in range(count)]
        for node in nodes:
            node.wait_ready()
        if clustered:  # each node's lease and subscription in place
            deadline = time.monotonic() + 15
            while not all((n.health() or {}).get("cluster") == "ok" for n in nodes):
                assert time.monotonic() < deadline, "cluster not ready"
                await asyncio.sleep(0.1)
        ports = [n.port for n in nodes]
        gen = Generator(ports[0])
        await gen.start(args.loop)
        rooms = args.peers // 4
        if name in ("cross-2", "rr-3"):
            commands = [{"rooms": list(range(rooms)), "spread": ports}]
        else:  # whole rooms, dealt out to the nodes in turn
            commands = [{"rooms": list(range(i, rooms, count)), "spread": [port], "gen": i}
                        for i, port in enumerate(ports)]
        ok = failed = 0
        for command in commands:
            reply = await gen.call({"cmd": "connect", "per_room": 4, "concurrency": 32,
                                    "timeout": 15.0, **command}, timeout=300)
            ok += reply["ok"]
            failed += reply["failed"]
        per_node = [int((n.health() or {}).get("peers", 0)) for n in nodes]
        await gen.call({"cmd": "relay", "mode": "closed"})
        await asyncio.sleep(args.warmup)
        pids = {"peersig": [n.pid for n in nodes],
                "redis": [redis.proc.pid] if redis is not None else [],
                "generator": [gen.pid]}
        m0 = await gen.call({"cmd": "mark", "record": True})
        c0 = {k: [process_cpu(p) for p in v] for k, v in pids.items()}
        b0 = machine_ticks()
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        t1 = time.monotonic()
        c1 = {k: [process_cpu(p) for p in v] for k, v in pids.items()}
        b1 = machine_ticks()
        m1 = await gen.call({"cmd": "mark"})
        stop = await gen.call({"cmd": "relay_stop"}, timeout=60)
        status = await gen.call({"cmd": "status"})
    finally:
        if gen is not None:
            await gen.stop()
        for node in nodes:
            node.stop()
        if redis is not None:
            redis.stop()
    secs = t1 - t0
    msgs = m1["rx_relay"] - m0["rx_relay"]
    cpu = {k: [b - a for a, b in zip(c0[k], c1[k], strict=True)] for k in c0}
    scale = 100 * (os.cpu_count() or 1) / max(b1[1] - b0[1], 1)
    return {
        "setup": name, "peers": ok, "failed": failed, "per_node": per_node, "seconds": secs,
        "msgs": msgs, "msgs_per_s": msgs / secs,
        "cpu_pct": {k: [x / secs * 100 for x in v] for k, v in cpu.items()},
        "us_per_msg": {k: sum(v) / max(msgs, 1) * 1e6 for k, v in cpu.items()},
        "machine_busy_pct": (b1[0] - b0[0]) * scale,
        "steal_cpu_pct": (b1[3] - b0[3]) * scale,
        "rtt_ms_p50": stop["rtt"].get("p50", 0), "rtt_ms_p99": stop["rtt"].get("p99", 0),
        "drops": status["drops"], "bad_relays": status["bad_relays"],
    }


def report(runs: list[dict], args, raw: Path) -> str:
    by: dict[str, list[dict]] = {}
    for run in runs:
        by.setdefault(run["setup"], []).append(run)
    lines = [
        "# Relays through a cluster (`--cluster`)",
        "",
        f"Generated by `python bench/cluster.py` ({args.rounds} rounds of each setup, "
        f"interleaved, {args.seconds:g}-s windows, {args.peers} peers in rooms of 4, closed "
        f"loop) on {time.strftime('%Y-%m-%d')}; raw results: `{raw.relative_to(ROOT)}`. "
        "Medians over the rounds; CPU is per relayed message, summed over each kind of "
        "process, from `/proc` (2 cores, everything on both).",
        "",
        "| setup | msg/s | peersig µs/msg (all nodes) | redis µs/msg | generator µs/msg "
        "| rtt p50 ms | rtt p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in by.items():
        def med(f, rs=rs):
            return median([f(r) for r in rs])
        lines.append(
            f"| {SETUPS[name][2]} | {med(lambda r: r['msgs_per_s']):,.0f} "
            f"| {med(lambda r: r['us_per_msg']['peersig']):.1f} "
            f"| {med(lambda r: r['us_per_msg']['redis']):.1f} "
            f"| {med(lambda r: r['us_per_msg']['generator']):.1f} "
            f"| {med(lambda r: r['rtt_ms_p50']):.2f} | {med(lambda r: r['rtt_ms_p99']):.2f} |")
    model = _model(by)
    if model:
        lines += ["", *model]
    lines += ["", "Each round's figures:", "",
              "| setup | round | msg/s | peersig µs/msg | redis µs/msg | peers per node "
              "| drops |", "|---|---:|---:|---:|---:|---|---:|"]
    for run in runs:
        lines.append(f"| {run['setup']} | {run['round']} | {run['msgs_per_s']:,.0f} "
                     f"| {run['us_per_msg']['peersig']:.1f} | {run['us_per_msg']['redis']:.1f} "
                     f"| {run['per_node']} | {run['drops']} |")
    return "\n".join(lines) + "\n"


def _model(by: dict[str, list[dict]]) -> list[str]:
    """Capacity on more cores than this machine has, from the per-message costs: with k
    nodes behind a round-robin balancer the two peers of a pair share a node with chance
    1/k, so a message costs (1/k) same + (1 - 1/k) cross; k cores give k / that, and
    Redis (one core) caps the crossing ones."""
    if not {"one", "cross-2"} <= by.keys():
        return []
    same = median([r["us_per_msg"]["peersig"] for r in by.get("same-2", by["one"])])
    cross = median([r["us_per_msg"]["peersig"] for r in by["cross-2"]])
    redis = median([r["us_per_msg"]["redis"] for r in by["cross-2"]])
    one = median([r["us_per_msg"]["peersig"] for r in by["one"]])
    out = [
        "**A model for more cores.** Per relayed message, peersig spends "
        f"{one:.1f} µs of CPU in one process, {same:.1f} µs in a cluster when both peers "
        f"share a node, and {cross:.1f} µs (both nodes together) when they do not; Redis "
        f"spends {redis:.1f} µs on a crossing one. Behind a round-robin balancer, with k "
        "nodes on k cores, a pair shares a node with chance 1/k:",
        "",
        "| nodes (cores) | CPU per message | msg/s the nodes can relay "
        "| msg/s one Redis core can route |",
        "|---:|---:|---:|---:|",
    ]
    for k in (1, 2, 4, 8, 16):
        if k == 1:
            cost = one
            redis_cap = "—"
        else:
            cost = same / k + cross * (1 - 1 / k)
            redis_cap = f"{1e6 / (redis * (1 - 1 / k)):,.0f}" if redis else "—"
        out.append(f"| {k} | {cost:.1f} µs | {k * 1e6 / cost:,.0f} | {redis_cap} |")
    out += ["", "The model leaves out what the measurement on 2 shared cores includes "
            "(loopback softirq, the generator) and what more machines add (network round "
            "trips to Redis). Pinning rooms to nodes (docs/scaling.md) keeps every relay "
            "on its node, at the same-node cost."]
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default=",".join(DEFAULT_SETUPS), help=f"of {', '.join(SETUPS)}")
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--quiet", type=float, default=15.0)
    ap.add_argument("--before-root", help="another checkout, for the one-before setup")
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    setups = args.setups.split(",")
    if "one-before" in setups and not args.before_root:
        ap.error("one-before needs --before-root")
    runs = []
    with tempfile.TemporaryDirectory(prefix="peersig-cluster-bench-") as tmp:
        for r in range(args.rounds):
            for name in setups:
                wait_quiet(args.quiet, 120)
                res = asyncio.run(run_setup(name, args, Path(tmp) / f"{name}-{r}"))
                res["round"] = r
                runs.append(res)
                log(f"{name} round {r}: {res['msgs_per_s']:,.0f} msg/s, µs/msg "
                    f"{ {k: round(v, 1) for k, v in res['us_per_msg'].items()} }, "
                    f"per node {res['per_node']}, rtt p50 {res['rtt_ms_p50']:.2f} ms, "
                    f"drops {res['drops']}, failed {res['failed']}")
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    raw = results / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    text = report(runs, args, raw)
    print(text)
    if not args.no_doc:
        with contextlib.suppress(OSError):
            Path(args.doc).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
