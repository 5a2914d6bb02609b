"""Bad input for every service that accepts some, as data: which bytes go to which gRPC method or
topic, and what the refusal must say. `test_poison_input.py` sends them to real service processes.

Payloads are built from `Fixtures`, the valid objects a test module creates first (generated
single objects of run V, a copy of one under run F, and store objects that are not images or
that declare 20000×20000 pixels), by changing one thing in an otherwise valid message, so each
case is refused for the reason it names and for nothing else.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from kafka import KafkaConsumer, TopicPartition

from freemask.coordinator.rounds import single_sample
from freemask.shared.bus import GapGuard, Topics
from freemask.shared.config import BusConfig
from freemask.shared.keys import sample_prefix
from freemask.v1 import (
    common_pb2,
    compose_pb2,
    coordinator_pb2,
    dead_letter_pb2,
    generate_pb2,
    harmonization_pb2,
    placement_pb2,
    samples_pb2,
    scoring_pb2,
    thesaurus_pb2,
)

M = TypeVar("M", bound=Message)

NAN, INF = float("nan"), float("inf")
TEN_MB = 10_000_000
# Fits the bus's 1 MiB record limit with its dead letter around it, but is far over limits.max_prompt_chars.
LONG_PROMPT_CHARS = 200_000
SIDE = 32  # generated images are SIDE x SIDE
CLASS_ID = {"dog": 8}  # default.yaml's classes, 1-based
# Another message type whose field 1 is a string that is not an id: it parses as most requests
# (as different fields) and must then fail their validation.
WRONG_TYPE = dead_letter_pb2.DeadLetter(original_topic="freemask.generate.v1", partition=3,
                                        attempts=2).SerializeToString()
GARBAGE = b"\xff\xff\xff\xff garbage"
# Field 1 declared as a string, sent as bytes that are not UTF-8.
BAD_UTF8 = b"\x0a\x02\xc3\x28"


def with_declared_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming another size: a decompression-bomb header on a tiny file."""
    ihdr_start = 8 + 8  # signature, then the IHDR chunk's length and type
    body = struct.pack(">II", width, height) + png[ihdr_start + 8: ihdr_start + 13]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return png[:ihdr_start] + body + crc + png[ihdr_start + 17:]


def truncated(message: Message) -> bytes:
    """The message's bytes cut short so that they no longer parse (a cut at a field boundary would)."""
    data = message.SerializeToString()
    for cut in range(1, len(data)):
        try:
            type(message).FromString(data[:-cut])
        except DecodeError:
            return data[:-cut]
    raise AssertionError(f"no truncation of a {type(message).__name__} fails to parse")


def changed(message: M, change: Callable[[M], object]) -> M:
    copy = type(message)()
    copy.CopyFrom(message)
    change(copy)
    return copy


def with_keys(single: generate_pb2.SingleObject, image_key: str, label_key: str | None = None
              ) -> generate_pb2.SingleObject:
    def change(s: generate_pb2.SingleObject) -> None:
        s.keys.image_key = image_key
        if label_key is not None:
            s.keys.label_key = label_key
    return changed(single, change)


def generate_request(run_id: str, sample_id: str, seed: int = 5) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        run_id=run_id, round=0, sample_id=sample_id, class_name="dog", background_name="grass",
        prompt="a photo of a dog on the grass", seed=seed, image_size=common_pb2.ImageSize(width=SIDE, height=SIDE))


