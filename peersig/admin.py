"""The admin API: an operator's view of the rooms, and removing peers and rooms.

Served on its own endpoint (``--admin-port``), never on the public one. Every request needs
``Authorization: Bearer <token>`` (the contents of ``--admin-token-file``; RFC 6750), else
401. JSON in and out; ``docs/operations.md`` is the reference. Room names are those of the
room mode; in ``none`` mode the one namespace is the room named by the key
(``Hub.public_name``). Times are Unix milliseconds.

- ``GET /rooms``: ``{"rooms": [{"room", "peers", "created"}]}``
- ``GET /rooms/{room}``: ``{"room", "created", "peers": [{"id", "since", "away"[,
  "address"]}]}`` (``away``: its socket closed, within its reconnect grace; the address only
  with ``--log-peers``)
- ``DELETE /rooms/{room}/peers/{id}[?reason=TEXT][&ban=SECONDS]``: ERROR ``reason``, LEAVE to
  the room, close 1008; with ``ban`` the id is refused in that room, with that ERROR, for
  that long (a ban applies even to an id not connected now).
- ``DELETE /rooms/{room}``: every peer gets the ERROR and the close.

A room with no peers does not exist: 404.
"""

from __future__ import annotations

import hmac
import json
import math
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .rooms import Hub, Room
from .session import AWAY, Session

log = Logger()

