"""The message bus: Kafka through kafka-python, with at-least-once stage workers.

A stage worker runs one readable loop (DESIGN §6, after quix-streams):

    poll a batch → handle each message (retry / dead-letter) → publish all
    outputs and wait for their acks → commit the batch

Offsets are committed only after every output of a batch is acknowledged by
the broker, so a crash at any point redelivers the message instead of losing
it. Handlers are written to be idempotent (deterministic ids and keys), which
turns redelivery into a harmless rewrite of the same bytes.

A message that keeps failing is retried `max_attempts` times with exponential
backoff, then published to the dead-letter topic with its error and committed,
so one poison message never blocks a partition. Input that can never succeed
(it does not decode, or fails validation) raises `InvalidInput` and goes to
the DLQ on the first attempt.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from freemask.shared.config import BusConfig
from freemask.shared.errors import InvalidInput, Unavailable, Unusable
from freemask.shared.metrics import ServiceMetrics
from freemask.v1 import dead_letter_pb2

log = logging.getLogger(__name__)

SCHEMA_HEADER = "schema"
# Room a dead letter keeps for its own fields and the original headers besides the original value.
DEAD_LETTER_HEADROOM_BYTES = 64 * 1024
TRACE_HEADER = "trace-id"
# A publish whose acks have not all come within this is given up: the batch is not committed and
# is redelivered. The producer expires the records by then itself (`delivery_timeout_ms`), so none
# is left pending and closing it cannot block or leave its sender thread running.
_DELIVERY_TIMEOUT_S = 30.0
_PUBLISH_WAIT_S = _DELIVERY_TIMEOUT_S + 5.0
_PRODUCE_REQUEST_TIMEOUT_MS = 15_000  # below the delivery timeout, which must exceed it (plus linger)
# kafka-python 3.0 backs off reconnects up to 30 s: after a broker outage of that length a client
# kept trying only every 30 s, and the stages sat idle for up to half a minute after the broker was
# back (measured by tests/faults/test_broker_restart.py). One second is Kafka's own default.
_RECONNECT_BACKOFF_MAX_MS = 1000
# Header values come from outside; only a sane id is propagated into our headers and logs.
_TRACE_ID = re.compile(r"[0-9A-Za-z-]{1,64}")


class Topics:
    """Topic names (DESIGN §2). Versioned: an incompatible message change gets a new topic."""

    GENERATE = "freemask.generate.v1"
    SINGLES = "freemask.singles.v1"
    COMPOSE = "freemask.compose.v1"
    PLACE = "freemask.place.v1"
    HARMONIZE = "freemask.harmonize.v1"
    COMPOSED = "freemask.composed.v1"
    SCORED = "freemask.scored.v1"
    ACCEPTED = "freemask.samples.accepted.v1"
    DLQ = "freemask.dlq.v1"

    ALL = (GENERATE, SINGLES, COMPOSE, PLACE, HARMONIZE, COMPOSED, SCORED, ACCEPTED, DLQ)


M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, bytes]

    @property
    def trace_id(self) -> str:
        """The caller's trace id if it is well-formed, else '' (a new trace starts)."""
        raw = self.headers.get(TRACE_HEADER, b"")
        text = raw.decode("ascii", "replace")
        return text if _TRACE_ID.fullmatch(text) else ""

    def decode(self, message_type: type[M]) -> M:
        """Parse the value as `message_type`, refusing a message of another declared schema."""
        expected = message_type.DESCRIPTOR.full_name
        declared = self.headers.get(SCHEMA_HEADER)
        if declared is not None and declared.decode("ascii", "replace") != expected:
            raise InvalidInput(
                f"topic {self.topic} carries {declared.decode('ascii', 'replace')!r}; expected {expected!r}"
            )
        try:
            return message_type.FromString(self.value)
        except DecodeError as err:
            raise InvalidInput(f"value is not a valid {expected}: {err}") from None


@dataclass(frozen=True)
class OutboundMessage:
    topic: str
    key: str
    message: Message
    trace_id: str = ""


