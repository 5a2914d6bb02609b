"""Small helpers for the bus tests: unique topics, producing, draining a topic."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

from google.protobuf.message import Message
from kafka import KafkaConsumer

from freemask.shared.bus import GapGuard, OutboundMessage, Publisher, ensure_topics, make_producer
from freemask.shared.config import BusConfig
from freemask.v1 import generate_pb2


def unique_topics(config: BusConfig, *names: str) -> list[str]:
    suffix = uuid.uuid4().hex[:8]
    topics = [f"test.{name}.{suffix}" for name in names]
    ensure_topics(config, topics)
    return topics


def request(sample_id: str) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        run_id="run-1", sample_id=sample_id, class_name="dog", background_name="grass", prompt="a dog", seed=7
    )


def publish_samples(config: BusConfig, topic: str, messages: Iterable[Message]) -> None:
    """Publish stage messages, each keyed by its `sample_id` as the stages key them."""
    publisher = Publisher(make_producer(config))
    try:
        publisher.publish([OutboundMessage(topic, m.sample_id, m) for m in messages])  # type: ignore[attr-defined]
    finally:
        publisher.close()


def produce(config: BusConfig, topic: str, ids: Iterable[str], batch: int = 500) -> None:
    publisher = Publisher(make_producer(config))
    try:
        ids = list(ids)
        for start in range(0, len(ids), batch):
            publisher.publish([OutboundMessage(topic, i, request(i)) for i in ids[start : start + batch]])
    finally:
        publisher.close()


Record = tuple[str, bytes, dict]


def read_from_start(
    config: BusConfig, topic: str, enough: Callable[[list[Record]], bool], timeout_s: float
) -> list[Record]:
    """Read a topic from the start (no group) until `enough(records)` or the timeout."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=config.bootstrap_servers, auto_offset_reset="earliest", enable_auto_commit=False,
        group_id=None,
    )
    guard = GapGuard(config.gap_wait_s)
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not enough(records) and time.monotonic() < deadline:
            for batch in guard.poll(consumer, 500).values():
                records.extend((r.key.decode(), r.value, dict(r.headers)) for r in batch)
    finally:
        consumer.close()
    return records


def drain(config: BusConfig, topic: str, expected: int, timeout_s: float = 60.0) -> list[Record]:
    """Records from the start of the topic, until `expected` of them or the timeout."""
    return read_from_start(config, topic, lambda records: len(records) >= expected, timeout_s)


def drain_records(config: BusConfig, topic: str, wanted: Iterable[str], timeout_s: float = 90.0) -> list[Record]:
    """Every record on the topic, read from the start until each wanted key has appeared.

    Counting records is not enough where duplicates are possible: N records may
    hold N-k distinct keys while the rest are still on their way.
    """
    wanted = set(wanted)
    return read_from_start(config, topic, lambda seen: wanted <= {key for key, _, _ in seen}, timeout_s)


def drain_keys(config: BusConfig, topic: str, wanted: Iterable[str], timeout_s: float = 90.0) -> list[str]:
    """The keys of `drain_records`."""
    return [key for key, _, _ in drain_records(config, topic, wanted, timeout_s)]
