"""The gRPC wrapper every servicer goes through: errors become statuses whose details arrive."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest

from freemask.shared.errors import InvalidInput
from freemask.shared.grpc_runtime import MAX_STATUS_DETAIL_CHARS, service_handler
from freemask.shared.metrics import ServiceMetrics
from freemask.v1 import thesaurus_pb2

from grpc_helpers import Aborted, CallContext


class Refuses:
    def __init__(self, message: str) -> None:
        self.message = message

    def Relation(self, request: thesaurus_pb2.RelationRequest) -> thesaurus_pb2.RelationResponse:  # noqa: N802
        raise InvalidInput(self.message)


def call_relation(message: str) -> Aborted:
    descriptor = thesaurus_pb2.DESCRIPTOR.services_by_name["Thesaurus"]
    generic = service_handler(descriptor, Refuses(message), ServiceMetrics("grpc-runtime-test"))
    handler = generic.service(SimpleNamespace(method=f"/{descriptor.full_name}/Relation", invocation_metadata=()))
    with pytest.raises(Aborted) as raised:
        handler.unary_unary(thesaurus_pb2.RelationRequest().SerializeToString(), CallContext())
    return raised.value


def test_a_short_message_arrives_whole() -> None:
    aborted = call_relation("object 'x' is unknown")
    assert aborted.code is grpc.StatusCode.INVALID_ARGUMENT and aborted.details == "object 'x' is unknown"


def test_a_message_quoting_a_huge_input_is_cut_and_keeps_its_code() -> None:
    aborted = call_relation("unknown object " + "y" * 10_000_000)
    assert aborted.code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(aborted.details) < MAX_STATUS_DETAIL_CHARS + 100
    assert aborted.details.startswith("unknown object yyy") and "cut from 10000015 characters" in aborted.details
