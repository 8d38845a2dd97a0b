"""Turn one run's results (``bench/results/run-*.json``) into ``docs/benchmarks.md``.

``python -m bench.report RUN.json [MORE.json ...] [-o out.md]`` re-renders saved runs; with
several, a later run's (scenario, server) results replace an earlier one's, and the report
lists every command that contributed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _num(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "—"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 100):
        return f"{int(v):,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _check(ok: bool | None) -> str:
    if ok is None:
        return ""
    return "yes" if ok else "**no**"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class Table:
    """Rows of the results table. With ``repeats`` (``merge_repeats``: each figure of each
    run), a row's cells give the median and, in brackets, the spread (lowest to highest);
    its ratio is the median of the runs' own ratios, and its target is met only when it is
    met in every run."""

    def __init__(self, runs: dict, repeats: dict | None = None) -> None:
        self.runs = runs
        self.repeats = repeats or {}
        self.rows: list[str] = []

    def each_run(self, scenario: str, server: str, key: str) -> list:
        return self.repeats.get(scenario, {}).get(server, {}).get(key, [])

    def get(self, scenario: str, server: str, key: str):
        r = self.runs.get(scenario, {}).get(server)
        if not r or "error" in r:
            return None
        if key.startswith("gen."):
            return r.get("generator_status", {}).get(key[4:])
        return r.get(key)

    def row(self, label: str, scenario: str, key: str, digits: int = 1,
            target: str = "", better: str | None = None, limit: float | None = None,
            fmt=None) -> None:
        """``better`` is "lower" or "higher"; ``limit`` the ratio the target allows."""
        p = self.get(scenario, "peersig", key)
        r = self.get(scenario, "reference", key)
        f = fmt or (lambda v: _num(v, digits))
        ps, rs = self.each_run(scenario, "peersig", key), self.each_run(scenario, "reference", key)
        paired = self.get(scenario, "peersig", "paired_key") == key
        if len(ps) > 1 or len(rs) > 1:
            # The runs' own ratios: run i's peersig against run i's reference, or paired,
            # each run's median of its pairs' ratios (bench.run.paired_ratio).
            ratios = [p / r for p, r in zip(ps, rs, strict=False) if p is not None and r]
            medians = None
            if paired:
                medians = ratios
                ratios = [q for q in self.each_run(scenario, "peersig", "paired_ratio")
                          if q is not None]
            self._spread_row(label, ps, rs, f, target, better, limit, ratios, medians)
            return
        q = p / r if p is not None and r else None
        ratio = "—" if q is None else f"{q:.2f}×"
        if paired and q is not None:
            q = self.get(scenario, "peersig", "paired_ratio")
            ratio = f"{q:.2f}× (pairs; of the medians {ratio})"
        met = None
        if better and limit is not None and q is not None:
            met = q <= limit if better == "lower" else q >= limit
        self.rows.append(f"| {label} | {f(p)} | {f(r)} | {ratio} | {target} "
                         f"| {_check(met)} |")

    def _spread_row(self, label: str, ps: list, rs: list, f, target: str,
                    better: str | None, limit: float | None, ratios: list[float],
                    medians: list[float] | None) -> None:
        """``ratios``: each run's; ``medians``, when ``ratios`` are paired ratios, each
        run's ratio of the two servers' median rounds, shown beside them."""
        def cell(vs: list) -> str:
            got = [v for v in vs if v is not None]
            if not got:
                return "—"
            if len(got) == 1:
                return f(got[0])
            return f"{f(_median(got))} ({f(min(got))}–{f(max(got))})"

        ratio = "—"
        if ratios:
            ratio = f"{_median(ratios):.2f}×"
            if len(ratios) > 1:
                ratio += f" ({min(ratios):.2f}–{max(ratios):.2f}×)"
            if medians:
                ratio += (f" (pairs; of the medians {min(medians):.2f}–"
                          f"{max(medians):.2f}×)")
        met_text = ""
        if better and limit is not None and ratios:
            met_in = sum(1 for q in ratios if (q <= limit if better == "lower" else q >= limit))
            met_text = f"{_check(met_in == len(ratios))} ({met_in} of {len(ratios)})"
        self.rows.append(f"| {label} | {cell(ps)} | {cell(rs)} | {ratio} | {target} "
                         f"| {met_text} |")

    def raw(self, label: str, p: str, r: str, ratio: str = "", target: str = "",
            met: bool | None = None) -> None:
        self.rows.append(f"| {label} | {p} | {r} | {ratio} | {target} | {_check(met)} |")

    def rounds_row(self, label: str, scenario: str, key: str, digits: int) -> None:
        """Each round's figure, when the scenario ran in rounds, and in how many of them
        peersig's was the lower."""
        per = [self.get(scenario, k, "rounds") or [] for k in ("peersig", "reference")]
        if max(len(per[0]), len(per[1])) < 2:
            return

        def each(rs: list) -> str:
            return " / ".join(_num(r.get(key), digits) for r in rs)
        pairs = [x[key] / y[key] for x, y in zip(*per, strict=False)
                 if x.get(key) is not None and y.get(key)]
        lower = sum(1 for q in pairs if q < 1)
        ratios = ", ".join(f"{q:.2f}×" for q in pairs)
        self.raw(label, each(per[0]), each(per[1]),
                 f"lower in {lower} of {len(per[0])} ({ratios})")

    def section(self, title: str) -> None:
        self.rows.append(f"| **{title}** | | | | | |")


def windows(a: dict, scenario: str) -> str:
    """The windows of a scenario run in rounds (relay, idle): how many, how long, and
    that the median round is shown; only the length for a run made before rounds."""
    rounds, secs = a.get(f"{scenario}_rounds", 1), a[f"{scenario}_seconds"]
    return f"{rounds} × {secs:g} s, the median round" if rounds > 1 else f"{secs:g} s"


