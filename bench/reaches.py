"""What each private reach buys (``peersig/upstream``): for each optional reach, runs of
peersig with every reach and with that one switched off (``PEERSIG_WITHOUT_REACH``), back to
back in pairs whose order alternates, so that the machine's slow drift cancels; the median of
each figure and of the pairs' ratios.

Usage (from the repository root; ~40 min on a quiet 2-core machine)::

    python -m bench.reaches                 # writes docs/benchmarks-reaches.md
    python -m bench.reaches --pairs 2 --reaches write_now --no-doc

Each run is one ``python -m bench`` of peersig alone: connect (CPU and RSS per peer) and relay
(CPU per message), over ws and wss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.run import RESULTS, ROOT, log, render_appendix

DOC = ROOT / "docs" / "benchmarks-reaches.md"
sys.path.insert(0, str(ROOT))
from peersig.upstream import REACHES, optional  # noqa: E402

# (label, scenario in a bench run, figure, unit, digits)
FIGURES = (
    ("relay CPU per message, ws", "relay", "server_us_per_msg", "µs", 1),
    ("relay CPU per message, wss", "wss-relay", "server_us_per_msg", "µs", 1),
    ("CPU per connect, ws", "connect{n}", "cpu_ms_per_connect", "ms", 3),
    ("CPU per connect, wss", "wss-connect{n}", "cpu_ms_per_connect", "ms", 3),
    ("RSS per peer, ws", "connect{n}", "rss_kib_per_peer", "KiB", 2),
    ("RSS per peer, wss", "wss-connect{n}", "rss_kib_per_peer", "KiB", 2),
)


def one_run(off: str, args: argparse.Namespace) -> dict[str, float | None]:
    before = set(RESULTS.glob("run-*.json"))
    command = [sys.executable, "-m", "bench", "--servers", "peersig",
               "--scenarios", "connect,relay", "--connect-sizes", str(args.peers),
               "--wss-connect-sizes", str(args.peers), "--connect-rounds", "1",
               "--relay-rounds", "1", "--relay-seconds", str(args.seconds), "--no-doc"]
    env = {**os.environ, "PEERSIG_WITHOUT_REACH": off}
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    (raw,) = set(RESULTS.glob("run-*.json")) - before
    runs = json.loads(raw.read_text())["runs"]
    return {name: runs.get(scenario.format(n=args.peers), {}).get("peersig", {}).get(key)
            for name, scenario, key, _unit, _digits in FIGURES}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.reaches",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--peers", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--reaches", default=",".join(optional()),
                    help="optional reaches to measure (default: all)")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    reaches = [r for r in a.reaches.split(",") if r]
    results: dict[str, list[tuple[dict, dict]]] = {r: [] for r in reaches}
    for reach in reaches:
        for n in range(a.pairs):
            log(f"{reach}: pair {n + 1}/{a.pairs}")
            order = ("", reach) if n % 2 == 0 else (reach, "")
            got = {off: one_run(off, a) for off in order}
            results[reach].append((got[""], got[reach]))
            log(f"{reach}: " + ", ".join(f"{k} {got[''][k]} -> {got[reach][k]}"
                                        for k in got[""] if got[""][k] is not None))
    res = {"args": vars(a), "pairs": results,
           "reaches": {n: REACHES[n]._asdict() for n in REACHES}}
    raw = RESULTS / f"reaches-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps(res, indent=1))
    log(f"raw results: {raw}")
    text = render(res)
    print(text)
    if not a.no_doc:
        render_appendix(DOC, lambda _r: text, res)


def render(res: dict) -> str:
    a = res["args"]
    lines = ["# What each private reach buys", "",
             f"`python -m bench.reaches`: for each optional reach, {a['pairs']} pairs of runs "
             f"of peersig alone ({a['peers']} peers connected, relay windows of "
             f"{a['seconds']} s), one with every reach and one with that reach switched off "
             "(`PEERSIG_WITHOUT_REACH`), back to back, the order alternating. Each cell: the "
             "median with the reach, the median without it, and the median of the pairs' "
             "ratios (without / with) with their range. The required reaches "
             "(`peersig/upstream/__init__.py`) have no switch; what they buy is said there.",
             "", "| reach | " + " | ".join(f"{n} ({u})" for n, _s, _k, u, _d in FIGURES) + " |",
             "|---|" + "---|" * len(FIGURES)]
    for reach, pairs in res["pairs"].items():
        cells = []
        for name, _s, _k, _u, digits in FIGURES:
            both = [(on[name], off[name]) for on, off in pairs
                    if on[name] is not None and off[name] is not None]
            if not both:
                cells.append("n/a")
                continue
            ratios = [off / on for on, off in both if on]
            with_, without = (statistics.median(x) for x in zip(*both, strict=True))
            cells.append(f"{with_:.{digits}f} → {without:.{digits}f}, "
                         f"×{statistics.median(ratios):.2f} "
                         f"({min(ratios):.2f}-{max(ratios):.2f})")
        lines.append(f"| `{reach}` | " + " | ".join(cells) + " |")
    lines += ["", "Every pair's figures are in the raw results (`bench/results/reaches-*.json`)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
