"""A benchmark leaves no server or generator running, however it ends (bench.run.run_owning):
stopped with ``kill``, it used to leave them behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A run (in a process of its own: the suite's may have an event loop running) that starts a
# child, says its pid once SIGTERM's handler is in place, then waits or fails.
RUN = """
import asyncio, subprocess, sys
from bench.run import OWN_PIDS, run_owning
child = subprocess.Popen(['sleep', '60'])
OWN_PIDS.add(child.pid)
async def main():
    print(child.pid, flush=True)
    if sys.argv[1] == 'fail':
        raise RuntimeError('a scenario failed')
    await asyncio.sleep(60)
run_owning(main())
"""


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


@pytest.mark.parametrize("end", ["fail", "sigterm"])
def test_the_children_of_a_run_do_not_outlive_it(end: str) -> None:
    with subprocess.Popen([sys.executable, "-c", RUN, end], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as run:
        assert run.stdout is not None and run.stderr is not None
        try:
            pid = int(run.stdout.readline())
            if end == "sigterm":
                run.send_signal(signal.SIGTERM)
                assert run.wait(timeout=10) == 128 + signal.SIGTERM
            else:
                assert run.wait(timeout=10) == 1
                assert "a scenario failed" in run.stderr.read()
            assert _gone(pid), "the run's child outlived it"
        finally:
            run.kill()
