"""``twistd peersig``: the command-line options and ``makeService``.

Every option can also be given as an environment variable ``PEERSIG_<OPTION>`` (upper
case, ``-`` as ``_``), for systemd's ``EnvironmentFile=``; the command line wins.
Repeatable options take a comma-separated list from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import IService
from twisted.python import usage

from . import upstream
from .auth import authorizers
from .cluster import parse_url
from .config import Config
from .messages import app_type_problem
from .tls import CertificateError, load_context, split_description
from .tokens import read_secret
from .turn import valid_ice_url

DEFAULT_PORT = "tcp:9000"
# Milliseconds: far inside the seed's 500 ms for a relayed offer (AS2), 200 ms at p95 (SC-002).
MAX_POLL_COALESCE = 100.0
# --poll-coalesce unless set: ms (docs/benchmarks-idle.md).
POLL_COALESCE = 50.0
ROOM_MODES = ("token", "key", "none")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _keepalive(value: str) -> int:
    number = int(value)
    if number != 0 and number < 3:
        raise ValueError("must be 0 (off) or at least 3")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be positive")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must not be negative")
    return number


def _room_mode(value: str) -> str:
    if value not in ROOM_MODES:
        raise ValueError(f"must be one of {', '.join(ROOM_MODES)}")
    return value


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A PeerJS-compatible WebRTC signaling server. Every option may also be set "
        "through the environment as PEERSIG_<OPTION> (e.g. PEERSIG_ROOM_SIZE=4); "
        "repeatable options take a comma-separated list there."
    )
    optParameters: list[list[Any]] = [
        ["path", None, "/", "URL path the PeerJS client is told (its `path` option)."],
        ["key", None, "peerjs", "API key clients must send (token and none room modes)."],
        ["room-by", None, "token", "What scopes peers: token, key or none.", _room_mode],
        ["room-size", None, 4, "Peers per room; 0 = unlimited (not used in none mode).",
         _positive_int],
        ["max-peers", None, 10000, "Connected peers per process.", _positive_int],
        ["max-peers-per-ip", None, 64, "Connected peers per client address; 0 = unlimited.",
         _positive_int],
        ["trusted-proxies", None, 0,
         "Proxy hops whose X-Forwarded-For is trusted for the client address.", _positive_int],
        ["keepalive", None, 5,
         "Seconds in which the kernel drops a peer whose network vanished (TCP keepalive "
         "and user timeout); 0 = off, else at least 3.", _keepalive],
        ["ping-interval", None, 7.0, "Seconds of silence before a WebSocket ping.",
         _positive_float],
        ["alive-timeout", None, 10.0, "Seconds of silence before a peer is dropped.",
         _positive_float],
        ["sweep-interval", None, 1.0, "Seconds between liveness and expiry sweeps.",
         _positive_float],
        ["max-message-size", None, 65536, "Largest frame accepted, in bytes.", _positive_int],
        ["rate-limit", None, 100.0,
         "Messages per second per peer (token bucket, burst of the same size); 0 = off.",
         float],
        ["queue-limit", None, 50, "Queued messages per offline destination.", _positive_int],
        ["room-queue-limit", None, 200, "Queued messages per room.", _positive_int],
        ["total-queue-bytes", None, 64 * 1024 * 1024,
         "Bytes of queued messages per process.", _positive_int],
        ["expire-timeout", None, 5.0,
         "Seconds a queued message waits before its sender gets EXPIRE.", _positive_float],
        ["drain-timeout", None, 5.0,
         "Seconds a stopping server waits for peers to close before it exits.",
         _positive_float],
        ["cluster", None, None,
         "Run as one node of a cluster that shares its peers, rooms and ids through Redis "
         "7.0+ or Valkey 7.2+: redis://[user:password@]host[:port][/db], rediss://... or "
         "unix:/path/to/redis.sock[?db=N] (docs/scaling.md) [default: off, one process]."],
        ["demo-peerjs-url", None, None,
         "Where the demo page loads the PeerJS client from [default: a pinned CDN URL, with "
         "its integrity hash]."],
        ["poll-coalesce", None, POLL_COALESCE,
         "Milliseconds a server at rest lets heartbeats gather before it serves them, so "
         "that those of independent peers share a wakeup. At rest: 2 s after the last "
         "message or join, 0.5 s after the last new connection. The first message or "
         "connection after that waits this long at most, and ends the gathering; 0 = off.",
         _non_negative_float],
        ["reconnect-grace", None, 10.0,
         "Seconds a peer whose socket closed without leaving for good (peer.disconnect(), a "
         "cut connection) keeps its id and seat; a reconnect within them is silent (no LEAVE, "
         "no JOIN) and gets what was queued; 0 = none.",
         _non_negative_float],
        ["takeover-probe", None, 1.0,
         "Seconds the holder of a place a newcomer wants (its id, a seat in a full room) "
         "has to answer a ping before it is presumed dead and replaced; 0 = no probe.",
         _non_negative_float],
        ["turn-secret-file", None, None,
         "File with coturn's static-auth-secret: /ice hands out TURN credentials "
         "[default: none]."],
        ["turn-ttl", None, 86400, "Seconds TURN credentials from /ice stay valid.",
         _positive_int],
        ["admin-port", None, None,
         "Twisted endpoint of the admin API, e.g. tcp:9001:interface=127.0.0.1 or "
         "unix:/run/peersig/admin.sock [default: none]."],
        ["admin-token-file", None, None,
         "File with the bearer token the admin API requires (needed with --admin-port)."],
        ["webhook-secret-file", None, None,
         "File with the secret that signs webhook events (needed with --webhook)."],
        ["webhook-queue", None, 10000,
         "Webhook events that may wait per receiver; more are dropped and counted.",
         _positive_int],
        ["webhook-retry", None, 300.0,
         "Seconds a webhook event is retried for while its receiver fails.",
         _non_negative_float],
        ["handshake-timeout", None, 5.0,
         "Seconds a client has to complete its HTTP request or WebSocket handshake.",
         _positive_float],
        ["auth", None, None,
         "Authorizer plugin deciding who may join: open, hmac, jwt, or your own "
         "[default: hmac with --secret-file, jwt with --jwt-key-file or --jwks-url, "
         "else open]."],
        ["secret-file", None, None,
         "File with the HMAC secret; peers then need signed join tokens [default: none]."],
        ["jwt-key-file", None, None,
         "File with the key verifying JWT join tokens (--auth jwt): an HS256 secret, or a "
         "PEM public key or certificate [default: none]."],
        ["jwks-url", None, None,
         "URL of the identity provider's JWKS verifying JWT join tokens (--auth jwt) "
         "[default: none]."],
        ["jwt-audience", None, None, "The aud claim JWT join tokens must carry [default: none]."],
        ["jwt-issuer", None, None, "The iss claim JWT join tokens must carry [default: none]."],
    ]
    optFlags: list[list[str | None]] = [
        ["allow-discovery", None, "Answer GET {path}{key}/peers with the room's ids."],
        ["room-events", None, "Send a joining peer PEERS (the others' ids) and its room-mates "
         "JOIN and PART (not in none mode)."],
        ["quick-match", None, "Tokens match:NAME seat a peer in the oldest open room of queue "
         "NAME, rooms of --room-size or the token's room_size; implies --room-events "
         "(token mode only)."],
        ["demo", None, "Serve GET /demo, a page to try peersig in two tabs (room members, "
         "chat, a video call); implies --room-events and the app message type CHAT."],
        ["log-peers", None, "Put peer ids and client addresses in log events."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = []
        self["allowed-origin"] = []
        self["ice-server"] = []
        self["webhook"] = []
        self["app-message-type"] = []
        self._cli_lists: set[str] = set()

    def parseOptions(self, options: list[str] | None = None) -> None:
        """The environment, then the command line, then the checks of ``postOptions``.

        A usage error ends the process with status 1 and the error on stderr, on every
        supported Twisted: twistd before 26.10 printed it and exited 0, which systemd takes
        for a good start.
        """
        try:
            self._apply_environment(os.environ)
            super().parseOptions(options)
        except usage.UsageError as e:
            message = f"twistd peersig: {e}\n(twistd peersig --help lists the options)"
            raise SystemExit(message) from None

    def opt_port(self, description: str) -> None:
        """Twisted endpoint to listen on (repeatable) [default: tcp:9000]"""
        self._append_cli("port", description)

    def opt_allowed_origin(self, origin: str) -> None:
        """Origin that may connect and read HTTP (repeatable) [default: any]"""
        self._append_cli("allowed-origin", origin)

    def opt_ice_server(self, url: str) -> None:
        """STUN or TURN URL that GET {path}{key}/ice hands out (repeatable) [default: none]"""
        self._append_cli("ice-server", url)

    def opt_app_message_type(self, name: str) -> None:
        """Type of app messages relayed through the room, to one peer (dst) or all
        (repeatable) [default: none]"""
        self._append_cli("app-message-type", name)

    def opt_webhook(self, url: str) -> None:
        """http:// or https:// URL that room events are POSTed to (repeatable) [default: none]"""
        self._append_cli("webhook", url)

    def _append_cli(self, name: str, value: str) -> None:
        if name not in self._cli_lists:
            self._cli_lists.add(name)
            self[name] = []
        self[name].append(value)

    def _apply_environment(self, environ: Mapping[str, str]) -> None:
        coercers: dict[str, Callable[[str], Any] | None] = {
            p[0]: (p[4] if len(p) > 4 else None) for p in self.optParameters
        }
        for name, coerce in coercers.items():
            value = environ.get(env_name(name))
            if value is not None:
                try:
                    self[name] = coerce(value) if coerce else value
                except ValueError as e:
                    raise usage.UsageError(f"{env_name(name)}={value!r}: {e}") from None
        for flag in self.optFlags:
            name = str(flag[0])
            value = environ.get(env_name(name))
            if value is not None:
                self[name] = value.strip().lower() in ("1", "true", "yes", "on")
        for name in ("port", "allowed-origin", "ice-server", "webhook", "app-message-type"):
            value = environ.get(env_name(name))
            if value:
                self[name] = [v.strip() for v in value.split(",") if v.strip()]

    def postOptions(self) -> None:
        unknown = upstream.unknown_off()
        if unknown:
            raise usage.UsageError(
                f"PEERSIG_WITHOUT_REACH={','.join(unknown)}: not an optional reach (see "
                f"peersig/upstream/__init__.py: {', '.join(upstream.optional())})")
        if not self["port"]:
            self["port"] = [DEFAULT_PORT]
        if self["poll-coalesce"] > MAX_POLL_COALESCE:
            raise usage.UsageError(
                f"--poll-coalesce is at most {MAX_POLL_COALESCE:g} ms (every message of a "
                "server at rest may wait that long)")
        if self["alive-timeout"] - self["sweep-interval"] <= self["ping-interval"]:
            raise usage.UsageError(
                "--alive-timeout must exceed --ping-interval plus --sweep-interval")
        path = self["path"]
        if not path.startswith("/"):
            path = "/" + path
        if not path.endswith("/"):
            path += "/"
        self["path"] = path
        for description in self["port"]:
            if description.startswith("ssl:"):
                _check_certificate(description)
        self.built = self.config()

    def _secret(self, option: str) -> bytes | None:
        if not self[option]:
            return None
        try:
            return read_secret(self[option])
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--{option}: {e}") from None

    def _jwt_keys(self) -> Any:
        from .jwtauth import JWKS, UnusableKey, load_key_file

        path, url = self["jwt-key-file"], self["jwks-url"]
        if path and url:
            raise usage.UsageError("--jwt-key-file and --jwks-url: one or the other")
        if path:
            try:
                return load_key_file(path)
            except (OSError, UnusableKey) as e:
                raise usage.UsageError(f"--jwt-key-file {path}: {e}") from None
        if url:
            parts = urlsplit(url)
            local = parts.hostname in ("localhost", "127.0.0.1", "::1")
            if parts.scheme != "https" and not (parts.scheme == "http" and local):
                raise usage.UsageError(f"--jwks-url {url}: an https:// URL (keys fetched over "
                                       "plain http could be anyone's; http only on loopback)")
            return JWKS(url)
        return None

    def config(self) -> Config:
        secret = self._secret("secret-file")
        turn_secret = self._secret("turn-secret-file")
        if turn_secret is not None:
            if self["turn-ttl"] < 1:
                raise usage.UsageError("--turn-ttl must be at least 1")
            if not any(url.startswith("turn") for url in self["ice-server"]):
                raise usage.UsageError("--turn-secret-file needs a turn: or turns: --ice-server")
        for url in self["ice-server"]:
            if not valid_ice_url(url):
                raise usage.UsageError(f"--ice-server {url}: not a stun:, stuns:, turn: or "
                                       "turns: URL (host[:port], and ?transport=udp|tcp)")
        admin_token = self._secret("admin-token-file")
        if bool(self["admin-port"]) != (admin_token is not None):
            raise usage.UsageError("--admin-port and --admin-token-file go together")
        if self["admin-port"]:
            _check_endpoint("--admin-port", self["admin-port"])
        webhook_secret = self._secret("webhook-secret-file")
        if self["webhook"] and webhook_secret is None:
            raise usage.UsageError("--webhook needs --webhook-secret-file")
        for url in self["webhook"]:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise usage.UsageError(f"--webhook {url}: not an http:// or https:// URL")
        jwt_keys = self._jwt_keys()
        if self["room-events"] and self["room-by"] == "none":
            raise usage.UsageError("--room-events has no rooms to tell of in --room-by none")
        if self["quick-match"] and self["room-by"] != "token":
            raise usage.UsageError("--quick-match seats peers in rooms of --room-by token")
        if self["cluster"] is not None:
            try:
                parse_url(self["cluster"])
            except ValueError as e:
                raise usage.UsageError(f"--cluster {self['cluster']}: {e}") from None
            if self["quick-match"]:
                raise usage.UsageError("--quick-match does not work with --cluster yet: its "
                                       "rooms are made by one process")
            try:
                import txredisapi  # noqa: F401
            except ImportError:
                raise usage.UsageError("--cluster needs txredisapi: pip install "
                                       "'peersig[cluster]' (or '.[cluster]' in a "
                                       "checkout)") from None
        if self["demo"] and self["room-by"] == "none":
            raise usage.UsageError("--demo shows a room: not in --room-by none")
        app_types = set(self["app-message-type"]) | ({"CHAT"} if self["demo"] else set())
        for app_type in app_types:
            problem = app_type_problem(app_type)
            if problem:
                raise usage.UsageError(f"--app-message-type {app_type}: {problem}")
        demo_url = self["demo-peerjs-url"]
        if demo_url and urlsplit(demo_url).scheme not in ("http", "https"):
            raise usage.UsageError(f"--demo-peerjs-url {demo_url}: an http(s) URL")
        name = self["auth"] or ("hmac" if secret else "jwt" if jwt_keys else "open")
        found = authorizers()
        if name not in found:
            raise usage.UsageError(f"--auth {name}: no such authorizer "
                                   f"(found: {', '.join(sorted(found))})")
        if name == "hmac" and secret is None:
            raise usage.UsageError("--auth hmac needs --secret-file")
        if name == "jwt" and jwt_keys is None:
            raise usage.UsageError("--auth jwt needs --jwt-key-file or --jwks-url")
        if self["demo"] and name != "open":
            raise usage.UsageError(f"--demo joins with plain room names: not with --auth {name}")
        return Config(
            path=self["path"],
            key=self["key"],
            room_by=self["room-by"],
            room_size=self["room-size"],
            max_peers=self["max-peers"],
            max_peers_per_ip=self["max-peers-per-ip"],
            trusted_proxies=self["trusted-proxies"],
            keepalive=self["keepalive"],
            ping_interval=self["ping-interval"],
            alive_timeout=self["alive-timeout"],
            sweep_interval=self["sweep-interval"],
            max_message_size=self["max-message-size"],
            rate_limit=self["rate-limit"],
            queue_limit=self["queue-limit"],
            room_queue_limit=self["room-queue-limit"],
            total_queue_bytes=self["total-queue-bytes"],
            expire_timeout=self["expire-timeout"],
            allow_discovery=bool(self["allow-discovery"]),
            drain_timeout=self["drain-timeout"],
            handshake_timeout=self["handshake-timeout"],
            takeover_probe=self["takeover-probe"],
            reconnect_grace=self["reconnect-grace"],
            poll_coalesce=self["poll-coalesce"] / 1000,
            ice_servers=tuple(self["ice-server"]),
            turn_secret=turn_secret,
            turn_ttl=self["turn-ttl"],
            admin_port=self["admin-port"],
            admin_token=admin_token,
            webhooks=tuple(self["webhook"]),
            webhook_secret=webhook_secret,
            webhook_queue=self["webhook-queue"],
            webhook_retry=self["webhook-retry"],
            log_peers=bool(self["log-peers"]),
            allowed_origins=tuple(self["allowed-origin"]),
            secret=secret,
            authorizer=found[name],
            jwt_keys=jwt_keys,
            jwt_audience=self["jwt-audience"],
            jwt_issuer=self["jwt-issuer"],
            room_events=bool(self["room-events"] or self["quick-match"] or self["demo"]),
            app_message_types=frozenset(app_types),
            quick_match=bool(self["quick-match"]),
            demo=bool(self["demo"]),
            demo_peerjs_url=demo_url or None,
            cluster=self["cluster"],
        )


