"""Data survives restarts of the embedded servers (each test owns a private stack)."""

from __future__ import annotations

import pytest

from freemask.shared.bus import InboundMessage, OutboundMessage, StageWorker
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.store import ObjectStore

from bus_helpers import drain, produce, unique_topics
from conftest import PrivateStack, config_for

pytestmark = pytest.mark.stack


def test_store_keeps_objects_across_a_restart(private_stack: PrivateStack) -> None:
    stack = private_stack.up(("seaweedfs",))
    payload = bytes(range(256)) * 4096
    ObjectStore(stack.store_config()).put_bytes("models/keep/v1/weights.bin", payload)

    stack.down(("seaweedfs",))
    stack.up(("seaweedfs",))

    assert ObjectStore(stack.store_config()).get_bytes("models/keep/v1/weights.bin") == payload


def test_records_and_committed_offsets_survive_a_broker_restart(private_stack: PrivateStack) -> None:
    stack = private_stack.up(("seaweedfs", "tansu"))
    config = config_for(stack).bus
    (topic,) = unique_topics(config, "durable")
    ids = [f"s-{i}" for i in range(200)]
    produce(config, topic, ids)
    seen_before: list[str] = []

    def record(message: InboundMessage) -> list[OutboundMessage]:
        seen_before.append(message.key or "")
        return []

    StageWorker("durable", topic, record, config, ServiceMetrics("test")).run(max_messages=80, timeout_s=60)
    assert len(seen_before) == 80

    stack.down(("tansu",))
    stack.up(("tansu",))

    assert sorted(key for key, _, _ in drain(config, topic, len(ids))) == sorted(ids), "records were lost"
    seen_after: list[str] = []

    def record_after(message: InboundMessage) -> list[OutboundMessage]:
        seen_after.append(message.key or "")
        return []

    StageWorker("durable", topic, record_after, config, ServiceMetrics("test")).run(max_messages=120, timeout_s=60)
    # the same group resumes exactly at its committed offsets: nothing twice, nothing skipped
    assert not set(seen_before) & set(seen_after)
    assert sorted(seen_before + seen_after) == sorted(ids)
