"""Algorithm 1's state machine against a simulated pipeline: every action is answered the
way the services would answer it, with scores drawn from the sample id, so the expected
outcome of each round is known in advance.

Covered: the phases of a two-round run; the α cut and D_{t+1}; accepted samples published
once each despite redelivered events; dead letters ending their slot; a machine rebuilt
from its saved JSON after every event ending with the same accepted set; a stop taking
effect at the next round; a run whose D_0 never arrives failing with a reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque

import pytest

from freemask.coordinator.rounds import (
    BOOTSTRAP,
    COMPLETED,
    FAILED,
    GENERATE,
    STOPPED,
    TRAIN,
    Publish,
    RunMachine,
    RunRecord,
    RunSettings,
    Train,
)
from freemask.shared.bus import Topics
from freemask.shared.errors import InvalidInput
from freemask.shared.keys import sample_key
from freemask.v1 import common_pb2, generate_pb2, samples_pb2

SETTINGS = RunSettings(rounds=2, alpha=0.7, selection="global", initial_samples=4, samples_per_round=10,
                       composed_fraction=0.5, classes=("cat", "dog"),
                       backgrounds={"cat": ("room",), "dog": ("grass", "room")})


def score_of(sample_id: str) -> float:
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 16**8


class Pipeline:
    """Answers actions as the services would; `dead` sample ids are dead-lettered instead."""

    def __init__(self, dead: frozenset[str] = frozenset(), duplicate: bool = False) -> None:
        self.dead = dead
        self.duplicate = duplicate  # deliver every event twice (at-least-once)
        self.accepted: list[samples_pb2.AcceptedSample] = []
        self.trained: list[Train] = []
        self.composed_requests = 0

    def events(self, action) -> list[tuple[str, object]]:
        if isinstance(action, Train):
            self.trained.append(action)
            return [("trained", action.round)]
        assert isinstance(action, Publish)
        message = action.message
        if action.key in self.dead:
            return [("dead", action.key)]
        if action.topic == Topics.GENERATE:
            keys = common_pb2.SampleKeys(**{f: sample_key(message.run_id, message.round, message.sample_id, name)
                                            for f, name in (("image_key", "image.png"), ("label_key", "label.png"))})
            return [("single", generate_pb2.SingleObject(
                sample_id=message.sample_id, run_id=message.run_id, round=message.round, class_id=1,
                class_name=message.class_name, background_name=message.background_name, prompt=message.prompt,
                seed=message.seed, keys=keys, image_size=message.image_size))]
        if action.topic == Topics.COMPOSE:
            self.composed_requests += 1
            keys = common_pb2.SampleKeys(image_key=sample_key(message.run_id, message.round, message.sample_id,
                                                              "image.png"),
                                         label_key=sample_key(message.run_id, message.round, message.sample_id,
                                                              "label.png"))
            sample = samples_pb2.Sample(sample_id=message.sample_id, run_id=message.run_id, round=message.round,
                                        kind=samples_pb2.SAMPLE_KIND_COMPOSED, keys=keys)
            return [("scored", samples_pb2.ScoredSample(sample=sample, score=score_of(message.sample_id)))]
        if action.topic == Topics.COMPOSED:
            return [("scored", samples_pb2.ScoredSample(sample=message, score=score_of(message.sample_id)))]
        if action.topic == Topics.ACCEPTED:
            self.accepted.append(message)
            return []
        raise AssertionError(f"unexpected action {action}")


def deliver(machine: RunMachine, kind: str, payload) -> list:
    if kind == "single":
        return machine.on_single(payload)
    if kind == "scored":
        return machine.on_scored(payload)
    if kind == "dead":
        return machine.on_dead_letter(payload, "boom")
    return machine.on_trained(payload)


def run_to_end(pipeline: Pipeline, reload_every_event: bool = False, stop_after: int | None = None,
               settings: RunSettings = SETTINGS) -> RunMachine:
    machine = RunMachine.new("run-a", 7, settings)
    queue = deque(event for action in machine.start() for event in pipeline.events(action))
    handled = 0
    while queue:
        kind, payload = queue.popleft()
        copies = 2 if pipeline.duplicate else 1
        for _ in range(copies):
            for action in deliver(machine, kind, payload):
                queue.extend(pipeline.events(action))
        handled += 1
        if stop_after is not None and handled == stop_after:
            machine.stop("operator")
        if reload_every_event:  # a coordinator restarted after every event, from what it saved
            machine = RunMachine(RunRecord.from_json(json.loads(json.dumps(machine.record.to_json()))))
    return machine


def test_a_two_round_run_trains_generates_scores_and_keeps_the_top_alpha() -> None:
    pipeline = Pipeline()
    machine = run_to_end(pipeline)
    record = machine.record
    assert record.phase == COMPLETED and machine.finished
    assert [t.round for t in pipeline.trained] == [0, 1]
    assert len(pipeline.trained[0].pairs) == 4  # D_0: every bootstrap single
    assert pipeline.trained[0].init_from is None
    assert pipeline.trained[1].init_from == common_pb2.ModelVersion(name="segmenter", version="run-a/0")
    assert pipeline.composed_requests == 10  # 5 composed slots in each of the 2 rounds
    for round_record in record.rounds:
        scores = {slot.final_id: slot.score for slot in round_record.slots}
        ranked = sorted(scores, key=lambda i: -scores[i])
        assert round_record.retained == ranked[:7]  # ceil(0.7 * 10)
        assert round_record.threshold == pytest.approx(scores[ranked[6]])
    # D_1 is exactly round 0's retained samples
    kept = {pair.image_key for pair in pipeline.trained[1].pairs}
    assert kept == {sample_key("run-a", 0, i, "image.png") for i in record.rounds[0].retained}
    ids = [a.sample.sample_id for a in pipeline.accepted]
    assert len(ids) == 14 and len(set(ids)) == 14
    first = pipeline.accepted[0]
    assert first.schema_version == 1 and first.round_accepted == 0 and first.segmenter.version == "run-a/0"
    assert first.score >= first.score_threshold


def test_a_state_saved_with_the_rounds_since_dropped_segmenter_field_still_loads() -> None:
    saved = run_to_end(Pipeline()).record.to_json()
    for item in saved["rounds"]:
        item["segmenter"] = f"run-a/{item['round']}"  # derivable from run and round, so no longer stored
    assert RunRecord.from_json(json.loads(json.dumps(saved))).to_json() == run_to_end(Pipeline()).record.to_json()


@pytest.mark.parametrize("selection", ["per_class", "per_class_and_kind"])
def test_a_run_by_group_keeps_the_top_alpha_of_each_group_and_names_each_sample_its_group_cut(selection: str
                                                                                               ) -> None:
    pipeline = Pipeline()
    settings = RunSettings(**{**SETTINGS.__dict__, "samples_per_round": 20, "selection": selection})
    machine = run_to_end(pipeline, reload_every_event=True, settings=settings)
    record = machine.record
    assert record.phase == COMPLETED
    accepted = {a.sample.sample_id: a for a in pipeline.accepted}
    for round_record in record.rounds:
        by_group: dict[str, list] = {}
        for slot in round_record.slots:
            assert slot.class_name == slot.single["class_name"]  # known from the draw, before the single came
            group = slot.class_name if selection == "per_class" else f"{slot.class_name}/{slot.kind}"
            by_group.setdefault(group, []).append(slot)
        assert set(round_record.class_thresholds) == set(by_group)
        for group, slots in by_group.items():
            kept = [slot for slot in slots if slot.final_id in round_record.retained]
            # each group keeps its best, about α of them (the cut is shared by within-group rank)
            assert sorted(slot.score for slot in kept) == sorted(slot.score for slot in slots)[-len(kept):]
            assert abs(len(kept) - 0.7 * len(slots)) <= 1
            assert round_record.class_thresholds[group] == min(slot.score for slot in kept)
            for slot in kept:
                assert accepted[slot.final_id].score_threshold == pytest.approx(round_record.class_thresholds[group])
        assert round_record.threshold == min(round_record.class_thresholds.values())
    if selection == "per_class_and_kind":  # both kinds of slot were drawn, and each kept its share
        kinds = {group.split("/")[1] for round_record in record.rounds for group in round_record.class_thresholds}
        assert kinds == {"single", "composed"}


class ScoredFirst(Pipeline):
    """After a restart, a single slot's score can be read before its single object is read again
    (the old process published the sample, the new one resumed from a state saved before that)."""

    def events(self, action) -> list[tuple[str, object]]:
        events = super().events(action)
        if isinstance(action, Publish) and action.topic == Topics.GENERATE and action.message.round > 0:
            _, single = events[0]
            sample = samples_pb2.Sample(sample_id=single.sample_id, run_id=single.run_id, round=single.round,
                                        kind=samples_pb2.SAMPLE_KIND_SINGLE, keys=single.keys)
            return [("scored", samples_pb2.ScoredSample(sample=sample, score=score_of(single.sample_id))), *events]
        return events


@pytest.mark.parametrize("selection", ["per_class", "per_class_and_kind"])
def test_a_round_by_group_ends_when_a_slot_is_scored_before_its_single_object_is_seen(selection: str) -> None:
    settings = RunSettings(**{**SETTINGS.__dict__, "selection": selection})
    record = run_to_end(ScoredFirst(), settings=settings).record
    assert record.phase == COMPLETED
    unseen = [slot for slot in record.rounds[1].slots if slot.kind == "single"]
    assert unseen and all(slot.single is None and slot.score is not None for slot in unseen)
    assert {group.split("/")[0] for group in record.rounds[1].class_thresholds} <= set(SETTINGS.classes)


def test_a_state_saved_before_the_selection_setting_finishes_with_the_global_cut() -> None:
    saved = run_to_end(Pipeline()).record.to_json()
    del saved["settings"]["selection"]
    assert RunRecord.from_json(saved).settings.selection == "global"


def test_slots_mix_single_and_composed_samples() -> None:
    record = run_to_end(Pipeline()).record
    kinds = [slot.kind for slot in record.rounds[0].slots]
    assert kinds.count("composed") == 5 and kinds.count("single") == 5
    assert all(slot.final_id.startswith("c-") for slot in record.rounds[0].slots if slot.kind == "composed")
    single = next(slot for slot in record.rounds[0].slots if slot.kind == "single")
    assert single.sample["kind"] == "SAMPLE_KIND_SINGLE" and single.sample["objects"][0]["instance_id"] == 1


def test_redelivered_events_change_nothing() -> None:
    once, twice = Pipeline(), Pipeline(duplicate=True)
    assert run_to_end(twice).record.to_json() == run_to_end(once).record.to_json()
    assert [a.sample.sample_id for a in twice.accepted] == [a.sample.sample_id for a in once.accepted]


def test_a_coordinator_rebuilt_from_its_saved_state_after_every_event_ends_the_same() -> None:
    straight, restarted = Pipeline(), Pipeline()
    assert run_to_end(restarted, reload_every_event=True).record.to_json() == run_to_end(straight).record.to_json()
    assert [a.SerializeToString() for a in restarted.accepted] == [a.SerializeToString() for a in straight.accepted]


def test_dead_letters_end_their_slots_and_the_cut_uses_the_rest() -> None:
    clean = run_to_end(Pipeline()).record
    doomed = {clean.rounds[0].slots[0].composed_id, clean.rounds[0].slots[9].generate_id}
    record = run_to_end(Pipeline(dead=frozenset(doomed))).record
    slots = record.rounds[0].slots
    assert [slot.dead_letter for slot in slots if slot.dead_letter] == ["boom", "boom"]
    assert len(record.rounds[0].retained) == 6  # ceil(0.7 * 8)
    assert record.phase == COMPLETED


def test_a_stop_ends_the_run_at_the_next_round() -> None:
    record = run_to_end(Pipeline(), stop_after=6).record
    assert record.phase == STOPPED and record.stop_requested == "operator"
    assert len(record.rounds) == 1 and record.rounds[0].retained  # round 0 finished, round 1 never started


def test_a_run_whose_d0_never_arrives_fails_with_a_reason() -> None:
    machine = RunMachine.new("run-a", 7, SETTINGS)
    actions = machine.start()
    for action in actions:
        machine.on_dead_letter(action.key, "generator down")
    assert machine.record.phase == FAILED and "no single object of D_0" in machine.record.error
    assert all(slot.dead_letter == "generator down" for slot in machine.record.bootstrap)


def test_phases_in_order_and_events_of_other_phases_ignored() -> None:
    machine = RunMachine.new("run-a", 7, SETTINGS)
    assert machine.record.phase == BOOTSTRAP
    actions = machine.start()
    assert len(actions) == 4 and all(a.topic == Topics.GENERATE for a in actions)
    assert machine.on_trained(0) == []  # not training yet
    pipeline = Pipeline()
    for action in actions:
        for kind, payload in pipeline.events(action):
            deliver(machine, kind, payload)
    assert machine.record.phase == TRAIN
    generate = machine.on_trained(0, validation_mean_iou=0.42)
    assert machine.record.phase == GENERATE and len(generate) == 10
    assert machine.record.rounds[0].validation_mean_iou == 0.42
    assert machine.on_trained(0) == []  # a second notice is ignored


@pytest.mark.parametrize("fields", [{"rounds": 0}, {"alpha": 0.0}, {"composed_fraction": 1.5},
                                    {"backgrounds": {"cat": ("room",)}}, {"selection": "by_colour"}])
def test_bad_settings_are_refused(fields: dict) -> None:
    with pytest.raises(InvalidInput):
        RunSettings(**{**SETTINGS.__dict__, **fields})
