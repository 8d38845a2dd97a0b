"""An in-memory ``PeerTransport`` and a ``Hub`` on a fake clock, for tests of the core."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock

from peersig.config import Config
from peersig.rooms import Hub, JoinRequest
from peersig.session import Session


class FakeTransport:
    """Records what the core sends; answers pings when ``responsive``."""

    def __init__(self, responsive: bool = False) -> None:
        self.frames: list[bytes] = []
        self.pings = 0
        self.closed: tuple[int, str] | None = None
        self.aborted = False
        self.responsive = responsive
        self.session: Session | None = None

    def send_frame(self, frame: bytes) -> None:
        assert self.closed is None and not self.aborted, "frame sent on a closed socket"
        self.frames.append(frame)

    def attach(self, session: Session) -> None:
        self.session = session

    def send_ping(self) -> None:
        self.pings += 1
        if self.responsive and self.session is not None:
            self.session.alive()

    def close_with(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def abort_connection(self) -> None:
        self.aborted = True

    # -- reading what was sent ------------------------------------------------------------

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.frames]

    def take(self) -> list[dict[str, Any]]:
        out = self.messages()
        self.frames.clear()
        return out

    def types(self) -> list[str]:
        return [m["type"] for m in self.messages()]


class World:
    """A hub on a fake clock, with helpers to join peers and send frames."""

    def __init__(self, **config: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.hub = Hub(Config(**config), self.clock)

    def connect(
        self,
        peer_id: str,
        token: str = "room1",
        key: str = "peerjs",
        address: str = "127.0.0.1",
        responsive: bool = True,
    ) -> FakeTransport:
        transport = FakeTransport(responsive)
        transport.session = self.hub.join(transport, JoinRequest(key, peer_id, token, address))
        return transport

    def send(self, transport: FakeTransport, message: Any) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        assert transport.session is not None
        transport.session.received(data)

    def close(self, transport: FakeTransport) -> None:
        """The client closed its socket."""
        assert transport.session is not None
        self.hub.depart(transport.session, "closed")

    def advance(self, seconds: float, step: float | None = None) -> None:
        """Move time on, sweeping every ``sweep_interval`` as the service would."""
        step = step or self.hub.config.sweep_interval
        remaining = seconds
        while remaining > 1e-9:
            dt = min(step, remaining)
            self.clock.advance(dt)
            remaining -= dt
            self.hub.sweep()
