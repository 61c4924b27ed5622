"""Logging setup: one line per event, optional JSON, secrets never shown.

The redaction filter is a second line of defence: secrets are ``Secret`` objects and are never
formatted into messages, but a filter also masks any registered secret value that reaches a
log record (e.g. inside an exception text from a client library).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any

# longest first; replaced as a whole (never mutated) so that ``redact`` reads it without a
# lock: a log line formatted while a signal handler or another thread logs never waits
_SECRETS: tuple[str, ...] = ()
_LOCK = threading.Lock()  # serialises writers only


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it would appear in a log line."""
    global _SECRETS
    if value and len(value) >= 4:
        with _LOCK:
            if value not in _SECRETS:
                _SECRETS = tuple(sorted({*_SECRETS, value}, key=len, reverse=True))


def redact(text: str) -> str:
    for s in _SECRETS:
        if s in text:
            text = text.replace(s, "***")
    return text


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            doc.update(extra)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, default=str))


def setup_logging(*, level: str = "INFO", json_logs: bool = False, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if json_logs:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in (
        "urllib3",
        "apscheduler.executors",
        "apscheduler.scheduler",  # "Added job" on every takeover or kick
        "httpx",
        "httpcore",
        "uvicorn.access",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