@dataclass
class Fixtures:
    """What the payloads are built from; made by the test module before any bad input is sent."""

    run: str  # the run whose messages these are
    foreign_run: str  # another run, holding a copy of one of run's objects
    singles: tuple[generate_pb2.SingleObject, generate_pb2.SingleObject]  # dog on grass, generated
    foreign_single: generate_pb2.SingleObject  # singles[1] copied under foreign_run
    junk_single: generate_pb2.SingleObject  # run's, whose image and label are not images
    bomb_single: generate_pb2.SingleObject  # run's, whose image and label declare 20000x20000 pixels
    pngs: dict[str, bytes] = field(default_factory=dict)  # "scene", "foreground", "mask"

    @property
    def segmenter(self) -> common_pb2.ModelVersion:
        return common_pb2.ModelVersion(name="segmenter", version=f"{self.run}/0")

    def foreign_key(self, filename: str = "image.png") -> str:
        return sample_prefix(self.foreign_run, 0, self.foreign_single.sample_id) + filename

    # --- valid messages, one per entry point ------------------------------------------------

    def generate(self, sample_id: str) -> generate_pb2.GenerateRequest:
        return generate_request(self.run, sample_id)

    def compose(self, sample_id: str) -> compose_pb2.ComposeRequest:
        return compose_pb2.ComposeRequest(run_id=self.run, round=0, sample_id=sample_id, base_scene=self.singles[0],
                                          background_name="grass", num_objects_to_add=1, seed=3)

    def planned(self, source: generate_pb2.SingleObject | None = None) -> compose_pb2.PlannedObject:
        return compose_pb2.PlannedObject(class_id=CLASS_ID["dog"], class_name="dog", relation=0.2,
                                         source=source or self.singles[1])

    def scene(self) -> compose_pb2.SceneState:
        base = self.singles[0]
        # A one-pixel base object leaves the whole scene free, so placement always finds a box.
        instance = common_pb2.ObjectInstance(
            class_id=base.class_id, class_name=base.class_name, instance_id=1,
            box=common_pb2.BoundingBox(x=0, y=0, width=1, height=1), visible_area_pixels=1,
            origin=common_pb2.OBJECT_ORIGIN_GENERATED, source_sample_id=base.sample_id, source_keys=base.keys)
        return compose_pb2.SceneState(keys=common_pb2.SampleKeys(image_key=base.keys.image_key,
                                                                 label_key=base.keys.label_key),
                                      image_size=base.image_size, objects=[instance])

    def provenance(self) -> common_pb2.Provenance:
        base = self.singles[0]
        return common_pb2.Provenance(
            generations=[common_pb2.GenerationRecord(sample_id=base.sample_id, class_name=base.class_name,
                                                     prompt=base.prompt, seed=base.seed, threshold=base.threshold)],
            models=[common_pb2.ModelVersion(name="thesaurus", version="t1")], compose_seed=3)

    def placement_task(self, sample_id: str) -> compose_pb2.PlacementTask:
        return compose_pb2.PlacementTask(
            run_id=self.run, round=0, sample_id=sample_id, background_name="grass", scene=self.scene(),
            next_object=self.planned(), step_index=0, seed=3, provenance=self.provenance())

    def harmonize_task(self, sample_id: str) -> compose_pb2.HarmonizeTask:
        return compose_pb2.HarmonizeTask(
            run_id=self.run, round=0, sample_id=sample_id, background_name="grass", scene=self.scene(),
            foreground=self.planned(), box=common_pb2.BoundingBox(x=4, y=4, width=12, height=12),
            placement_score=0.5, step_index=0, seed=3, provenance=self.provenance())

    def sample(self, single: generate_pb2.SingleObject | None = None) -> samples_pb2.Sample:
        return single_sample(single or self.singles[0])

    def place_request(self) -> placement_pb2.PlaceRequest:
        return placement_pb2.PlaceRequest(background=common_pb2.ImageRef(png=self.pngs["scene"]),
                                          foreground=common_pb2.ImageRef(png=self.pngs["foreground"]),
                                          foreground_mask=common_pb2.ImageRef(png=self.pngs["mask"]), seed=1)

    def harmonize_request(self) -> harmonization_pb2.HarmonizeRequest:
        return harmonization_pb2.HarmonizeRequest(
            scene_image=common_pb2.ImageRef(png=self.pngs["scene"]),
            scene_label_map=common_pb2.ImageRef(png=self.pngs["scene_label"]),
            foreground_image=common_pb2.ImageRef(png=self.pngs["foreground"]),
            foreground_mask=common_pb2.ImageRef(png=self.pngs["mask"]),
            box=common_pb2.BoundingBox(x=4, y=4, width=12, height=12), class_id=CLASS_ID["dog"], instance_id=2)

    def score_request(self, sample: samples_pb2.Sample | None = None) -> scoring_pb2.ScoreRequest:
        return scoring_pb2.ScoreRequest(samples=[sample or self.sample()], model=self.segmenter)

    def pair(self, image_key: str, label_key: str) -> scoring_pb2.Dataset:
        return scoring_pb2.Dataset(images=scoring_pb2.LabelledImageList(images=[
            scoring_pb2.LabelledImage(image_key=image_key, label_key=label_key)]))

    def start_run(self, run_id: str, **overrides: str) -> coordinator_pb2.StartRunRequest:
        return coordinator_pb2.StartRunRequest(run_id=run_id, seed=1,
                                               config_overrides={"initial_samples": "1", **overrides})


Payload = Callable[[Fixtures], bytes]


def message(build: Callable[[Fixtures], Message]) -> Payload:
    return lambda fx: build(fx).SerializeToString()


def raw(data: bytes) -> Payload:
    return lambda fx: data


# --- gRPC ---------------------------------------------------------------------------------------------------------

GRPC_SERVICES = {"attention_mask": "AttentionMask", "thesaurus": "Thesaurus", "placement": "Placement",
                 "harmonization": "Harmonization", "scoring": "Scoring", "coordinator": "Coordinator"}


@dataclass(frozen=True)
class GrpcCase:
    service: str  # a SERVICE_NAMES entry
    case: str
    method: str
    payload: Payload
    fragments: tuple[str, ...]  # each must be in the INVALID_ARGUMENT details

    @property
    def id(self) -> str:
        return f"{self.service}-{self.case}"


