"""Who may join, and who may take an id over: the ``IPeerAuthorizer`` extension point.

Authorizers are Twisted plugins: any object providing ``IPlugin`` and ``IPeerAuthorizer``
in a module under a ``twisted/plugins/`` folder on the Python path is found by
``getPlugins`` and chosen with ``--auth NAME``. peersig ships ``open`` (everyone may join;
the default), ``hmac`` (signed join tokens, see ``tokens.py``) and ``jwt`` (an identity
provider's JWTs, see ``jwtauth.py``). ``docs/auth.md`` shows a user's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface, implementer

from . import tokens
from .messages import E_INVALID_TOKEN

if TYPE_CHECKING:
    from .config import Config
    from .rooms import JoinRequest


class Verdict(NamedTuple):
    allowed: bool
    # May replace a live holder of the same id at once (a reconnect it vouches for).
    takeover: bool = False
    # The ERROR text a refused client gets.
    message: str = E_INVALID_TOKEN
    # Not decided yet (the authorizer is fetching what it needs, such as keys): the join
    # waits, without OPEN, and is asked again once this fires. The authorizer must decide
    # the second time, or after a bounded number of waits.
    later: Deferred[Any] | None = None
    # The size of the room this peer creates (a JWT's room_size claim); None: --room-size.
    room_size: int | None = None


ALLOW = Verdict(True)


class IPeerAuthorizer(Interface):
    name = Attribute("The name --auth selects it by.")

    def authorize(request: JoinRequest, room: str, config: Config, now: float) -> Verdict:
        """Decide on a join that passed peersig's own checks (key, room name, id rule).

        ``request`` holds key, id, token, address (after --trusted-proxies) and origin;
        ``room`` is the room the --room-by mode gives; ``now`` is the server clock.
        Called once per join attempt, on the reactor thread: it must not block. An
        authorizer that must first fetch something answers ``Verdict(False, later=d)``.
        """


@implementer(IPlugin, IPeerAuthorizer)
class OpenAuthorizer:
    """Everyone who passes peersig's own checks may join; nobody takes a live id over
    except by the rules every mode has (a dead holder; the same token in key/none modes; a
    holder that does not answer the takeover probe)."""

    name = "open"

    def authorize(self, request: JoinRequest, room: str, config: Config, now: float) -> Verdict:
        return ALLOW


@implementer(IPlugin, IPeerAuthorizer)
class HMACAuthorizer:
    """Signed join tokens (``ROOM~EXPIRY~SIGNATURE``, keyed by --secret-file): a valid one
    is good for one id in one room until it expires, and takes that id over at once."""

    name = "hmac"

    def authorize(self, request: JoinRequest, room: str, config: Config, now: float) -> Verdict:
        secret = config.secret
        signed = tokens.split(request.token)
        if secret is None or signed is None:
            return Verdict(False)
        signed_room = room if config.room_by != "none" else config.key
        if not tokens.verify(secret, signed, signed_room, request.id, now):
            return Verdict(False)
        return Verdict(True, takeover=True)


def authorizers() -> dict[str, IPeerAuthorizer]:
    import twisted.plugins

    return {p.name: p for p in getPlugins(IPeerAuthorizer, twisted.plugins)}
