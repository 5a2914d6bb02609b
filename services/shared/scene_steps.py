"""What every step of the place ⇄ harmonize loop checks and records (compose.proto).

PlacementTask and HarmonizeTask carry the same run, round, sample, background and
scene, and both name a planned object whose pixels come from a generated single
object; the checks on those live here once.

A task of run R, round r reads only that round's samples: the scene is the base single
object's files at step 0 and the sample's own step folders later, and every planned
object's source is one of the round's generated single objects (the thesaurus picks them
from `runs/R/rounds/r/samples/`). A key anywhere else (another run's samples, weights,
indexes, run state) is refused, so a message can neither read nor, through what it
passes on, get written over anything outside its own run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from freemask.shared.errors import InvalidInput, shown
from freemask.shared.keys import key_within, sample_prefix, validate_id, validate_round, within_run
from freemask.v1 import common_pb2, compose_pb2, generate_pb2

MAX_CLASS_ID = 254  # 0 is background and 255 "ignore" in label maps
# A compose plan adds at most 16 objects (thesaurus.plan); more would only make a task loop longer.
MAX_PLANNED_OBJECTS = 16
_FLOAT_TYPES = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


class SceneStep(Protocol):
    run_id: str
    round: int
    sample_id: str
    background_name: str
    scene: compose_pb2.SceneState

    def HasField(self, field_name: str) -> bool: ...  # noqa: N802 - the protobuf method


def require_finite(message: Message, what: str) -> None:
    """InvalidInput naming the first float or double field of `message` (nested messages, repeated
    fields and map values included) that is NaN or infinite: scores, thresholds and relations are
    copied into samples, provenance and the accepted topic, where a NaN poisons every comparison."""
    for path, value in _float_values(message, what):
        if not math.isfinite(value):
            raise InvalidInput(f"{path} is {value}; it must be a finite number")


def _float_values(message: Message, path: str) -> Iterator[tuple[str, float]]:
    for field, value in message.ListFields():
        name = f"{path}.{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.type in _FLOAT_TYPES:
                    yield f"{name}[{shown(key, 40)}]", item
                elif value_field.message_type is not None:
                    yield from _float_values(item, f"{name}[{shown(key, 40)}]")
        elif field.type in _FLOAT_TYPES:
            if field.is_repeated:
                yield from ((f"{name}[{i}]", item) for i, item in enumerate(value))
            else:
                yield name, value
        elif field.message_type is not None:
            if field.is_repeated:
                for i, item in enumerate(value):
                    yield from _float_values(item, f"{name}[{i}]")
            else:
                yield from _float_values(value, name)


def validate_scene_step(task: SceneStep, backgrounds: Sequence[str]) -> None:
    """InvalidInput naming the first thing wrong with the fields every step shares."""
    require_finite(task, type(task).__name__)  # type: ignore[arg-type]
    validate_id(task.run_id, "run id")
    validate_round(task.round)
    validate_id(task.sample_id, "sample id")
    if task.background_name not in backgrounds:
        raise InvalidInput(f"unknown background {shown(task.background_name, 64)}; "
                           f"configured: {', '.join(backgrounds)}")
    if not task.HasField("scene"):
        raise InvalidInput("scene is missing")
    if task.scene.image_size.width < 1 or task.scene.image_size.height < 1:
        raise InvalidInput("scene.image_size is missing")
    if len(task.scene.objects) > MAX_PLANNED_OBJECTS + 1:
        raise InvalidInput(f"scene holds {len(task.scene.objects)} objects; a composed scene has at most "
                           f"{MAX_PLANNED_OBJECTS + 1}")
    within_run(task.scene.keys.image_key, task.run_id, task.round, "scene image_key")


def validate_scene_keys(task: SceneStep) -> None:
    """The scene's label and instance maps, where set, lie in the task's own run and round too."""
    for field in ("label_key", "instance_map_key"):
        key = getattr(task.scene.keys, field)
        if key:
            within_run(key, task.run_id, task.round, f"scene {field}")


def validate_planned_source(planned: compose_pb2.PlannedObject, present: bool, what: str, task: SceneStep,
                            classes: Sequence[str]) -> None:
    """The planned object is there, names a configured class, and its source is one of the task's
    round's single objects, with keys in that source's own sample folder."""
    if not present or not planned.HasField("source"):
        raise InvalidInput(f"{what} (with its source single object) is missing")
    if planned.class_name not in classes:
        raise InvalidInput(f"{what} has unknown class {shown(planned.class_name, 64)}; known classes: "
                           f"{', '.join(classes)}")
    if not 1 <= planned.class_id <= MAX_CLASS_ID:
        raise InvalidInput(f"{what} class_id {planned.class_id} is outside 1..{MAX_CLASS_ID}")
    if not 0.0 <= planned.relation <= 1.0:  # NaN fails the test too
        raise InvalidInput(f"{what} relation {planned.relation} is outside [0, 1]")
    source = planned.source
    validate_id(source.run_id, f"{what} source run id")
    validate_round(source.round)
    if (source.run_id, source.round) != (task.run_id, task.round):
        raise InvalidInput(f"{what} source {shown(source.sample_id, 64)} belongs to run {source.run_id!r} round "
                           f"{source.round}; a task of run {task.run_id!r} round {task.round} pastes only objects "
                           "generated in its own run and round")
    source_prefix = sample_prefix(source.run_id, source.round, source.sample_id)
    key_within(source.keys.image_key, source_prefix, f"{what} source image_key")
    key_within(source.keys.label_key, source_prefix, f"{what} source label_key")


def validate_remaining(remaining: Sequence[compose_pb2.PlannedObject], task: SceneStep,
                       classes: Sequence[str]) -> None:
    """The rest of the plan passes the same checks now, so a bad object late in a plan is refused
    before the first paste is written rather than steps later."""
    if len(remaining) >= MAX_PLANNED_OBJECTS:
        raise InvalidInput(f"remaining_objects holds {len(remaining)} objects; a plan adds at most "
                           f"{MAX_PLANNED_OBJECTS}")
    for index, planned in enumerate(remaining):
        validate_planned_source(planned, True, f"remaining_objects[{index}]", task, classes)


def generation_record(single: generate_pb2.SingleObject) -> common_pb2.GenerationRecord:
    """How a single object was generated, for a sample's provenance."""
    return common_pb2.GenerationRecord(sample_id=single.sample_id, class_name=single.class_name,
                                       prompt=single.prompt, seed=single.seed, threshold=single.threshold,
                                       generator=single.generator)
