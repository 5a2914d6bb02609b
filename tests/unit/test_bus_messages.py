"""Decoding inbound records, without a broker."""

from __future__ import annotations

import pytest

from freemask.shared.bus import InboundMessage
from freemask.shared.errors import InvalidInput
from freemask.v1 import dead_letter_pb2, generate_pb2


def inbound(value: bytes, **headers: bytes) -> InboundMessage:
    return InboundMessage(topic="t", partition=0, offset=7, key="s-1", value=value,
                          headers={k.replace("_", "-"): v for k, v in headers.items()})


def test_decode_returns_the_declared_message() -> None:
    request = generate_pb2.GenerateRequest(sample_id="s-1", prompt="a dog")
    message = inbound(request.SerializeToString(), schema=b"freemask.v1.GenerateRequest")
    assert message.decode(generate_pb2.GenerateRequest) == request


def test_decode_refuses_another_schema() -> None:
    message = inbound(dead_letter_pb2.DeadLetter().SerializeToString(), schema=b"freemask.v1.DeadLetter")
    with pytest.raises(InvalidInput, match="carries 'freemask.v1.DeadLetter'; expected 'freemask.v1.GenerateRequest'"):
        message.decode(generate_pb2.GenerateRequest)


def test_decode_refuses_bytes_that_do_not_parse() -> None:
    with pytest.raises(InvalidInput, match="not a valid freemask.v1.GenerateRequest"):
        inbound(b"\xff\xff\xff").decode(generate_pb2.GenerateRequest)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(b"0f3a-trace", "0f3a-trace"), (b"", ""), (b"\xff\xfe", ""), (b"../../x", ""), (b"a" * 65, "")],
)
def test_only_well_formed_trace_ids_are_propagated(header: bytes, expected: str) -> None:
    assert inbound(b"", trace_id=header).trace_id == expected
