"""Log lines for operators: one JSON object per line (LOG_FORMAT=json) or plain console text."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from router.config import Settings


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
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("router", "service"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(settings.log_level)
        logger.propagate = False