def _check_certificate(description: str) -> None:
    """A missing or unreadable certificate is a usage error, not a traceback."""
    args, kw = split_description(description)
    private_key = kw.get("privateKey", args[2] if len(args) > 2 else "server.pem")
    cert_key = kw.get("certKey", args[3] if len(args) > 3 else private_key)
    try:
        load_context(private_key, cert_key, kw.get("extraCertChain"))
    except CertificateError as e:
        raise usage.UsageError(f"--port {description.split(':')[0]}:...: {e}") from None


def _check_endpoint(option: str, description: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise usage.UsageError(f"{option} {description}: not an endpoint ({e})") from None


def env_name(option: str) -> str:
    return "PEERSIG_" + option.upper().replace("-", "_")


def makeService(options: Options) -> IService:
    import gc

    from twisted.internet import reactor
    from twisted.logger import Logger

    from .service import make_service
    from .upstream.twisted import lighten

    service = make_service(options.built, options["port"], reactor)  # type: ignore[arg-type,unused-ignore]
    coalesce = options.built.poll_coalesce
    if not lighten(reactor, coalesce, service.hub.stats) and coalesce:
        # Set by hand, say that it does nothing; left at its default, this reactor is all.
        if options["poll-coalesce"] != POLL_COALESCE:
            Logger().warn("--poll-coalesce needs the epoll reactor and its lean loop: ignored")
    elif coalesce:
        Logger().info("at rest, heartbeats gather for up to {ms:g} ms before they are served "
                      "(--poll-coalesce)", ms=coalesce * 1000)
    # A full pass of the cycle collector walks every tracked object, some 50 per peer: the
    # five of a 20,000-peer ramp took 0.7 s of CPU, a tenth of it (docs/benchmarks.md).
    # Departed peers are freed by reference counting (their cycles are cut as they go), so
    # those passes find next to nothing; they now wait for 100 middle passes, not 10.
    gc.set_threshold(*gc.get_threshold()[:2], 100)
    return service
