"""A reconnect storm (issue 16): every peer of a node connecting at once, as after a restart,
a deploy or the loss of another node, against peersig on its defaults, peersig listening with
Twisted's default backlog of 50 (what it did before), and the reference server (Node's 511).

Usage (from the repository root)::

    python -m bench.storm                   # 6000 peers (1500 rooms of 4), 3 rounds: the report
    python -m bench.storm --peers 2000 --rounds 1 --no-doc

Each round starts a fresh server pinned to CPU 0 and the generator of ``bench/run.py``
(``bench/loadgen.py`` workers) on CPU 1, then starts every peer at once. Measured: the time
from the first connect to the last OPEN; each client's wait from its ``connect()`` to its
OPEN (a SYN the kernel dropped costs the client its retransmit, a second or more); failures;
and the SYNs dropped because the listening socket's accept queue was full
(``TcpExtListenOverflows``, read from ``/proc/net/netstat`` as ``nstat`` does), along with the
hypervisor's steal in the window. The servers take turns going first.

All traffic goes to 127.0.0.1; every phase is bounded in time. Raw results go to
``bench/results/storm-*.json``, the report to ``docs/benchmarks-storm.md``, which
``bench/report.py`` appends to ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from bench.run import (
    ROOT,
    Fleet,
    Server,
    cpu_affinity_ok,
    cpu_times,
    ensure_node_packages,
    ensure_uvloop,
    git_describe,
    log,
    machine_facts,
    raise_nofile,
    render_appendix,
    run_appendix,
    steal_pct,
)

DOC = ROOT / "docs" / "benchmarks-storm.md"
# (label, server kind, backlog written into peersig's --port, or None for the default)
CONFIGS = (("peersig", "peersig", None), ("peersig backlog=50", "peersig", 50),
           ("reference", "reference", None))


def listen_overflows() -> int:
    """SYNs dropped so far because an accept queue was full (TcpExt ListenOverflows)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(table["ListenOverflows"])
    raise RuntimeError("no TcpExt ListenOverflows in /proc/net/netstat")


class StormServer(Server):
    def __init__(self, kind: str, scenario: str, args: argparse.Namespace,
                 backlog: int | None) -> None:
        super().__init__(kind, scenario, args)
        self.backlog = backlog

    def command(self) -> list[str]:
        command = super().command()
        if self.backlog is not None:
            port = command.index("--port") + 1
            command[port] += f":backlog={self.backlog}"
        return command


async def storm(label: str, kind: str, backlog: int | None, args: argparse.Namespace,
                n: int) -> dict:
    srv = StormServer(kind, "storm-" + label.replace(" ", "-").replace("=", ""), args, backlog)
    await srv.start()
    fleet = Fleet(args, srv.port, n)
    try:
        await fleet.start()
        await asyncio.sleep(1.0)
        u0, s0 = srv.cpu()
        dropped0, st0 = listen_overflows(), cpu_times()
        c = await fleet.connect(n, timeout=120.0)
        dropped1, st1 = listen_overflows(), cpu_times()
        u1, s1 = srv.cpu()
        return {
            "label": label, "server_command": srv.display_command(), "peers": n,
            "ok": c["ok"], "failed": c["failed"], "failures": c["failures"],
            "all_open_s": c["t1"] - c["t0"], "wait_ms_p50": c["join_ms_p50"],
            "wait_ms_p99": c["join_ms_p99"], "wait_ms_max": c["join_ms_max"],
            "syns_dropped": dropped1 - dropped0, "server_cpu_s": (u1 - u0) + (s1 - s0),
            "steal_pct": max(steal_pct(st0, st1, args.server_cpu),
                             steal_pct(st0, st1, args.gen_cpu)),
        }
    finally:
        await fleet.stop()
        await srv.stop()


