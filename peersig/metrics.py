"""Prometheus metrics and the seed's JSON summary, read from the core at scrape time."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .rooms import Hub
from .stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HubCollector:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        stats = hub.stats
        yield GaugeMetricFamily("peersig_peers", "Connected (registered) peers.",
                                value=len(hub.sessions))
        yield GaugeMetricFamily("peersig_peers_away",
                                "Members whose socket closed, within their reconnect grace.",
                                value=len(hub.away))
        yield GaugeMetricFamily("peersig_rooms", "Rooms with at least one peer.",
                                value=len(hub.rooms))
        occupancy = Counter(len(room.peers) for room in hub.rooms.values())
        buckets = [(str(size), sum(n for s, n in occupancy.items() if s <= size))
                   for size in (1, 2, 3, 4, 6, 8, 16)]
        buckets.append(("+Inf", len(hub.rooms)))
        yield HistogramMetricFamily("peersig_room_occupancy", "Rooms by number of peers.",
                                    buckets=buckets, sum_value=len(hub.sessions))
        yield GaugeMetricFamily("peersig_queued_messages", "Messages in offline queues.",
                                value=sum(r.queued for r in hub.rooms_with_queues))
        yield GaugeMetricFamily("peersig_queued_bytes", "Bytes in offline queues.",
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
        yield _labelled("peersig_probes", "Probes of held places that newcomers contend for: "
                        "started, and each verdict.", "outcome", stats.probes)
        yield _labelled("peersig_takeovers", "Ids taken over by a newcomer, by cause.",
                        "cause", stats.takeovers)
        yield _labelled("peersig_ice_requests", "Requests for ICE servers and TURN credentials: "
                        "issued, or why they were refused.", "outcome", stats.ice)
        yield _labelled("peersig_webhook_events", "Webhook events per receiver: delivered, "
                        "dropped (queue full), rejected (4xx), failed (retried out), and "
                        "retries.", "outcome", stats.webhooks)
        yield GaugeMetricFamily("peersig_webhook_queue", "Webhook events waiting, all "
                                "receivers together.",
                                value=hub.events.queued() if hub.events is not None else 0)
        yield _labelled("peersig_poll_gathering", "The event loop's gathering of heartbeats "
                        "at rest (--poll-coalesce): rounds served after gathering (round), "
                        "gatherings ended by a message or a join (message), or by a new "
                        "connection (connection).", "event",
                        stats.gathering)
        yield CounterMetricFamily("peersig_expiries", "EXPIRE notices sent to senders.",
                                  value=stats.expiries)
        yield CounterMetricFamily("peersig_rate_limited", "Frames dropped by the rate limit.",
                                  value=stats.rate_limited)
        yield CounterMetricFamily("peersig_sweep_errors", "Errors caught inside sweeps.",
                                  value=stats.sweep_errors)
        yield _histogram("peersig_sweep_seconds", "Duration of liveness sweeps.",
                         stats.sweep_seconds)
        yield _histogram("peersig_relay_seconds",
                         "Time to handle one inbound frame (one in 64 is timed).",
                         stats.relay_seconds)
        if hub.cluster is not None:
            yield GaugeMetricFamily("peersig_cluster_up", "1 while this node can reach the "
                                    "cluster's Redis (lease held, subscriber hearing its own "
                                    "probe), else 0: joins are refused, cross-node sends "
                                    "EXPIRE.", value=1 if hub.cluster.ok else 0)
            yield GaugeMetricFamily("peersig_cluster_pending_releases", "Rows this node "
                                    "gave back that Redis has not confirmed yet.",
                                    value=len(hub.cluster.releases))


def _labelled(name: str, doc: str, label: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


def _histogram(name: str, doc: str, histogram: Histogram) -> Metric:
    return HistogramMetricFamily(name, doc, buckets=histogram.cumulative(),
                                 sum_value=histogram.total)


def make_registry(hub: Hub) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return bytes(generate_latest(registry))


def summary(hub: Hub) -> dict[str, Any]:
    """The seed's JSON metrics shape."""
    stats = hub.stats
    errors = dict(stats.drops)
    errors["internal"] = stats.disconnections.get("internal_error", 0)
    errors["sweep"] = stats.sweep_errors
    return {
        "activeRooms": len(hub.rooms),
        "totalConnections": len(hub.sessions),
        "messagesPerSecond": round(stats.messages_per_second(), 3),
        "uptimeSeconds": round(hub.clock.seconds() - hub.started, 3),
        "timestamp": int(time.time() * 1000),
        "errors": errors,
    }
