"""Holes in a partition's offsets on the real broker (Tansu on SeaweedFS), and `bus.GapGuard`.

Tansu 0.6 keeps each produced batch as one S3 object named by its base offset, and answers a
fetch with the objects it finds from the offset asked for. A batch not yet written (another
producer's later batch already is) is a hole the fetch steps over. The tests make that hole
for as long as they like by taking one batch's object out of the broker's bucket, and put it
back to end it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from kafka import KafkaConsumer, TopicPartition

from freemask.shared.bus import GapGuard, InboundMessage, OutboundMessage, StageWorker, make_reader, read_to_end
from freemask.shared.config import BusConfig, FreemaskConfig
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore

from bus_helpers import produce, unique_topics

pytestmark = pytest.mark.stack

RECORDS = 6
HOLE = 2  # the offset whose batch is taken away
READ_TIMEOUT_S = 30.0


@dataclass
class Holed:
    bus: BusConfig
    partition: TopicPartition
    broker_store: ObjectStore
    batch_key: str  # the missing batch's object in the broker's bucket
    batch: bytes

    def fill(self) -> None:
        self.broker_store.put_bytes(self.batch_key, self.batch, "application/octet-stream")


def make_hole(stack: EmbeddedStack, config: FreemaskConfig, offset: int) -> Iterator[Holed]:
    """A one-partition topic of RECORDS records, one batch each, whose batch at `offset` is gone
    until the test ends (or fills it)."""
    bus = config.bus.model_copy(update={"partitions": 1})
    (topic,) = unique_topics(bus, "holed")
    for index in range(RECORDS):
        produce(bus, topic, [f"s-{index}"])  # one publish each: every record its own batch
    broker_store = ObjectStore(config.store.model_copy(update={"bucket": stack.config.kafka_storage_bucket,
                                                               "prefix": ""}))
    batch_name = f"/topics/{topic}/partitions/{0:010d}/records/{offset:020d}.batch"
    keys = [key for key in (o.key for o in broker_store.list("clusters")) if key.endswith(batch_name)]
    assert len(keys) == 1, f"no single batch object for offset {offset} of {topic}: {keys}"
    batch = broker_store.get_bytes(keys[0])
    broker_store.delete(keys[0])
    holed = Holed(bus, TopicPartition(topic, 0), broker_store, keys[0], batch)
    yield holed
    holed.fill()


@pytest.fixture
def holed(stack: EmbeddedStack, stack_config: FreemaskConfig) -> Iterator[Holed]:
    yield from make_hole(stack, stack_config, HOLE)


@pytest.fixture
def holed_at_end(stack: EmbeddedStack, stack_config: FreemaskConfig) -> Iterator[Holed]:
    yield from make_hole(stack, stack_config, RECORDS - 1)


def reader_at_start(holed: Holed) -> KafkaConsumer:
    reader = make_reader(holed.bus)
    reader.assign([holed.partition])
    reader.seek(holed.partition, 0)
    return reader


def read(holed: Holed, guard: GapGuard | None, until: int, timeout_s: float = READ_TIMEOUT_S,
         on_poll=lambda offsets: None) -> list[int]:
    """Offsets read from the start until the one before `until` has come, or the time is up."""
    reader = reader_at_start(holed)
    offsets: list[int] = []
    deadline = time.monotonic() + timeout_s
    try:
        while (not offsets or offsets[-1] < until - 1) and time.monotonic() < deadline:
            polled = guard.poll(reader, 200) if guard is not None else reader.poll(timeout_ms=200)
            offsets += [record.offset for records in polled.values() for record in records]
            on_poll(offsets)
    finally:
        reader.close()
    return offsets


def wait_until(done: Callable[[], bool], timeout_s: float = READ_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)
    return done()


def metric(metrics: ServiceMetrics, name: str, topic: str) -> float:
    return metrics.registry.get_sample_value(f"{name}_total", {"service": "test", "topic": topic}) or 0.0


def test_a_plain_reader_steps_over_a_batch_the_broker_has_not_written(holed: Holed) -> None:
    # What the guard is for: if Tansu ever stops serving past a hole, this says so.
    stepped_over = [o for o in range(RECORDS) if o != HOLE]
    assert read(holed, None, RECORDS) == stepped_over
    metrics = ServiceMetrics("test")
    assert read(holed, GapGuard(0.0, metrics), RECORDS) == stepped_over  # gap_wait_s 0: the guard is off
    assert metric(metrics, "freemask_bus_offset_gaps", holed.partition.topic) == 0


def test_the_guard_holds_back_at_a_hole_until_it_is_filled(holed: Holed) -> None:
    metrics = ServiceMetrics("test")
    filled_after: list[list[int]] = []

    def fill_once_held(offsets: list[int]) -> None:
        if offsets == [0, 1] and not filled_after:
            time.sleep(1.0)  # polls at the hole meanwhile hand out nothing past it
            filled_after.append(list(offsets))
            holed.fill()

    offsets = read(holed, GapGuard(READ_TIMEOUT_S, metrics), RECORDS, on_poll=fill_once_held)

    assert filled_after == [[0, 1]], "the guard handed out records past the hole"
    assert offsets == list(range(RECORDS))
    assert metric(metrics, "freemask_bus_offset_gaps", holed.partition.topic) >= 1
    assert metric(metrics, "freemask_bus_skipped_offsets", holed.partition.topic) == 0


def test_the_guard_passes_over_a_hole_that_stays_after_its_wait(holed: Holed) -> None:
    metrics = ServiceMetrics("test")
    wait_s = 1.0
    started = time.monotonic()
    offsets = read(holed, GapGuard(wait_s, metrics), RECORDS)
    took = time.monotonic() - started

    assert offsets == [o for o in range(RECORDS) if o != HOLE]
    assert took >= wait_s
    assert metric(metrics, "freemask_bus_skipped_offsets", holed.partition.topic) == 1
    assert metric(metrics, "freemask_bus_offset_gaps", holed.partition.topic) == 1


def test_a_stage_worker_waits_at_a_hole_and_then_handles_every_record_in_order(holed: Holed) -> None:
    handled: list[int] = []

    def handler(message: InboundMessage) -> list[OutboundMessage]:
        handled.append(message.offset)
        return []

    bus = holed.bus.model_copy(update={"gap_wait_s": READ_TIMEOUT_S})
    worker = StageWorker("gaps", holed.partition.topic, handler, bus, ServiceMetrics("test"))
    thread = threading.Thread(target=worker.run, kwargs={"timeout_s": 2 * READ_TIMEOUT_S}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: handled == [0, 1]), f"handled {handled}"
        time.sleep(1.0)
        assert handled == [0, 1], "the worker went past the hole"
        holed.fill()
        assert wait_until(lambda: len(handled) >= RECORDS), f"handled {handled}"
    finally:
        worker.stop()
        thread.join(READ_TIMEOUT_S)
    assert handled == list(range(RECORDS))


def test_reading_to_the_end_passes_a_hole_that_ends_the_partition_after_its_wait(holed_at_end: Holed) -> None:
    # No later record gives such a hole away: the position only stays below the high-water mark.
    bus = holed_at_end.bus.model_copy(update={"gap_wait_s": 1.0})
    started = time.monotonic()
    offsets = [record.offset for record in read_to_end(bus, holed_at_end.partition.topic, READ_TIMEOUT_S)]

    assert offsets == list(range(RECORDS - 1))
    assert time.monotonic() - started >= 1.0
