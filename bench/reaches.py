"""What each private reach buys (``peersig/upstream``): peersig with every reach, then with
each optional one switched off (``PEERSIG_WITHOUT_REACH``), then with all of them off, on the
same scenarios, in interleaved rounds; the medians, and each figure's change against all on.

Usage (from the repository root; ~25 min on a quiet 2-core machine)::

    python -m bench.reaches                 # writes docs/benchmarks-reaches.md
    python -m bench.reaches --rounds 1 --no-doc
    python -m bench.reaches --extra NAME=PATH   # also a checkout at PATH (PYTHONPATH), e.g.
                                                # one that still uses a removed reach

Each configuration is one ``python -m bench`` run of peersig alone: connect (CPU and RSS per
peer), relay (CPU per message) and idle, over ws and wss.
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

# (label, figure key in a bench run, scenario, unit, digits)
FIGURES = (
    ("relay CPU per message, ws", "relay", "server_us_per_msg", "µs", 1),
    ("relay CPU per message, wss", "wss-relay", "server_us_per_msg", "µs", 1),
    ("CPU per connect, ws", "connect{n}", "cpu_ms_per_connect", "ms", 3),
    ("CPU per connect, wss", "wss-connect{n}", "cpu_ms_per_connect", "ms", 3),
    ("RSS per peer, ws", "connect{n}", "rss_kib_per_peer", "KiB", 2),
    ("RSS per peer, wss", "wss-connect{n}", "rss_kib_per_peer", "KiB", 2),
    ("idle CPU, ws", "idle", "server_cpu_pct", "%", 2),
)


def one_run(label: str, env: dict[str, str], args: argparse.Namespace) -> dict:
    out = RESULTS / "reaches" / f"{label}-{time.strftime('%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    before = set(RESULTS.glob("run-*.json"))
    command = [sys.executable, "-m", "bench", "--servers", "peersig",
               "--scenarios", "connect,relay,idle", "--connect-sizes", str(args.peers),
               "--wss-connect-sizes", str(args.peers), "--connect-rounds", "1",
               "--relay-seconds", str(args.seconds), "--idle-peers", str(args.peers),
               "--idle-seconds", str(args.seconds), "--doc", str(out)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    (raw,) = set(RESULTS.glob("run-*.json")) - before
    runs = json.loads(raw.read_text())["runs"]
    figures = {}
    for name, scenario, key, _unit, _digits in FIGURES:
        figures[name] = runs.get(scenario.format(n=args.peers), {}).get("peersig", {}).get(key)
    log(f"{label}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items() if v is not None))
    return figures


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.reaches", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peers", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    configs: dict[str, dict[str, str]] = {"all reaches": {}}
    for name in optional():
        configs[f"without {name}"] = {"PEERSIG_WITHOUT_REACH": name}
    configs["without every optional reach"] = {"PEERSIG_WITHOUT_REACH": ",".join(optional())}
    for extra in a.extra:
        name, _, path = extra.partition("=")
        configs[name] = {"PYTHONPATH": path}
    results: dict[str, list[dict]] = {label: [] for label in configs}
    for round_no in range(a.rounds):
        for label, extra_env in configs.items():
            log(f"round {round_no + 1}/{a.rounds}: {label}")
            env = {**os.environ, **extra_env}
            results[label].append(one_run(label.replace(" ", "_"), env, a))
    medians = {label: {name: statistics.median(v) if (v := [r[name] for r in runs
                                                             if r[name] is not None]) else None
                       for name, *_ in FIGURES}
               for label, runs in results.items()}
    res = {"args": vars(a), "rounds": results, "medians": medians,
           "reaches": {n: REACHES[n]._asdict() for n in REACHES}}
    raw = RESULTS / f"reaches-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw.write_text(json.dumps(res, indent=1))
    log(f"raw results: {raw}")
    text = render(res)
    print(text)
    if not a.no_doc:
        render_appendix(DOC, lambda _r: text, res)


def render(res: dict) -> str:
    medians = res["medians"]
    base = medians["all reaches"]
    a = res["args"]
    lines = ["# What each private reach buys", "",
             f"`python -m bench.reaches` ({a['rounds']} interleaved rounds, medians; "
             f"{a['peers']} peers connected, relay and idle windows of {a['seconds']} s; "
             "peersig alone). Each row switches reaches off with `PEERSIG_WITHOUT_REACH`; the "
             "change is against all reaches on (positive: the reach saves that much). The "
             "required reaches (`peersig/upstream/__init__.py`) have no switch.", "",
             "| configuration | " + " | ".join(f"{n} ({u})" for n, _s, _k, u, _d in FIGURES)
             + " |",
             "|---|" + "---|" * len(FIGURES)]
    for label, figures in medians.items():
        cells = []
        for name, _s, _k, _u, digits in FIGURES:
            value, ref = figures.get(name), base.get(name)
            if value is None:
                cells.append("n/a")
            elif label == "all reaches" or not ref:
                cells.append(f"{value:.{digits}f}")
            else:
                cells.append(f"{value:.{digits}f} ({(value - ref) / ref * 100:+.0f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Every round's figures are in the raw results (`bench/results/reaches-*.json`)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
