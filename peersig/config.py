"""Settings of one peersig server, as a frozen value built by ``tap.Options``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .auth import IPeerAuthorizer, OpenAuthorizer

RoomBy = Literal["token", "key", "none"]


@dataclass(frozen=True, slots=True)
class Config:
    path: str = "/"
    key: str = "peerjs"
    room_by: RoomBy = "token"
    room_size: int = 4
    max_peers: int = 10000
    max_peers_per_ip: int = 64
    trusted_proxies: int = 0
    keepalive: int = 5
    ping_interval: float = 7.0
    alive_timeout: float = 10.0
    sweep_interval: float = 1.0
    max_message_size: int = 65536
    rate_limit: float = 100.0
    rate_limit_grace: float = 5.0
    queue_limit: int = 50
    room_queue_limit: int = 200
    total_queue_bytes: int = 64 * 1024 * 1024
    expire_timeout: float = 5.0
    allow_discovery: bool = False
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    secret: bytes | None = None
    authorizer: IPeerAuthorizer = field(default_factory=OpenAuthorizer)
    bad_frame_limit: int = 10  # more bad frames than this within bad_frame_window: cut
    bad_frame_window: float = 10.0
    takeover_probe: float = 1.0
    # Seconds a member whose socket closed keeps its place for a reconnect (Hub.socket_closed).
    reconnect_grace: float = 10.0
    # Seconds a reactor at rest lets heartbeats gather before it polls (LeanEPollReactor).
    poll_coalesce: float = 0.05
    # --auth jwt (jwtauth.py): where keys come from (a KeyFile or a JWKS), and the aud and
    # iss claims required when set.
    jwt_keys: Any = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # PEERS to a joining peer and JOIN and PART to its room-mates (not in none mode).
    room_events: bool = False
    # Types of app messages relayed through the room (--app-message-type; messages.py).
    app_message_types: frozenset[str] = frozenset()
    # Tokens match:NAME seat a peer in the oldest open room of queue NAME (Hub.match_room).
    quick_match: bool = False
    # GET /demo: the page to try peersig with (demo.py), and where it loads PeerJS from.
    demo: bool = False
    demo_peerjs_url: str | None = None
    # STUN/TURN URLs for GET {path}{key}/ice, and coturn's static-auth-secret (TURN REST).
    ice_servers: tuple[str, ...] = field(default_factory=tuple)
    turn_secret: bytes | None = None
    turn_ttl: int = 86400
    # The admin API (admin.py): its endpoint and bearer token; off without them.
    admin_port: str | None = None
    admin_token: bytes | None = None
    # Webhook receivers (webhooks.py), the secret that signs their events, the events that
    # may wait per receiver, and the seconds an event is retried for.
    webhooks: tuple[str, ...] = field(default_factory=tuple)
    webhook_secret: bytes | None = None
    webhook_queue: int = 10000
    webhook_retry: float = 300.0
    drain_timeout: float = 5.0
    handshake_timeout: float = 5.0
    log_peers: bool = False
    # --cluster: the Redis URL the nodes of a cluster share (cluster.py); None = one process.
    cluster: str | None = None

    @property
    def dead_after(self) -> float:
        """Silence after which a peer is presumed dead: dropped by the sweep, and its id
        free for a newcomer.

        The sweep runs every ``sweep_interval``, so it drops a peer that would pass
        ``alive_timeout`` before the next sweep: nobody stays silent longer than the timeout.
        A healthy peer was pinged at ``ping_interval`` and has answered long before. A peer
        whose network vanished is gone sooner, within ``keepalive``, through its kernel.
        """
        return self.alive_timeout - self.sweep_interval

    def origin_allowed(self, origin: str | None) -> bool:
        if not self.allowed_origins:
            return True
        return origin is not None and origin in self.allowed_origins
