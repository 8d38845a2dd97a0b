"""How bench/ turns rounds into a figure: the median round for relay and idle, pooled
connect and latency, ratios judged pair by pair, and a report that names every round's
failures (issue 25)."""

from __future__ import annotations

import pytest

from bench.report import Table, merge_repeats, problems_section
from bench.run import parse_args, pool_rounds


def _relay(us: float, **extra: object) -> dict:
    return {"server_us_per_msg": us, "msgs_per_s": 1e6 / us, "drops": 0,
            "connect_failed": 0, "server": {}, "generator_status": {}, **extra}


def test_relay_takes_each_servers_median_round_whole() -> None:
    runs = {"wss-relay#1": {"peersig": _relay(52.3, gen_us_per_msg=41.4),
                            "reference": _relay(59.1)},
            "wss-relay#2": {"reference": _relay(58.4),
                            "peersig": _relay(33.5, gen_us_per_msg=27.8)},
            "wss-relay#3": {"peersig": _relay(37.4, gen_us_per_msg=30.3),
                            "reference": _relay(65.5)}}
    pool_rounds(runs)
    assert list(runs) == ["wss-relay"]
    peersig = runs["wss-relay"]["peersig"]
    # The median, and the other figures of that same window, not of another round.
    assert peersig["server_us_per_msg"] == 37.4
    assert peersig["gen_us_per_msg"] == 30.3
    assert runs["wss-relay"]["reference"]["server_us_per_msg"] == 59.1
    assert [r["server_us_per_msg"] for r in peersig["rounds"]] == [52.3, 33.5, 37.4]


def _run_two_of_556201a() -> dict:
    # Issue 25's run 2 at 556201a: peersig's first round slow (the machine), the reference's
    # third.
    return {"wss-relay#1": {"peersig": _relay(52.3), "reference": _relay(59.1)},
            "wss-relay#2": {"reference": _relay(58.4), "peersig": _relay(33.5)},
            "wss-relay#3": {"peersig": _relay(37.4), "reference": _relay(65.5)}}


def test_the_ratio_is_the_median_of_each_pairs() -> None:
    runs = _run_two_of_556201a()
    pool_rounds(runs)
    peersig = runs["wss-relay"]["peersig"]
    # 52.3/59.1, 33.5/58.4, 37.4/65.5: the median pair, not the medians' 37.4/59.1 (0.633).
    assert peersig["paired_ratio"] == pytest.approx(33.5 / 58.4)
    assert peersig["paired_key"] == "server_us_per_msg"
    assert "paired_ratio" not in runs["wss-relay"]["reference"]


def test_a_failed_round_leaves_its_pair_out() -> None:
    runs = _run_two_of_556201a()
    runs["wss-relay#2"]["reference"] = {"error": "RuntimeError('gone')"}
    pool_rounds(runs)
    # Two pairs left, 0.885 and 0.571: their mean, as a median of two.
    assert runs["wss-relay"]["peersig"]["paired_ratio"] == pytest.approx(
        (52.3 / 59.1 + 37.4 / 65.5) / 2)


def test_one_server_alone_has_no_paired_ratio() -> None:
    runs = {f"relay#{i}": {"peersig": _relay(us)} for i, us in enumerate((30, 31, 29), 1)}
    pool_rounds(runs)
    assert "paired_ratio" not in runs["relay"]["peersig"]


def _ascii(row: str) -> str:
    return row.replace("\u00d7", "x").replace("\u2013", "-")


def test_the_report_judges_the_target_by_the_pairs_and_shows_the_medians() -> None:
    runs = _run_two_of_556201a()
    pool_rounds(runs)
    table = Table(runs)
    table.row("CPU per message, us", "wss-relay", "server_us_per_msg", 1, "<= 0.6x",
              "lower", 0.6)
    assert [_ascii(r) for r in table.rows] == [
        "| CPU per message, us | 37.4 | 59.1 | 0.57x (pairs; of the medians 0.63x) "
        "| <= 0.6x | yes |"]
    # Other figures of the same scenario keep the plain ratio.
    table.row("generator", "wss-relay", "msgs_per_s", 0)
    assert "pairs" not in table.rows[-1]


