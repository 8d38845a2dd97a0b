"""Plain counters kept by the core; ``metrics.py`` reads them at scrape time.

Incrementing an int in a dict costs far less than a prometheus_client child's lock, and
keeps the core free of metrics machinery on the per-message path.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque

# One relay in this many is timed: the clock calls would cost more than the counters.
TIMING_SAMPLE = 64


class Histogram:
    """Fixed buckets (upper bounds in seconds), cumulative at export."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Stats:
    __slots__ = (
        "accepted",
        "activity",
        "connections",
        "disconnections",
        "drops",
        "expiries",
        "gathering",
        "history",
        "ice",
        "probes",
        "rate_limited",
        "received",
        "relay_seconds",
        "relayed",
        "sweep_errors",
        "sweep_seconds",
        "takeovers",
        "timing_tick",
        "webhooks",
    )

    def __init__(self) -> None:
        # accepted inbound messages by type (HEARTBEAT, OFFER, ...)
        self.received: Counter[str] = Counter()
        # messages delivered to their destination, by type
        self.relayed: Counter[str] = Counter()
        # frames or messages not delivered, by reason
        self.drops: Counter[str] = Counter()
        # connection attempts by outcome: opened, takeover, id_taken, room_full, ...
        self.connections: Counter[str] = Counter()
        # departures by reason: closed, lost, timeout, rate_limit, ...
        self.disconnections: Counter[str] = Counter()
        # probes of contended places: started, holder_alive, holder_dead
        self.probes: Counter[str] = Counter()
        # takeovers by cause: silent, token, authorizer, probe
        self.takeovers: Counter[str] = Counter()
        # GET {path}{key}/ice: issued, or why not (origin, rate_limit, invalid_key, ...)
        self.ice: Counter[str] = Counter()
        # webhook events: delivered, dropped (queue full), rejected (4xx), failed (gave up)
        # and retries
        self.webhooks: Counter[str] = Counter()
        self.expiries = 0
        # What should not wait: frames routed (every accepted frame but HEARTBEAT), joins,
        # messages from other nodes; and connections accepted. A server at rest counts
        # neither, which is how the reactor tells it (upstream.twisted.LeanEPollReactor).
        self.activity = 0
        self.accepted = 0
        # the reactor's gathering at rest: rounds served after gathering, and gatherings
        # ended by a message or a new connection
        self.gathering: Counter[str] = Counter()
        self.rate_limited = 0
        self.sweep_errors = 0
        self.sweep_seconds = Histogram((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1))
        self.relay_seconds = Histogram(
            (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01))
        self.timing_tick = 0
        # (time, messages received so far), one per sweep, for a one-minute rate
        self.history: deque[tuple[float, int]] = deque(maxlen=61)

    def messages_per_second(self) -> float:
        if len(self.history) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.history[0], self.history[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
