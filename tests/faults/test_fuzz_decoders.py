"""Fuzzing every decoder and validator that untrusted bytes reach (issue #13 item 5), with hypothesis.

Inputs are random bytes, valid messages truncated or with bytes flipped, inserted and deleted, and
random structured messages: every field drawn from its type (weird unicode, 200 000-character
strings, ids with `../`, the extremes of each integer type, NaN and infinite floats, unknown enum
values, pictures that are not pictures), either alone or merged over a valid message so that the
checks deep inside are reached too.

Property: a decoder or validator returns a valid, validated value or raises the project's
InvalidInput, never any other exception; a whole handler (a gRPC method behind the real dispatch,
a stage handler) answers or fails with one of the project's errors (InvalidInput, NotFound,
Unusable), never INTERNAL. The budget is fixed (`derandomize=True`, no example database), so a
run is deterministic and takes well under a minute.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from freemask.attention_mask.requests import validate_generate_request
from freemask.coordinator.rounds import single_sample
from freemask.coordinator.service import run_settings
from freemask.harmonization.service import Compositor, HarmonizationApi, HarmonizeStage, Harmonizers
from freemask.harmonization.service import validate_task as validate_harmonize_task
from freemask.placement.placer import UniformHeatmaps
from freemask.placement.service import PlaceStage, PlacementApi, Placer
from freemask.placement.service import validate_task as validate_placement_task
from freemask.scoring.data import dataset_pairs, require_own_run
from freemask.scoring.models import check_model_version
from freemask.scoring.scorer import validate_sample
from freemask.shared.bus import InboundMessage
from freemask.shared.config import FreemaskConfig, load_config
from freemask.shared.errors import InvalidInput, NotFound, Unusable
from freemask.shared.grpc_runtime import service_handler
from freemask.shared.image_refs import ImageReader
from freemask.shared.images import (
    decode_image,
    decode_instance_map,
    decode_mask,
    decode_soft_map,
    encode_npz,
    encode_png,
)
from freemask.shared.keys import (
    key_within,
    parse_segmenter_version,
    sample_prefix,
    validate_id,
    validate_key,
    validate_version,
    within_a_sample,
    within_run,
)
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.singles import single_object_from_meta, single_object_meta, validate_single_object
from freemask.thesaurus.index import ThesaurusIndex, build_index
from freemask.thesaurus.plan import ComposePlanner
from freemask.thesaurus.service import IndexRepository, ThesaurusApi, normalizer_for
from freemask.v1 import (
    common_pb2,
    compose_pb2,
    generate_pb2,
    harmonization_pb2,
    placement_pb2,
    samples_pb2,
    scoring_pb2,
    thesaurus_pb2,
)

from grpc_helpers import Aborted, CallContext
from memory_store import MemoryStore
from poison_cases import with_declared_size

pytestmark = pytest.mark.timeout(180)  # a hang fails the test instead of the session


def budget(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


RUN, SIDE = "run-a", 16
PROJECT_ERRORS = (InvalidInput, NotFound, Unusable)
ALLOWED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.FAILED_PRECONDITION}


# --- the world the inputs meet ------------------------------------------------------------------------------------

CONFIG: FreemaskConfig = load_config(environ={"FREEMASK_HARMONIZATION__METHOD": "copy_paste",
                                              "FREEMASK_HARMONIZATION__FEATHER_PX": "0"})
CLASSES = CONFIG.world.classes
INDEX = build_index(["a dog on the grass", "a boat on the sea", "a cat and a dog in the room", "a bird in the sky"],
                    normalizer_for(CONFIG), {"name": "fuzz"})


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


LABELS = np.zeros((SIDE, SIDE), np.uint8)
LABELS[4:12, 3:13] = CLASSES.index("dog") + 1
PNG, LABEL_PNG = encode_png(_pixels(0)), encode_png(LABELS)
JPEG_BUFFER = io.BytesIO()
Image.fromarray(_pixels(1)).save(JPEG_BUFFER, format="JPEG")
JPEG = JPEG_BUFFER.getvalue()
NPZ = encode_npz(softmap=np.linspace(0, 1, SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE))
PICTURES = [PNG, LABEL_PNG, JPEG, b"not a picture", with_declared_size(PNG, 20000, 20000), PNG[: len(PNG) // 2],
            b"\x89PNG\r\n\x1a\n", b""]


def single(sample_id: str) -> generate_pb2.SingleObject:
    prefix = sample_prefix(RUN, 0, sample_id)
    return generate_pb2.SingleObject(
        sample_id=sample_id, run_id=RUN, round=0, class_id=CLASSES.index("dog") + 1, class_name="dog",
        background_name="grass", prompt="a photo of a dog on the grass", seed=3,
        keys=common_pb2.SampleKeys(image_key=prefix + "image.png", label_key=prefix + "label.png"),
        image_size=common_pb2.ImageSize(width=SIDE, height=SIDE), threshold=0.4,
        mask_box=common_pb2.BoundingBox(x=3, y=4, width=10, height=8), mask_area_pixels=80,
        generator=common_pb2.ModelVersion(name="generator", version="g1"), num_inference_steps=3, guidance_scale=3.0)


BASE, SOURCE = single("base-1"), single("src-1")


def filled_store() -> MemoryStore:
    store = MemoryStore()
    for one in (BASE, SOURCE):
        store.objects[one.keys.image_key] = PNG
        store.objects[one.keys.label_key] = LABEL_PNG
    return store


def planned() -> compose_pb2.PlannedObject:
    return compose_pb2.PlannedObject(class_id=SOURCE.class_id, class_name="dog", relation=0.2, source=SOURCE)


def scene() -> compose_pb2.SceneState:
    return compose_pb2.SceneState(
        keys=common_pb2.SampleKeys(image_key=BASE.keys.image_key, label_key=BASE.keys.label_key),
        image_size=BASE.image_size, objects=[common_pb2.ObjectInstance(
            class_id=BASE.class_id, class_name="dog", instance_id=1, box=common_pb2.BoundingBox(x=0, y=0, width=1,
                                                                                                   height=1),
            visible_area_pixels=1, origin=common_pb2.OBJECT_ORIGIN_GENERATED)])


VALID: dict[type[Message], Message] = {
    generate_pb2.GenerateRequest: generate_pb2.GenerateRequest(
        run_id=RUN, round=0, sample_id="s-1", class_name="dog", background_name="grass",
        prompt="a photo of a dog on the grass", seed=1, image_size=common_pb2.ImageSize(width=32, height=32)),
    compose_pb2.ComposeRequest: compose_pb2.ComposeRequest(run_id=RUN, round=0, sample_id="c-1", base_scene=BASE,
                                                           background_name="grass", num_objects_to_add=2, seed=4),
    compose_pb2.PlacementTask: compose_pb2.PlacementTask(run_id=RUN, round=0, sample_id="c-1", background_name="grass",
                                                         scene=scene(), next_object=planned(), seed=4),
    compose_pb2.HarmonizeTask: compose_pb2.HarmonizeTask(
        run_id=RUN, round=0, sample_id="c-1", background_name="grass", scene=scene(), foreground=planned(),
        box=common_pb2.BoundingBox(x=2, y=2, width=8, height=8), placement_score=0.5, seed=4),
    samples_pb2.Sample: single_sample(BASE),
    generate_pb2.SingleObject: SOURCE,
    placement_pb2.PlaceRequest: placement_pb2.PlaceRequest(
        background=common_pb2.ImageRef(png=PNG), foreground=common_pb2.ImageRef(store_key=SOURCE.keys.image_key),
        foreground_mask=common_pb2.ImageRef(png=LABEL_PNG), num_candidates=2, seed=9),
    harmonization_pb2.HarmonizeRequest: harmonization_pb2.HarmonizeRequest(
        scene_image=common_pb2.ImageRef(png=PNG), scene_label_map=common_pb2.ImageRef(png=LABEL_PNG),
        foreground_image=common_pb2.ImageRef(png=PNG), foreground_mask=common_pb2.ImageRef(png=LABEL_PNG),
        box=common_pb2.BoundingBox(x=1, y=1, width=9, height=9), class_id=3, instance_id=2),
    thesaurus_pb2.RelationRequest: thesaurus_pb2.RelationRequest(object_name="dog", background_name="grass"),
    thesaurus_pb2.TopObjectsRequest: thesaurus_pb2.TopObjectsRequest(background_name="room", k=2),
    scoring_pb2.TrainRequest: scoring_pb2.TrainRequest(
        run_id=RUN, round=1, dataset=scoring_pb2.Dataset(images=scoring_pb2.LabelledImageList(images=[
            scoring_pb2.LabelledImage(image_key=BASE.keys.image_key, label_key=BASE.keys.label_key)])),
        init_from=common_pb2.ModelVersion(name="segmenter", version=f"{RUN}/0"), epochs=2),
    scoring_pb2.ScoreRequest: scoring_pb2.ScoreRequest(samples=[single_sample(BASE)], model=common_pb2.ModelVersion(
        name="segmenter", version=f"{RUN}/0")),
}


# --- strategies ---------------------------------------------------------------------------------------------------

SPECIAL_STRINGS = ["", " ", "dog", "grass", "sea", "unicorn", "..", "../x", "a/b", "/etc/passwd", "run-a", "s-1",
                   "runs/run-a/rounds/0/samples/s-1/image.png", "runs/other/rounds/0/samples/s-1/image.png",
                   "models/segmenter/run-a/0/model.safetensors", "run-a/0", "segmenter", "\x00", "\ufeffdog",
                   "DOG", "d\u0307og", "🐕", "\u202egrass", "x" * 200_000, "é" * 600, "a" * 65, "a" * 64,
                   "runs/run-a/rounds/0/samples/../../../other/image.png", "runs/run-a/rounds/0/samples/s-1/../x.png",
                   "/runs/run-a/rounds/0/samples/s-1/image.png", "runs//run-a", "runs/run-a/rounds/00/samples/s/x.png",
                   "runs/run-a/rounds/0/samples/s-1/steps/0/image.png", "thesaurus/v1/index.json", "coordinator/runs/x"]
STRINGS = st.one_of(st.sampled_from(SPECIAL_STRINGS), st.text(max_size=40))
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
FLOAT_EDGES = [float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38, 1e300]


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([low, high, 0, 1, 2, 31, 255, 256, 65536]).filter(lambda n: low <= n <= high),
                     st.integers(low, high))


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return STRINGS
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.sampled_from(PICTURES), st.binary(max_size=48))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)  # proto3 enums are open: unknown values parse
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32))
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats())
    return integers(*INT_RANGES[field.type])


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of `descriptor`'s type with a random subset of its fields set to random values."""
    from google.protobuf import message_factory

    message = message_factory.GetMessageClass(descriptor)()
    chosen = draw(st.lists(st.sampled_from(list(descriptor.fields)), max_size=4, unique_by=lambda f: f.number))
    for field in chosen:
        target = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = (field.message_type.fields_by_name[n] for n in ("key", "value"))
            for key in draw(st.lists(scalar(key_field), max_size=3)):
                if value_field.message_type is None:
                    target[key] = draw(scalar(value_field))
                elif depth < 3:
                    target[key].CopyFrom(draw(messages(value_field.message_type, depth + 1)))
        elif field.message_type is not None:
            if depth >= 3:
                continue
            if field.is_repeated:
                for item in draw(st.lists(messages(field.message_type, depth + 1), max_size=3)):
                    target.add().CopyFrom(item)
            else:
                target.CopyFrom(draw(messages(field.message_type, depth + 1)))
        elif field.is_repeated:
            target.extend(draw(st.lists(scalar(field), max_size=3)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    return message


def structured(message_type: type[Message]) -> st.SearchStrategy[Message]:
    """Random messages, and the valid one with random fields merged over it (which keeps the rest valid)."""
    def over_valid(partial: Message) -> Message:
        merged = type(partial)()
        merged.CopyFrom(VALID[message_type])
        merged.MergeFrom(partial)
        return merged

    random = messages(message_type.DESCRIPTOR)
    return st.one_of(random, random.map(over_valid), st.just(VALID[message_type]))


@st.composite
def corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` truncated, with bytes flipped, inserted or deleted (one to three edits)."""
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        if edit == "truncate":
            data = data[:at]
        elif edit == "flip" and at < len(data):
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
        elif edit == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
        elif edit == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 16)):]
    return data


def wire_bytes(message_type: type[Message]) -> st.SearchStrategy[bytes]:
    """Bytes that may or may not be a `message_type`: random, corrupted valid, and valid structured."""
    valid = VALID[message_type].SerializeToString()
    return st.one_of(st.binary(max_size=96), corrupted(valid),
                     structured(message_type).map(lambda m: m.SerializeToString()))


def refused_or(value: Callable[[], Any], errors: tuple[type[BaseException], ...] = (InvalidInput,)) -> Any:
    """`value()`, or None when it raised one of `errors`; any other exception fails the example."""
    try:
        return value()
    except errors:
        return None


# --- stage messages: decoding and validation ----------------------------------------------------------------------

PLANNER = ComposePlanner(CONFIG, INDEX, "v1", pool=None)  # type: ignore[arg-type] - _validate reads no pool
STAGE_VALIDATORS: dict[type[Message], Callable[[Any], object]] = {
    generate_pb2.GenerateRequest: lambda r: validate_generate_request(r, CONFIG.world, CONFIG.limits),
    compose_pb2.ComposeRequest: PLANNER._validate,  # noqa: SLF001 - the stage's own checks, without its store
    compose_pb2.PlacementTask: lambda t: validate_placement_task(t, CONFIG),
    compose_pb2.HarmonizeTask: lambda t: validate_harmonize_task(t, CONFIG),
    samples_pb2.Sample: lambda s: validate_sample(s, CLASSES),
}
STAGE_TYPES = list(STAGE_VALIDATORS)
HEADERS = st.one_of(
    st.just({}), st.sampled_from(STAGE_TYPES).map(lambda t: {"schema": t.DESCRIPTOR.full_name.encode()}),
    st.dictionaries(st.sampled_from(["schema", "trace-id", "other"]), st.binary(max_size=40), max_size=3))


@budget(1000)
@given(st.sampled_from(STAGE_TYPES), st.data())
def test_stage_records_decode_and_validate_or_are_refused(message_type: type[Message], data: st.DataObject) -> None:
    record = InboundMessage("topic", 0, 0, data.draw(st.none() | STRINGS), data.draw(wire_bytes(message_type)),
                            data.draw(HEADERS))
    assert isinstance(record.trace_id, str)
    decoded = refused_or(lambda: record.decode(message_type))
    if decoded is not None:
        assert isinstance(decoded, message_type)
        refused_or(lambda: STAGE_VALIDATORS[message_type](decoded))


@budget(800)
@given(st.sampled_from(STAGE_TYPES), st.data())
def test_structured_stage_messages_validate_or_are_refused(message_type: type[Message], data: st.DataObject) -> None:
    message = data.draw(structured(message_type))
    if refused_or(lambda: STAGE_VALIDATORS[message_type](message) or True):
        # what passes is what the stages rely on: ids, keys in the message's own run, finite floats
        run_id = getattr(message, "run_id", None)
        if run_id:
            validate_id(run_id)
        for value in _floats(message):
            assert np.isfinite(value), message


def _floats(message: Message) -> list[float]:
    found = []
    for field, value in message.ListFields():
        if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            found += list(value) if field.is_repeated else [value]
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in (value if field.is_repeated else [value]):
                found += _floats(item)
    return found


@budget(500)
@given(structured(generate_pb2.SingleObject))
def test_single_objects_from_messages_validate_or_are_refused(single: generate_pb2.SingleObject) -> None:
    if refused_or(lambda: validate_single_object(single, RUN, 0, CLASSES) or True):
        own = sample_prefix(RUN, 0, single.sample_id)
        assert single.keys.image_key.startswith(own) and single.keys.label_key.startswith(own)
        assert all(np.isfinite(value) for value in _floats(single))


# --- whole handlers: gRPC behind the real dispatch, stage handlers over an in-memory store --------------------------

def _handlers() -> dict[str, Callable[[bytes], bytes]]:
    store = filled_store()
    reader = ImageReader(store, CONFIG.limits)
    repository = IndexRepository(store)
    version = repository.publish(INDEX)
    placer = Placer(UniformHeatmaps())
    compositor = Compositor(Harmonizers(CONFIG.harmonization), CONFIG.harmonization.feather_px)
    services = [
        (thesaurus_pb2.DESCRIPTOR.services_by_name["Thesaurus"], ThesaurusApi(repository, version)),
        (placement_pb2.DESCRIPTOR.services_by_name["Placement"], PlacementApi(reader, placer, CONFIG.placement)),
        (harmonization_pb2.DESCRIPTOR.services_by_name["Harmonization"],
         HarmonizationApi(reader, compositor, store, CONFIG.harmonization)),
    ]
    handlers = {}
    for descriptor, implementation in services:
        generic = service_handler(descriptor, implementation, ServiceMetrics("fuzz"))
        for method in descriptor.methods:
            path = f"/{descriptor.full_name}/{method.name}"
            handler = generic.service(SimpleNamespace(method=path, invocation_metadata=()))
            handlers[path] = lambda raw, handler=handler: handler.unary_unary(raw, CallContext())
    return handlers


HANDLERS = _handlers()
GRPC_METHODS = {"/freemask.v1.Thesaurus/Relation": thesaurus_pb2.RelationRequest,
                "/freemask.v1.Thesaurus/TopObjects": thesaurus_pb2.TopObjectsRequest,
                "/freemask.v1.Placement/Place": placement_pb2.PlaceRequest,
                "/freemask.v1.Harmonization/Harmonize": harmonization_pb2.HarmonizeRequest}


@budget(600)
@given(st.sampled_from(sorted(GRPC_METHODS)), st.data())
def test_grpc_methods_answer_or_refuse_never_internal(path: str, data: st.DataObject) -> None:
    payload = data.draw(wire_bytes(GRPC_METHODS[path]))
    try:
        HANDLERS[path](payload)
    except Aborted as aborted:
        assert aborted.code in ALLOWED_CODES, f"{aborted.code.name}: {aborted.details}"
        assert len(aborted.details) <= 2000, aborted.details[:300]


STAGES = {compose_pb2.PlacementTask: PlaceStage(ImageReader(filled_store(), CONFIG.limits), Placer(UniformHeatmaps()),
                                                CONFIG),
          compose_pb2.HarmonizeTask: HarmonizeStage(ImageReader(filled_store(), CONFIG.limits),
                                                    Compositor(Harmonizers(CONFIG.harmonization), 0), MemoryStore(),
                                                    CONFIG)}


@budget(500)
@given(st.sampled_from(sorted(STAGES, key=lambda t: t.DESCRIPTOR.name)), st.data())
def test_stage_handlers_publish_or_fail_with_a_project_error(message_type: type[Message], data: st.DataObject) -> None:
    value = data.draw(st.one_of(structured(message_type).map(lambda m: m.SerializeToString()),
                                corrupted(VALID[message_type].SerializeToString())))
    record = InboundMessage("topic", 0, 0, "c-1", value, {})
    outputs = refused_or(lambda: STAGES[message_type].handle(record), PROJECT_ERRORS)
    for output in outputs or ():
        assert output.message.run_id == RUN  # a task's outputs stay in its run


# --- the rest of the gRPC requests' checks: scoring and the coordinator --------------------------------------------

@budget(600)
@given(st.data())
def test_scoring_requests_validate_or_are_refused(data: st.DataObject) -> None:
    train = data.draw(structured(scoring_pb2.TrainRequest))

    def check_train() -> None:
        validate_id(train.run_id)
        require_own_run(train.dataset, (), train.run_id)
        pairs = dataset_pairs(train.dataset, MemoryStore())
        require_own_run(train.dataset, pairs, train.run_id)
        if train.HasField("init_from"):
            check_model_version(train.init_from)

    refused_or(check_train)
    score = data.draw(structured(scoring_pb2.ScoreRequest))
    for sample in score.samples:
        refused_or(lambda sample=sample: validate_sample(sample, CLASSES))
    if score.HasField("model"):
        refused_or(lambda: check_model_version(score.model))


SETTING_NAMES = ["rounds", "alpha", "initial_samples", "samples_per_round", "composed_fraction", "objects_to_add",
                 "train_epochs", "image_size", "unicorn"]
YAML_VALUES = st.one_of(st.sampled_from([".nan", ".inf", "-.inf", "1e309", "0", "-1", "2", "0.5", "[1, 2]", "{a: 1}",
                                         "&a [*a]", "!!python/object:os.system {}", "'", "~", "yes", "1" * 400,
                                         "[" * 200, "!!binary aGVsbG8="]), STRINGS)


@budget(500)
@given(st.dictionaries(st.one_of(st.sampled_from(SETTING_NAMES), STRINGS), YAML_VALUES, max_size=3))
def test_run_overrides_validate_or_are_refused(overrides: dict[str, str]) -> None:
    settings_ = refused_or(lambda: run_settings(CONFIG, overrides))
    if settings_ is not None:
        assert 0.0 < settings_.alpha <= 1.0 and 0.0 <= settings_.composed_fraction <= 1.0


# --- pictures, soft maps and the JSON documents stages read from the store ---------------------------------------

@budget(500)
@given(st.one_of(st.binary(max_size=128), st.sampled_from([PNG, LABEL_PNG, JPEG]).flatmap(corrupted),
                 st.sampled_from(PICTURES)))
def test_image_decoders_decode_or_refuse(data: bytes) -> None:
    for decode in (decode_image, decode_mask, decode_instance_map):
        pixels = refused_or(lambda decode=decode: decode(data, CONFIG.limits))
        if pixels is not None:
            assert pixels.ndim in (2, 3) and 0 < pixels.shape[0] <= CONFIG.limits.max_image_side_px


def npz_with(array: np.ndarray) -> bytes:
    return encode_npz(softmap=array)


SOFT_MAPS = st.one_of(
    st.binary(max_size=128), corrupted(NPZ),
    st.sampled_from([npz_with(np.full((4, 4), np.nan, np.float32)), npz_with(np.full((4, 4), np.inf, np.float64)),
                     npz_with(np.zeros((4, 4, 4), np.float32)), npz_with(np.zeros((4, 4), np.int64)),
                     npz_with(np.zeros((5000, 1), np.float32)), encode_npz(other=np.zeros((4, 4), np.float32)),
                     npz_with(np.array([[1.0]], dtype=">f4")), NPZ]))


@budget(500)
@given(SOFT_MAPS)
def test_soft_maps_decode_finite_or_are_refused(data: bytes) -> None:
    values = refused_or(lambda: decode_soft_map(data, CONFIG.limits))
    if values is not None:
        assert values.ndim == 2 and np.isfinite(values).all()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | STRINGS,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=4),
                    max_leaves=12)
META = single_object_meta(BASE, {"threshold_iou": 0.5})


def meta_documents() -> st.SearchStrategy[bytes]:
    meta = json.loads(META)

    def with_field(pair: tuple[str, Any]) -> bytes:
        name, value = pair
        return json.dumps({**meta, name: value}).encode()

    return st.one_of(corrupted(META), JSON.map(lambda v: json.dumps(v).encode()),
                     st.tuples(st.sampled_from(sorted(meta)), JSON).map(with_field))


@budget(500)
@given(meta_documents())
def test_single_object_records_parse_or_are_refused(data: bytes) -> None:
    parsed = refused_or(lambda: single_object_from_meta(data, "meta.json"))
    if parsed is not None:
        assert isinstance(parsed, generate_pb2.SingleObject)


@budget(300)
@given(st.one_of(corrupted(INDEX.to_bytes()), JSON.map(lambda v: json.dumps(v).encode())))
def test_thesaurus_indexes_parse_or_are_refused(data: bytes) -> None:
    index = refused_or(lambda: ThesaurusIndex.from_bytes(data))
    if index is not None:
        refused_or(lambda: index.top_objects("grass", 3))


@budget(300)
@given(st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode()),
                 st.lists(JSON.map(json.dumps), max_size=4).map(lambda lines: "\n".join(lines).encode())))
def test_dataset_manifests_parse_or_are_refused(data: bytes) -> None:
    store = MemoryStore()
    store.objects["runs/run-a/rounds/0/dataset.jsonl"] = data
    pairs = refused_or(lambda: dataset_pairs(scoring_pb2.Dataset(manifest_key="runs/run-a/rounds/0/dataset.jsonl"),
                                             store))
    for pair in pairs or ():
        validate_key(pair.image_key) and validate_key(pair.label_key)


@budget(800)
@given(STRINGS, st.integers(-5, 20_000))
def test_ids_versions_and_keys_are_checked_or_refused(text: str, round_index: int) -> None:
    for check in (validate_id, validate_version, validate_key, within_a_sample, parse_segmenter_version,
                  lambda t: key_within(t, "runs/run-a/"), lambda t: within_run(t, RUN, 0)):
        checked = refused_or(lambda check=check: check(text))
        if checked is not None and check in (validate_key, within_a_sample):
            assert ".." not in checked.split("/") and not checked.startswith("/")
    refused_or(lambda: sample_prefix(text, round_index, "s-1"))
