"""Algorithm 1 as a state machine: events in, actions out, state as plain JSON.

A run goes through these phases:

1. **bootstrap**: D_0 is generated: `initial_samples` GenerateRequests; every single
   object that comes back joins D_0 (nothing is scored yet: there is no f to score with).
2. **train** (round t): D_t is written as a JSONL manifest and f_t is trained on it by
   the scoring service (from f_{t-1}'s weights after round 0).
3. **generate** (round t): D'_t is `samples_per_round` slots. A slot is a single object
   (its GenerateRequest's result is scored as it is) or a composed scene (the single
   object becomes the base of a ComposeRequest, and the composed sample is scored). A
   slot ends when its sample is scored, or when any of its messages is dead-lettered.
4. **select**: when every slot has ended, the α cut (`selection.py`) retains the top
   scores; they are published as AcceptedSamples and become D_{t+1}. After the last
   round the run is COMPLETED.

Every id is derived from the run, the round and the slot, so redelivered events are
recognised and dropped, and a machine rebuilt from its saved JSON after a crash goes
on exactly where it stopped. The machine does no I/O: the coordinator service
publishes the actions, persists the state and talks to the scoring service.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format

from freemask.coordinator.selection import GLOBAL, PER_CLASS_AND_KIND, SELECTIONS, group_of, select
from freemask.scoring.data import LabelledPair
from freemask.scoring.models import model_version
from freemask.shared.bus import Topics
from freemask.shared.errors import InvalidInput
from freemask.shared.keys import derive_sample_id, validate_id
from freemask.shared.scene_steps import generation_record
from freemask.shared.singles import single_object_instance
from freemask.v1 import common_pb2, compose_pb2, generate_pb2, samples_pb2

ACCEPTED_SCHEMA_VERSION = 1
BOOTSTRAP, TRAIN, GENERATE, COMPLETED, FAILED, STOPPED = (
    "bootstrap", "train", "generate", "completed", "failed", "stopped")
SINGLE_SLOT, COMPOSED_SLOT = "single", "composed"


@dataclass(frozen=True)
class RunSettings:
    """What a run does; fixed when it starts and saved with it."""

    rounds: int = 2  # T + 1
    alpha: float = 0.7
    selection: str = PER_CLASS_AND_KIND  # how the α cut is taken (selection.py)
    initial_samples: int = 24  # |D_0|
    samples_per_round: int = 24  # |D'_t|
    composed_fraction: float = 0.5  # share of D'_t's slots that are composed scenes
    objects_to_add: int = 2
    train_epochs: int | None = None  # None: the scoring service's default
    classes: tuple[str, ...] = ()
    backgrounds: dict[str, tuple[str, ...]] = field(default_factory=dict)  # class -> backgrounds it may appear on
    prompt_template: str = "a photo of a {cls} {background}"
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.initial_samples < 1 or self.samples_per_round < 1:
            raise InvalidInput("rounds, initial_samples and samples_per_round must each be at least 1")
        if not 0.0 < self.alpha <= 1.0 or not 0.0 <= self.composed_fraction <= 1.0:
            raise InvalidInput(f"alpha must be in (0, 1] and composed_fraction in [0, 1]; got {self.alpha} and "
                               f"{self.composed_fraction}")
        if not self.classes or any(not self.backgrounds.get(cls) for cls in self.classes):
            raise InvalidInput("every class needs at least one background it may appear on")
        if self.selection not in SELECTIONS:
            raise InvalidInput(f"selection must be one of {', '.join(SELECTIONS)}; got {self.selection!r}")


@dataclass(frozen=True)
class Publish:
    topic: str
    key: str
    message: Any  # a freemask.v1 message


@dataclass(frozen=True)
class Train:
    """Train f_t on D_t: `pairs` written as the manifest `manifest_key` (none: it is written already)."""

    round: int
    manifest_key: str
    pairs: tuple[LabelledPair, ...]
    init_from: common_pb2.ModelVersion | None


Action = Publish | Train


@dataclass
class Slot:
    kind: str  # SINGLE_SLOT or COMPOSED_SLOT (bootstrap slots are single)
    generate_id: str
    composed_id: str | None = None
    single: dict[str, Any] | None = None  # the SingleObject that came back, as JSON
    score: float | None = None
    sample: dict[str, Any] | None = None  # the scored Sample, as JSON
    dead_letter: str | None = None  # why the slot ended without a sample
    # The class the slot's object was drawn for (a composed scene's base object's), known from the
    # start: a slot can be scored before its single object is seen again after a restart.
    class_name: str = ""

    @property
    def final_id(self) -> str:
        return self.composed_id or self.generate_id

    @property
    def ended(self) -> bool:
        return self.score is not None or self.dead_letter is not None


@dataclass
class RoundRecord:
    round: int
    slots: list[Slot] = field(default_factory=list)
    trained: bool = False
    validation_mean_iou: float | None = None  # f_t on the validation manifest, when one is configured
    threshold: float | None = None  # the α cut; under a selection by group, the lowest group cut
    # Under a selection by group: group (selection.group_of, the class or "class/kind") -> its cut. The
    # name is the saved state's, from when the groups were always classes.
    class_thresholds: dict[str, float] = field(default_factory=dict)
    retained: list[str] = field(default_factory=list)

    def cut_for(self, slot: Slot, selection: str) -> float:
        """The score `slot`'s sample had to reach to be retained: its group's cut, or the round's."""
        return self.class_thresholds.get(group_of(selection, slot.class_name, slot.kind), self.threshold or 0.0)


