"""A service's gRPC servicers on a real server for a test module (`serving`), and calling one
method of a freemask.v1 service by name as any client would, with no generated stub: the
request's own type serialises it and `response_type` parses (`unary_call`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from freemask.shared.config import FreemaskConfig
from freemask.shared.grpc_runtime import start_server
from freemask.shared.metrics import ServiceMetrics

R = TypeVar("R", bound=Message)


def unary_call(target: str, service: str, method: str, request: Message, response_type: type[R],
               timeout_s: float) -> R:
    with grpc.insecure_channel(target) as channel:
        stub = channel.unary_unary(f"/freemask.v1.{service}/{method}",
                                   request_serializer=type(request).SerializeToString,
                                   response_deserializer=response_type.FromString)
        return stub(request, timeout=timeout_s)


@contextmanager
def serving(config: FreemaskConfig, grpc_services: list, name: str) -> Iterator[str]:
    """The servicers on a free loopback port; yields the target, stops the server at the end."""
    running = start_server(config.server, 0, grpc_services, ServiceMetrics(name))
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop(1.0)


class Aborted(Exception):
    """What `context.abort` raises in a handler called without a server (see CallContext)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class CallContext:
    """What the gRPC wrapper uses of a servicer context: `abort` raises, as grpc's does."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)
