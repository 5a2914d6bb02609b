"""What every step of the place ⇄ harmonize loop checks and records (compose.proto).

PlacementTask and HarmonizeTask carry the same run, round, sample, background and
scene, and both name a planned object whose pixels come from a generated single
object; the checks on those live here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from freemask.shared.errors import InvalidInput
from freemask.shared.keys import key_within, sample_prefix, validate_id, validate_round
from freemask.v1 import common_pb2, compose_pb2, generate_pb2

# Scenes at every step live under runs/…: the base object's files at step 0, the
# sample's own step folders later.
SCENES_PREFIX = "runs/"


class SceneStep(Protocol):
    run_id: str
    round: int
    sample_id: str
    background_name: str
    scene: compose_pb2.SceneState

    def HasField(self, field_name: str) -> bool: ...  # noqa: N802 - the protobuf method


def validate_scene_step(task: SceneStep, backgrounds: Sequence[str]) -> None:
    """InvalidInput naming the first thing wrong with the fields every step shares."""
    validate_id(task.run_id, "run id")
    validate_round(task.round)
    validate_id(task.sample_id, "sample id")
    if task.background_name not in backgrounds:
        raise InvalidInput(f"unknown background {task.background_name[:64]!r}; configured: {', '.join(backgrounds)}")
    if not task.HasField("scene"):
        raise InvalidInput("scene is missing")
    if task.scene.image_size.width < 1 or task.scene.image_size.height < 1:
        raise InvalidInput("scene.image_size is missing")
    key_within(task.scene.keys.image_key, SCENES_PREFIX, "scene image_key")


def validate_planned_source(planned: compose_pb2.PlannedObject, present: bool, what: str) -> None:
    """The planned object is there, and its source's keys lie in that source's own sample folder."""
    if not present or not planned.HasField("source"):
        raise InvalidInput(f"{what} (with its source single object) is missing")
    source = planned.source
    source_prefix = sample_prefix(source.run_id, source.round, source.sample_id)
    key_within(source.keys.image_key, source_prefix, f"{what} source image_key")
    key_within(source.keys.label_key, source_prefix, f"{what} source label_key")


def generation_record(single: generate_pb2.SingleObject) -> common_pb2.GenerationRecord:
    """How a single object was generated, for a sample's provenance."""
    return common_pb2.GenerationRecord(sample_id=single.sample_id, class_name=single.class_name,
                                       prompt=single.prompt, seed=single.seed, threshold=single.threshold,
                                       generator=single.generator)