_ROUND_FIELDS = frozenset(RoundRecord.__dataclass_fields__) - {"slots"}


@dataclass
class RunRecord:
    """Everything the coordinator knows of a run: saved after every change."""

    run_id: str
    seed: int
    settings: RunSettings
    phase: str = BOOTSTRAP
    round: int = 0
    bootstrap: list[Slot] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # sample ids published on the accepted topic
    error: str = ""
    stop_requested: str = ""
    # Unix seconds, stamped by the service when it saves the record (the machine keeps no clock).
    created_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.phase in (COMPLETED, FAILED, STOPPED)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def copy(self) -> RunRecord:
        """A deep copy, sharing nothing with this record."""
        return RunRecord.from_json(self.to_json())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        # A run saved before `selection` existed was started with the global cut, and finishes with it.
        settings = {"selection": GLOBAL, **data["settings"]}
        record = cls(run_id=data["run_id"], seed=data["seed"], settings=RunSettings(
            **{**settings, "classes": tuple(settings["classes"]),
               "backgrounds": {k: tuple(v) for k, v in settings["backgrounds"].items()}}))
        record.phase, record.round = data["phase"], data["round"]
        record.bootstrap = [Slot(**slot) for slot in data["bootstrap"]]
        # Only known fields: a state saved by an earlier version may hold ones since dropped (derivable ones).
        record.rounds = [RoundRecord(**{k: v for k, v in r.items() if k in _ROUND_FIELDS},
                                     slots=[Slot(**slot) for slot in r["slots"]]) for r in data["rounds"]]
        record.accepted, record.error, record.stop_requested = data["accepted"], data["error"], data["stop_requested"]
        record.created_at, record.updated_at, record.finished_at = (data.get(name) for name in (
            "created_at", "updated_at", "finished_at"))
        return record


def _message_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def labelled_pair(message: dict[str, Any]) -> LabelledPair:
    """The (image, label map) pair of a SingleObject or Sample kept as JSON in a slot."""
    return LabelledPair(message["keys"]["image_key"], message["keys"]["label_key"])


