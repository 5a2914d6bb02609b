"""The coordinator's memory of the accepted topic, on the real broker: what it reads back at
start-up is what keeps a sample published just before a crash from being published again."""

from __future__ import annotations

import uuid

import pytest

from freemask.coordinator.service import accepted_ids
from freemask.shared.bus import OutboundMessage, Publisher, Topics, ensure_topics, make_producer
from freemask.shared.stack import EmbeddedStack
from freemask.v1 import samples_pb2

from conftest import config_for

pytestmark = pytest.mark.stack


def test_accepted_ids_reads_back_every_run_s_published_samples(stack: EmbeddedStack) -> None:
    config = config_for(stack)
    ensure_topics(config.bus, [Topics.ACCEPTED])
    first, second = (f"acc-{uuid.uuid4().hex[:8]}" for _ in range(2))
    runs = {first: [f"s-{i}" for i in range(3)], second: ["s-9"]}
    publisher = Publisher(make_producer(config.bus))
    try:
        publisher.publish([OutboundMessage(Topics.ACCEPTED, sample_id, samples_pb2.AcceptedSample(
            schema_version=1, run_id=run_id, sample=samples_pb2.Sample(sample_id=sample_id, run_id=run_id)))
            for run_id, ids in runs.items() for sample_id in ids])
    finally:
        publisher.close()
    found = accepted_ids(config)
    for run_id, ids in runs.items():
        assert found.get(run_id) == set(ids)


def test_accepted_ids_reads_on_past_the_end_offsets_the_broker_reports(stack: EmbeddedStack) -> None:
    """Tansu 0.6 reports 1 as the end offset of any non-empty partition, so a read-back that stopped at
    the reported end got only its first poll (at most 500 records in kafka-python): a coordinator
    restarting then would publish the rest of a run's accepted samples a second time."""
    config = config_for(stack)
    ensure_topics(config.bus, [Topics.ACCEPTED])
    run_id = f"acc-{uuid.uuid4().hex[:8]}"
    ids = [f"s-{i}" for i in range(1200)]  # well over one poll's worth, in any partition layout
    publisher = Publisher(make_producer(config.bus))
    try:
        publisher.publish([OutboundMessage(Topics.ACCEPTED, sample_id, samples_pb2.AcceptedSample(
            schema_version=1, run_id=run_id, sample=samples_pb2.Sample(sample_id=sample_id, run_id=run_id)))
            for sample_id in ids])
    finally:
        publisher.close()
    found = accepted_ids(config).get(run_id, set())
    assert found == set(ids), f"read back {len(found)} of the {len(ids)} accepted samples of {run_id}"
