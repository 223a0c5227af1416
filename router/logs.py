"""Log lines for operators: one JSON object per line (LOG_FORMAT=json) or plain console text, and the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import BinaryIO

from starlette.types import Scope

from router.config import Settings

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """Flat JSON lines that log shippers parse without a grok pattern."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """Give the `router` and `service` loggers one handler in the configured format and level."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(CONSOLE_FORMAT))
    for name in ("router", "service"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(settings.log_level)
        logger.propagate = False


class AccessLog:
    """The access log: a line per request on stderr (client, request line, status, server-side ms), shaped like the
    other log lines of LOG_FORMAT (logger `router.access`); a JSON line also has each of those as a field.

    Not written through `logging`: with a LogRecord per request, made and dispatched even to a handler that drops
    it, cache hits ran at 0.87-0.88 of the rate with no access log, and with BentoML's access log at 0.76-0.83
    (docs/performance.md). The lines of one turn of the event loop are written together at its end. The path is the
    one sent (`raw_path`, still %-encoded; a byte that is not UTF-8 as \\xNN), so no decoded newline splits a line.
    """

    def __init__(self, json_lines: bool, stream: BinaryIO | None = None) -> None:
        self.json_lines = json_lines
        self.stream = stream if stream is not None else sys.stderr.buffer
        self.pending: list[str] = []
        self.second = -1
        self.stamp = ""

    def request(self, scope: Scope, status: int, elapsed_ms: float) -> None:
        """Queue the line of a request that ended (in the event loop's thread)."""
        client = scope.get("client")
        address = f"{client[0]}:{client[1]}" if client else "-"
        path = scope.get("raw_path", b"").decode("utf-8", "backslashreplace") or scope["path"]
        if scope.get("query_string"):
            path = f"{path}?{scope['query_string'].decode('utf-8', 'backslashreplace')}"
        method = scope["method"]
        message = f'{address} "{method} {path}" {status} {elapsed_ms:.3f}ms'
        seconds, milliseconds = self.clock()
        if self.json_lines:
            line = {
                "time": f"{seconds}.{milliseconds}+00:00",
                "level": "INFO",
                "logger": "router.access",
                "message": message,
                "client": address,
                "method": method,
                "path": path,
                "status": status,
                "latency_ms": round(elapsed_ms, 3),
            }
            self.pending.append(json.dumps(line, ensure_ascii=False) + "\n")
        else:
            self.pending.append(f"{seconds},{milliseconds} INFO router.access: {message}\n")
        if len(self.pending) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def clock(self) -> tuple[str, str]:
        """The time now as this log format writes it: the second (kept for a second) and the milliseconds. Console
        lines have `logging.Formatter`'s asctime (local time), JSON lines `JsonFormatter`'s ISO 8601 time (UTC)."""
        now = time.time()
        if int(now) != self.second:
            self.second = int(now)
            if self.json_lines:
                self.stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            else:
                self.stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        return self.stamp, f"{int(now * 1000) % 1000:03d}"

    def flush(self) -> None:
        data = "".join(self.pending).encode("utf-8", "replace")
        self.pending.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: the lines are lost, not the requests
            pass
