"""A benchmark leaves no server or generator running, however it ends (bench.run.run_owning):
stopped with ``kill``, it used to leave them behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.run import OWN_PIDS, run_owning

ROOT = Path(__file__).resolve().parent.parent


def _gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether ``pid`` ended (or is a zombie) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_an_error_kills_what_the_run_started() -> None:
    child = subprocess.Popen(["sleep", "60"])
    OWN_PIDS.add(child.pid)

    async def fails() -> None:
        raise RuntimeError("a scenario failed")

    try:
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(RuntimeError):
            run_owning(fails())
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        OWN_PIDS.discard(child.pid)
        child.kill()
        child.wait()


def test_sigterm_kills_what_the_run_started() -> None:
    script = (
        "import asyncio, subprocess\n"
        "from bench.run import OWN_PIDS, run_owning\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "OWN_PIDS.add(child.pid)\n"
        "async def main():\n"
        "    print(child.pid, flush=True)\n"  # SIGTERM's handler is in place by now
        "    await asyncio.sleep(60)\n"
        "run_owning(main())\n"
    )
    bench = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert bench.stdout is not None
        pid = int(bench.stdout.readline())
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=10) == 128 + signal.SIGTERM
        assert _gone(pid), "the run's child outlived it"
    finally:
        bench.kill()
        bench.wait()