def test_repeats_are_judged_run_by_run_on_their_pairs() -> None:
    results = []
    for slow in (52.3, 31.0, 30.0):
        runs = _run_two_of_556201a()
        runs["wss-relay#1"]["peersig"] = _relay(slow)
        pool_rounds(runs)
        results.append({"command": "python -m bench", "runs": runs})
    merged = merge_repeats(results)
    table = Table(merged["runs"], merged["repeats"])
    table.row("CPU per message, us", "wss-relay", "server_us_per_msg", 1, "<= 0.6x",
              "lower", 0.6)
    # Run 1's pairs: 0.885, 0.574, 0.571; runs 2 and 3 have 0.52 and 0.51 in round 1.
    assert _ascii(table.rows[0]).endswith(
        "| 0.57x (0.57-0.57x) (pairs; of the medians 0.57-0.63x) | <= 0.6x | yes (3 of 3) |")


def test_idle_carries_the_dead_peer_checks_and_sums_the_drops() -> None:
    def idle(cpu: float, drops: int, **extra: object) -> dict:
        return {"server_cpu_pct": cpu, "drops": drops, "connect_failed": 0, "server": {},
                **extra}
    runs = {"idle#1": {"peersig": idle(2.3, 0, silent_waited_s=65.0,
                                       silent_dropped_after_s=9.5)},
            "idle#2": {"peersig": idle(2.7, 2)},
            "idle#3": {"peersig": idle(2.9, 1)}}
    pool_rounds(runs)
    peersig = runs["idle"]["peersig"]
    assert peersig["server_cpu_pct"] == 2.7
    assert peersig["silent_dropped_after_s"] == 9.5
    assert peersig["drops"] == 3


def test_connect_and_latency_still_pool_every_round() -> None:
    def connect(ok: int, cpu_s: float) -> dict:
        return {"ok": ok, "failed": 0, "dropped_after_open": 0, "server_cpu_s": cpu_s,
                "cpu_ms_per_connect": cpu_s / ok * 1000, "connect_seconds": 1.0,
                "rss_kib_per_peer": 17.0, "gen_cpu_ms_per_connect": 0.1, "join_ms_p99": 5.0,
                "other_load_pct": 0.0}
    runs = {"wss-connect4000#1": {"peersig": connect(4000, 2.0)},
            "wss-connect4000#2": {"peersig": connect(4000, 6.0)}}
    pool_rounds(runs)
    assert runs["wss-connect4000"]["peersig"]["cpu_ms_per_connect"] == 1.0


def test_a_failure_in_a_round_that_is_not_the_median_is_reported() -> None:
    bad = _relay(31.0, server={"log_problems": 2, "log_examples": ["Traceback"]})
    runs = {"relay#1": {"peersig": _relay(30.0)}, "relay#2": {"peersig": bad},
            "relay#3": {"peersig": {"error": "RuntimeError('gone')"}},
            "relay#4": {"peersig": _relay(29.0)}}
    pool_rounds(runs)
    assert runs["relay"]["peersig"]["server_us_per_msg"] == 30.0
    text = problems_section({"runs": runs})
    assert "relay / peersig (round 2):** 2 error lines" in text
    assert "relay / peersig: round 3 failed: `RuntimeError('gone')`" in text
    assert "Nothing" not in text


@pytest.mark.parametrize("option", ["--relay-rounds", "--idle-rounds"])
def test_rounds_must_be_odd_to_have_a_median(option: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([option, "3"]) is not None
    with pytest.raises(SystemExit):
        parse_args([option, "2"])
    assert "odd" in capsys.readouterr().err
