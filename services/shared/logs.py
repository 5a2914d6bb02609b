"""Structured JSON logs to stdout that never print credentials.

Every record becomes one JSON object. A redaction filter masks anything that
looks like a secret (values of keys named *secret*, *password*, *token*,
*access_key*; URLs with user:password@), and `SecretStr` values are masked by
pydantic before they get here.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_SECRET_ASSIGNMENT = re.compile(
    r"(?i)((?:secret|password|passwd|token|access[_-]?key)[a-z_]*[\"']?\s*[:=]\s*[\"']?)([^\s\"',}]+)"
)
_URL_CREDENTIALS = re.compile(r"(\w+://)([^/\s:@]+):([^/\s@]+)@")
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def redact(text: str) -> str:
    text = _URL_CREDENTIALS.sub(r"\1\2:***@", text)
    return _SECRET_ASSIGNMENT.sub(r"\1***", text)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = redact(str(value)) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route the root logger to stdout as JSON; called once by each process entry point."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every reconnect at INFO; keep ours readable.
    logging.getLogger("kafka").setLevel(logging.WARNING)
