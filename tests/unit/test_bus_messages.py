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


def test_every_client_the_bus_makes_carries_the_configured_tls_and_sasl(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's read-back of the accepted topic once built its consumer without them."""
    from freemask.shared import bus as bus_module
    from freemask.shared.config import BusConfig

    made: list[dict] = []

    class Recorder:
        def __init__(self, **options: object) -> None:
            made.append(options)

        def subscribe(self, topics: list[str]) -> None:
            pass

    monkeypatch.setattr(bus_module, "KafkaConsumer", Recorder)
    monkeypatch.setattr(bus_module, "KafkaProducer", Recorder)
    config = BusConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                       sasl_password="s3cret")
    bus_module.make_reader(config)
    bus_module.make_consumer(config, "stage", ["t"])
    bus_module.make_producer(config)
    assert len(made) == 3
    for options in made:
        assert (options["security_protocol"], options["sasl_mechanism"], options["sasl_plain_username"],
                options["sasl_plain_password"]) == ("SASL_SSL", "SCRAM-SHA-512", "svc", "s3cret")
    assert made[0]["group_id"] is None and made[0]["enable_auto_commit"] is False