async def amain(args: argparse.Namespace) -> dict:
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "command": "python -m bench.storm " + " ".join(args.argv),
                 "peersig_git": git_describe(), "machine": machine_facts(),
                 "somaxconn": int(Path("/proc/sys/net/core/somaxconn").read_text()),
                 "rounds": []}
    configs = [c for c in CONFIGS if c[0] in args.configs]
    for r in range(args.rounds):
        turn = configs[r % len(configs):] + configs[:r % len(configs)]
        runs = []
        for label, kind, backlog in turn:
            log(f"round {r + 1}: {label}, {args.peers} peers at once")
            run = await storm(label, kind, backlog, args, args.peers)
            log(f"  all OPEN after {run['all_open_s']:.2f} s, worst wait "
                f"{run['wait_ms_max']:.0f} ms, {run['failed']} failed, "
                f"{run['syns_dropped']} SYNs dropped")
            runs.append(run)
            await asyncio.sleep(2.0)
        res["rounds"].append(runs)
    return res


def render(res: dict) -> str:
    labels = [run["label"] for run in res["rounds"][0]]
    by_label = {label: [run for rnd in res["rounds"] for run in rnd if run["label"] == label]
                for label in labels}

    def each(runs: list[dict], key: str, fmt: str) -> str:
        return " / ".join(format(run[key], fmt) for run in runs)

    peers = res["rounds"][0][0]["peers"]
    lines = [
        "# A reconnect storm",
        "",
        f"{peers:,} peers ({peers // 4:,} rooms of 4) connecting at once, as after a restart or "
        "a deploy: each figure is one round, rounds in order "
        f"(`{res['command'].strip()}`, {res['date']}, peersig {res['peersig_git']}, "
        f"net.core.somaxconn {res['somaxconn']}).",
        "",
        "| server | all OPEN after (s) | worst wait (ms) | p99 wait (ms) | failed | SYNs dropped "
        "| steal (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, runs in by_label.items():
        lines.append(f"| {label} | {each(runs, 'all_open_s', '.2f')} "
                     f"| {each(runs, 'wait_ms_max', '.0f')} | {each(runs, 'wait_ms_p99', '.0f')} "
                     f"| {each(runs, 'failed', 'd')} | {each(runs, 'syns_dropped', 'd')} "
                     f"| {each(runs, 'steal_pct', '.1f')} |")
    lines += [
        "",
        "- *peersig*: `twistd peersig` as users run it, whose `tcp:` and `ssl:` ports now listen "
        "with a backlog of 4096 (capped by `net.core.somaxconn`); *peersig backlog=50*: the same "
        "with `backlog=50` in its `--port`, Twisted's default and so peersig's before; "
        "*reference*: npm `peer` 1.0.2 (Node's backlog, 511).",
        "- *wait*: from the client's `connect()` to its OPEN; a dropped SYN is retransmitted "
        "after 1 s, then 2 s more. *SYNs dropped*: the kernel's TcpExtListenOverflows over the "
        "round (all of this machine's listening sockets; nothing else listens under load here; a "
        "SYN dropped again on its retransmit counts again).",
        "- Server on CPU 0, generator (`bench/loadgen.py`, uvloop) on CPU 1; a fresh server per "
        "round; the servers take turns going first.",
        "",
        f"Raw results (git-ignored): `{res.get('raw', '')}`.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", type=lambda s: s.split(","),
                    default=[c[0] for c in CONFIGS],
                    help="which of: " + ", ".join(c[0] for c in CONFIGS))
    ap.add_argument("--workers", type=int, default=2, help="generator processes")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--render", metavar="RAW_JSON",
                    help="only re-render the report from a saved run")
    args = ap.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    args.server_cpu, args.gen_cpu = (0, 1) if cpu_affinity_ok() else (None, None)
    args.loop = "uvloop"
    args.connect_concurrency = args.peers  # every peer at once
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        render_appendix(DOC, render, json.loads(Path(args.render).read_text()))
        return 0
    args.fd_limit = raise_nofile()
    if args.gen_cpu is not None:
        os.sched_setaffinity(0, {args.gen_cpu})
    if any(c[1] == "reference" and c[0] in args.configs for c in CONFIGS):
        ensure_node_packages(with_ws=False)
    if not ensure_uvloop():
        args.loop = "asyncio"
    run_appendix(amain(args), "storm", DOC, render, args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