class RunMachine:
    """Algorithm 1 for one run, over a RunRecord."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record

    @classmethod
    def new(cls, run_id: str, seed: int, settings: RunSettings) -> RunMachine:
        return cls(RunRecord(run_id=validate_id(run_id, "run_id"), seed=seed, settings=settings))

    @property
    def finished(self) -> bool:
        return self.record.finished

    # --- starting ------------------------------------------------------------------

    def start(self) -> list[Action]:
        """The bootstrap's GenerateRequests (again, if the run had started: ids are stable)."""
        record = self.record
        if not record.bootstrap:
            record.bootstrap = [Slot(SINGLE_SLOT, derive_sample_id(record.run_id, 0, i, kind="b"))
                                for i in range(record.settings.initial_samples)]
        return [self._generate(0, slot.generate_id, index, "b") for index, slot in enumerate(record.bootstrap)
                if not slot.ended]

    def _rng(self, round_index: int, index: int, kind: str) -> np.random.Generator:
        """The draws of one slot's request: a function of the run's seed and the slot alone."""
        return np.random.default_rng([self.record.seed, round_index, index, ord(kind[0])])

    def _seed(self, round_index: int, index: int, kind: str) -> int:
        return int(self._rng(round_index, index, kind).integers(2**31))

    def _generate(self, round_index: int, sample_id: str, index: int, kind: str) -> Publish:
        settings = self.record.settings
        rng = self._rng(round_index, index, kind)
        cls = settings.classes[int(rng.integers(len(settings.classes)))]
        choices = settings.backgrounds[cls]
        background = choices[int(rng.integers(len(choices)))]
        request = generate_pb2.GenerateRequest(
            run_id=self.record.run_id, round=round_index, sample_id=sample_id, class_name=cls,
            background_name=background, prompt=settings.prompt_template.format(cls=cls, background=background),
            seed=int(rng.integers(2**31)),
            image_size=common_pb2.ImageSize(width=settings.image_size, height=settings.image_size))
        return Publish(Topics.GENERATE, sample_id, request)

    # --- events --------------------------------------------------------------------

    def on_single(self, single: generate_pb2.SingleObject) -> list[Action]:
        slot = self._slot_of(single.sample_id)
        if slot is None or slot.single is not None or slot.ended:
            return []  # another run's, or a redelivery
        slot.single = _message_json(single)
        if self.record.phase == BOOTSTRAP:
            slot.score = 1.0  # D_0 is taken as generated: nothing scores it
            return self._after_bootstrap_event()
        if slot.kind == COMPOSED_SLOT:
            request = compose_pb2.ComposeRequest(
                run_id=single.run_id, round=single.round, sample_id=slot.composed_id, base_scene=single,
                background_name=single.background_name, num_objects_to_add=self.record.settings.objects_to_add,
                seed=self._seed(single.round, self.record.rounds[-1].slots.index(slot), "c"))
            return [Publish(Topics.COMPOSE, slot.composed_id, request)]
        return [Publish(Topics.COMPOSED, single.sample_id, single_sample(single))]

    def on_scored(self, scored: samples_pb2.ScoredSample) -> list[Action]:
        if self.record.phase != GENERATE:
            return []
        slot = self._slot_of(scored.sample.sample_id)
        if slot is None or slot.ended or slot.final_id != scored.sample.sample_id:
            return []
        slot.score = float(scored.score)
        slot.sample = _message_json(scored.sample)
        return self._after_round_event()

    def on_dead_letter(self, key: str, error: str) -> list[Action]:
        slot = self._slot_of(key)
        if slot is None or slot.ended:
            return []
        slot.dead_letter = error or "dead-lettered"
        if self.record.phase == BOOTSTRAP:
            return self._after_bootstrap_event()
        return self._after_round_event()

    def on_trained(self, round_index: int, validation_mean_iou: float | None = None) -> list[Action]:
        """f_t is ready (with its mIoU on the validation set, if measured): publish D'_t's GenerateRequests."""
        record = self.record
        current = record.rounds[-1] if record.rounds else None
        if record.phase != TRAIN or current is None or current.round != round_index or current.trained:
            return []
        current.trained = True
        current.validation_mean_iou = validation_mean_iou
        record.phase = GENERATE
        settings = record.settings
        composed = round(settings.composed_fraction * settings.samples_per_round)
        generates = [self._generate(round_index, derive_sample_id(record.run_id, round_index, i), i, "s")
                     for i in range(settings.samples_per_round)]
        current.slots = [
            Slot(COMPOSED_SLOT if i < composed else SINGLE_SLOT, generate.key,
                 derive_sample_id(record.run_id, round_index, i, kind="c") if i < composed else None,
                 class_name=generate.message.class_name)
            for i, generate in enumerate(generates)]
        return generates

    def on_training_failed(self, error: str) -> list[Action]:
        self.record.phase, self.record.error = FAILED, f"training f_{self.record.round} failed: {error}"
        return []

    def stop(self, reason: str) -> None:
        """No new work is started; the run ends STOPPED at its next phase boundary."""
        if not self.finished:
            self.record.stop_requested = reason or "stopped"

    # --- transitions ---------------------------------------------------------------

    def owns(self, sample_id: str) -> bool:
        """Whether `sample_id` is one of this run's current slots (dead letters name only a sample)."""
        return self._slot_of(sample_id) is not None

    def _slot_of(self, sample_id: str) -> Slot | None:
        slots = self.record.bootstrap if self.record.phase == BOOTSTRAP else (
            self.record.rounds[-1].slots if self.record.rounds else [])
        for slot in slots:
            if sample_id in (slot.generate_id, slot.composed_id):
                return slot
        return None

    def _after_bootstrap_event(self) -> list[Action]:
        if not all(slot.ended for slot in self.record.bootstrap):
            return []
        dataset = [slot.single for slot in self.record.bootstrap if slot.single is not None]
        if not dataset:
            self.record.phase, self.record.error = FAILED, "no single object of D_0 was generated"
            return []
        return self._train_round(0, [labelled_pair(single) for single in dataset])

    def _after_round_event(self) -> list[Action]:
        record = self.record
        current = record.rounds[-1]
        if not all(slot.ended for slot in current.slots):
            return []
        scored = [slot for slot in current.slots if slot.score is not None]
        how = record.settings.selection
        selection = select({slot.final_id: slot.score for slot in scored},
                           {slot.final_id: group_of(how, slot.class_name, slot.kind) for slot in scored},
                           record.settings.alpha, how)
        current.threshold, current.class_thresholds = selection.threshold, selection.group_cuts
        current.retained = selection.retained
        by_id = {slot.final_id: slot for slot in current.slots}
        actions: list[Action] = []
        for sample_id in current.retained:
            if sample_id in record.accepted:
                continue
            slot = by_id[sample_id]
            accepted = samples_pb2.AcceptedSample(
                schema_version=ACCEPTED_SCHEMA_VERSION, run_id=record.run_id, round_accepted=current.round,
                sample=json_format.ParseDict(slot.sample, samples_pb2.Sample()), score=slot.score,
                score_threshold=current.cut_for(slot, how), segmenter=model_version(record.run_id, current.round))
            actions.append(Publish(Topics.ACCEPTED, sample_id, accepted))
            record.accepted.append(sample_id)
        if current.round + 1 >= record.settings.rounds:
            record.phase = COMPLETED
            return actions
        pairs = [labelled_pair(by_id[i].sample) for i in current.retained]
        return actions + self._train_round(current.round + 1, pairs)

    def _train_round(self, round_index: int, pairs: list[LabelledPair]) -> list[Action]:
        record = self.record
        if record.stop_requested:
            record.phase = STOPPED
            return []
        if not pairs:
            record.phase, record.error = FAILED, f"D_{round_index} is empty: nothing was retained"
            return []
        record.phase, record.round = TRAIN, round_index
        record.rounds.append(RoundRecord(round=round_index))
        return [self._train(tuple(pairs))]

    def training_again(self) -> list[Action]:
        """The current round's Train once more, for a coordinator that resumes a run waiting on f_t:
        the scoring service answers a repeated Train with the same job (the manifest is written)."""
        return [self._train(())] if self.record.phase == TRAIN else []

    def _train(self, pairs: tuple[LabelledPair, ...]) -> Train:
        record = self.record
        round_index = record.rounds[-1].round
        init_from = model_version(record.run_id, round_index - 1) if round_index > 0 else None
        return Train(round_index, f"runs/{record.run_id}/rounds/{round_index}/dataset.jsonl", pairs, init_from)


def single_sample(single: generate_pb2.SingleObject) -> samples_pb2.Sample:
    """A generated single object as a Sample to score: its one object, its label as y_pseudo."""
    return samples_pb2.Sample(
        sample_id=single.sample_id, run_id=single.run_id, round=single.round, kind=samples_pb2.SAMPLE_KIND_SINGLE,
        keys=single.keys, image_size=single.image_size, background_name=single.background_name,
        objects=[single_object_instance(single)],
        provenance=common_pb2.Provenance(generations=[generation_record(single)],
                                         models=[m for m in (single.generator, single.affinity) if m.name]))
