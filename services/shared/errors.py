"""Errors that cross the boundary between a service's core and its adapters.

The core raises these; the gRPC adapter maps them to status codes and the Kafka
stage worker decides from them whether a message is retried or dead-lettered.
"""

from __future__ import annotations


class InvalidInput(ValueError):
    """Input we will never accept (bad bytes, bad ids, wrong shapes). gRPC: INVALID_ARGUMENT;
    Kafka: dead-lettered on the first attempt, since retrying cannot help."""


class NotFound(LookupError):
    """The thing asked for does not exist. gRPC: NOT_FOUND."""


class Unavailable(RuntimeError):
    """A dependency (store, broker, Triton) is down; retrying later may succeed. gRPC: UNAVAILABLE."""


class Unusable(RuntimeError):
    """A valid request whose deterministic result cannot be used (e.g. an empty mask): retrying
    gives the same result. gRPC: FAILED_PRECONDITION; Kafka: dead-lettered on the first attempt."""


# Error messages travel as gRPC status details (a trailer: grpc drops details over ~16 KB and the
# caller sees RESOURCE_EXHAUSTED instead of the real status) and as dead letters, and they are
# logged: a value echoed from the input is cut to a readable length.
SHOWN_CHARS = 100


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters with its full length noted."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str) else len(text)
    return f"{text[:limit]}… ({size} characters)"