def idle_rows(t: Table, runs: dict, scenario: str, target: float) -> None:
    """Server CPU at rest (schedstat) against the target ratio, the sliced and silent
    models' figures beside it when those scenarios ran, and RSS."""
    t.row("server CPU, % of one core (schedstat)", scenario, "server_cpu_pct", 2,
          f"≤ {target:.1f}×", "lower", target)
    t.rounds_row("server CPU of each round, %", scenario, "server_cpu_pct", 2)
    if f"{scenario}-sliced" in runs:
        t.row("the same with heartbeats sent in 50 slices of 100 ms, % of one core",
              f"{scenario}-sliced", "server_cpu_pct", 2)
    if f"{scenario}-silent" in runs:
        t.row("the same with no heartbeats (silent peers: the server's pings and their "
              "pongs), % of one core", f"{scenario}-silent", "server_cpu_pct", 2)
    t.row("server RSS, MiB", scenario, "rss_kib", 1,
          fmt=lambda v: _num(v / 1024 if v else None, 1))


def charts_section(charts: list[tuple[str, str]], folder: str) -> list[str]:
    """Links to the SVG charts ``bench.charts`` drew, beside the tables they picture."""
    if not charts:
        return []
    out = ["## Charts", "",
           "Drawn by `bench/charts.py` from the figures above (peersig in blue, the reference "
           "in orange).", ""]
    for title, name in charts:
        out += [f"![{title}]({folder}/{name})", ""]
    return out


