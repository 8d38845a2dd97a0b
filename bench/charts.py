"""Charts for docs/benchmarks.md: SVG files drawn with matplotlib from a run's results.

``draw(res, outdir)`` writes what the run has figures for and returns (title, file name)
pairs for the report to link, in order:

- CPU at rest: server CPU (% of one core, schedstat) in the idle scenarios, ws and wss,
  with independent heartbeats and with sliced ones;
- relay: server CPU per relayed message (µs), user and system, ws and wss;
- latency: round-trip percentiles (ms) at the offered rate, ws and wss.

Each chart shows peersig beside the reference. Without matplotlib (``ensure_matplotlib``
installs it from PyPI, as ``bench.run`` does uvloop) the report has no charts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

SERVERS = (("peersig", "#1f77b4"), ("reference", "#ff7f0e"))


def ensure_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"])
    return r.returncode == 0


def _get(runs: dict, scenario: str, server: str, key: str) -> float | None:
    value = runs.get(scenario, {}).get(server, {}).get(key)
    return value if isinstance(value, (int, float)) else None


def _bars(ax: Any, groups: list[str], values: dict[str, list[float | None]],
          unit: str) -> None:
    """Grouped bars, one per server in each group, labelled with their value."""
    width = 0.38
    for i, (server, colour) in enumerate(SERVERS):
        xs = [g + (i - 0.5) * width for g in range(len(groups))]
        heights = [v or 0.0 for v in values[server]]
        bars = ax.bar(xs, heights, width, label=server, color=colour)
        for bar, v in zip(bars, values[server], strict=True):
            if v is not None:
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(unit)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)


def _idle(runs: dict) -> tuple[str, Any] | None:
    cases = [(f"{label}\n{model}", f"{prefix}idle{suffix}")
             for prefix, label in (("", "ws"), ("wss-", "wss"))
             for suffix, model in (("", "independent"), ("-sliced", "sliced"))]
    cases = [(g, sc) for g, sc in cases if sc in runs]
    if not cases:
        return None
    import matplotlib.pyplot as plt

    peers = next((v for _, sc in cases if (v := _get(runs, sc, "peersig", "peers"))), None)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    _bars(ax, [g for g, _ in cases],
          {s: [_get(runs, sc, s, "server_cpu_pct") for _, sc in cases] for s, _ in SERVERS},
          "server CPU, % of one core")
    title = f"CPU at rest: {int(peers):,} peers heartbeating every 5 s" if peers else \
        "CPU at rest"
    ax.set_title(title, fontsize=10)
    return title, fig


def _relay(runs: dict) -> tuple[str, Any] | None:
    cases = [(label, sc) for label, sc in (("ws", "relay"), ("wss", "wss-relay")) if sc in runs]
    if not cases:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.38
    for i, (server, colour) in enumerate(SERVERS):
        for g, (_, sc) in enumerate(cases):
            user = _get(runs, sc, server, "server_user_us_per_msg")
            system = _get(runs, sc, server, "server_sys_us_per_msg")
            if user is None or system is None:
                continue
            x = g + (i - 0.5) * width
            ax.bar(x, user, width, color=colour, label=server if g == 0 else None)
            ax.bar(x, system, width, bottom=user, color=colour, alpha=0.45,
                   label=f"{server}, system" if g == 0 else None)
            ax.annotate(f"{user + system:.3g}", (x, user + system), ha="center", va="bottom",
                        fontsize=8)
    ax.set_xticks(range(len(cases)), [label for label, _ in cases])
    ax.set_ylabel("server CPU per relayed message, µs")
    ax.legend(frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    title = "Relay: CPU per message, closed loop (user, then system time)"
    ax.set_title(title, fontsize=10)
    return title, fig


def _latency(runs: dict) -> tuple[str, Any] | None:
    cases = [(label, sc) for label, sc in (("ws", "latency"), ("wss", "wss-latency"))
             if sc in runs]
    if not cases:
        return None
    import matplotlib.pyplot as plt

    keys = (("p50", "rtt_ms_p50"), ("p99", "rtt_ms_p99"), ("max", "rtt_ms_max"))
    groups = [f"{label} {name}" for label, _ in cases for name, _ in keys]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    _bars(ax, groups, {s: [_get(runs, sc, s, key) for _, sc in cases for _, key in keys]
                       for s, _ in SERVERS}, "round trip, ms")
    ax.set_yscale("log")
    rate = next((v for _, sc in cases
                 if (v := _get(runs, sc, "peersig", "offered_msgs_per_s"))), None)
    title = "Latency: round trip (two relays) at " + \
        (f"{int(rate):,} relayed msg/s offered" if rate else "the offered rate")
    ax.set_title(title, fontsize=10)
    return title, fig


def draw(res: dict, outdir: Path) -> list[tuple[str, str]]:
    """Write the run's charts into ``outdir`` as SVG; (title, file name) of each."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Reproducible SVG: no date, fixed ids, text as text.
    plt.rcParams.update({"svg.hashsalt": "peersig", "svg.fonttype": "none"})
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in (("idle", _idle), ("relay", _relay), ("latency", _latency)):
        try:
            chart = make(res["runs"])
        except Exception as e:  # a chart lost must not lose the report
            print(f"bench.charts: {name} not drawn: {e!r}", file=sys.stderr)
            continue
        if chart is None:
            continue
        title, fig = chart
        fig.tight_layout()
        path = outdir / f"{name}.svg"
        fig.savefig(path, format="svg", metadata={"Date": None})
        plt.close(fig)
        written.append((title, path.name))
    return written
