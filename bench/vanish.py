"""A client whose network vanishes, on loopback: every TCP segment to or from one local
port is dropped by an nftables rule, so neither kernel hears from the other again (a laptop
shut, a phone out of coverage). Needs root and ``nft`` (Debian: ``apt-get install -y
nftables``). Used by ``bench/run.py`` (idle scenario) and ``tests/test_process.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from types import TracebackType

NFT = shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)


def unusable() -> str | None:
    """Why a port cannot be made to vanish here, or None if it can."""
    if NFT is None:
        return "no nft binary (apt-get install -y nftables)"
    probe = subprocess.run([NFT, "list", "tables"], capture_output=True, text=True)
    if probe.returncode:
        return f"nft does not work here: {probe.stderr.strip() or probe.returncode}"
    return None


class Vanish:
    """``with Vanish(port, address):`` drops every TCP segment from or to ``address``:
    ``port`` until the block ends. One table per instance, deleted on exit.

    The address matters when clients bind several loopback addresses: the same port
    number is then in use once per address."""

    def __init__(self, port: int, address: str = "127.0.0.1") -> None:
        self.port = port
        self.address = address
        self.table = f"peersig_vanish_{os.getpid()}_{port}"

    def _nft(self, *command: str) -> None:
        assert NFT is not None
        subprocess.run([NFT, *command], check=True, capture_output=True, text=True)

    def __enter__(self) -> Vanish:
        table = ("inet", self.table)
        self._nft("add", "table", *table)
        try:
            for hook in ("output", "input"):
                self._nft("add", "chain", *table, hook,
                          f"{{ type filter hook {hook} priority 0 ; }}")
                for ip, tcp in (("saddr", "sport"), ("daddr", "dport")):
                    self._nft("add", "rule", *table, hook, "ip", ip, self.address,
                              "tcp", tcp, str(self.port), "drop")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if NFT is not None:
            subprocess.run([NFT, "delete", "table", "inet", self.table], capture_output=True)
