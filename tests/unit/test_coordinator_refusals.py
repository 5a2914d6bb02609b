"""The coordinator builds D_t and the α cut from other stages' outputs: an output it cannot use
(keys in another sample's folder, a NaN or out-of-range score) goes to the DLQ under its sample id
instead of into the run, and the slot is then counted as dead-lettered like any poison message.
A training request the scoring service refuses ends the run with the reason; asking again would
get the same answer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from freemask.coordinator.service import Coordinator, RunRepository, refused, validate_scored
from freemask.shared.bus import OutboundMessage, Topics
from freemask.shared.config import load_config
from freemask.shared.errors import InvalidInput, Unavailable
from freemask.v1 import common_pb2, dead_letter_pb2, generate_pb2, samples_pb2

from memory_store import MemoryStore

RUN = "refusals"


def record(topic: str, key: str, message, offset: int = 7) -> SimpleNamespace:
    """What kafka-python hands the loop: bytes in, headers as (name, bytes) pairs."""
    return SimpleNamespace(topic=topic, partition=0, offset=offset, key=key.encode(), value=message.SerializeToString(),
                           headers=[("schema", message.DESCRIPTOR.full_name.encode())])


class TrainingRecorder:
    """The scoring service's Train, as far as the coordinator uses it when a round's data is complete."""

    def __init__(self) -> None:
        self.manifests: list[str] = []

    def train(self, run_id: str, action, epochs: int | None, seed: int) -> str:
        self.manifests.append(action.manifest_key)
        return f"job-{len(self.manifests)}"


@pytest.fixture
def started() -> tuple[Coordinator, list[OutboundMessage]]:
    published: list[OutboundMessage] = []

    def publish(messages: Sequence[OutboundMessage]) -> None:
        published.extend(messages)

    store = MemoryStore()
    coordinator = Coordinator(load_config(environ={}), RunRepository(store), store,
                              scoring=TrainingRecorder(), publish=publish)  # type: ignore[arg-type]
    coordinator.start_run(RUN, seed=1, overrides={"initial_samples": "2", "rounds": "1"})
    return coordinator, published


def single_for(request: generate_pb2.GenerateRequest, image_key: str | None = None) -> generate_pb2.SingleObject:
    folder = f"runs/{request.run_id}/rounds/{request.round}/samples/{request.sample_id}/"
    return generate_pb2.SingleObject(
        run_id=request.run_id, round=request.round, sample_id=request.sample_id, class_name=request.class_name,
        background_name=request.background_name, prompt=request.prompt, seed=request.seed,
        keys=common_pb2.SampleKeys(image_key=image_key or folder + "image.png", label_key=folder + "label.png"),
        image_size=request.image_size)


def test_a_single_whose_files_lie_in_another_run_is_dead_lettered_and_the_slot_counted(started) -> None:
    coordinator, published = started
    first, second = [m.message for m in published if m.topic == Topics.GENERATE]
    published.clear()
    stray = single_for(first, image_key="runs/other-run/rounds/0/samples/x/image.png")
    coordinator.handle([record(Topics.SINGLES, first.sample_id, stray)])
    (letter_out,) = published
    assert letter_out.topic == Topics.DLQ and letter_out.key == first.sample_id
    letter = letter_out.message
    assert letter.stage == "coordinator" and letter.error_type == "InvalidIdError" and "runs/other-run" in letter.error
    assert letter.value == stray.SerializeToString() and letter.original_topic == Topics.SINGLES
    assert letter.headers["schema"] == b"freemask.v1.SingleObject" and letter.attempts == 1

    # The letter comes back on the DLQ topic: the slot ends dead-lettered and the good one still counts.
    published.clear()
    coordinator.handle([record(Topics.DLQ, first.sample_id, letter, offset=1),
                        record(Topics.SINGLES, second.sample_id, single_for(second))])
    ended = {slot.final_id: slot for slot in coordinator.record(RUN).bootstrap}
    assert ended[first.sample_id].dead_letter is not None and ended[first.sample_id].score is None
    assert ended[second.sample_id].single is not None
    assert coordinator._scoring.manifests == [f"runs/{RUN}/rounds/0/dataset.jsonl"]  # D_0: the one usable single


@pytest.mark.parametrize("score", [math.nan, math.inf, -0.1, 1.5])
def test_scores_the_cut_cannot_use_are_refused(score: float) -> None:
    scored = samples_pb2.ScoredSample(sample=samples_pb2.Sample(run_id=RUN, sample_id="s-0-1"), score=score)
    with pytest.raises(InvalidInput, match="score|finite"):
        validate_scored(scored)


def test_a_score_in_range_passes_and_the_refusal_keeps_the_record_byte_for_byte() -> None:
    scored = samples_pb2.ScoredSample(sample=samples_pb2.Sample(run_id=RUN, sample_id="s-0-1"), score=0.25)
    validate_scored(scored)
    letter = refused(record(Topics.SCORED, "s-0-1", scored), InvalidInput("nope")).message
    assert isinstance(letter, dead_letter_pb2.DeadLetter)
    assert samples_pb2.ScoredSample.FromString(letter.value) == scored and letter.error == "nope"
    assert letter.first_failure_time.seconds > 0 and letter.last_failure_time == letter.first_failure_time


class RefusingScoring:
    """A scoring service that answers Train with `error`, as ScoringClient raises it."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def train(self, run_id: str, action, epochs: int | None, seed: int) -> str:
        self.calls += 1
        raise self.error


def one_sample_run(scoring) -> tuple[Coordinator, SimpleNamespace]:
    """A run of one bootstrap sample on `scoring`, and the delivery of that sample's single."""
    store = MemoryStore()
    published: list[OutboundMessage] = []
    coordinator = Coordinator(load_config(environ={}), RunRepository(store), store, scoring=scoring,
                              publish=published.extend)  # type: ignore[arg-type]
    coordinator.start_run(RUN, seed=1, overrides={"initial_samples": "1", "rounds": "1"})
    (request,) = [m.message for m in published if m.topic == Topics.GENERATE]
    return coordinator, record(Topics.SINGLES, request.sample_id, single_for(request))


def finish_bootstrap(scoring) -> Coordinator:
    coordinator, delivery = one_sample_run(scoring)
    coordinator.handle([delivery])  # D_0 done: train f_0
    return coordinator


def test_a_training_request_the_scoring_service_refuses_fails_the_run_with_the_reason() -> None:
    scoring = RefusingScoring(InvalidInput("scoring service: INVALID_ARGUMENT: epochs must be in [1, 1000]"))
    coordinator = finish_bootstrap(scoring)
    state = coordinator.record(RUN)
    assert scoring.calls == 1 and state.phase == "failed", state.phase
    assert "training f_0 failed" in state.error and "epochs must be in [1, 1000]" in state.error


def test_a_scoring_service_that_is_down_leaves_the_run_to_be_retried() -> None:
    outage = Unavailable("scoring service: UNAVAILABLE: connection refused")
    coordinator, delivery = one_sample_run(RefusingScoring(outage))
    with pytest.raises(Unavailable):
        coordinator.handle([delivery])  # D_0 is complete: Train f_0, which the outage refuses
    assert coordinator.record(RUN).phase == "bootstrap"  # the failed batch saved nothing

    # The loop restarts on the same coordinator: a resume from the saved state, then the single
    # (its offset never committed) is delivered again, and f_0 is asked for again.
    coordinator._scoring = recorder = TrainingRecorder()
    coordinator.resume({})
    coordinator.handle([delivery])
    assert recorder.manifests == [f"runs/{RUN}/rounds/0/dataset.jsonl"]
    assert coordinator.record(RUN).phase == "train"
