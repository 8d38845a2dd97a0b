"""Prometheus metrics, read from the core's plain counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .rooms import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HubCollector:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        stats = hub.stats
        yield GaugeMetricFamily("peersig_peers", "Connected (registered) peers.",
                                value=len(hub.sessions))
        yield GaugeMetricFamily("peersig_rooms", "Rooms with at least one peer.",
                                value=len(hub.rooms))
        yield GaugeMetricFamily("peersig_queued_messages",
                                "Messages waiting in offline queues.",
                                value=sum(r.queued for r in hub.rooms_with_queues))
        yield GaugeMetricFamily("peersig_queued_bytes", "Bytes waiting in offline queues.",
                                value=hub.queued_bytes)
        yield _labelled("peersig_messages", "Accepted messages from peers, by type.",
                        "type", stats.received)
        yield _labelled("peersig_relays", "Messages delivered to their destination, by type.",
                        "type", stats.relayed)
        yield _labelled("peersig_drops", "Frames or messages not delivered, by reason.",
                        "reason", stats.drops)
        yield _labelled("peersig_connections", "Connection attempts, by outcome.",
                        "outcome", stats.connections)
        yield _labelled("peersig_disconnections", "Departures of registered peers, by reason.",
                        "reason", stats.disconnections)
        yield CounterMetricFamily("peersig_expiries", "EXPIRE notices sent to senders.",
                                  value=stats.expiries)
        yield CounterMetricFamily("peersig_rate_limited", "Frames dropped by the rate limit.",
                                  value=stats.rate_limited)
        yield CounterMetricFamily("peersig_sweeps", "Liveness sweeps run.", value=stats.sweeps)
        yield CounterMetricFamily("peersig_sweep_errors", "Errors caught inside sweeps.",
                                  value=stats.sweep_errors)
        yield GaugeMetricFamily("peersig_sweep_seconds", "Duration of the last sweep.",
                                value=stats.sweep_seconds)


def _labelled(name: str, doc: str, label: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


def make_registry(hub: Hub) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return bytes(generate_latest(registry))
