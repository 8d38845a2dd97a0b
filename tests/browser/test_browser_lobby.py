"""Issue 24 end to end with the stock client (npm peerjs@1.5.5) in Chromium: app messages
through the room, quick match, and the demo page in two tabs."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator

import pytest
from browser_harness import OpenTabs, PeersigServer, PeerTab, await_mesh, exchange, open_peers
from PIL import Image, ImageStat
from playwright.sync_api import Browser

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def lobby(loopback_only: None, site: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[PeersigServer]:
    """Rooms of 4 with app messages (CHAT, READY), quick match and the demo page, which
    loads the npm bundle from the test's own site."""
    server = PeersigServer(tmp_path_factory.mktemp("lobby"), [
        "--app-message-type", "CHAT", "--app-message-type", "READY", "--quick-match",
        "--demo", "--demo-peerjs-url", f"{site}peerjs.min.js"])
    server.start()
    yield server
    server.stop()


def app_messages(tab: PeerTab, kind: str) -> list[tuple[str, object, object]]:
    return [(e["src"], e.get("dst"), e["payload"]) for e in tab.events("signal")
            if e["type"] == kind]


def test_pages_exchange_app_messages_and_a_broadcast_reaches_three(
        tabs: OpenTabs, lobby: PeersigServer, room: str) -> None:
    peers = tabs(4)
    open_peers(peers, lobby.ws, room, ["host", "p1", "p2", "p3"])
    host, *guests = peers
    host.send_frame({"type": "READY", "payload": {"seat": 1}})  # to the whole room
    guests[0].send_frame({"type": "CHAT", "dst": "host", "payload": {"text": "hi host"}})
    for guest in guests:
        guest.page.wait_for_function("T.events().some((e) => e.type === 'READY')")
        assert app_messages(guest, "READY") == [("host", None, {"seat": 1})]
    host.page.wait_for_function("T.events().some((e) => e.type === 'CHAT')")
    assert app_messages(host, "CHAT") == [("p1", "host", {"text": "hi host"})]
    assert app_messages(host, "READY") == []  # not to its sender
    for tab in peers:  # the stock client lets them be
        assert tab.errors() == [] and tab.state()["open"], tab.name


def test_two_quick_match_pages_find_each_other_and_connect(
        tabs: OpenTabs, lobby: PeersigServer) -> None:
    queue = f"match:q{secrets.token_hex(3)}"
    first, second = tabs(2)
    first.start(lobby.ws, queue, "first")
    first.wait_open()
    second.start(lobby.ws, queue, "second")
    second.wait_open()
    first.wait_signal("JOIN", "second")
    (peers,) = [e["peers"] for e in second.events("signal") if e["type"] == "PEERS"]
    assert peers == ["first"]
    second.id, first.id = "second", "first"
    second.connect(peers[0])
    await_mesh([first, second])
    exchange([first, second], "matched")
    assert first.errors() == [] and second.errors() == []


def colours(png: bytes) -> float:
    """How much a screenshot varies: the standard deviation of its grey levels."""
    return float(ImageStat.Stat(Image.open(io.BytesIO(png)).convert("L")).stddev[0])


def test_the_demo_page_works_in_two_tabs(browser: Browser, lobby: PeersigServer) -> None:
    context = browser.new_context()
    try:
        ann, ben = (context.new_page() for _ in range(2))
        room = f"demo{secrets.token_hex(3)}"
        for page, name in ((ann, "ann"), (ben, "ben")):
            page.goto(f"{lobby.http}/demo?stun=off")
            page.fill("#name", name)
            page.fill("#room", room)
            page.click("#join-btn")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('in room')")
        ann.wait_for_function("document.getElementById('members').textContent.includes('ben')")
        ann.fill("#text", "good luck, have fun")
        ann.click("#say-room")
        ben.wait_for_function(
            "document.getElementById('log').textContent.includes('ann: good luck, have fun')")
        ann.click("#members li:nth-child(2) button:nth-child(2)")  # call ben
        for page in (ann, ben):
            page.wait_for_function("document.getElementById('remote').videoWidth > 0",
                                   timeout=10_000)
        ben.wait_for_timeout(500)  # a few frames in
        line = ben.locator("#log div", has_text="ann: good luck, have fun")
        assert colours(line.screenshot()) > 10  # the chat line is drawn
        remote = ben.locator("#remote").screenshot()
        assert colours(remote) > 10  # the caller's (fake) camera, not a black box
        ben.screenshot(path=str(lobby.workdir / "demo-ben.png"), full_page=True)
    finally:
        context.close()
