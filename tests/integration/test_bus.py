"""The stage worker against the real Kafka-compatible broker (Tansu)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from freemask.shared.bus import (
    BatchResult, InboundMessage, OutboundMessage, Publisher, StageWorker, Topics, ensure_topics, make_consumer,
    make_producer,
)
from freemask.shared.config import BusConfig, FreemaskConfig, load_config
from freemask.shared.errors import Unusable
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.processes import stop_pid
from freemask.v1 import dead_letter_pb2, generate_pb2

from bus_helpers import drain, drain_keys, produce, read_from_start, request, unique_topics

pytestmark = pytest.mark.stack
ECHO_STAGE = Path(__file__).with_name("echo_stage.py")


def copy_to(out_topic: str):
    def handler(message: InboundMessage) -> list[OutboundMessage]:
        req = message.decode(generate_pb2.GenerateRequest)
        return [OutboundMessage(out_topic, req.sample_id, req)]

    return handler


def test_first_message_within_5_s_of_subscribing(stack_config: FreemaskConfig) -> None:
    config = stack_config.bus
    (topic,) = unique_topics(config, "first")
    produce(config, topic, ["s-0"])
    started = time.monotonic()
    consumer = make_consumer(config, f"first-{topic}", [topic])
    try:
        got = None
        while got is None and time.monotonic() - started < 30:
            for records in consumer.poll(timeout_ms=200).values():
                got = records[0]
        elapsed = time.monotonic() - started
    finally:
        consumer.close()
    assert got is not None and got.key == b"s-0"
    assert elapsed < 5.0, f"first message took {elapsed:.1f} s after subscribing"


def test_ten_thousand_messages_pass_through_a_stage_with_none_lost(stack_config: FreemaskConfig) -> None:
    config = stack_config.bus.model_copy(update={"max_poll_records": 500})
    source, sink = unique_topics(config, "in", "out")
    ids = [f"s-{i}" for i in range(10_000)]
    produce(config, source, ids)
    worker = StageWorker(f"bulk-{source}", source, copy_to(sink), config, ServiceMetrics("test"))
    stats = worker.run(max_messages=len(ids), timeout_s=240)
    assert stats.processed == len(ids) and stats.dead_lettered == 0
    out = drain(config, sink, len(ids))
    assert sorted(key for key, _, _ in out) == sorted(ids)
    assert all(headers["schema"] == b"freemask.v1.GenerateRequest" and headers["trace-id"] for _, _, headers in out)


def start_echo_worker(config: BusConfig, source: str, sink: str, delay_s: float, log: Path) -> subprocess.Popen:
    """The echo stage in its own process, in consumer group `echo-{source}`."""
    command = [sys.executable, str(ECHO_STAGE), config.bootstrap_servers, source, sink, f"echo-{source}", str(delay_s)]
    return subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def wait_for_outputs(config: BusConfig, sink: str, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(drain(config, sink, count, timeout_s=1)) < count and time.monotonic() < deadline:
        pass


def test_killed_consumer_resumes_from_its_committed_offset(stack_config: FreemaskConfig, tmp_path: Path) -> None:
    config = stack_config.bus
    source, sink = unique_topics(config, "in", "out")
    ids = [f"s-{i}" for i in range(300)]
    produce(config, source, ids)

    first = start_echo_worker(config, source, sink, 0.03, tmp_path / "first.log")
    try:
        wait_for_outputs(config, sink, 50)
    finally:
        first.kill()  # SIGKILL: no chance to commit or close
        first.wait()
    done_before_kill = len(drain(config, sink, len(ids), timeout_s=2))
    assert 0 < done_before_kill < len(ids), "the kill must land mid-stream"

    second = start_echo_worker(config, source, sink, 0.03, tmp_path / "second.log")
    try:
        # redeliveries come first in each partition, so once every id is seen they are all in
        keys = drain_keys(config, sink, ids)
    finally:
        stop_pid(second.pid)
        second.wait()
    assert set(keys) == set(ids), f"lost: {sorted(set(ids) - set(keys))[:10]}"
    redelivered = len(keys) - len(ids)
    # at-least-once: what was in hand at the kill comes again, but not the whole stream
    assert redelivered < done_before_kill, f"{redelivered} duplicates: the restart did not resume from the commit"


def test_poison_message_goes_to_the_dlq_and_the_worker_continues(stack_config: FreemaskConfig) -> None:
    config = stack_config.bus.model_copy(update={"max_attempts": 3, "retry_backoff_s": 0.01})
    source, sink = unique_topics(config, "in", "out")
    ensure_topics(config, [Topics.DLQ])
    produce(config, source, ["s-0", "s-poison", "s-2"])
    producer = make_producer(config)
    producer.send(source, key=b"s-garbage", value=b"\xff\xff\xff not a protobuf").get(timeout=10)
    producer.send(source, key=b"s-4", value=request("s-4").SerializeToString()).get(timeout=10)
    producer.close()
    attempts: dict[str, int] = {}

    def flaky(message: InboundMessage) -> list[OutboundMessage]:
        req = message.decode(generate_pb2.GenerateRequest)
        attempts[req.sample_id] = attempts.get(req.sample_id, 0) + 1
        if req.sample_id == "s-poison":
            raise RuntimeError("model exploded on this one")
        return [OutboundMessage(sink, req.sample_id, req)]

    dlq_before = _dlq_for(config, source)
    worker = StageWorker(f"poison-{source}", source, flaky, config, ServiceMetrics("test"))
    stats = worker.run(max_messages=5, timeout_s=60)
    assert stats.dead_lettered == 2 and stats.processed == 5
    assert attempts["s-poison"] == 3, "a failing message is tried max_attempts times"
    assert sorted(k for k, _, _ in drain(config, sink, 3)) == ["s-0", "s-2", "s-4"]

    letters = {letter.key.decode(): letter for letter in _dlq_for(config, source, expected=len(dlq_before) + 2)}
    assert letters["s-poison"].attempts == 3 and "model exploded" in letters["s-poison"].error
    assert letters["s-poison"].error_type == "RuntimeError"
    assert letters["s-poison"].value == request("s-poison").SerializeToString(), "the DLQ keeps the original bytes"
    # bytes that cannot decode are dead-lettered at once: retrying cannot help
    assert letters["s-garbage"].attempts == 1 and letters["s-garbage"].error_type == "InvalidInput"
    assert letters["s-garbage"].original_topic == source


def test_a_batch_handler_takes_whole_polls_and_a_failing_batch_falls_back_to_one_at_a_time(
        stack_config: FreemaskConfig) -> None:
    config = stack_config.bus.model_copy(update={"max_attempts": 2, "retry_backoff_s": 0.01})
    source, sink = unique_topics(config, "in", "out")
    ensure_topics(config, [Topics.DLQ])
    good = [f"s-{i}" for i in range(20)]
    produce(config, source, [*good[:10], "s-poison", *good[10:]])
    batch_sizes: list[int] = []

    def together(messages: list[InboundMessage]) -> list[list[OutboundMessage]]:
        batch_sizes.append(len(messages))
        requests = [m.decode(generate_pb2.GenerateRequest) for m in messages]
        if any(r.sample_id == "s-poison" for r in requests):
            raise RuntimeError("one bad apple")
        return [[OutboundMessage(sink, r.sample_id, r)] for r in requests]

    worker = StageWorker(f"batch-{source}", source, lambda m: together([m])[0], config, ServiceMetrics("test"),
                         batch_handler=together)
    stats = worker.run(max_messages=len(good) + 1, timeout_s=60)
    assert stats.processed == len(good) + 1 and stats.dead_lettered == 1
    assert max(batch_sizes) > 1, "polls of several records go through the batch handler"
    assert set(drain_keys(config, sink, good)) == set(good)
    letters = {letter.key.decode(): letter for letter in _dlq_for(config, source, expected=1)}
    assert letters["s-poison"].attempts == 2 and "one bad apple" in letters["s-poison"].error


def test_a_batch_handler_can_dead_letter_one_message_without_failing_the_batch(
        stack_config: FreemaskConfig) -> None:
    config = stack_config.bus
    source, sink = unique_topics(config, "in", "out")
    ensure_topics(config, [Topics.DLQ])
    good = [f"s-{i}" for i in range(12)]
    produce(config, source, [*good[:6], "s-unusable", *good[6:]])
    handled: list[str] = []

    def together(messages: list[InboundMessage]) -> list[BatchResult]:
        requests = [m.decode(generate_pb2.GenerateRequest) for m in messages]
        handled.extend(r.sample_id for r in requests)
        return [Unusable(f"{r.sample_id} is of no use") if r.sample_id == "s-unusable"
                else [OutboundMessage(sink, r.sample_id, r)] for r in requests]

    def one(message: InboundMessage) -> list[OutboundMessage]:  # a poll of one record comes here
        (result,) = together([message])
        if isinstance(result, Exception):
            raise result
        return list(result)

    worker = StageWorker(f"partial-{source}", source, one, config, ServiceMetrics("test"), batch_handler=together)
    stats = worker.run(max_messages=len(good) + 1, timeout_s=60)
    assert stats.processed == len(good) + 1 and stats.dead_lettered == 1 and stats.retries == 0
    assert sorted(handled) == sorted([*good, "s-unusable"]), "each message handled once: no fallback, no retry"
    assert set(drain_keys(config, sink, good)) == set(good)
    (letter,) = _dlq_for(config, source, expected=1)
    assert letter.key.decode() == "s-unusable" and letter.attempts == 1 and letter.error_type == "Unusable"
    assert "s-unusable is of no use" in letter.error


def test_wrong_message_type_on_a_topic_is_refused(stack_config: FreemaskConfig) -> None:
    config = stack_config.bus
    (source,) = unique_topics(config, "in")
    publisher = Publisher(make_producer(config))
    publisher.publish([OutboundMessage(source, "s-0", dead_letter_pb2.DeadLetter(error="x"))])
    publisher.close()
    seen: list[str] = []

    def handler(message: InboundMessage) -> list[OutboundMessage]:
        message.decode(generate_pb2.GenerateRequest)
        seen.append(message.key or "")
        return []

    worker = StageWorker(f"types-{source}", source, handler, config, ServiceMetrics("test"))
    stats = worker.run(max_messages=1, timeout_s=30)
    assert stats.dead_lettered == 1 and seen == []


def _dlq_for(config, source: str, expected: int = 0) -> list[dead_letter_pb2.DeadLetter]:
    """Dead letters from `source`, reading the shared DLQ until `expected` of them have arrived."""

    def from_source(records: list) -> list[dead_letter_pb2.DeadLetter]:
        letters = [dead_letter_pb2.DeadLetter.FromString(value) for _, value, _ in records]
        return [letter for letter in letters if letter.original_topic == source]

    records = read_from_start(config, Topics.DLQ, lambda seen: len(from_source(seen)) >= expected,
                              timeout_s=20 if expected else 2)
    return from_source(records)


def test_sigterm_finishes_the_batch_in_hand_and_commits(stack_config: FreemaskConfig, tmp_path: Path) -> None:
    config = stack_config.bus
    source, sink = unique_topics(config, "in", "out")
    ids = [f"s-{i}" for i in range(200)]
    produce(config, source, ids)

    first = start_echo_worker(config, source, sink, 0.02, tmp_path / "first.log")
    wait_for_outputs(config, sink, 20)
    first.terminate()  # SIGTERM: finish the message in hand, publish, commit, exit
    assert first.wait(timeout=20) == 0
    done = len(drain(config, sink, len(ids), timeout_s=2))
    assert 0 < done < len(ids), "SIGTERM must land mid-stream"

    second = start_echo_worker(config, source, sink, 0.02, tmp_path / "second.log")
    try:
        keys = drain_keys(config, sink, ids)
    finally:
        second.terminate()
        second.wait(timeout=20)
    # a graceful stop commits everything it published: each message exactly once
    assert sorted(keys) == sorted(ids)


def test_topics_create_makes_every_topic_once_with_its_configured_partitions(private_stack) -> None:
    """`freemask topics create` is the chart's topic Job: idempotent, partitions per topic from config."""
    stack = private_stack.up(("seaweedfs", "tansu"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FREEMASK_")}, **stack.client_env(),
           "FREEMASK_BUS__PARTITIONS": "2", "FREEMASK_BUS__TOPIC_PARTITIONS": f"{{{Topics.PLACE}: 5}}"}

    def topics_create(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "freemask.shared.cli", "topics", "create"],
                              env={**env, **extra}, capture_output=True, text=True, timeout=120)

    first = topics_create()
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(" created ") == len(Topics.ALL)
    admin = KafkaAdminClient(bootstrap_servers=load_config(environ=env).bus.bootstrap_servers)
    try:
        partitions = {described["name"]: len(described["partitions"])
                      for described in admin.describe_topics(list(Topics.ALL))}
    finally:
        admin.close()
    assert partitions == {topic: 5 if topic == Topics.PLACE else 2 for topic in Topics.ALL}
    again = topics_create()
    assert again.returncode == 0 and again.stdout.count(" exists ") == len(Topics.ALL), again.stdout
    unknown = topics_create(FREEMASK_BUS__TOPIC_PARTITIONS="{freemask.plaec.v1: 4}")
    assert unknown.returncode == 1 and "freemask.plaec.v1" in unknown.stderr, unknown.stderr