DEFAULT_REASON = "Removed by the server"
# An ERROR text, and the close reason (cut to 123 bytes there): one line of text.
MAX_REASON = 200
MAX_BAN_SECONDS = 30 * 86400
# Bans held at once; the sweep forgets expired ones.
MAX_BANS = 100_000


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class AdminRoot(Resource):
    isLeaf = True

    def __init__(self, hub: Hub, token: bytes) -> None:
        super().__init__()
        self.hub = hub
        self.expected = b"Bearer " + token

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        given = request.getHeader(b"authorization") or b""
        if not hmac.compare_digest(given, self.expected):
            request.setHeader(b"www-authenticate", b'Bearer realm="peersig admin"')
            return self._error(request, 401, "A valid bearer token is required")
        try:
            parts = [unquote(p, errors="strict") for p in request.path.decode().split("/")[1:]]
            answer = self._route(request, request.method, parts)
        except UnicodeDecodeError:
            return self._error(request, 400, "The path is not UTF-8")
        except AdminError as e:
            return self._error(request, e.status, str(e))
        if not isinstance(answer, Deferred):
            return json.dumps(answer).encode()
        # --cluster: the answer needs Redis (cluster.Link).
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)

        def write(body: bytes) -> None:
            if not finished.called:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> bytes:
            error = failure.value
            if isinstance(error, AdminError):
                return self._error(request, error.status, str(error))
            log.warn("admin: the cluster did not answer: {e}", e=failure.getErrorMessage())
            return self._error(request, 503, "The cluster's Redis did not answer")

        answer.addCallback(lambda a: json.dumps(a).encode()).addErrback(failed).addCallback(write)
        return NOT_DONE_YET

    def _error(self, request: Request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        return json.dumps({"error": message}).encode()

    def _route(self, request: Request, method: bytes, parts: list[str]) -> Any:
        if not parts or parts[0] != "rooms" or len(parts) > 4 or (
                len(parts) == 3 or (len(parts) == 4 and parts[2] != "peers")):
            raise AdminError(404, "Not found")
        allowed = {1: (b"GET",), 2: (b"GET", b"DELETE"), 4: (b"DELETE",)}[len(parts)]
        if method not in allowed:
            request.setHeader(b"allow", b", ".join(allowed))
            raise AdminError(405, "Method not allowed")
        hub = self.hub
        if len(parts) == 1 and hub.cluster is not None:
            return hub.cluster.rooms().addCallback(self._all_rooms)
        if len(parts) == 1:
            return {"rooms": [{"room": hub.public_name(room),
                               "peers": len(room.peers) + len(room.away),
                               "created": _ms(room.created)} for room in hub.rooms.values()]}
        name = parts[1]
        if hub.room_key(name) is None:  # none mode: only the key names the room
            raise AdminError(404, "No such room")
        room = hub.room_named(name)
        if len(parts) == 4:
            return self._remove_peer(request, name, room, parts[3])
        if hub.cluster is not None:
            return self._cluster_room(request, method, name, room)
        if room is None:
            raise AdminError(404, "No such room")
        if method == b"GET":
            return self._describe(room)
        reason = self._reason(request)
        removed = hub.close_room(room, reason)
        log.info("admin closed room {room}: {peers} peers removed", event="admin",
                 room=room.tag, peers=removed)
        return {"removed": removed}

    def _all_rooms(self, counts: dict[str, int]) -> Any:
        """--cluster: ``GET /rooms`` from Redis, every node's rooms (``created`` null for
        a room with no member on this node)."""
        hub = self.hub
        rooms = []
        for key, peers in sorted(counts.items()):
            local = hub.rooms.get(key)
            rooms.append({"room": hub.config.key if hub.config.room_by == "none" else key,
                          "peers": peers,
                          "created": _ms(local.created) if local is not None else None})
        return {"rooms": rooms}

    def _cluster_room(self, request: Request, method: bytes, name: str,
                      room: Room | None) -> Deferred[Any]:
        """--cluster: ``GET /rooms/R`` lists every node's members (``node`` says where;
        ``since`` and ``away`` are known for this node's only, null for others');
        ``DELETE /rooms/R`` asks every node to remove its members."""
        hub = self.hub
        link = hub.cluster
        assert link is not None
        key = hub.room_key(name)
        assert key is not None
        reason = self._reason(request) if method == b"DELETE" else ""

        def answer(members: dict[str, str]) -> Any:
            room = hub.rooms.get(key)  # as it is now, after the wait
            if not members and room is None:
                raise AdminError(404, "No such room")
            if method == b"DELETE":
                removed = len(members)
                link.close_room(key, reason)
                if room is not None:
                    hub.close_room(room, reason)
                log.info("admin closed room {room} on every node", event="admin",
                         room=room.tag if room is not None else "-")
                return {"removed": removed}
            described = self._describe(room) if room is not None else {
                "room": name, "created": None, "peers": []}
            local = {p["id"] for p in described["peers"]}
            for peer in described["peers"]:
                peer["node"] = link.node
            described["peers"] += [{"id": i, "since": None, "away": None, "node": node}
                                   for i, node in members.items() if i not in local]
            return described

        return link.members(key).addCallback(answer)

    def _describe(self, room: Room) -> Any:
        show_address = self.hub.config.log_peers
        peers = []
        for session in [*room.peers.values(), *room.away.values()]:
            peer = {"id": session.id, "since": _ms(session.connected_at),
                    "away": session.state == AWAY}
            if show_address:
                peer["address"] = session.address
            peers.append(peer)
        return {"room": self.hub.public_name(room), "created": _ms(room.created), "peers": peers}

    def _remove_peer(self, request: Request, name: str, room: Room | None, peer_id: str) -> Any:
        hub = self.hub
        reason = self._reason(request)
        ban = self._ban_seconds(request)
        session = (room.peers.get(peer_id) or room.away.get(peer_id)) if room is not None \
            else None
        if hub.cluster is not None and (session is None or ban is not None):
            return self._remove_anywhere(name, peer_id, reason, ban, session)
        if session is None and ban is None:
            raise AdminError(404, "No such peer in that room")
        answer: dict[str, Any] = {"removed": session is not None}
        if ban is not None:
            if len(hub.bans) >= MAX_BANS:
                raise AdminError(503, f"{MAX_BANS} bans are held already")
            until = hub.clock.seconds() + ban
            hub.ban(name, peer_id, until, reason)
            answer["banned_until"] = _ms(until)
        if session is not None:
            hub.remove(session, reason)
        log.info("admin removed a peer from room {room}", event="admin",
                 room=session.room.tag if session else "-", ban=ban,
                 **({"peer": peer_id} if hub.config.log_peers else {}))
        return answer

    def _remove_anywhere(self, name: str, peer_id: str, reason: str, ban: float | None,
                         session: Session | None) -> Deferred[Any]:
        """--cluster: the ban goes to Redis (every node, and past restarts), and a peer not
        connected here is removed by the node it is connected to."""
        hub = self.hub
        link = hub.cluster
        assert link is not None
        key = hub.room_key(name)
        assert key is not None
        answer: dict[str, Any] = {}

        def removed(found: bool) -> Any:
            if not found and ban is None:
                raise AdminError(404, "No such peer in that room")
            answer["removed"] = found
            if ban is None:
                return answer
            answer["banned_until"] = _ms(hub.clock.seconds() + ban)
            return answer

        def remove(_: Any) -> Deferred[bool]:
            if session is not None:
                hub.remove(session, reason)
                return succeed(True)
            return link.remove(key, peer_id, reason)

        # The ban first: a peer removed before it is in place could come back elsewhere.
        banned = link.ban(key, peer_id, ban, reason) if ban is not None else succeed(None)
        return banned.addCallback(remove).addCallback(removed)

    def _reason(self, request: Request) -> str:
        raw = request.args.get(b"reason")
        if not raw:
            return DEFAULT_REASON
        try:
            reason: str = raw[0].decode()
        except UnicodeDecodeError:
            raise AdminError(400, "reason is not UTF-8") from None
        if not reason or len(reason) > MAX_REASON or not reason.isprintable():
            raise AdminError(400, f"reason must be 1 to {MAX_REASON} printable characters")
        return reason

    def _ban_seconds(self, request: Request) -> float | None:
        raw = request.args.get(b"ban")
        if not raw:
            return None
        try:
            seconds = float(raw[0])
        except ValueError:
            seconds = math.nan
        if not 0 < seconds <= MAX_BAN_SECONDS:
            raise AdminError(400, f"ban must be a number of seconds, up to {MAX_BAN_SECONDS}")
        return seconds


class AdminSite(Site):
    """No access log (paths carry peer ids)."""

    def log(self, request: Any) -> None:
        pass


def make_admin_site(hub: Hub, token: bytes) -> AdminSite:
    site = AdminSite(AdminRoot(hub, token))
    site.timeOut = 30
    return site