Handler = Callable[[InboundMessage], Sequence[OutboundMessage]]
# One message's answer from a batch handler: its outputs, or the error that a retry would
# repeat (InvalidInput, Unusable), which dead-letters that message alone.
BatchResult = Sequence[OutboundMessage] | InvalidInput | Unusable
# Answers to several messages at once, one per message in order; for stages whose core is
# cheaper per item in a batch (a diffusion pass over many prompts).
BatchHandler = Callable[[Sequence[InboundMessage]], Sequence[BatchResult]]


def _client_options(config: BusConfig) -> dict[str, object]:
    """What every client of the bus shares: the broker, its security, and how it reconnects."""
    options: dict[str, object] = {"bootstrap_servers": config.bootstrap_servers, "client_id": config.client_id,
                                  "reconnect_backoff_max_ms": _RECONNECT_BACKOFF_MAX_MS,
                                  "security_protocol": config.security_protocol}
    if config.sasl_mechanism:
        options["sasl_mechanism"] = config.sasl_mechanism
        if config.sasl_username is not None:
            options["sasl_plain_username"] = config.sasl_username.get_secret_value()
        if config.sasl_password is not None:
            options["sasl_plain_password"] = config.sasl_password.get_secret_value()
    return options


def make_producer(config: BusConfig) -> KafkaProducer:
    # Not idempotent (kafka-python 3.0's default is): Tansu 0.6 stores a producer's sequence number
    # and the partition's high-water mark before the record batch, so a broker killed in between
    # answers the client's retry as a duplicate, acknowledged and never written. Records were lost
    # so, and a partition ending in such a hole stalled its consumers (tests/faults/test_broker_restart.py).
    # A plain retry writes the record again: at worst a duplicate, which deterministic ids absorb.
    return KafkaProducer(
        enable_idempotence=False,
        acks="all",
        linger_ms=2,
        max_request_size=config.max_message_bytes,
        retries=5,
        request_timeout_ms=_PRODUCE_REQUEST_TIMEOUT_MS,
        delivery_timeout_ms=int(_DELIVERY_TIMEOUT_S * 1000),
        **_client_options(config),
    )


def make_consumer(config: BusConfig, group: str, topics: Iterable[str]) -> KafkaConsumer:
    consumer = KafkaConsumer(
        group_id=f"{config.group_prefix}.{group}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=config.session_timeout_ms,
        heartbeat_interval_ms=config.heartbeat_interval_ms,
        max_poll_records=config.max_poll_records,
        fetch_max_wait_ms=config.poll_timeout_ms,
        **_client_options(config),
    )
    consumer.subscribe(list(topics))
    return consumer


def make_reader(config: BusConfig) -> KafkaConsumer:
    """A consumer in no group, committing nothing: for reading a topic back (assign and seek)."""
    return KafkaConsumer(group_id=None, enable_auto_commit=False, **_client_options(config))


def read_to_end(config: BusConfig, topic: str, timeout_s: float = 60.0) -> Iterator[ConsumerRecord]:
    """Every record of `topic`, from the start of each partition, by a reader in no group that
    commits nothing; it stops once a poll brings nothing more and each partition's position has
    reached both the end offset the broker reported and the high-water mark of its latest fetch.

    The reported end alone cannot be trusted: Tansu 0.6 answers ListOffsets(latest) with 1 for any
    non-empty partition, so a read that stopped there saw only the first poll's records. The fetch's
    high-water mark is right on Tansu and Kafka alike; the deadline bounds a topic that never stops
    growing (Unavailable)."""
    reader = make_reader(config)
    try:
        reader.topics()  # loads the cluster metadata, so the topic's partitions are known
        partitions = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic) or ()]
        if not partitions:
            return
        reader.assign(partitions)
        reader.seek_to_beginning(*partitions)
        reported_end = reader.end_offsets(partitions)
        guard = GapGuard(config.gap_wait_s)
        deadline = time.monotonic() + timeout_s
        while True:
            polled = guard.poll(reader, 500)
            for batch in polled.values():
                yield from batch
            if not polled:
                if _caught_up(reader, partitions, reported_end):
                    return
                guard.pass_trailing_holes(reader)
            if time.monotonic() > deadline:
                raise Unavailable(f"reading {topic} back took over {timeout_s:.0f} s")
    finally:
        reader.close()