def _grpc_cases() -> list[GrpcCase]:
    def am(case: str, payload: Payload, *fragments: str, method: str = "Generate") -> GrpcCase:
        return GrpcCase("attention_mask", case, method, payload, fragments)

    def gen(change: Callable[[generate_pb2.GenerateRequest], object]) -> Payload:
        return message(lambda fx: changed(fx.generate("g-bad"), change))

    cases = [
        am("truncated", lambda fx: truncated(fx.generate("g-trunc")), "not a valid freemask.v1.GenerateRequest"),
        am("garbage", raw(GARBAGE), "not a valid freemask.v1.GenerateRequest"),
        am("bad-utf8", raw(BAD_UTF8), "not a valid freemask.v1.GenerateRequest"),
        am("wrong-type", raw(WRONG_TYPE), "run_id 'freemask.generate.v1' is not a valid id", "unknown class"),
        am("unknown-class", gen(lambda r: setattr(r, "class_name", "unicorn")), "unknown class 'unicorn'"),
        am("empty-prompt", gen(lambda r: setattr(r, "prompt", "  ")), "prompt is empty"),
        am("10mb-prompt", gen(lambda r: setattr(r, "prompt", "a dog " + "x" * (TEN_MB - 6))),
           f"prompt has {TEN_MB} characters; the limit is 512"),
        am("nan", gen(lambda r: setattr(r, "guidance_scale", NAN)), "guidance_scale nan is outside"),
        am("inf", gen(lambda r: setattr(r, "guidance_scale", INF)), "guidance_scale inf is outside"),
        am("dotdot-id", gen(lambda r: setattr(r, "sample_id", "../../etc/passwd")),
           "sample_id '../../etc/passwd' is not a valid id"),
        am("slash-id", gen(lambda r: setattr(r, "run_id", "runs/other")), "run_id 'runs/other' is not a valid id"),
        # all or nothing: the valid first request must not be written either
        am("batch-with-one-bad", message(lambda fx: _batch(fx.generate("g-batch-ok"),
                                                           changed(fx.generate("g-batch-bad"),
                                                                   lambda r: setattr(r, "sample_id", "../x")))),
           "sample_id '../x' is not a valid id", method="GenerateBatch"),
    ]

    def th(case: str, method: str, payload: Payload, *fragments: str) -> GrpcCase:
        return GrpcCase("thesaurus", case, method, payload, fragments)

    def relation(**fields: object) -> Payload:
        return message(lambda fx: thesaurus_pb2.RelationRequest(**{"object_name": "dog", "background_name": "grass",
                                                                   **fields}))

    def top(**fields: object) -> Payload:
        return message(lambda fx: thesaurus_pb2.TopObjectsRequest(**{"background_name": "grass", "k": 3, **fields}))

    cases += [
        th("truncated", "Relation", lambda fx: truncated(thesaurus_pb2.RelationRequest(
            object_name="dog", background_name="grass", thesaurus_version="some-version")),
           "not a valid freemask.v1.RelationRequest"),
        th("garbage", "TopObjects", raw(GARBAGE), "not a valid freemask.v1.TopObjectsRequest"),
        th("bad-utf8", "Relation", raw(BAD_UTF8), "not a valid freemask.v1.RelationRequest"),
        th("wrong-type", "Relation", raw(WRONG_TYPE), "unknown object 'freemask.generate.v1'"),
        th("unknown-class", "Relation", relation(object_name="unicorn"), "unknown object 'unicorn'"),
        th("unknown-background", "TopObjects", top(background_name="moon"), "unknown background 'moon'"),
        th("empty-word", "Relation", relation(object_name=""), "the object word is empty"),
        th("10mb-word", "Relation", relation(object_name="x" * TEN_MB), "unknown object 'xxx"),
        th("nan", "TopObjects", top(min_relation=NAN), "min_relation must be in [0, 1], got nan"),
        th("inf", "TopObjects", top(min_relation=INF), "min_relation must be in [0, 1], got inf"),
        th("dotdot-version", "Relation", relation(thesaurus_version="../v1"), "'../v1' is not a valid version"),
        th("slash-version", "TopObjects", top(thesaurus_version="a/b"), "'a/b' is not a valid version"),
        th("10mb-version", "Relation", relation(thesaurus_version="v" * TEN_MB), f"({TEN_MB} characters)"),
    ]

    def pl(case: str, payload: Payload, *fragments: str, method: str = "Place") -> GrpcCase:
        return GrpcCase("placement", case, method, payload, fragments)

    def place(change: Callable[[placement_pb2.PlaceRequest], object]) -> Payload:
        return message(lambda fx: changed(fx.place_request(), change))

    cases += [
        pl("truncated", lambda fx: truncated(fx.place_request()), "not a valid freemask.v1.PlaceRequest"),
        pl("garbage", raw(GARBAGE), "not a valid freemask.v1.PlaceRequest"),
        pl("wrong-type", raw(WRONG_TYPE), "not a valid freemask.v1.PlaceRequest"),
        pl("non-image", place(lambda r: r.background.CopyFrom(common_pb2.ImageRef(png=b"this is not a png"))),
           "background is not a PNG or JPEG image"),
        pl("bomb", lambda fx: changed(fx.place_request(), lambda r: r.foreground.CopyFrom(common_pb2.ImageRef(
            png=with_declared_size(fx.pngs["foreground"], 20000, 20000)))).SerializeToString(),
           "foreground declares far more pixels than allowed"),
        pl("10mb-image", place(lambda r: r.foreground_mask.CopyFrom(
            common_pb2.ImageRef(png=b"\x89PNG" * (TEN_MB // 4)))),
           f"foreground_mask is {TEN_MB} bytes inline"),
        pl("nan", place(lambda r: setattr(r, "max_overlap", NAN)), "max_overlap must be in [0, 1], got nan"),
        pl("inf", place(lambda r: setattr(r, "max_overlap", -INF)), "max_overlap must be in [0, 1], got -inf"),
        pl("dotdot-key", place(lambda r: r.foreground.CopyFrom(common_pb2.ImageRef(
            store_key="runs/../../etc/passwd"))), "invalid segment '..'"),
        pl("absolute-key", place(lambda r: r.foreground_mask.CopyFrom(common_pb2.ImageRef(store_key="/etc/passwd"))),
           "'/etc/passwd' is absolute"),
        pl("batch-over-limit", message(lambda fx: placement_pb2.PlaceBatchRequest(requests=[fx.place_request()] * 65)),
           "a batch holds 1..64 requests, got 65", method="PlaceBatch"),
    ]

    def hz(case: str, payload: Payload, *fragments: str) -> GrpcCase:
        return GrpcCase("harmonization", case, "Harmonize", payload, fragments)

    def harmonize(change: Callable[[harmonization_pb2.HarmonizeRequest], object]) -> Payload:
        return message(lambda fx: changed(fx.harmonize_request(), change))

    def out(fx: Fixtures, image: str, label: str, instances: str) -> common_pb2.SampleKeys:
        return common_pb2.SampleKeys(image_key=image, label_key=label, instance_map_key=instances)

    own = "runs/{run}/rounds/0/samples/h-out/"
    cases += [
        hz("truncated", lambda fx: truncated(fx.harmonize_request()), "not a valid freemask.v1.HarmonizeRequest"),
        hz("garbage", raw(GARBAGE), "not a valid freemask.v1.HarmonizeRequest"),
        hz("wrong-type", raw(WRONG_TYPE), "not a valid freemask.v1.HarmonizeRequest"),
        hz("non-image", harmonize(lambda r: r.foreground_image.CopyFrom(common_pb2.ImageRef(png=b"GIF89a, no"))),
           "foreground image is not a PNG or JPEG image"),
        hz("bomb", lambda fx: changed(fx.harmonize_request(), lambda r: r.scene_image.CopyFrom(common_pb2.ImageRef(
            png=with_declared_size(fx.pngs["scene"], 20000, 20000)))).SerializeToString(),
           "scene image declares far more pixels than allowed"),
        hz("10mb-image", harmonize(lambda r: r.scene_label_map.CopyFrom(common_pb2.ImageRef(png=b"\x00" * TEN_MB))),
           f"scene label map is {TEN_MB} bytes inline"),
        hz("unknown-class", harmonize(lambda r: setattr(r, "class_id", 255)), "class_id must be in 1..254, got 255"),
        hz("dotdot-key", lambda fx: changed(fx.harmonize_request(), lambda r: r.output_keys.CopyFrom(out(
            fx, "runs/../../x/image.png", own.format(run=fx.run) + "label.png",
            own.format(run=fx.run) + "instances.png"))).SerializeToString(), "invalid segment '..'"),
        hz("absolute-key", lambda fx: changed(fx.harmonize_request(), lambda r: r.output_keys.CopyFrom(out(
            fx, "/" + own.format(run=fx.run) + "image.png", own.format(run=fx.run) + "label.png",
            own.format(run=fx.run) + "instances.png"))).SerializeToString(), "is absolute"),
        hz("models-key", lambda fx: changed(fx.harmonize_request(), lambda r: r.output_keys.CopyFrom(out(
            fx, "models/rain/v1/image.png", own.format(run=fx.run) + "label.png",
            own.format(run=fx.run) + "instances.png"))).SerializeToString(),
           "output_keys.image_key 'models/rain/v1/image.png' does not lie under runs/"),
        hz("keys-in-two-samples", lambda fx: changed(fx.harmonize_request(), lambda r: r.output_keys.CopyFrom(out(
            fx, own.format(run=fx.run) + "image.png", own.format(run=fx.run) + "label.png",
            fx.foreign_key("instances.png")))).SerializeToString(), "output_keys name 2 folders"),
    ]

    def sc(case: str, method: str, payload: Payload, *fragments: str) -> GrpcCase:
        return GrpcCase("scoring", case, method, payload, fragments)

    def score(change: Callable[[samples_pb2.Sample], object]) -> Payload:
        return message(lambda fx: fx.score_request(changed(fx.sample(), change)))

    cases += [
        sc("truncated", "Score", lambda fx: truncated(fx.score_request()), "not a valid freemask.v1.ScoreRequest"),
        sc("garbage", "Score", raw(GARBAGE), "not a valid freemask.v1.ScoreRequest"),
        sc("wrong-type", "Train", raw(WRONG_TYPE), "run_id 'freemask.generate.v1' is not a valid id"),
        sc("dotdot-id", "Train", message(lambda fx: scoring_pb2.TrainRequest(
            run_id="../x", dataset=fx.pair(fx.singles[0].keys.image_key, fx.singles[0].keys.label_key))),
           "run_id '../x' is not a valid id"),
        sc("slash-id", "Score", score(lambda s: setattr(s, "sample_id", "a/b")), "sample_id 'a/b' is not a valid id"),
        sc("dotdot-job-id", "TrainStatus", message(lambda fx: scoring_pb2.TrainStatusRequest(job_id="../train-1")),
           "job_id '../train-1' is not a valid id"),
        sc("10mb-job-id", "TrainStatus", message(lambda fx: scoring_pb2.TrainStatusRequest(job_id="j" * TEN_MB)),
           "is not a valid id"),
        sc("10mb-model-name", "Score", message(lambda fx: changed(fx.score_request(), lambda r: setattr(
            r.model, "name", "m" * TEN_MB))), "is not a segmenter"),
        sc("non-image", "Score", message(lambda fx: fx.score_request(fx.sample(fx.junk_single))),
           "image is not a PNG or JPEG image"),
        sc("bomb", "Score", message(lambda fx: fx.score_request(fx.sample(fx.bomb_single))),
           "declares far more pixels than allowed"),
        sc("nan", "Score", score(lambda s: setattr(s.objects[0], "placement_score", NAN)),
           "objects[0].placement_score is nan; it must be a finite number"),
        sc("inf", "Score", score(lambda s: setattr(s.provenance.generations[0], "threshold", INF)),
           "provenance.generations[0].threshold is inf; it must be a finite number"),
        sc("unknown-class", "Score", score(lambda s: setattr(s.objects[0], "class_name", "unicorn")),
           "objects[0] has unknown class 'unicorn'"),
        sc("foreign-keys", "Score", lambda fx: fx.score_request(changed(fx.sample(), lambda s: setattr(
            s.keys, "image_key", fx.foreign_key()))).SerializeToString(), "lies outside 'runs/"),
        sc("models-key", "Score",
           score(lambda s: setattr(s.keys, "label_key", "models/segmenter/x/0/model.safetensors")),
           "keys.label_key 'models/segmenter/x/0/model.safetensors' lies outside"),
        sc("foreign-train-data", "Train", lambda fx: scoring_pb2.TrainRequest(
            run_id=fx.run, round=1, dataset=fx.pair(fx.foreign_key("image.png"), fx.foreign_key("label.png")),
            epochs=1).SerializeToString(), "lies under another run"),
        sc("foreign-train-manifest", "Train", lambda fx: scoring_pb2.TrainRequest(
            run_id=fx.run, round=1, dataset=scoring_pb2.Dataset(
                manifest_key=f"runs/{fx.foreign_run}/rounds/0/dataset.jsonl"), epochs=1).SerializeToString(),
           "dataset manifest_key", "lies under another run"),
        sc("absolute-key", "Train", message(lambda fx: scoring_pb2.TrainRequest(
            run_id=fx.run, round=1, dataset=fx.pair("/etc/passwd", fx.singles[0].keys.label_key))), "is absolute"),
        sc("dotdot-key", "Evaluate", lambda fx: scoring_pb2.EvaluateRequest(
            dataset=scoring_pb2.Dataset(manifest_key="runs/../../etc/passwd"), model=fx.segmenter).SerializeToString(),
           "invalid segment '..'"),
    ]

    def co(case: str, method: str, payload: Payload, *fragments: str) -> GrpcCase:
        return GrpcCase("coordinator", case, method, payload, fragments)

    cases += [
        co("truncated", "StartRun", lambda fx: truncated(fx.start_run("c-trunc")),
           "not a valid freemask.v1.StartRunRequest"),
        co("garbage", "StartRun", raw(GARBAGE), "not a valid freemask.v1.StartRunRequest"),
        co("bad-utf8", "GetRun", raw(BAD_UTF8), "not a valid freemask.v1.GetRunRequest"),
        co("wrong-type", "StartRun", raw(WRONG_TYPE), "run_id 'freemask.generate.v1' is not a valid id"),
        co("dotdot-id", "StartRun", message(lambda fx: fx.start_run("../x")), "run_id '../x' is not a valid id"),
        co("slash-id", "GetRun", message(lambda fx: coordinator_pb2.GetRunRequest(run_id="runs/x")),
           "run_id 'runs/x' is not a valid id"),
        co("dotdot-stop", "StopRun", message(lambda fx: coordinator_pb2.StopRunRequest(run_id="..")),
           "run_id '..' is not a valid id"),
        co("10mb-id", "StartRun", message(lambda fx: fx.start_run("r" * TEN_MB)), "is not a valid id"),
        co("nan", "StartRun", message(lambda fx: fx.start_run("c-nan", alpha=".nan")), "bad run settings", "alpha"),
        co("inf", "StartRun", message(lambda fx: fx.start_run("c-inf", composed_fraction=".inf")),
           "bad run settings", "composed_fraction"),
        co("unknown-setting", "StartRun", message(lambda fx: fx.start_run("c-unknown", unicorn="1")),
           "unknown run setting 'unicorn'"),
    ]
    return cases


def _batch(*requests: generate_pb2.GenerateRequest) -> Message:
    from freemask.v1 import attention_mask_pb2

    return attention_mask_pb2.GenerateBatchRequest(requests=list(requests))


GRPC_CASES = _grpc_cases()


# --- Kafka --------------------------------------------------------------------------------------------------------

STAGE_TOPICS = {"attention_mask": Topics.GENERATE, "thesaurus": Topics.COMPOSE, "placement": Topics.PLACE,
                "harmonization": Topics.HARMONIZE, "scoring": Topics.COMPOSED}
STAGE_SCHEMAS = {"attention_mask": "freemask.v1.GenerateRequest", "thesaurus": "freemask.v1.ComposeRequest",
                 "placement": "freemask.v1.PlacementTask", "harmonization": "freemask.v1.HarmonizeTask",
                 "scoring": "freemask.v1.Sample"}
OWN_SCHEMA = "own"  # the stage's own schema in the header
KafkaPayload = Callable[[Fixtures, str], bytes]  # (fixtures, the case's sample id) -> record value


@dataclass(frozen=True)
class KafkaCase:
    service: str
    case: str
    payload: KafkaPayload
    fragments: tuple[str, ...]  # each must be in the dead letter's error
    schema: str | None = OWN_SCHEMA  # the record's `schema` header; None: no header

    @property
    def id(self) -> str:
        return f"{self.service}-{self.case}"

    @property
    def key(self) -> str:
        """The record's key, and the sample id of its message wherever the case leaves that alone."""
        return f"k-{self.id}"[:64]

    @property
    def topic(self) -> str:
        return STAGE_TOPICS[self.service]

    def header(self) -> bytes | None:
        if self.schema is None:
            return None
        return (STAGE_SCHEMAS[self.service] if self.schema == OWN_SCHEMA else self.schema).encode()


def _decode_cases(service: str, valid: Callable[[Fixtures, str], Message]) -> list[KafkaCase]:
    """Bytes that are not the stage's message, whatever its content rules."""
    schema = STAGE_SCHEMAS[service]
    return [
        KafkaCase(service, "garbage", lambda fx, sid: GARBAGE, (f"value is not a valid {schema}",)),
        KafkaCase(service, "truncated", lambda fx, sid: truncated(valid(fx, sid)), (f"value is not a valid {schema}",)),
        KafkaCase(service, "wrong-schema-header", lambda fx, sid: WRONG_TYPE,
                  (f"carries 'freemask.v1.DeadLetter'; expected '{schema}'",), schema="freemask.v1.DeadLetter"),
        KafkaCase(service, "wrong-type-no-header", lambda fx, sid: WRONG_TYPE, ("'freemask.generate.v1'",),
                  schema=None),
        KafkaCase(service, "wrong-type-own-header", lambda fx, sid: WRONG_TYPE, ("'freemask.generate.v1'",)),
    ]


def _kafka_cases() -> list[KafkaCase]:
    cases: list[KafkaCase] = []

    def case(service: str, name: str, valid: Callable[[Fixtures, str], Message],
             change: Callable[[Fixtures, Message], object], *fragments: str) -> KafkaCase:
        def payload(fx: Fixtures, sample_id: str) -> bytes:
            return changed(valid(fx, sample_id), lambda m: change(fx, m)).SerializeToString()
        return KafkaCase(service, name, payload, fragments)

    def gen(fx: Fixtures, sid: str) -> Message:
        return fx.generate(sid)

    cases += _decode_cases("attention_mask", gen)
    cases += [
        case("attention_mask", "unknown-class", gen, lambda fx, m: setattr(m, "class_name", "unicorn"),
             "unknown class 'unicorn'"),
        case("attention_mask", "empty-prompt", gen, lambda fx, m: setattr(m, "prompt", ""), "prompt is empty"),
        case("attention_mask", "long-prompt", gen,
             lambda fx, m: setattr(m, "prompt", "a dog " + "x" * LONG_PROMPT_CHARS),
             f"prompt has {LONG_PROMPT_CHARS + 6} characters; the limit is 512"),
        case("attention_mask", "nan", gen, lambda fx, m: setattr(m, "guidance_scale", NAN), "guidance_scale nan"),
        case("attention_mask", "inf", gen, lambda fx, m: setattr(m, "guidance_scale", INF), "guidance_scale inf"),
        case("attention_mask", "dotdot-id", gen, lambda fx, m: setattr(m, "sample_id", "../../x"),
             "sample_id '../../x' is not a valid id"),
        case("attention_mask", "slash-id", gen, lambda fx, m: setattr(m, "run_id", f"{fx.run}/x"),
             "is not a valid id"),
    ]

    def compose(fx: Fixtures, sid: str) -> Message:
        return fx.compose(sid)

    def base(change: Callable[[Fixtures, generate_pb2.SingleObject], object]) -> Callable[[Fixtures, Message], object]:
        return lambda fx, m: change(fx, m.base_scene)  # type: ignore[attr-defined]

    cases += _decode_cases("thesaurus", compose)
    cases += [
        case("thesaurus", "unknown-class", compose, base(lambda fx, b: setattr(b, "class_name", "unicorn")),
             "base scene class 'unicorn'"),
        case("thesaurus", "unknown-background", compose, lambda fx, m: setattr(m, "background_name", "moon"),
             "unknown background 'moon'"),
        case("thesaurus", "empty-prompt", compose, base(lambda fx, b: setattr(b, "prompt", "")),
             "base scene prompt is empty"),
        case("thesaurus", "long-prompt", compose, base(lambda fx, b: setattr(b, "prompt", "x" * LONG_PROMPT_CHARS)),
             f"base scene prompt has {LONG_PROMPT_CHARS} characters; the limit is 512"),
        case("thesaurus", "nan", compose, base(lambda fx, b: setattr(b, "threshold", NAN)),
             "base scene.threshold is nan"),
        case("thesaurus", "inf", compose, base(lambda fx, b: setattr(b, "guidance_scale", -INF)),
             "base scene.guidance_scale is -inf"),
        case("thesaurus", "dotdot-id", compose, lambda fx, m: setattr(m, "run_id", ".."),
             "run id '..' is not a valid id"),
        case("thesaurus", "slash-id", compose, base(lambda fx, b: setattr(b, "sample_id", "a/b")),
             "base scene sample id 'a/b' is not a valid id"),
        case("thesaurus", "foreign-run", compose, lambda fx, m: m.base_scene.CopyFrom(fx.foreign_single),
             "belongs to run", "builds only on objects generated in its own run"),
        case("thesaurus", "foreign-keys", compose, base(lambda fx, b: setattr(b.keys, "image_key", fx.foreign_key())),
             "base scene image_key", "lies outside"),
        case("thesaurus", "models-key", compose, base(lambda fx, b: setattr(b.keys, "label_key", "models/fopa/1/x")),
             "base scene label_key 'models/fopa/1/x' lies outside"),
        case("thesaurus", "absolute-key", compose,
             base(lambda fx, b: setattr(b.keys, "image_key", "/" + b.keys.image_key)), "is absolute"),
        case("thesaurus", "dotdot-key", compose, base(lambda fx, b: setattr(
            b.keys, "image_key", b.keys.image_key.replace("/samples/", f"/samples/../../../../{fx.foreign_run}/"))),
            "invalid segment '..'"),
    ]

    def place(fx: Fixtures, sid: str) -> Message:
        return fx.placement_task(sid)

    cases += _decode_cases("placement", place)
    cases += [
        case("placement", "unknown-class", place, lambda fx, m: setattr(m.next_object, "class_name", "unicorn"),
             "next_object has unknown class 'unicorn'"),
        case("placement", "unknown-background", place, lambda fx, m: setattr(m, "background_name", "moon"),
             "unknown background 'moon'"),
        case("placement", "nan", place, lambda fx, m: setattr(m.next_object, "relation", NAN),
             "next_object.relation is nan"),
        case("placement", "inf", place, lambda fx, m: setattr(m.scene.objects[0], "placement_score", INF),
             "scene.objects[0].placement_score is inf"),
        case("placement", "dotdot-id", place, lambda fx, m: setattr(m, "sample_id", "../x"),
             "sample id '../x' is not a valid id"),
        case("placement", "slash-id", place, lambda fx, m: setattr(m, "run_id", "a/b"),
             "run id 'a/b' is not a valid id"),
        case("placement", "non-image", place, lambda fx, m: setattr(m.scene.keys, "image_key",
                                                                   fx.junk_single.keys.image_key),
             "scene image", "is not a PNG or JPEG image"),
        case("placement", "bomb", place,
             lambda fx, m: setattr(m.scene.keys, "image_key", fx.bomb_single.keys.image_key),
             "declares far more pixels than allowed"),
        case("placement", "foreign-scene", place, lambda fx, m: setattr(m.scene.keys, "image_key", fx.foreign_key()),
             "scene image_key", "reads only its own round's samples"),
        case("placement", "foreign-source", place, lambda fx, m: m.next_object.source.CopyFrom(fx.foreign_single),
             "next_object source", "pastes only objects generated in its own run and round"),
        case("placement", "models-key", place, lambda fx, m: setattr(m.scene.keys, "image_key",
                                                                    "models/fopa/1/model.onnx"),
             "scene image_key 'models/fopa/1/model.onnx' lies outside 'runs/'"),
        case("placement", "absolute-key", place, lambda fx, m: setattr(m.scene.keys, "image_key", "/etc/passwd"),
             "is absolute"),
        case("placement", "dotdot-key", place, lambda fx, m: setattr(
            m.next_object.source.keys, "image_key",
            m.next_object.source.keys.image_key.replace("/samples/", "/samples/../../")), "invalid segment '..'"),
    ]

    def harm(fx: Fixtures, sid: str) -> Message:
        return fx.harmonize_task(sid)

    cases += _decode_cases("harmonization", harm)
    cases += [
        case("harmonization", "unknown-class", harm, lambda fx, m: setattr(m.foreground, "class_name", "unicorn"),
             "foreground has unknown class 'unicorn'"),
        case("harmonization", "unknown-background", harm, lambda fx, m: setattr(m, "background_name", "moon"),
             "unknown background 'moon'"),
        case("harmonization", "nan", harm, lambda fx, m: setattr(m, "placement_score", NAN),
             "HarmonizeTask.placement_score is nan"),
        case("harmonization", "inf", harm, lambda fx, m: setattr(m.provenance.generations[0], "threshold", INF),
             "provenance.generations[0].threshold is inf"),
        case("harmonization", "dotdot-id", harm, lambda fx, m: setattr(m, "sample_id", ".."),
             "sample id '..' is not a valid id"),
        case("harmonization", "slash-id", harm, lambda fx, m: setattr(m.foreground.source, "sample_id", "x/y"),
             "is not a valid id"),
        case("harmonization", "non-image", harm, lambda fx, m: setattr(m.scene.keys, "label_key",
                                                                      fx.junk_single.keys.label_key),
             "scene label map", "is not a PNG or JPEG image"),
        case("harmonization", "bomb", harm, lambda fx, m: m.foreground.source.CopyFrom(fx.bomb_single),
             "declares far more pixels than allowed"),
        case("harmonization", "foreign-scene", harm, lambda fx, m: setattr(m.scene.keys, "label_key",
                                                                          fx.foreign_key("label.png")),
             "scene label_key", "reads only its own round's samples"),
        case("harmonization", "foreign-source", harm, lambda fx, m: m.foreground.source.CopyFrom(fx.foreign_single),
             "foreground source", "pastes only objects generated in its own run and round"),
        case("harmonization", "models-key", harm, lambda fx, m: setattr(m.scene.keys, "instance_map_key",
                                                                       "models/rain/v1/instances.png"),
             "scene instance_map_key 'models/rain/v1/instances.png' lies outside 'runs/'"),
        case("harmonization", "absolute-key", harm, lambda fx, m: setattr(m.scene.keys, "label_key",
                                                                         "/" + m.scene.keys.label_key), "is absolute"),
        case("harmonization", "dotdot-key", harm, lambda fx, m: setattr(
            m.scene.keys, "image_key", m.scene.keys.image_key.replace("/samples/", "/samples/../")),
            "invalid segment '..'"),
    ]

    def sample(fx: Fixtures, sid: str) -> Message:
        """Single-a's sample under the case's own id, its keys in that id's folder as a sample's must be
        (nothing is there: every case is refused before anything is read)."""
        def change(s: samples_pb2.Sample) -> None:
            s.sample_id = sid
            folder = sample_prefix(s.run_id, s.round, sid)
            s.keys.image_key, s.keys.label_key = folder + "image.png", folder + "label.png"
        return changed(fx.sample(), change)

    def own_keys(single: Callable[[Fixtures], generate_pb2.SingleObject]) -> Callable[[Fixtures, Message], object]:
        """The sample becomes `single`'s (its id and keys): a sample's keys must lie in its own folder."""
        def change(fx: Fixtures, m: Message) -> None:
            m.CopyFrom(fx.sample(single(fx)))
        return change

    cases += _decode_cases("scoring", sample)
    cases += [
        case("scoring", "unknown-class", sample, lambda fx, m: setattr(m.objects[0], "class_name", "unicorn"),
             "objects[0] has unknown class 'unicorn'"),
        case("scoring", "nan", sample, lambda fx, m: setattr(m.objects[0], "placement_score", NAN),
             "objects[0].placement_score is nan"),
        case("scoring", "inf", sample, lambda fx, m: setattr(m.provenance.generations[0], "threshold", -INF),
             "provenance.generations[0].threshold is -inf"),
        case("scoring", "dotdot-id", sample, lambda fx, m: setattr(m, "run_id", "../.."),
             "run_id '../..' is not a valid id"),
        case("scoring", "slash-id", sample, lambda fx, m: setattr(m, "sample_id", "s/1"), "sample_id 's/1' is not"),
        case("scoring", "non-image", sample, own_keys(lambda fx: fx.junk_single), "image is not a PNG or JPEG image"),
        case("scoring", "bomb", sample, own_keys(lambda fx: fx.bomb_single), "declares far more pixels than allowed"),
        case("scoring", "foreign-keys", sample, lambda fx, m: setattr(m.keys, "image_key", fx.foreign_key()),
             "keys.image_key", "lies outside"),
        case("scoring", "models-key", sample, lambda fx, m: setattr(m.keys, "label_key", "models/x/1/label.png"),
             "keys.label_key 'models/x/1/label.png' lies outside"),
        case("scoring", "absolute-key", sample, lambda fx, m: setattr(m.keys, "image_key", "/" + m.keys.image_key),
             "is absolute"),
        case("scoring", "dotdot-key", sample, lambda fx, m: setattr(
            m.keys, "image_key", m.keys.image_key.replace("/samples/", "/samples/../")), "invalid segment '..'"),
    ]
    return cases


KAFKA_CASES = _kafka_cases()


# --- reading topics -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    key: str
    value: bytes
    headers: dict[str, bytes]


class TopicReader:
    """Every record of a topic from its start, read on demand and kept: `wait_for` returns a key's
    records once it has appeared. No consumer group, nothing committed."""

    def __init__(self, config: BusConfig, topic: str) -> None:
        self.topic = topic
        self._consumer = KafkaConsumer(bootstrap_servers=config.bootstrap_servers, group_id=None,
                                       enable_auto_commit=False, fetch_max_bytes=64 * 1024 * 1024,
                                       max_partition_fetch_bytes=32 * 1024 * 1024)
        self._consumer.topics()  # loads the cluster metadata, so the topic's partitions are known
        partitions = [TopicPartition(topic, p) for p in sorted(self._consumer.partitions_for_topic(topic) or ())]
        assert partitions, f"topic {topic} has no partitions"
        self._consumer.assign(partitions)
        self._consumer.seek_to_beginning(*partitions)
        self._guard = GapGuard(config.gap_wait_s)  # several services write the DLQ at once
        self.records: list[Record] = []

    def poll(self, timeout_ms: int = 300) -> None:
        for batch in self._guard.poll(self._consumer, timeout_ms).values():
            for record in batch:
                key = record.key.decode("utf-8", "replace") if record.key is not None else ""
                self.records.append(Record(key, record.value or b"", dict(record.headers or [])))

    def of(self, key: str) -> list[Record]:
        return [record for record in self.records if record.key == key]

    def wait_for(self, key: str, timeout_s: float) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        while not self.of(key) and time.monotonic() < deadline:
            self.poll()
        return self.of(key)

    def close(self) -> None:
        self._consumer.close()
