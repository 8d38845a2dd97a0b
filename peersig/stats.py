"""Plain counters kept by the core; ``metrics.py`` reads them at scrape time.

Incrementing an int in a dict costs far less than a prometheus_client child's lock, and
keeps the core free of metrics machinery on the per-message path.
"""

from __future__ import annotations

from collections import Counter


class Stats:
    __slots__ = (
        "connections",
        "disconnections",
        "drops",
        "expiries",
        "rate_limited",
        "received",
        "relayed",
        "sweep_errors",
        "sweep_seconds",
        "sweeps",
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
        # departures by reason: closed, timeout, rate_limit, ...
        self.disconnections: Counter[str] = Counter()
        self.expiries = 0
        self.rate_limited = 0
        self.sweeps = 0
        self.sweep_errors = 0
        self.sweep_seconds = 0.0
