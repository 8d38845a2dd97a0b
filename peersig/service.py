"""The service tree: listening endpoints, the liveness sweep, certificate reloads, and a
draining stop."""

from __future__ import annotations

import signal
import socket
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from .admin import make_admin_site
from .cluster import Link, parse_url
from .config import Config
from .jwtauth import JWKS
from .messages import CLOSE_GOING_AWAY
from .rooms import Hub
from .tls import ReloadingTLS, tls_endpoint, with_backlog
from .upstream.twisted import raise_on_listen_error
from .web import QuietSite, Root
from .webhooks import Webhooks, agent_post
from .websocket import PeerFactory, make_factory

log = Logger()

# However fast the peers go, a draining server keeps answering /health with 503 this long
# (bounded by --drain-timeout), so load balancers see it before the port closes.
MIN_DRAIN_WINDOW = 1.0


# What each --room-by means to a stock PeerJS app, said once at startup: an app that does not
# set PeerJS's token option gets a random token per Peer, and so in token mode meets no one.
ROOM_MODES = {
    "token": "peers meet when they pass the same PeerJS token option; a Peer created "
             "without one gets a random token and meets no one (--room-by none behaves "
             "like npm peer)",
    "key": "peers meet when they pass the same PeerJS key option",
    "none": "one namespace for every peer with the right key, as in npm peer",
}


def run_sweep(hub: Hub) -> None:
    """One sweep; an error is logged and the next sweep runs as usual."""
    try:
        hub.sweep()
    except Exception:
        hub.stats.sweep_errors += 1
        log.failure("liveness sweep failed")


class PeersigService(MultiService):
    def __init__(self, hub: Hub, factory: PeerFactory, clock: IReactorTime,
                 certificates: list[ReloadingTLS]) -> None:
        super().__init__()
        self.hub = hub
        self.factory = factory
        self.clock = clock
        self.certificates = certificates

    def startService(self) -> None:
        super().startService()
        config = self.hub.config
        log.info("room mode {room_by}: {meaning}", room_by=config.room_by,
                 meaning=ROOM_MODES[config.room_by])
        from twisted.internet import reactor

        def on_hangup(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.reload_certificates)  # type: ignore[attr-defined]

        def on_terminate(signum: int, frame: Any) -> None:
            # Twisted's own handler would re-raise SIGTERM once stopped; a completed drain
            # is a clean exit, status 0.
            reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

        def install() -> None:
            signal.signal(signal.SIGHUP, on_hangup)
            signal.signal(signal.SIGTERM, on_terminate)

        # After the reactor's own handlers, which it installs as it starts running.
        reactor.callWhenRunning(install)

    def reload_certificates(self) -> None:
        for certificate in self.certificates:
            certificate.reload()

    def stopService(self) -> Deferred[None]:
        """Drain: /health turns 503, upgrades are refused, every peer gets 1001; the port
        closes once they are gone (but not before MIN_DRAIN_WINDOW) or at the drain timeout."""
        hub = self.hub
        hub.draining = True
        log.info("draining {peers} peers", peers=len(hub.sessions))
        if hub.cluster is not None:
            hub.cluster.hand_over()
        hub.close_all(CLOSE_GOING_AWAY, "Server shutting down")
        for protocol in list(self.factory.open_connections):
            protocol.close_with(CLOSE_GOING_AWAY, "Server shutting down")
        started = self.clock.seconds()
        limit = hub.config.drain_timeout
        drained: Deferred[None] = Deferred()

        def check() -> None:
            elapsed = self.clock.seconds() - started
            left = self.factory.open_connections
            # The departures' webhook events go out too, while the drain lasts.
            sending = hub.events is not None and hub.events.queued()
            if (not left and not sending and elapsed >= min(MIN_DRAIN_WINDOW, limit)) \
                    or elapsed >= limit:
                for protocol in list(left):
                    protocol.abort_connection()
                poll.stop()
                drained.callback(None)

        poll = LoopingCall(check)
        poll.clock = self.clock
        poll.start(0.05)
        def stop_children(_: None) -> Any:
            return MultiService.stopService(self)

        return drained.addCallback(stop_children)


