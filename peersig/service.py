"""The service tree: listening endpoints, the liveness sweep, and a clean stop."""

from __future__ import annotations

from autobahn.twisted.resource import WebSocketResource
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import Config
from .rooms import Hub
from .web import QuietSite, Root
from .websocket import make_factory

log = Logger()


def run_sweep(hub: Hub) -> None:
    """One sweep; an error is logged and the next sweep runs as usual."""
    try:
        hub.sweep()
    except Exception:
        hub.stats.sweep_errors += 1
        log.failure("liveness sweep failed")


class PeersigService(MultiService):
    def __init__(self, hub: Hub) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.hub = hub

    def stopService(self):  # type: ignore[no-untyped-def]
        self.hub.draining = True
        self.hub.close_all()
        return super().stopService()  # type: ignore[no-untyped-call]


def make_site(hub: Hub) -> QuietSite:
    return QuietSite(Root(hub, WebSocketResource(make_factory(hub))))  # type: ignore[no-untyped-call]


def make_service(config: Config, ports: list[str], reactor: IReactorTime) -> PeersigService:
    hub = Hub(config, reactor)
    top = PeersigService(hub)
    site = make_site(hub)
    for description in ports:
        listening = StreamServerEndpointService(serverFromString(reactor, description), site)
        listening._raiseSynchronously = True
        listening.setServiceParent(top)
    sweep = TimerService(config.sweep_interval, run_sweep, hub)
    sweep.clock = reactor
    sweep.setServiceParent(top)
    return top
