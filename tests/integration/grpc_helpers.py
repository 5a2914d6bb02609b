"""Calling one method of a freemask.v1 gRPC service by name, as any client would, with
no generated stub: the request's own type serialises it and `response_type` parses."""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf.message import Message

R = TypeVar("R", bound=Message)


def unary_call(target: str, service: str, method: str, request: Message, response_type: type[R],
               timeout_s: float) -> R:
    with grpc.insecure_channel(target) as channel:
        stub = channel.unary_unary(f"/freemask.v1.{service}/{method}",
                                   request_serializer=type(request).SerializeToString,
                                   response_deserializer=response_type.FromString)
        return stub(request, timeout=timeout_s)
