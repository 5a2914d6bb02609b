"""Structured JSON logs to stdout that never print credentials.

Every record becomes one JSON object. Redaction masks anything that looks like
a secret: `extra` fields named like one (*secret*, *password*, *token*,
*access_key*, *credential*), `name=value` and `"name": value` pairs with such
names inside any text, and the password of `scheme://user:password@host` URLs.
`SecretStr` values are already masked by pydantic before they get here.
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
_URL_CREDENTIALS = re.compile(r"(\w+://)([^/\s:@]+):(\S+)@")
_SECRET_NAME = re.compile(r"(?i)secret|password|passwd|token|access[_-]?key|credential")
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def redact(text: str) -> str:
    text = _URL_CREDENTIALS.sub(r"\1\2:***@", text)
    return _SECRET_ASSIGNMENT.sub(r"\1***", text)


def _redact_field(name: str, value: Any) -> Any:
    """An `extra` value as JSON-ready data, with secrets masked at any depth."""
    if _SECRET_NAME.search(name):
        return "***"
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _redact_field(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_redact_field("", item) for item in value]
    return redact(str(value))


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
            if key in _STANDARD_ATTRS or key.startswith("_"):
                continue
            entry[key] = _redact_field(key, value)
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