def _caught_up(reader: KafkaConsumer, partitions: Sequence[TopicPartition],
               reported_end: dict[TopicPartition, int]) -> bool:
    """Whether every partition is read up to its end; a partition no fetch has answered yet is not
    (its high-water mark is still unknown)."""
    for partition in partitions:
        highwater = reader.highwater(partition)
        if highwater is None or reader.position(partition) < max(highwater, reported_end.get(partition, 0)):
            return False
    return True


@dataclass
class GapGuard:
    """Hands out each partition's records in offset order with none missing: a poll that skips an
    offset is cut short there and the consumer is rewound to ask for it again.

    Why: Tansu 0.6, the embedded broker, gives a produced batch its offset first and writes the batch
    to S3 after, and a fetch returns whichever batches exist from the offset asked for. While one
    producer's batch is still being written, another's later batch can already be fetched, and a
    consumer that takes it has moved past the first for good (tests/integration/test_bus_gaps.py).
    On the platform's topics, neither compacted nor transactional, Kafka's offsets have no
    holes, so a hole is a record not readable yet. One still missing after `max_wait_s` is taken as a
    write the broker lost (killed between its two writes): logged, counted, and passed over.
    `max_wait_s` 0 turns the guard off (a plain poll); a broker whose offsets have holes of their
    own (compaction, transaction markers) needs that, or it pauses at each.

    A hole at the very end of a partition shows no later record to give it away, only a position
    below the high-water mark; a reader that must reach the end passes it with `pass_trailing_holes`.

    The expected next offset of a partition is its position when the guard first sees it assigned
    before a poll; for one a group assigns within a poll, its committed offset, or the start of the
    partition (the platform's consumers begin at the earliest offset)."""

    max_wait_s: float
    metrics: ServiceMetrics | None = None
    pause_s: float = 0.05  # between asks while a hole is being written: the broker is not spun on
    _next: dict[TopicPartition, int] = field(default_factory=dict)
    _missing: dict[TopicPartition, tuple[int, float]] = field(default_factory=dict)  # offset, since
    _trailing: dict[TopicPartition, tuple[int, float]] = field(default_factory=dict)  # offset, since

    def poll(self, consumer: KafkaConsumer, timeout_ms: int,
             max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord]]:
        if self.max_wait_s == 0:
            return consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        assigned = consumer.assignment()
        for partition in set(self._next) - assigned:  # revoked: whoever gets it next moves it on
            self._next.pop(partition)
            self._missing.pop(partition, None)
            self._trailing.pop(partition, None)  # else a stale timer could pass a new hole at once
        for partition in assigned - set(self._next):
            position = consumer.position(partition, timeout_ms=timeout_ms)
            if position is not None:  # else not known yet: the first records' partition start stands in
                self._next[partition] = position
        polled = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        contiguous = {}
        for partition, records in polled.items():
            if kept := self._contiguous(consumer, partition, records):
                contiguous[partition] = kept
        if not contiguous and self._missing:
            time.sleep(self.pause_s)
        return contiguous

    def _contiguous(self, consumer: KafkaConsumer, partition: TopicPartition,
                    records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        expected = self._next.get(partition)
        if expected is None:
            expected = self._start(consumer, partition)
        kept: list[ConsumerRecord] = []
        for record in records:
            if record.offset > expected and not self._given_up(partition, expected, record.offset):
                consumer.seek(partition, expected)
                break
            kept.append(record)
            expected = record.offset + 1
        self._next[partition] = expected
        if partition in self._missing and self._missing[partition][0] < expected:
            del self._missing[partition]  # the hole was filled
        return kept

    def pass_trailing_holes(self, consumer: KafkaConsumer) -> None:
        """After a poll that brought nothing: move past the end of a partition that has stayed below
        its high-water mark for `max_wait_s`, its last offsets a write the broker lost."""
        now = time.monotonic()
        for partition in consumer.assignment():
            position, highwater = self._next.get(partition), consumer.highwater(partition)
            if position is None or highwater is None or position >= highwater:
                self._trailing.pop(partition, None)
                continue
            if self._trailing.get(partition, (None,))[0] != position:
                self._trailing[partition] = (position, now)
            elif now - self._trailing[partition][1] >= self.max_wait_s:
                del self._trailing[partition]
                self._pass_over(partition, position, highwater)
                consumer.seek(partition, highwater)
                self._next[partition] = highwater

    @staticmethod
    def _start(consumer: KafkaConsumer, partition: TopicPartition) -> int:
        if consumer.config.get("group_id") is not None:
            committed = consumer.committed(partition)
            if committed is not None:
                return committed
        return consumer.beginning_offsets([partition])[partition]

    def _given_up(self, partition: TopicPartition, missing: int, found: int) -> bool:
        """Whether the hole [missing, found) has been waited for long enough to be passed over."""
        now = time.monotonic()
        if self._missing.get(partition, (None,))[0] != missing:
            self._missing[partition] = (missing, now)
            if self.metrics is not None:
                self.metrics.offset_gaps.labels(self.metrics.service, partition.topic).inc()
        if now - self._missing[partition][1] < self.max_wait_s:
            return False
        del self._missing[partition]
        self._pass_over(partition, missing, found)
        return True

    def _pass_over(self, partition: TopicPartition, first: int, end: int) -> None:
        log.warning("offsets never became readable; passing over them",
                    extra={"topic": partition.topic, "partition": partition.partition,
                           "offsets": f"{first}..{end - 1}", "waited_s": self.max_wait_s})
        if self.metrics is not None:
            self.metrics.skipped_offsets.labels(self.metrics.service, partition.topic).inc(end - first)


def ensure_topics(config: BusConfig, topics: Iterable[str] = Topics.ALL) -> list[str]:
    """Create missing topics and return their names; existing ones are left as they are."""
    unknown = sorted(set(config.topic_partitions) - set(Topics.ALL))
    if unknown:
        raise InvalidInput(f"bus.topic_partitions names topics that do not exist: {unknown}; known: {Topics.ALL}")
    admin = KafkaAdminClient(**_client_options(config))
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics(
                    [NewTopic(t, config.partitions_of(t), config.replication_factor) for t in missing]
                )
            except TopicAlreadyExistsError:
                pass  # another process created them between our list and create
        return missing
    finally:
        admin.close()


class Publisher:
    """Sends protobuf messages with schema and trace headers, and waits for the broker's ack."""

    def __init__(self, producer: KafkaProducer) -> None:
        self._producer = producer

    def publish(self, outputs: Sequence[OutboundMessage]) -> None:
        """Send all, then wait for every ack; a message without a trace id starts a new trace."""
        futures = [
            self._producer.send(
                out.topic,
                key=out.key.encode("utf-8"),
                value=out.message.SerializeToString(),
                headers=[
                    (SCHEMA_HEADER, out.message.DESCRIPTOR.full_name.encode("ascii")),
                    (TRACE_HEADER, (out.trace_id or uuid.uuid4().hex).encode("ascii")),
                ],
            )
            for out in outputs
        ]
        for future in futures:
            future.get(timeout=_PUBLISH_WAIT_S)  # raises if the broker did not take it

    def close(self) -> None:
        self._producer.close(timeout=5)


@dataclass
class WorkerStats:
    processed: int = 0
    dead_lettered: int = 0
    retries: int = 0
    committed_batches: int = 0  # batches whose outputs were acknowledged and offsets committed


@dataclass
class StageWorker:
    """Consumes one topic, runs `handler` per message, publishes its outputs, commits."""

    stage: str
    topic: str
    handler: Handler
    config: BusConfig
    metrics: ServiceMetrics
    batch_handler: BatchHandler | None = None
    stats: WorkerStats = field(default_factory=WorkerStats)
    _stop: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        """Ask the loop to finish the message in hand, commit, and return."""
        self._stop.set()

    def run(self, max_messages: int | None = None, timeout_s: float | None = None) -> WorkerStats:
        """Process until stopped, `max_messages` handled, or `timeout_s` elapsed."""
        consumer = make_consumer(self.config, self.stage, [self.topic])
        guard = GapGuard(self.config.gap_wait_s, self.metrics)
        publisher = Publisher(make_producer(self.config))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if max_messages is not None and self.stats.processed >= max_messages:
                    break
                batch = guard.poll(consumer, self.config.poll_timeout_ms, self._budget(max_messages))
                self._settle_batch(batch, consumer, publisher)
                self._record_lag(consumer)
        finally:
            try:
                consumer.close(autocommit=False)
            finally:
                publisher.close()  # even if the consumer's close failed: its sender thread must end
        return self.stats

    def _settle_batch(self, batch: dict, consumer: KafkaConsumer, publisher: Publisher) -> None:
        """Handle a polled batch, publish all its outputs, then commit it.

        Each produce and each commit is a durable write on the broker, so they are
        done once per batch rather than once per message. If the publish fails the
        commit does not happen, and the batch is redelivered after the restart.
        """
        outputs: list[OutboundMessage] = []
        settled: dict[TopicPartition, OffsetAndMetadata] = {}
        batched = self._handle_together([(p, r) for p, records in batch.items() for r in records])
        if batched is not None:
            outputs, settled = batched
        else:
            for partition, records in batch.items():
                for record in records:
                    if self._stop.is_set():
                        break  # uncommitted: the next owner of the partition gets it again
                    result = self._handle(_inbound(record))
                    if result is None:
                        break
                    outputs.extend(result)
                    settled[partition] = OffsetAndMetadata(record.offset + 1, "", -1)
        if not settled:
            return
        publisher.publish(outputs)
        consumer.commit(settled)
        self.stats.committed_batches += 1

    def _handle_together(
        self, records: list[tuple[TopicPartition, ConsumerRecord]]
    ) -> tuple[list[OutboundMessage], dict[TopicPartition, OffsetAndMetadata]] | None:
        """All records through the batch handler in one call; None to fall back to one at a time.

        A message the handler answers with InvalidInput or Unusable is dead-lettered at once.
        Any failure of the batch itself (one bad message among good ones, say) falls back to
        the per-message path, which retries and dead-letters each message on its own.
        """
        if self.batch_handler is None or len(records) < 2 or self._stop.is_set():
            return None
        messages = [_inbound(record) for _, record in records]
        started = time.perf_counter()
        try:
            results = self.batch_handler(messages)
        except Exception as err:  # noqa: BLE001 - the per-message path sorts out which message failed
            log.info("batch failed; handling its messages one by one",
                     extra={"stage": self.stage, "messages": len(messages), "error": str(err)})
            return None
        if len(results) != len(messages):
            raise RuntimeError(f"batch handler returned {len(results)} results for {len(messages)} messages")
        per_message = (time.perf_counter() - started) / len(messages)
        outputs: list[OutboundMessage] = []
        settled: dict[TopicPartition, OffsetAndMetadata] = {}
        for (partition, record), message, result in zip(records, messages, results):
            if isinstance(result, (InvalidInput, Unusable)):
                outputs.append(self._dead_letter(message, result, 1, _now()))
            else:
                outputs.extend(self._succeeded(message, result, per_message))
            settled[partition] = OffsetAndMetadata(record.offset + 1, "", -1)
        return outputs, settled

    def _succeeded(self, message: InboundMessage, outputs: Sequence[OutboundMessage],
                   seconds: float) -> list[OutboundMessage]:
        """Count a handled message and carry its trace id onto outputs that have none."""
        self.metrics.message_latency.labels(self.metrics.service, self.topic).observe(seconds)
        self.metrics.messages.labels(self.metrics.service, self.topic, "ok").inc()
        self.stats.processed += 1
        return [replace(out, trace_id=out.trace_id or message.trace_id) for out in outputs]

    def _budget(self, max_messages: int | None) -> int:
        if max_messages is None:
            return self.config.max_poll_records
        return max(1, min(self.config.max_poll_records, max_messages - self.stats.processed))

    def _handle(self, message: InboundMessage) -> list[OutboundMessage] | None:
        """The outputs of one message, or its dead letter; None if stopping mid-retry."""
        first_failure: Timestamp | None = None
        error: BaseException | None = None
        for attempt in range(1, self.config.max_attempts + 1):
            started = time.perf_counter()
            try:
                outputs = self.handler(message)
            except (InvalidInput, Unusable) as err:  # the same input fails the same way again
                error = err
                first_failure = first_failure or _now()
                break
            except Exception as err:  # noqa: BLE001 - any failure is retried, then dead-lettered
                error = err
                first_failure = first_failure or _now()
                log.warning(
                    "stage message failed",
                    extra={"stage": self.stage, "offset": message.offset, "attempt": attempt, "error": str(err)},
                )
                if attempt < self.config.max_attempts:
                    self.stats.retries += 1
                    self.metrics.messages.labels(self.metrics.service, self.topic, "retried").inc()
                    if self._stop.wait(self._backoff(attempt)):
                        return None  # stopping: leave it uncommitted for redelivery
                continue
            return self._succeeded(message, outputs, time.perf_counter() - started)
        return [self._dead_letter(message, error, attempt, first_failure)]

    def _backoff(self, attempt: int) -> float:
        return min(self.config.retry_backoff_max_s, self.config.retry_backoff_s * 2 ** (attempt - 1))

    def _dead_letter(
        self,
        message: InboundMessage,
        error: BaseException | None,
        attempts: int,
        first_failure: Timestamp | None,
    ) -> OutboundMessage:
        value, reason = message.value, str(error)[:4000]
        # A record larger than this producer may send (another producer's limit, or a broker that
        # accepts more) could never be dead-lettered whole: the publish would fail, the batch would
        # never commit, and the stage would retry it forever. Its head is kept instead, and said so.
        room = self.config.max_message_bytes - DEAD_LETTER_HEADROOM_BYTES
        if len(value) > room:
            reason = f"{reason} [value cut to its first {room} of {len(value)} bytes to fit the DLQ]"
            value = value[:room]
        letter = dead_letter_pb2.DeadLetter(
            original_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=(message.key or "").encode("utf-8"),
            value=value,
            headers=message.headers,
            stage=self.stage,
            error=reason,
            error_type=type(error).__name__,
            attempts=attempts,
        )
        if first_failure is not None:
            letter.first_failure_time.CopyFrom(first_failure)
        letter.last_failure_time.CopyFrom(_now())
        log.error(
            "message dead-lettered",
            extra={"stage": self.stage, "topic": message.topic, "offset": message.offset, "error": str(error)},
        )
        self.metrics.messages.labels(self.metrics.service, self.topic, "dead_lettered").inc()
        self.metrics.dead_letters.labels(self.metrics.service, self.topic).inc()
        self.stats.dead_lettered += 1
        self.stats.processed += 1
        # Published with the batch: if that publish fails, nothing is committed and
        # the message is redelivered rather than lost.
        return OutboundMessage(Topics.DLQ, message.key or f"offset-{message.offset}", letter, message.trace_id)

    def _record_lag(self, consumer: KafkaConsumer) -> None:
        for partition in consumer.assignment():
            highwater = consumer.highwater(partition)
            if highwater is None:
                continue
            position = consumer.position(partition)
            self.metrics.lag.labels(self.metrics.service, partition.topic, str(partition.partition)).set(
                max(0, highwater - position)
            )


def _inbound(record: ConsumerRecord) -> InboundMessage:
    return InboundMessage(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key.decode("utf-8", "replace") if record.key is not None else None,
        value=record.value or b"",
        headers={name: value for name, value in (record.headers or [])},
    )


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp
