"""Fixtures for the browser suite: one Chromium per session, one peersig per module, a fresh
browser context per test, and artifacts (console logs, screenshots, server log) on failure."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest
from browser_harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    OpenTabs,
    PeersigServer,
    PeerTab,
    StaticSite,
    isolate_to_loopback,
    save_artifacts,
)
from playwright.sync_api import Browser, sync_playwright


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "browser: end to end through headless Chromium, stock PeerJS and peersig"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    tabs: list[PeerTab] = getattr(item, "browser_tabs", [])
    if report.failed and report.when in ("setup", "call") and tabs:
        funcargs = getattr(item, "funcargs", {})
        servers = [v for v in funcargs.values() if isinstance(v, PeersigServer)]
        folder = save_artifacts(item.name, tabs, servers)
        report.sections.append(("browser artifacts", f"console logs and screenshots: {folder}"))


@pytest.fixture(scope="session")
def loopback_only() -> None:
    isolate_to_loopback()


@pytest.fixture(scope="session")
def site(loopback_only: None) -> Iterator[str]:
    served = StaticSite()
    yield served.url
    served.close()


@pytest.fixture(scope="session")
def browser(loopback_only: None) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(
    loopback_only: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PeersigServer]:
    """peersig with default settings (room size 4 said explicitly), on ws and wss."""
    running = PeersigServer(tmp_path_factory.mktemp("peersig"), ["--room-size", "4"], tls=True)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def tabs(browser: Browser, site: str, request: pytest.FixtureRequest) -> Iterator[OpenTabs]:
    """Opens n more tabs, each with the test page, in this test's own browser context."""
    context = browser.new_context()
    opened: list[PeerTab] = []
    request.node.browser_tabs = opened

    def open_tabs(n: int, url: str | None = None) -> list[PeerTab]:
        new = [PeerTab(context.new_page(), f"tab{len(opened) + i}", url or site)
               for i in range(n)]
        opened.extend(new)
        return new

    yield open_tabs
    context.close()


@pytest.fixture
def room(request: pytest.FixtureRequest) -> str:
    """A room name of this test's own; peersig allows letters, digits and . _ : -"""
    return re.sub(r"[^A-Za-z0-9._:-]", "-", request.node.name)[:80] + "-" + secrets.token_hex(3)