def render(res: dict, raw_path: Path | None = None,
           charts: list[tuple[str, str]] | None = None, chart_folder: str = "") -> str:
    m = res["machine"]
    runs = res["runs"]
    a = res["args"]
    out: list[str] = []
    w = out.append
    w("# Benchmarks: peersig against the reference PeerJS server")
    w("")
    w("Generated by `bench/` (issue 4). Both servers ran on the same machine in the same run, "
      "each scenario against a fresh server process. Ratios are peersig / reference; the "
      "targets are the ones issue 4 sets.")
    w("")
    w(f"- **Date:** {res['started']} (UTC); "
      + ("the runs took " if res.get("commands") and len(res["commands"]) > 1
         else "the whole run took ")
      + f"{res.get('total_seconds', 0) / 60:.1f} min (most of it waiting for a quiet "
      "machine, see below).")
    cmds = res.get("commands") or [res["command"]]
    if len(cmds) == 1:
        w(f"- **Command:** `{cmds[0]}` (from the repository root).")
    elif res.get("repeats"):
        w(f"- **Commands:** {len(cmds)} runs of `{cmds[0]}` (from the repository root), "
          "each against fresh servers; each figure below is the median of the runs, with "
          "their spread (lowest–highest) in brackets, and each ratio the median of the "
          "runs' own ratios. Rows built from nested figures (each round of a scenario, the "
          "generator's status) and the text outside the tables are the first run's.")
    else:
        w("- **Commands** (from the repository root; the later ones re-ran some scenarios, "
          "whose figures replace the earlier ones): "
          + "; then ".join(f"`{c}`" for c in cmds) + ".")
    w(f"- **Machine:** {m['cpu']}, {m['cores']} vCPUs, {m['memory']}, {m['os']}, "
      f"Linux {m['kernel']} (a Firecracker VM).")
    many = len({r.get("peersig_git") for per in runs.values() for k, r in per.items()
                if k == "peersig" and r.get("peersig_git")}) > 1
    w(f"- **Versions:** peersig {m['peersig']} "
      + ("(at the revisions listed under the table)" if many else f"(git {m['git']})")
      + f", Python {m['python']}, "
      f"Twisted {m['twisted']}, Autobahn {m['autobahn']}; reference: npm `peer` {m['peer']} "
      f"on Node {m['node']} with `ws` {m['ws_in_reference']} (no `bufferutil`); "
      f"generator: `bench/loadgen.py` on uvloop {m['uvloop']}, {a['workers']} process(es).")
    wk = res.get("wakeup", {})
    if wk:
        w(f"- **Pinning:** server on CPU {a['server_cpu']}, generator and orchestrator on CPU "
          f"{a['gen_cpu']}. On this VM waking an idle vCPU is slow: a one-byte socketpair "
          f"round trip takes {wk['same']['p50_us']:.0f} µs (p50) / "
          f"{wk['same']['p99_us']:.0f} µs (p99) within one CPU but "
          f"{wk['cross']['p50_us']:.0f} µs / {wk['cross']['p99_us']:.0f} µs across the two "
          "(measured at the start of the run), which weighs on every latency figure below. "
          "Hypervisor steal time on the server's CPU during each window is in the raw "
          "results (`steal_pct_server_cpu`).")
    w("")
    w("## Results")
    w("")
    w("| Metric | peersig | reference | ratio | target | met |")
    w("|---|---:|---:|---:|---|---|")
    t = Table(runs, res.get("repeats"))
    for n in a["sizes"]:
        sc = f"connect{n}"
        if sc not in runs:
            continue
        used = t.get(sc, "peersig", "peers") or t.get(sc, "reference", "peers") or n
        if used != n:
            t.section(f"connect {n:,} peers (rooms of 4): {used:,} used, as the hard "
                      f"descriptor limit here is {a.get('fd_limit', 0):,} per process")
        else:
            t.section(f"connect {n:,} peers (rooms of 4)")
        t.row("server CPU per connect, ms", sc, "cpu_ms_per_connect", 3, "≤ 1.0×", "lower", 1.0)
        t.rounds_row("server CPU per connect of each round, ms", sc, "cpu_ms_per_connect", 3)
        t.row("RSS per connected peer, KiB", sc, "rss_kib_per_peer", 1, "≤ 0.8×", "lower", 0.8)
        p = t.get(sc, "peersig", "failed")
        r = t.get(sc, "reference", "failed")
        pd = t.get(sc, "peersig", "dropped_after_open")
        rd = t.get(sc, "reference", "dropped_after_open")
        tgt = "0 (20,000 in one process)" if n >= 20000 else ""
        met = (p == 0 and pd == 0) if (n >= 20000 and p is not None) else None
        t.raw("failed joins / dropped after OPEN", f"{_num(p)} / {_num(pd)}",
              f"{_num(r)} / {_num(rd)}", "", tgt, met)
        t.row("connects per second", sc, "connects_per_s", 0)
        t.row("join time p50, ms", sc, "join_ms_p50", 1)
        t.row("join time p99, ms", sc, "join_ms_p99", 1)
        t.row("server RSS with all connected, MiB", sc, "rss_kib", 1,
              fmt=lambda v: _num(v / 1024 if v else None, 1))
        t.row("generator CPU per connect, ms", sc, "gen_cpu_ms_per_connect", 3)
        t.row("generator event-loop lag, worst, ms", sc, "gen.max_loop_lag_ms", 0)
    if "relay" in runs:
        t.section(f"relay: {a['relay_peers'] // 4} rooms × 4, pairs ping-pong "
                  f"OFFER/ANSWER (1000-byte SDP), closed loop, {windows(a, 'relay')}")
        t.row("relayed messages/s", "relay", "msgs_per_s", 0, "≥ 1.0×", "higher", 1.0)
        t.row("server CPU, % of one core", "relay", "server_cpu_pct", 0)
        t.row("server CPU per relayed message, µs", "relay", "server_us_per_msg", 1,
              "≤ 1.0×", "lower", 1.0)
        t.rounds_row("server CPU per relayed message of each round, µs", "relay",
                     "server_us_per_msg", 1)
        t.row("… of which user, µs", "relay", "server_user_us_per_msg", 1)
        t.row("… of which system, µs", "relay", "server_sys_us_per_msg", 1)
        t.row("relayed messages/s per core (1 / CPU per message)", "relay",
              "msgs_per_s_at_100pct", 0)
        t.row("closed-loop round trip p50, ms", "relay", "closed_loop_rtt_ms_p50", 1)
        t.row("generator CPU per relayed message, µs", "relay", "gen_us_per_msg", 1)
        t.row("generator CPU, % of one core", "relay", "gen_cpu_pct", 0)
    if "latency" in runs:
        rounds = a.get("latency_rounds", 1)
        t.section(f"latency: {a['latency_rate']:,.0f} relayed messages/s offered "
                  f"(open loop), {rounds} × {a['latency_seconds']:g} s, pooled")
        t.row("relayed messages/s achieved", "latency", "msgs_per_s", 0)
        t.row("round trip p50, ms", "latency", "rtt_ms_p50", 2)
        t.row("round trip p99, ms", "latency", "rtt_ms_p99", 2, "≤ 1.0×", "lower", 1.0)
        t.row("round trip max, ms", "latency", "rtt_ms_max", 1)
        t.rounds_row("round trip p99 of each round, ms", "latency", "rtt_ms_p99", 2)
        t.row("server CPU, % of one core", "latency", "server_cpu_pct", 0)
        t.row("generator CPU, % of one core", "latency", "gen_cpu_pct", 0)
    if "idle" in runs:
        t.section(f"idle: {a['idle_peers']:,} peers heartbeating every 5 s on a timer each "
                  f"(a random phase, as independent browsers), {windows(a, 'idle')}")
        idle_rows(t, runs, "idle", 1.0)
        t.row("WebSocket pings from the server per second", "idle", "pings_per_s", 0)
        t.row("softirq, all CPUs, % of one core (kernel: loopback packets, keepalive timers)",
              "idle", "softirq_pct", 2)
        waited = t.get("idle", "reference", "silent_waited_s") or a.get("silent_wait")

        # Measured in one round (bench/run.py dead_peers): absent if that round failed.
        measured = {k: t.get("idle", k, "silent_waited_s") is not None
                    for k in ("peersig", "reference")}

        def after(key: str) -> tuple[float | None, float | None, str, str]:
            p, r = (t.get("idle", k, key) for k in ("peersig", "reference"))
            notes = {t.get("idle", k, "vanished_note") for k in ("peersig", "reference")}
            note = next((n for n in notes if n), None)

            def show(v: float | None, kind: str) -> str:
                if v is not None:
                    return f"{v:.1f}"
                if not measured[kind]:
                    return "n/a (not measured)"
                return f"n/a ({note})" if note and key.startswith("vanished") else \
                    f"> {waited:g} (not dropped)"
            return p, r, show(p, "peersig"), show(r, "reference")

        p, _, ps, rs = after("vanished_dropped_after_s")
        t.raw("peer whose network vanished: dropped after, s (all its packets lost)", ps, rs,
              "", "≤ 5 s", (p is not None and p <= 5.0) if measured["peersig"] else None)
        _, _, ps, rs = after("silent_dropped_after_s")
        t.raw("peer silent with its TCP up (no heartbeat, no pong): dropped after, s", ps, rs)
        t.row("peers dropped that were heartbeating", "idle", "drops", 0)
        t.row("generator CPU, % of one core", "idle", "gen_cpu_pct", 1)
        t.row("generator event-loop lag, worst, ms", "idle", "gen.max_loop_lag_ms", 0)
    if "churn" in runs:
        t.section(f"churn: {a['churn_peers']:,} peers, {a['churn_rate']:g} leave+join per s "
                  f"for {a['churn_seconds']:g} s")
        t.row("peers replaced", "churn", "joined", 0)
        pf = t.get("churn", "peersig", "failed")
        rf = t.get("churn", "reference", "failed")
        t.raw("failed joins", _num(pf), _num(rf))
        t.row("server CPU per leave+join+offer/answer, ms", "churn", "cpu_ms_per_replacement", 3)
        t.row("RSS before churn, MiB", "churn", "rss_kib_before", 1,
              fmt=lambda v: _num(v / 1024 if v else None, 1))
        t.row("RSS after churn, all closed, same number reconnected, MiB", "churn",
              "rss_kib_after", 1, fmt=lambda v: _num(v / 1024 if v else None, 1))
        p = t.get("churn", "peersig", "rss_growth_pct")
        r = t.get("churn", "reference", "rss_growth_pct")
        t.raw("RSS growth", f"{p:+.1f}%" if p is not None else "—",
              f"{r:+.1f}%" if r is not None else "—", "", "within 10%",
              (abs(p) <= 10) if p is not None else None)
        if t.get("churn", "peersig", "rss_kib_after2") or t.get("churn", "reference",
                                                                 "rss_kib_after2"):
            secs2 = a.get("churn2_seconds", 0)
            t.row(f"RSS after a second churn cycle ({secs2:g} s), same again, MiB", "churn",
                  "rss_kib_after2", 1, fmt=lambda v: _num(v / 1024 if v else None, 1))
        pg = t.get("churn", "peersig", "server_peers_gauge")
        rg = t.get("churn", "peersig", "server_rooms_gauge")
        if pg is not None:
            t.raw("peersig's own count at the end: peers / rooms", f"{pg:,.0f} / {rg:,.0f}",
                  "", "", f"{a['churn_peers']:,} / {a['churn_peers'] // 4:,}",
                  pg == a["churn_peers"] and rg == a["churn_peers"] // 4)
    out.extend(t.rows)
    w("")
    if any(sc.startswith("wss-") for sc in runs):
        out.extend(wss_section(res))
    out.extend(charts_section(charts or [], chart_folder))
    loads = []
    for sc, per in runs.items():
        for kind in ("peersig", "reference"):
            r = per.get(kind)
            if r and "error" not in r and "other_load_pct" in r:
                loads.append(f"{sc}/{kind} {r['other_load_pct']:.0f}%"
                             + (f" (best of {r['attempts']})" if r.get("attempts", 1) > 1 else ""))
    revs = sorted({r.get("peersig_git") for per in runs.values()
                   for k, r in per.items() if k == "peersig" and r.get("peersig_git")})
    if len(revs) > 1:
        inferred = any("(HEAD when" in r for r in revs)
        merged = len(res.get("commands", [])) > 1
        w(("The runs merged here measured different peersig revisions"
           if merged else "peersig changed while this suite ran (others were committing)")
          + "; the peersig revision of each scenario: " + ", ".join(
              f"{sc} {per['peersig']['peersig_git'].split(' (HEAD when')[0]}"
              + ("*" if "(HEAD when" in per["peersig"]["peersig_git"] else "")
              for sc, per in runs.items() if per.get("peersig", {}).get("peersig_git"))
          + "." + (" (* HEAD when the scenario started, read from commit times.)"
                   if inferred else ""))
        w("")
    if loads:
        w(f"The benchmark's processes (servers, generator) ran at nice {a.get('nice', 0)}. "
          "CPU used by processes outside the benchmark during each measured window (this "
          "machine is shared with other people's test runs; each scenario waited up to "
          f"{a.get('quiet_max_wait', 0):g} s for a quiet machine and was measured again, up "
          f"to {a.get('retries', 0)} more times, when this exceeded "
          f"{a.get('max_interference', 0):g}% of a CPU, or when the hypervisor stole more "
          f"than {a.get('max_steal', 100):g}% of the server's or the generator's CPU; the "
          "attempt least disturbed is reported): " + ", ".join(loads) + ".")
        w("")
    w("Reading the table: *CPU* is the server process's utime+stime from `/proc/PID/stat` "
      "over the measured window (all threads, so Node's GC helpers count); *RSS* is `VmRSS` "
      "from `/proc/PID/status`; *RSS per connected peer* is (RSS with all peers connected "
      "and 2 s settled − RSS of the fresh server) / peers. A round trip is OFFER from A, "
      "relayed to B, ANSWER from B, relayed back to A, timed in the generator, so it holds "
      "two relays. *Failed joins* are connections that got no `OPEN` (an ERROR, a close or "
      "no answer in 15 s); *dropped after OPEN* are peers the server disconnected while "
      "they heartbeated and answered pings.")
    w("")
    w(problems_section(res))
    w(method_section(res))
    if res.get("generators"):
        w(generator_section(res))
    if res.get("profile") and res["profile"].get("top"):
        w(profile_section(res))
    if raw_path is not None:
        try:
            rel = raw_path.resolve().relative_to(ROOT)
        except ValueError:
            rel = raw_path
        w(f"Raw results of this run (git-ignored): `{rel}`; server logs in "
          f"`bench/results/logs/{rel.stem.removeprefix('run-')}/`.")
        w("")
    return "\n".join(out)


def wss_section(res: dict) -> list[str]:
    """wss against the reference's own TLS, with issue 12's targets."""
    runs, a = res["runs"], res["args"]
    out = ["## wss: the production path, against the reference's own TLS", "",
           "The same scenarios over TLS: peersig with `--port ssl:PORT:privateKey=key.pem:"
           "certKey=cert.pem`, the reference with `--sslkey key.pem --sslcert cert.pem`, one "
           "self-signed ECDSA P-256 certificate for both (`bench/results/tls/`), TLS 1.3 "
           "negotiated by the generator's OpenSSL with each server's defaults. Targets are "
           "issue 12's.", "",
           "| Metric | peersig | reference | ratio | target | met |",
           "|---|---:|---:|---:|---|---|"]
    t = Table(runs, res.get("repeats"))
    cells: dict[tuple[str, str], float | None] = {}
    for n in a.get("wss_sizes", []):
        sc = f"wss-connect{n}"
        if sc not in runs:
            continue
        t.section(f"wss connect {n:,} peers (rooms of 4, full TLS handshake each)")
        t.row("server CPU per connect, ms", sc, "cpu_ms_per_connect", 3, "≤ 0.8×", "lower", 0.8)
        t.rounds_row("server CPU per connect of each round, ms", sc, "cpu_ms_per_connect", 3)
        t.row("RSS per connected peer, KiB", sc, "rss_kib_per_peer", 1, "≤ 0.5×", "lower", 0.5)
        p, r = t.get(sc, "peersig", "failed"), t.get(sc, "reference", "failed")
        t.raw("failed joins", _num(p), _num(r))
        t.row("join time p99, ms", sc, "join_ms_p99", 1)
    if "wss-relay" in runs:
        t.section(f"wss relay: {a['relay_peers'] // 4} rooms × 4, OFFER/ANSWER (1000-byte SDP), "
                  f"closed loop, {windows(a, 'relay')}")
        t.row("relayed messages/s", "wss-relay", "msgs_per_s", 0)
        t.row("server CPU per relayed message, µs", "wss-relay", "server_us_per_msg", 1,
              "≤ 0.6×", "lower", 0.6)
        t.rounds_row("server CPU per relayed message of each round, µs", "wss-relay",
                     "server_us_per_msg", 1)
        t.row("… of which user, µs", "wss-relay", "server_user_us_per_msg", 1)
        t.row("… of which system, µs", "wss-relay", "server_sys_us_per_msg", 1)
        t.row("relayed messages/s per core", "wss-relay", "msgs_per_s_at_100pct", 0)
        t.row("generator CPU per relayed message, µs", "wss-relay", "gen_us_per_msg", 1)
        ws = t.get("relay", "peersig", "server_us_per_msg")
        wss = t.get("wss-relay", "peersig", "server_us_per_msg")
        if ws and wss:
            t.raw("peersig: CPU per relayed message, wss / ws (µs)", f"{wss:.1f} / {ws:.1f}",
                  "", f"{wss / ws:.2f}×", "≤ 1.3×", wss / ws <= 1.3)
    if "wss-latency" in runs:
        t.section(f"wss latency: {a['latency_rate']:,.0f} relayed messages/s offered, "
                  f"{a.get('latency_rounds', 1)} × {a['latency_seconds']:g} s, pooled")
        t.row("round trip p50, ms", "wss-latency", "rtt_ms_p50", 2)
        t.row("round trip p99, ms", "wss-latency", "rtt_ms_p99", 2, "≤ 1.0×", "lower", 1.0)
        t.row("round trip max, ms", "wss-latency", "rtt_ms_max", 1)
        t.rounds_row("round trip p99 of each round, ms", "wss-latency", "rtt_ms_p99", 2)
        t.row("server CPU, % of one core", "wss-latency", "server_cpu_pct", 0)
    if "wss-idle" in runs:
        t.section(f"wss idle: {a['idle_peers']:,} peers heartbeating every 5 s on a timer "
                  f"each, {windows(a, 'idle')}")
        idle_rows(t, runs, "wss-idle", 0.6)
        t.row("peers dropped that were heartbeating", "wss-idle", "drops", 0)

        def per_beat(sc: str, kind: str) -> float | None:
            cpu, beats = (t.get(sc, kind, k) for k in ("server_cpu_pct", "heartbeats_per_s"))
            return cpu / 100 / beats * 1e6 if cpu and beats else None

        cells.update({(sc, k): per_beat(sc, k) for sc in ("idle", "wss-idle")
                      for k in ("peersig", "reference")})
        if all(cells.values()):
            t.raw("server CPU per heartbeat, ws → wss, µs",
                  f"{cells['idle', 'peersig']:.1f} → {cells['wss-idle', 'peersig']:.1f}",
                  f"{cells['idle', 'reference']:.1f} → {cells['wss-idle', 'reference']:.1f}")
    notes = ["", "Where TLS costs go (see the profile below, taken over wss): "
             "`TLSServer.doRead` and `TLSServer.writeSomeData` hold OpenSSL's `SSL_read` and "
             "`SSL_write` and the system calls under them. Each record costs OpenSSL 3.0 a "
             "fixed few microseconds (a cipher context set up per record, buffers allocated "
             "and released), and without read-ahead, which Python's `ssl` module cannot "
             "switch on, a record takes two system calls (header, then body), where Node "
             "reads a socket once into its own buffer."]
    if cells and all(cells.values()):
        ours = cells["wss-idle", "peersig"] - cells["idle", "peersig"]
        theirs = cells["wss-idle", "reference"] - cells["idle", "reference"]
        ws_ours, ws_theirs = cells["idle", "peersig"], cells["idle", "reference"]
        notes.append(f"A heartbeat is where that weighs most: TLS adds {ours:.1f} µs to each "
                     f"here and {theirs:.1f} µs to the reference's, on top of {ws_ours:.1f} "
                     f"and {ws_theirs:.1f} µs over ws.")
    notes += ["Kernel TLS would take the records out of OpenSSL; this VM's kernel has no `tls` "
              "module to measure it with.", ""]
    return [*out, *t.rows, *notes]


def _notes(sc: str, r: dict) -> list[str]:
    """What went wrong in one result (a scenario's, or one round's)."""
    notes = []
    for k in ("failed", "connect_failed", "initial_failed", "reconnect_failed"):
        if r.get(k):
            notes.append(f"{k.replace('_', ' ')}: {r[k]}")
    if r.get("failures"):
        notes.append("failure reasons: " + ", ".join(
            f"{k} ×{v}" for k, v in r["failures"].items()))
    for k in ("churn2_failures", "reconnect2_failures"):
        if r.get(k):
            notes.append(k.replace("_", " ") + ": " + ", ".join(
                f"{kk} ×{vv}" for kk, vv in r[k].items()))
    if r.get("reconnect_failures"):
        notes.append("reconnect failure reasons: " + ", ".join(
            f"{k} ×{v}" for k, v in r["reconnect_failures"].items()))
    if r.get("dropped_after_open") or (r.get("drops") and sc != "churn"):
        gs = r.get("generator_status", {})
        notes.append(f"peers dropped by the server: "
                     f"{r.get('dropped_after_open') or r.get('drops')} "
                     f"({gs.get('drop_reasons', {})})")
    gs = r.get("generator_status", {})
    if gs.get("bad_relays"):
        notes.append(f"relays with wrong src/dst/payload: {gs['bad_relays']}")
    if gs.get("proto_errors"):
        notes.append(f"WebSocket protocol errors: {gs['proto_errors']}")
    if r.get("unanswered"):
        notes.append(f"round trips unanswered at the end: {r['unanswered']}")
    mt = r.get("metrics") or {}
    timeouts = mt.get('peersig_disconnections_total{reason="timeout"}', 0)
    if timeouts and "idle" not in sc:  # idle's silent peer is meant to time out
        notes.append(f"peersig's liveness sweep dropped {timeouts:.0f} peers "
                     "(disconnections reason=timeout)")
    rejected = {k.split('"')[1]: v for k, v in mt.items()
                if k.startswith("peersig_connections_total{") and v
                and 'outcome="opened"' not in k}
    if rejected:
        notes.append("peersig rejected joins: " + ", ".join(
            f"{k} ×{v:.0f}" for k, v in rejected.items()))
    srv = r.get("server", {})
    if srv.get("log_problems"):
        notes.append(f"{srv['log_problems']} error lines in the server log, e.g. `"
                     + srv["log_examples"][0].replace("`", "'") + "`")
    if srv.get("killed"):
        notes.append("did not stop within 10 s of SIGTERM (killed)")
    return notes


def problems_section(res: dict) -> str:
    lines = ["## What went wrong under load", ""]
    found = False
    for sc, per in res["runs"].items():
        for kind, r in per.items():
            if "error" in r:
                lines.append(f"- {sc} / {kind}: the scenario failed: `{r['error']}`")
                found = True
                continue
            rounds = r.get("rounds") or []
            for i, x in enumerate(rounds, 1):
                if x.get("error"):
                    lines.append(f"- {sc} / {kind}: round {i} failed: `{x['error']}`")
                    found = True
            # Relay and idle keep their rounds whole: each round's own failures.
            whole = [(f" (round {i})" if len(rounds) > 1 else "", x)
                     for i, x in enumerate(rounds, 1) if "server" in x and not x.get("error")]
            for label, x in whole or [("", r)]:
                notes = _notes(sc, x)
                if notes:
                    found = True
                    lines.append(f"- **{sc} / {kind}{label}:** " + "; ".join(notes))
    if not found:
        lines.append("Nothing: no failed joins, no dropped peers, no wrong relays, no errors "
                     "in either server's log.")
    lines.append("")
    return "\n".join(lines)


def method_section(res: dict) -> str:
    a = res["args"]
    runs = res["runs"]
    cmds = {}
    for per in runs.values():
        for kind, r in per.items():
            if "server_command" in r:
                cmds.setdefault(kind, set()).add(r["server_command"])
    lines = ["## How it was measured", ""]
    lines.append("Servers, as started (PORT is a free port picked per scenario):")
    lines.append("")
    for kind, cs in cmds.items():
        for c in sorted(cs):
            lines.append(f"- {kind}: `{c}`")
    lines += [
        "",
        "peersig's rate limit (100 messages/s per peer by default) is turned off with "
        "`--rate-limit 0` in the relay and latency scenarios only, where a peer sends faster "
        "than a browser would; the other scenarios run with the default. `--max-peers-per-ip "
        "0` (no per-address cap) is needed because every peer comes from loopback. The "
        "reference server has no rate limit and no per-address cap; its `--concurrent_limit` "
        "is raised from 5000 to 30000.",
        "",
        "Scenarios (all peers are generator peers speaking the stock client's wire protocol: "
        "`ws://127.0.0.1:PORT/peerjs?key=peerjs&id=ID&token=ROOM&version=1.5.5`, `HEARTBEAT` "
        "every 5 s starting 5 s after `OPEN`, pongs for the server's pings, a clean "
        "WebSocket close when leaving; sockets are spread over source addresses "
        "127.0.0.2–9):",
        "",
        f"- **connect N:** N peers join in rooms of 4, {a['connect_concurrency']} joins in "
        "flight per generator process. CPU is counted from the first connect to the last "
        f"`OPEN`, in {a.get('connect_rounds', 1)} rounds per server (alternating which "
        "server goes first, a fresh server each time), and divided by all the rounds' "
        "connects together; then the peers stay connected "
        f"{a['settle'] + a['hold']:g} s (heartbeats, pings) to catch drops.",
        f"- **relay:** {a['relay_peers']} peers in rooms of 4; in each room slots 0↔1 and "
        "2↔3 ping-pong: A sends OFFER to B, B answers with ANSWER, A sends the next OFFER on "
        "receipt (one message in flight per pair). The payload is what the stock client "
        "sends for a data connection, with a 1000-byte string in `payload.sdp.sdp` (frames "
        f"of ~1.2 KB). {a['warmup']:g} s warm-up, then a {a['relay_seconds']:g} s window"
        + rounds_text(a, "relay") + ". Every peer checks the first relay it receives in "
        "full (type, src, dst, payload) and the length of every later one.",
        f"- **latency:** the same {a['relay_peers']} peers; the offering side sends "
        f"{a['latency_rate'] / 2:,.0f} OFFERs/s round robin over the pairs on a 1 ms timer "
        "(open loop: a late answer does not delay the next offer), each answered at once, "
        f"i.e. {a['latency_rate']:,.0f} relayed messages/s offered. Round trip = OFFER "
        f"written → ANSWER read. {a.get('latency_rounds', 1)} rounds per server, "
        "alternating which server goes first, each on a fresh server: "
        f"{a['warmup']:g} s warm-up, then a {a['latency_seconds']:g} s window; the "
        "percentiles are those of every round trip of all rounds together.",
        f"- **idle:** {a['idle_peers']:,} peers connected, {a['idle_settle']:g} s settle, "
        f"then a {a['idle_seconds']:g} s window with nothing but heartbeats (and "
        "whatever the server sends on its own: peersig pings a peer that misses a "
        "heartbeat, which the generator answers as a browser does, and leaves the network "
        "to the kernel's TCP keepalive). After the window (over ws, in the first "
        "round of the first heartbeat model), two extra peers time how long the server "
        "keeps a dead peer: one whose network vanishes after a HEARTBEAT (bench/vanish.py drops "
        "all its packets with nftables; `ss` shows when the server's end of the connection "
        "is no longer established), and one that goes silent but keeps its TCP connection "
        "(no heartbeats, no pongs: a hung client)" + rounds_text(a, "idle") + ".",
        f"- **churn:** {a['churn_peers']:,} peers connected; then for "
        f"{a['churn_seconds']:g} s, {a['churn_rate']:g} times a second a random peer leaves "
        "(90% with a WebSocket close 1001, as a closed page, 10% with a bare TCP close, whose "
        "seat peersig keeps for its 10-s reconnect grace) and a newcomer with a fresh id "
        "joins the same room (trying again each second while it is full) and sends an "
        "OFFER to a room-mate, who answers. Then every "
        "peer closes, and the same number of fresh peers connect; RSS is compared with "
        "the RSS before the churn (same number of peers connected, both 2 s settled).",
        "",
    ]
    return "\n".join(lines)


def rounds_text(a: dict, scenario: str) -> str:
    """How a scenario's rounds make its figure, for the method text."""
    rounds = a.get(f"{scenario}_rounds", 1)
    if rounds < 2:
        return ""
    return (f"; {rounds} rounds per server, alternating which server goes first, each on a "
            "fresh server. The figures are those of each server's median round (by CPU); a "
            "ratio marked (pairs) is the median of each pair's ratio (round i of peersig "
            "against round i of the reference, run one after the other), so that a slow "
            "stretch of the machine weighs on both sides of a ratio and one slow window does "
            "not decide it")


def generator_section(res: dict) -> str:
    lines = ["## Why this load generator", "",
             "The generator must not be the bottleneck: on this 2-vCPU machine it has one CPU "
             "for itself while the server has the other. Candidates, each driving the relay "
             f"scenario against the {res['args']['compare_server']} server for "
             f"{res['args']['compare_seconds']:g} s, one after the other:", "",
             "| generator | its CPU per relayed message, µs (user + sys) | its CPU, % of "
             "one core | relayed msg/s | server CPU, % | other processes' CPU, % |",
             "|---|---:|---:|---:|---:|---:|"]
    for g in res["generators"]:
        lines.append(f"| {g['generator']} | {g['gen_us_per_msg']:.1f} "
                     f"({g['gen_user_us_per_msg']:.1f} + {g['gen_sys_us_per_msg']:.1f}) "
                     f"| {g['gen_cpu_pct']:.0f} | {g['msgs_per_s']:,.0f} "
                     f"| {g['server_cpu_pct']:.0f} | {g.get('other_load_pct', 0):.0f} |")
    lines += ["",
              "`bench/loadgen.py` on uvloop costs the least per message, so it is the one used "
              "(hand-written WebSocket client on raw `asyncio.Protocol`s, frames built and "
              "masked once per peer, incoming relays recognised by their first bytes). About "
              "half of what it costs is the two system calls per message (one `recv`, one "
              "`send`), which no client can avoid. Each relayed message costs the generator "
              "one receive and one send, the same work as the server, so with the server at "
              "100% of its CPU the generator needs well under 100% of its own; the "
              "`generator CPU` rows of the results table show its load in the suite run "
              "itself. It can run as several processes (`--workers N`), each with its own "
              "source addresses, for connection counts beyond one process's ports or "
              "descriptors.", ""]
    return "\n".join(lines)


def profile_section(res: dict) -> str:
    p = res["profile"]
    lines = ["## Where peersig spends its time under the relay load", "",
             f"py-spy ({p.get('samples', 0):,.0f} samples at 250 Hz, `--nonblocking`) on "
             f"peersig {p.get('peersig_git', '')} during a separate relay run over "
             f"{p.get('transport', 'ws')} "
             f"({p.get('msgs_per_s', 0):,.0f} msg/s, {p.get('server_us_per_msg', 0):.1f} µs "
             f"per message under the profiler, server at {p.get('server_cpu_pct', 0):.0f}% "
             f"of its CPU, other processes {p.get('other_load_pct', 0):.0f}%). "
             "Own time = samples where the function itself "
             "was running (lines of a function merged); total = samples with the function "
             "anywhere on the stack. Full profile: `" + p.get("speedscope", "") +
             "` (git-ignored; open it at speedscope.app). Time in C (OpenSSL's "
             "SSL_read and SSL_write, the system calls under them) counts as the own time "
             "of the Python function that called it.", "",
             "| # | function | file | own % | total % |", "|---:|---|---|---:|---:|"]
    for i, r in enumerate(p["top"][:15], 1):
        lines.append(f"| {i} | `{r['function']}` | {r['file']}:{r['line']} "
                     f"| {r['own_pct']:.1f} | {r['total_pct']:.1f} |")
    lines += ["", "Own time by package: " + ", ".join(
        f"{k} {v:.1f}%" for k, v in p.get("by_package", {}).items()) + ".", ""]
    if p.get("peersig_inclusive"):
        lines.append("peersig's own functions, inclusive of what they call: " + ", ".join(
            f"`{r['function']}` {r['total_pct']:.1f}%" for r in p["peersig_inclusive"][:6])
            + ".")
        lines.append("")
    return "\n".join(lines)


# Reports of the other benchmark commands, one heading level down, so that
# docs/benchmarks.md holds every figure: (file, command that writes it).
APPENDICES = (
    (ROOT / "docs" / "benchmarks-haproxy.md", "python bench/haproxy.py"),
    (ROOT / "docs" / "benchmarks-soak.md", "python -m bench.soak"),
    (ROOT / "docs" / "benchmarks-storm.md", "python -m bench.storm"),
    (ROOT / "docs" / "benchmarks-reaches.md", "python -m bench.reaches"),
    (ROOT / "docs" / "benchmarks-idle.md", "hand, with the commands it gives"),
)
APPENDIX_MARK = "<!-- from docs/benchmarks-"


def appendices() -> str:
    out: list[str] = []
    for doc, command in APPENDICES:
        if not doc.exists():
            continue
        out += ["", f"{APPENDIX_MARK}{doc.name[len('benchmarks-'):]}, written by {command} -->"]
        out += ["#" + line if line.startswith("#") else line
                for line in doc.read_text().splitlines()]
    return "\n".join(out)


def write_report(res: dict, path: Path, raw_path: Path | None = None) -> None:
    """``path`` (docs/benchmarks.md) from a run's results, its charts as SVG files in the
    folder named after it (docs/benchmarks/)."""
    try:
        from .charts import draw, ensure_matplotlib
    except ImportError:  # run as a script: python bench/run.py
        from charts import draw, ensure_matplotlib  # type: ignore[no-redef]

    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.with_suffix("")
    charts = draw(res, folder) if ensure_matplotlib() else []
    path.write_text(render(res, raw_path, charts, folder.name) + "\n" + appendices() + "\n")


def refresh_appendices(path: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Replace the appended reports in an already written docs/benchmarks.md."""
    text = path.read_text() if path.exists() else ""
    head = text.split("\n" + APPENDIX_MARK, 1)[0].rstrip("\n")
    path.write_text(head + "\n\n" + appendices() + "\n")


def merge(results: list[dict]) -> dict:
    out = json.loads(json.dumps(results[0]))
    out["commands"] = [results[0]["command"]]
    for res in results[1:]:
        out["commands"].append(res["command"])
        for sc, per in res.get("runs", {}).items():
            out["runs"].setdefault(sc, {}).update(per)
        for k in ("generators", "profile"):
            if res.get(k):
                out[k] = res[k]
        out["total_seconds"] = out.get("total_seconds", 0) + res.get("total_seconds", 0)
    return out


def merge_repeats(results: list[dict]) -> dict:
    """Runs of the same scenarios, one figure set: each number is the median of the runs
    that have it, and ``repeats`` keeps every run's (scenario -> server -> key -> values, in
    run order, None where a run lacks it) for ``Table`` to show the spread."""
    out = json.loads(json.dumps(results[0]))
    out["commands"] = [r["command"] for r in results]
    out["total_seconds"] = sum(r.get("total_seconds", 0) for r in results)

    def number(v: object) -> float | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return v if ok else None  # type: ignore[return-value]

    repeats: dict = {}
    for res in results:  # every scenario, server and figure any run has
        for sc, per in res.get("runs", {}).items():
            for server, fig in per.items():
                if not isinstance(fig, dict):
                    continue
                merged = out["runs"].setdefault(sc, {}).setdefault(server, {})
                for key, value in fig.items():
                    if number(value) is None:
                        merged.setdefault(key, value)
                        continue
                    values = [number(r.get("runs", {}).get(sc, {}).get(server, {}).get(key))
                              for r in results]
                    merged[key] = _median([v for v in values if v is not None])
                    repeats.setdefault(sc, {}).setdefault(server, {})[key] = values
    out["repeats"] = repeats
    return out


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.report")
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--repeats", action="store_true",
                    help="the runs are repeats of the same scenarios: report each figure's "
                         "median and spread (otherwise a later run's scenarios replace an "
                         "earlier one's)")
    a = ap.parse_args(argv)
    loaded = [json.loads(p.read_text()) for p in a.runs]
    res = merge_repeats(loaded) if a.repeats else merge(loaded)
    write_report(res, a.out, a.runs[-1] if len(a.runs) == 1 else None)
    if len(a.runs) > 1:
        with open(a.out, "a") as f:
            f.write("Raw results (git-ignored): " + ", ".join(
                f"`{_rel(p)}`" for p in a.runs) + "; server logs in `bench/results/logs/`.\n")
    print(a.out)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    main(sys.argv[1:])
