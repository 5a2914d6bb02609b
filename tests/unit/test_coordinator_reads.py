"""Calls that race the coordinator's loop. A run's status is read without the lock that serialises
changes to runs: a change can wait on the broker or the scoring service for as long as their
timeouts, and GetRun must not wait with it; readers see the last saved state, never a run halfway
through a batch. A StartRun that fails leaves no half-started run behind."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from freemask.coordinator.service import Coordinator, RunRepository
from freemask.shared.bus import OutboundMessage, Topics
from freemask.shared.config import load_config
from freemask.shared.errors import NotFound, Unavailable

from memory_store import MemoryStore
from test_coordinator_refusals import RUN, TrainingRecorder, record, single_for


class GatedPublisher:
    """Publishes at once until `hold` is called; then each publish waits until `release`, like a
    producer blocked on a broker that is down."""

    def __init__(self) -> None:
        self.published: list[OutboundMessage] = []
        self.waiting = threading.Event()
        self._open = threading.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def __call__(self, messages: Sequence[OutboundMessage]) -> None:
        if not self._open.is_set():
            self.waiting.set()
            self._open.wait(timeout=60)
        self.published.extend(messages)


def test_a_status_read_does_not_wait_for_a_publish_held_up_by_the_broker() -> None:
    store = MemoryStore()
    publisher = GatedPublisher()
    coordinator = Coordinator(load_config(environ={}), RunRepository(store), store,
                              scoring=TrainingRecorder(), publish=publisher)  # type: ignore[arg-type]
    coordinator.start_run(RUN, seed=1, overrides={"initial_samples": "2", "rounds": "1"})
    first = next(m.message for m in publisher.published if m.topic == Topics.GENERATE)

    publisher.hold()
    handler = threading.Thread(target=coordinator.handle, args=([record(Topics.SINGLES, first.sample_id,
                                                                        single_for(first))],))
    handler.start()
    try:
        assert publisher.waiting.wait(timeout=30), "the batch never reached its publish"
        read: list = []
        reader = threading.Thread(target=lambda: read.append(coordinator.record(RUN)), daemon=True)
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive(), "GetRun waited for the publish held up by the broker"
        # The batch has changed the run in memory, but nothing of it is saved yet: readers do not see it.
        (during,) = read
        assert all(slot.single is None for slot in during.bootstrap)
    finally:
        publisher.release()
        handler.join(timeout=30)
    after = coordinator.record(RUN)
    assert [slot.final_id for slot in after.bootstrap if slot.single is not None] == [first.sample_id]
    assert all(slot.single is None for slot in during.bootstrap), "a reader's copy changed under it"


def test_a_start_that_could_not_publish_leaves_no_run_and_its_retry_starts_it() -> None:
    store = MemoryStore()
    published: list[OutboundMessage] = []
    broker_down = [True]

    def publish(messages: Sequence[OutboundMessage]) -> None:
        if broker_down[0]:
            raise Unavailable("broker at 127.0.0.1:1 is unreachable")
        published.extend(messages)

    coordinator = Coordinator(load_config(environ={}), RunRepository(store), store, scoring=TrainingRecorder(),
                              publish=publish)  # type: ignore[arg-type]
    with pytest.raises(Unavailable):
        coordinator.start_run(RUN, seed=1, overrides={"initial_samples": "2", "rounds": "1"})
    with pytest.raises(NotFound):
        coordinator.record(RUN)

    broker_down[0] = False
    started = coordinator.start_run(RUN, seed=1, overrides={"initial_samples": "2", "rounds": "1"})
    assert started.phase == "bootstrap" and coordinator.record(RUN).run_id == RUN
    assert len([m for m in published if m.topic == Topics.GENERATE]) == 2