def keep_alive(sock: socket.socket, seconds: int) -> bool:
    """Let the kernel drop a connection once the peer's host has answered nothing for
    ``seconds`` - 1 (a second is left for the kernel's timers, which run late by up to a
    tenth of a second each): TCP keepalive probes from ``seconds`` - 3 of silence on, one
    a second, and a TCP user timeout that also bounds data left unacknowledged. A live
    peer has two probes to answer, and two seconds to do it.

    Set on a listening socket, the options pass to every socket it accepts (Linux). A live
    peer's kernel answers the probes (as a browser answers WebSocket pings, without any page
    code), so this costs the server no wakeup, where a WebSocket ping costs a send, a
    receive and two trips through Python per peer per heartbeat. Returns whether ``sock``
    is a TCP socket, the only kind this applies to.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    idle = max(1, seconds - 3)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", 1),
                        ("TCP_KEEPCNT", max(1, seconds - 1 - idle)),
                        ("TCP_USER_TIMEOUT", (seconds - 1) * 1000)):
        option = getattr(socket, name, None)
        if option is not None:  # all four on Linux
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return True


@implementer(IStreamServerEndpoint)
class KeepAliveEndpoint:
    """An endpoint whose listening socket carries ``keep_alive``, for every socket it
    accepts to inherit."""

    def __init__(self, endpoint: IStreamServerEndpoint, seconds: int) -> None:
        self.endpoint = endpoint
        self.seconds = seconds

    def listen(self, factory: Any) -> Deferred[Any]:
        return self.endpoint.listen(factory).addCallback(self._keep_alive)

    def _keep_alive(self, port: Any) -> Any:
        sock = getattr(port, "socket", None)
        if not (isinstance(sock, socket.socket) and keep_alive(sock, self.seconds)):
            log.warn("no TCP socket on {port}: --keepalive does not apply there", port=port)
        return port


def make_site(hub: Hub, factory: PeerFactory) -> QuietSite:
    site = QuietSite(Root(hub, factory))
    site.websocket = factory
    site.stats = hub.stats
    site.upgrade_prefix = b"GET " + hub.config.path.encode() + b"peerjs?"
    # A client that opens TCP and sends nothing, or half a request, is cut this soon.
    site.timeOut = hub.config.handshake_timeout
    return site


def make_service(config: Config, ports: list[str], reactor: Any) -> PeersigService:
    hub = Hub(config, reactor)
    factory = make_factory(hub)
    site = make_site(hub, factory)
    certificates: list[ReloadingTLS] = []
    top = PeersigService(hub, factory, reactor, certificates)
    for description in ports:
        endpoint: IStreamServerEndpoint
        if description.startswith("ssl:"):
            endpoint, certificate = tls_endpoint(reactor, description)
            certificates.append(certificate)
        else:
            endpoint = serverFromString(reactor, with_backlog(description))
        if config.keepalive:
            endpoint = KeepAliveEndpoint(endpoint, config.keepalive)
        raise_on_listen_error(StreamServerEndpointService(endpoint, site)).setServiceParent(top)
    if config.admin_port is not None and config.admin_token is not None:
        admin = StreamServerEndpointService(serverFromString(reactor, config.admin_port),
                                            make_admin_site(hub, config.admin_token))
        raise_on_listen_error(admin).setServiceParent(top)
    if config.webhooks and config.webhook_secret is not None:
        hub.events = Webhooks(config.webhooks, config.webhook_secret, reactor,
                              agent_post(reactor), hub.stats.webhooks, config.webhook_queue,
                              config.webhook_retry)
    if isinstance(config.jwt_keys, JWKS):
        reactor.callWhenRunning(config.jwt_keys.start, reactor)
    if config.cluster is not None:
        link = Link(hub, parse_url(config.cluster), reactor)
        hub.cluster = link
        link.setServiceParent(top)
    sweep = TimerService(config.sweep_interval, run_sweep, hub)
    sweep.clock = reactor
    sweep.setServiceParent(top)
    return top
