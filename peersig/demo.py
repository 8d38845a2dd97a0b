"""``--demo``: the page at ``GET /demo`` to try peersig in two tabs (``demo.html``).

It joins a room with the stock PeerJS client, lists the room's members (room events), chats
through the room (app messages of type ``CHAT``) and over a direct data connection, and
starts a video call. The client comes from a pinned CDN URL with its integrity hash (SRI),
or from ``--demo-peerjs-url``.
"""

from __future__ import annotations

import html
import json
from importlib import resources

from .config import Config

# peerjs 1.5.5's UMD bundle, as npm ships it; the hash is SHA-384 of those bytes.
PEERJS_URL = "https://cdn.jsdelivr.net/npm/peerjs@1.5.5/dist/peerjs.min.js"
PEERJS_INTEGRITY = "sha384-x0YgkOr/3UOZP2CRDxGW9e0Q+2Qjyr3uJrm4xU32Y7ZCNAo7Cc7bjhrZMi/dwczu"


def _js_string(value: str) -> str:
    """``value`` as a JavaScript string literal that is safe inside a <script> element."""
    return json.dumps(value).replace("</", "<\\/")


def page(config: Config) -> bytes:
    """The demo page for this server's ``--path`` and ``--key``."""
    text = resources.files(__package__).joinpath("demo.html").read_text(encoding="utf-8")
    url = config.demo_peerjs_url or PEERJS_URL
    # Integrity needs a CORS fetch: only for the pinned CDN copy, which allows it.
    integrity = "" if config.demo_peerjs_url else \
        f' integrity="{PEERJS_INTEGRITY}" crossorigin="anonymous"'
    for placeholder, value in (('"{path}"', _js_string(config.path)),
                               ('"{key}"', _js_string(config.key)),
                               ("{peerjs_src}", html.escape(url, quote=True)),
                               ("{peerjs_integrity}", integrity)):
        text = text.replace(placeholder, value)
    return text.encode()
