"""A JSON-lines log observer, for journald and log shippers:
``twistd --logger peersig.logs.json_lines -n peersig ...``.

Each event is one line: time, level, namespace, the formatted text, and the event's own
named fields where they are plain JSON values. peersig never puts tokens or secrets in an
event; ids and addresses only with ``--log-peers``.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent
from zope.interface import implementer

_PLAIN = (str, int, float, bool, type(None))


@implementer(ILogObserver)
class JSONLinesObserver:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: LogEvent) -> None:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "text": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and isinstance(value, _PLAIN):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()


def json_lines() -> JSONLinesObserver:
    """The observer factory ``twistd --logger`` calls: JSON lines on standard output."""
    return JSONLinesObserver(sys.stdout)
