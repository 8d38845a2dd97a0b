"""A small HTTP server on 127.0.0.1 in a thread, for the parts of a test that play an app's
backend (a webhook receiver, an identity provider's JWKS). ``hang`` holds every request
until ``stop`` (or ``released``); stopped by the test that made it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0) -> None:
        self.hang = threading.Event()
        self.released = threading.Event()
        super().__init__(("127.0.0.1", port), handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def address(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def hold(self) -> None:
        """In a handler: wait here while ``hang`` is set, until released."""
        if self.hang.is_set():
            self.released.wait(30)

    def stop(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()
