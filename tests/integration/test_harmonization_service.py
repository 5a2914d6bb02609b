"""The harmonization service on real servers: SeaweedFS for pixels, Tansu for tasks, and a
seeded random RAIN network saved as the configured weights.

Covered: `Harmonize` over a real gRPC server with inline PNGs (the pixels the core
gives) and with output keys (written to the store); bad input answered
INVALID_ARGUMENT with nothing written; the stage running a two-object plan: step 0
goes back to placement with its step files in the store, the last step publishes a
composed Sample whose files and meta.json exist; a redelivered task rewrites
identical bytes; a bad task is dead-lettered at once.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from freemask.harmonization.composite import paste
from freemask.harmonization.rain import RainHarmonizer, RainNet, rain_weights_version, save_rain
from freemask.harmonization.service import build
from freemask.shared.image_refs import object_mask
from freemask.shared.bus import InboundMessage, StageWorker, Topics
from freemask.shared.config import FreemaskConfig
from freemask.shared.images import encode_png, encode_png16
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.v1 import common_pb2, compose_pb2, dead_letter_pb2, generate_pb2, harmonization_pb2, samples_pb2

from bus_helpers import drain_records, publish_samples, unique_topics
from conftest import config_for
from grpc_helpers import serving

pytestmark = pytest.mark.stack

SCENE_W, SCENE_H = 48, 32
FEATHER_PX = 1
CALL_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rain")
    torch.manual_seed(0)
    save_rain(RainNet(), directory)
    return directory


@pytest.fixture(scope="module")
def config(stack: EmbeddedStack, weights: Path) -> FreemaskConfig:
    return config_for(stack, FREEMASK_HARMONIZATION__WEIGHTS=str(weights),
                      FREEMASK_HARMONIZATION__FEATHER_PX=str(FEATHER_PX),
                      FREEMASK_BUS__GROUP_PREFIX=f"harmonization-{uuid.uuid4().hex[:8]}",
                      FREEMASK_BUS__RETRY_BACKOFF_S="0.1")


@pytest.fixture(scope="module")
def store(config: FreemaskConfig) -> ObjectStore:
    return ObjectStore(config.store)


@pytest.fixture(scope="module")
def parts(config: FreemaskConfig) -> ServiceParts:
    """The service as `freemask serve harmonization` wires it."""
    return build(ServiceContext("harmonization", config, ServiceMetrics("harmonization")))


@pytest.fixture(scope="module")
def target(config: FreemaskConfig, parts: ServiceParts) -> Iterator[str]:
    with serving(config, parts.grpc_services, "harmonization") as target:
        yield target


def harmonize(target: str, request: harmonization_pb2.HarmonizeRequest) -> harmonization_pb2.HarmonizeResponse:
    with grpc.insecure_channel(target) as channel:
        stub = channel.unary_unary("/freemask.v1.Harmonization/Harmonize",
                                   request_serializer=harmonization_pb2.HarmonizeRequest.SerializeToString,
                                   response_deserializer=harmonization_pb2.HarmonizeResponse.FromString)
        return stub(request, timeout=CALL_TIMEOUT_S)


# --- pictures --------------------------------------------------------------------------------------------------

def scene_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, SCENE_H)[:, None, None]
    colour = rng.integers(0, 256, (2, 3))
    return np.clip(colour[0] * (1 - rows) + colour[1] * rows + rng.normal(0, 10, (SCENE_H, SCENE_W, 3)), 0,
                   255).astype(np.uint8)


FOREGROUND = np.random.default_rng(7).integers(0, 256, (24, 24, 3), dtype=np.uint8)
FOREGROUND_LABELS = np.zeros((24, 24), np.uint8)
FOREGROUND_LABELS[4:20, 6:18] = 5  # a 12 x 16 object of class 5
BASE_LABELS = np.zeros((SCENE_H, SCENE_W), np.uint8)
BASE_LABELS[10:26, 4:30] = 3  # the base object, class 3


def inline(pixels: np.ndarray) -> common_pb2.ImageRef:
    return common_pb2.ImageRef(png=encode_png16(pixels) if pixels.dtype == np.uint16 else encode_png(pixels))


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def as_proto(box: tuple[int, int, int, int]) -> common_pb2.BoundingBox:
    x, y, width, height = box
    return common_pb2.BoundingBox(x=x, y=y, width=width, height=height)


# --- gRPC ------------------------------------------------------------------------------------------------------

BOX = (20, 6, 15, 20)


def request(**fields) -> harmonization_pb2.HarmonizeRequest:
    defaults = dict(scene_image=inline(scene_image(1)), scene_label_map=inline(BASE_LABELS),
                    foreground_image=inline(FOREGROUND), foreground_mask=inline(FOREGROUND_LABELS),
                    box=as_proto(BOX), class_id=5, instance_id=2)
    return harmonization_pb2.HarmonizeRequest(**{**defaults, **fields})


def test_harmonize_inline_gives_the_cores_pixels_with_rain_by_default(target: str, weights: Path) -> None:
    response = harmonize(target, request())

    scene_instances = np.where(BASE_LABELS == 3, 1, 0).astype(np.uint16)
    expected = paste(scene_image(1), BASE_LABELS, scene_instances, FOREGROUND, object_mask(FOREGROUND_LABELS), BOX,
                     5, 2, RainHarmonizer.from_directory(weights), FEATHER_PX)
    assert response.method == harmonization_pb2.HARMONIZATION_METHOD_RAIN
    assert (response.model.name, response.model.version) == ("rain", rain_weights_version(weights))
    np.testing.assert_array_equal(decoded(response.image.png), expected.image)
    labels = decoded(response.label_map.png)
    np.testing.assert_array_equal(labels, np.where(expected.object_mask, 5, BASE_LABELS))
    # without a scene instance map the scene has no instances yet: only the new one
    np.testing.assert_array_equal(decoded(response.instance_map.png), np.where(expected.object_mask, 2, 0))
    assert decoded(response.instance_map.png).dtype == np.uint16
    assert (response.object_box.x, response.object_box.y, response.object_box.width,
            response.object_box.height) == BOX  # a rectangular mask fills its box
    assert response.object_area_pixels == BOX[2] * BOX[3]


def test_harmonize_copy_paste_names_no_model_and_reads_the_instance_map(target: str) -> None:
    instances = np.where(BASE_LABELS == 3, 1, 0).astype(np.uint16)
    response = harmonize(target, request(method=harmonization_pb2.HARMONIZATION_METHOD_COPY_PASTE,
                                         scene_instance_map=inline(instances)))
    assert response.method == harmonization_pb2.HARMONIZATION_METHOD_COPY_PASTE
    assert not response.HasField("model")
    ids = decoded(response.instance_map.png)
    assert set(np.unique(ids)) == {0, 1, 2}
    assert (ids == 1).sum() == (BASE_LABELS == 3).sum() - (ids[10:26, 4:30] == 2).sum()


def output_keys(run_id: str) -> common_pb2.SampleKeys:
    prefix = f"runs/{run_id}/rounds/0/samples/out/"
    return common_pb2.SampleKeys(image_key=prefix + "image.png", label_key=prefix + "label.png",
                                 instance_map_key=prefix + "instances.png")


def test_harmonize_with_output_keys_writes_the_store(target: str, store: ObjectStore) -> None:
    keys = output_keys(f"h-{uuid.uuid4().hex[:8]}")
    by_key = harmonize(target, request(output_keys=keys))
    by_value = harmonize(target, request())
    assert (by_key.image.store_key, by_key.label_map.store_key, by_key.instance_map.store_key) == (
        keys.image_key, keys.label_key, keys.instance_map_key)
    assert store.get_bytes(keys.image_key) == by_value.image.png
    assert store.get_bytes(keys.label_key) == by_value.label_map.png
    assert store.get_bytes(keys.instance_map_key) == by_value.instance_map.png


@pytest.mark.parametrize(("fields", "fragment"), [
    (dict(scene_label_map=inline(BASE_LABELS[:, :40])),
     "scene label map is 40x32 uint8; it must be uint8 and the size of the scene image (48x32)"),
    (dict(foreground_mask=inline(FOREGROUND_LABELS[:20])),
     "foreground mask is 24x20 bool; it must be a boolean mask the size of the foreground (24x24)"),
    (dict(box=as_proto((40, 0, 15, 20))), "does not lie inside the 48x32 scene"),
    (dict(class_id=255), "class_id must be in 1..254, got 255"),
    (dict(scene_image=common_pb2.ImageRef(png=b"GIF89a not a png")), "scene image is not a PNG or JPEG image"),
])
def test_bad_requests_are_invalid_and_write_nothing(target: str, store: ObjectStore, fields: dict,
                                                    fragment: str) -> None:
    keys = output_keys(f"h-{uuid.uuid4().hex[:8]}")
    with pytest.raises(grpc.RpcError) as info:
        harmonize(target, request(output_keys=keys, **fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details(), \
        info.value.details()
    assert not any(store.exists(k) for k in (keys.image_key, keys.label_key, keys.instance_map_key))


@pytest.mark.parametrize(("keys", "fragment"), [
    (common_pb2.SampleKeys(image_key="runs/r/rounds/0/samples/s/image.png"), "output_keys.label_key is missing"),
    (common_pb2.SampleKeys(image_key="models/x/image.png", label_key="runs/r/rounds/0/samples/s/label.png",
                           instance_map_key="runs/r/rounds/0/samples/s/instances.png"),
     "output_keys.image_key 'models/x/image.png' does not lie under runs/"),
])
def test_bad_output_keys_are_invalid(target: str, keys: common_pb2.SampleKeys, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        harmonize(target, request(output_keys=keys))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()


# --- the stage -------------------------------------------------------------------------------------------------

def write_single(store: ObjectStore, run_id: str, sample_id: str, image: np.ndarray, labels: np.ndarray,
                 class_id: int, class_name: str) -> generate_pb2.SingleObject:
    """A single object as the attention-mask stage leaves it in the store."""
    prefix = f"runs/{run_id}/rounds/0/samples/{sample_id}/"
    keys = common_pb2.SampleKeys(image_key=prefix + "image.png", label_key=prefix + "label.png")
    store.put_bytes(keys.image_key, encode_png(image), "image/png")
    store.put_bytes(keys.label_key, encode_png(labels), "image/png")
    return generate_pb2.SingleObject(
        sample_id=sample_id, run_id=run_id, round=0, class_id=class_id, class_name=class_name,
        prompt=f"a photo of a {class_name}", seed=11, threshold=0.4, keys=keys,
        image_size=common_pb2.ImageSize(width=image.shape[1], height=image.shape[0]),
        generator=common_pb2.ModelVersion(name="generator", version="g1"))


def first_task(store: ObjectStore, run_id: str, sample_id: str) -> compose_pb2.HarmonizeTask:
    base = write_single(store, run_id, "base", scene_image(2), BASE_LABELS, 3, "boat")
    source = write_single(store, run_id, "src-1", FOREGROUND, FOREGROUND_LABELS, 5, "cat")
    planned = [compose_pb2.PlannedObject(class_id=5, class_name="cat", relation=0.3, source=source),
               compose_pb2.PlannedObject(class_id=5, class_name="cat", relation=0.3, source=source)]
    base_object = common_pb2.ObjectInstance(
        class_id=3, class_name="boat", instance_id=1, box=as_proto((4, 10, 26, 16)), visible_area_pixels=26 * 16,
        origin=common_pb2.OBJECT_ORIGIN_GENERATED, source_sample_id="base", source_keys=base.keys)
    return compose_pb2.HarmonizeTask(
        run_id=run_id, round=0, sample_id=sample_id, background_name="sea",
        scene=compose_pb2.SceneState(keys=base.keys, image_size=base.image_size, objects=[base_object]),
        foreground=planned[0], box=as_proto((20, 6, 15, 20)), placement_score=0.75,
        remaining_objects=planned[1:], step_index=0, seed=9,
        provenance=common_pb2.Provenance(
            generations=[common_pb2.GenerationRecord(sample_id="base", class_name="boat")],
            models=[common_pb2.ModelVersion(name="thesaurus", version="t1"),
                    common_pb2.ModelVersion(name="fopa", version="f1")],
            compose_seed=9))


def second_task(placement: compose_pb2.PlacementTask) -> compose_pb2.HarmonizeTask:
    """What placement would send for step 1, with a box chosen by hand over both objects."""
    return compose_pb2.HarmonizeTask(
        run_id=placement.run_id, round=placement.round, sample_id=placement.sample_id,
        background_name=placement.background_name, scene=placement.scene, foreground=placement.next_object,
        box=as_proto((0, 0, 30, 30)), placement_score=0.5, remaining_objects=placement.remaining_objects,
        step_index=placement.step_index, seed=placement.seed, provenance=placement.provenance)



def run_stage(config: FreemaskConfig, parts: ServiceParts, topic: str, count: int) -> StageWorker:
    assert parts.stage is not None and parts.stage.topic == Topics.HARMONIZE
    worker = StageWorker("harmonization", topic, parts.stage.handler, config.bus, ServiceMetrics("harmonization"))
    worker.run(max_messages=count, timeout_s=120)
    return worker


def records(config: FreemaskConfig, topic: str, keys: list[str]) -> dict[str, bytes]:
    return {key: value for key, value, _ in drain_records(config.bus, topic, keys) if key in keys}


def test_the_stage_runs_a_two_object_plan_to_a_composed_sample(config: FreemaskConfig, store: ObjectStore,
                                                               parts: ServiceParts, weights: Path) -> None:
    run_id = f"h-{uuid.uuid4().hex[:8]}"
    sample_id = f"c-{run_id}"
    task = first_task(store, run_id, sample_id)
    bad = compose_pb2.HarmonizeTask()
    bad.CopyFrom(task)
    bad.sample_id, bad.background_name = f"{sample_id}-bad", "moon"
    (topic,) = unique_topics(config.bus, "harmonize")
    publish_samples(config.bus, topic, [task, bad])

    worker = run_stage(config, parts, topic, 2)

    assert (worker.stats.processed, worker.stats.dead_lettered, worker.stats.retries) == (2, 1, 0)
    letter = dead_letter_pb2.DeadLetter.FromString(records(config, Topics.DLQ, [bad.sample_id])[bad.sample_id])
    assert (letter.error_type, letter.attempts) == ("InvalidInput", 1) and "unknown background 'moon'" in letter.error
    step = compose_pb2.PlacementTask.FromString(records(config, Topics.PLACE, [sample_id])[sample_id])
    step_prefix = f"runs/{run_id}/rounds/0/samples/{sample_id}/steps/0/"
    assert (step.scene.keys.image_key, step.scene.keys.label_key, step.scene.keys.instance_map_key) == (
        step_prefix + "image.png", step_prefix + "label.png", step_prefix + "instances.png")
    labels = decoded(store.get_bytes(step.scene.keys.label_key))
    instances = decoded(store.get_bytes(step.scene.keys.instance_map_key))
    assert set(np.unique(instances)) == {0, 1, 2} and ((instances == 2) == (labels == 5)).all()
    assert ((instances == 1) == (labels == 3)).all()
    assert (step.step_index, step.seed, step.next_object, list(step.remaining_objects)) == (
        1, 9, task.remaining_objects[0], [])
    base, pasted = step.scene.objects
    assert base.visible_area_pixels == (instances == 1).sum() < 26 * 16  # the cat hides part of the boat
    assert (pasted.instance_id, pasted.origin, pasted.placement_score, pasted.visible_area_pixels) == (
        2, common_pb2.OBJECT_ORIGIN_PASTED, 0.75, 15 * 20)
    assert pasted.source_sample_id == "src-1" and pasted.source_keys == task.foreground.source.keys
    assert [g.sample_id for g in step.provenance.generations] == ["base", "src-1"]
    assert [(m.name, m.version) for m in step.provenance.models] == [
        ("thesaurus", "t1"), ("fopa", "f1"), ("rain", rain_weights_version(weights))]

    # Step 1, the last: the new cat covers the base boat entirely.
    last = second_task(step)
    (topic,) = unique_topics(config.bus, "harmonize")
    publish_samples(config.bus, topic, [last])
    worker = run_stage(config, parts, topic, 1)

    assert (worker.stats.processed, worker.stats.dead_lettered) == (1, 0)
    sample = samples_pb2.Sample.FromString(records(config, Topics.COMPOSED, [sample_id])[sample_id])
    prefix = f"runs/{run_id}/rounds/0/samples/{sample_id}/"
    assert (sample.kind, sample.keys.image_key, sample.keys.label_key, sample.keys.instance_map_key,
            sample.keys.meta_key) == (samples_pb2.SAMPLE_KIND_COMPOSED, prefix + "image.png", prefix + "label.png",
                                      prefix + "instances.png", prefix + "meta.json")
    # the new 30x30 cat covers the boat (x 4..29, y 10..25) and all of the first cat but x 30..34, y 6..25
    assert [(o.instance_id, o.visible_area_pixels) for o in sample.objects] == [(1, 0), (2, 5 * 20), (3, 30 * 30)]
    assert (sample.objects[1].box.x, sample.objects[1].box.width) == (30, 5)
    assert not sample.objects[0].HasField("box")  # fully covered
    assert len(sample.provenance.generations) == 3 and [m.name for m in sample.provenance.models].count("rain") == 1
    meta = json.loads(store.get_bytes(sample.keys.meta_key))
    assert (meta["kind"], meta["method"], meta["feather_px"]) == ("composed", "rain", FEATHER_PX)
    assert [o["instance_id"] for o in meta["sample"]["objects"]] == [1, 2, 3]
    assert meta["sample"]["provenance"]["models"][-1]["name"] == "rain"

    # A redelivery of the last task rewrites identical bytes and publishes the same Sample.
    files = {k: store.get_bytes(k) for k in (sample.keys.image_key, sample.keys.label_key,
                                             sample.keys.instance_map_key, sample.keys.meta_key)}
    message = InboundMessage(topic, 0, 0, sample_id, last.SerializeToString(), {})
    (again,) = parts.stage.handler(message)
    assert again.topic == Topics.COMPOSED and again.message == sample
    assert {k: store.get_bytes(k) for k in files} == files
