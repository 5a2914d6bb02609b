"""The placement service on real servers: FOPA (random seeded weights) exported and
served by a tritonserver of this module's own, images in SeaweedFS, tasks on Tansu.

Covered: `Place` over a real gRPC server with inline PNGs and store keys, giving the
box torch would give; `PlaceBatch` as one Triton request; bad input answered
INVALID_ARGUMENT; Triton down answered UNAVAILABLE while health stays SERVING; the
stage turning PlacementTasks into HarmonizeTasks that keep clear of the scene's
objects; bad and unplaceable tasks dead-lettered at once; with Triton down, a task
retried and then dead-lettered with its original bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from freemask.placement.heatmaps import TritonHeatmaps
from freemask.placement.model import FopaHeatmap, FopaNet, load_fopa, save_fopa, weights_version
from freemask.placement.placer import PlacementQuery, place
from freemask.placement.service import build
from freemask.shared.image_refs import object_mask
from freemask.placement.triton_repo import write_repository
from freemask.shared.bus import StageWorker, Topics
from freemask.shared.config import FreemaskConfig
from freemask.shared.grpc_runtime import check_health, start_server
from freemask.shared.images import encode_png
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.processes import pid_alive, stop_pid
from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.shared.triton_server import start_tritonserver
from freemask.v1 import common_pb2, compose_pb2, dead_letter_pb2, generate_pb2, placement_pb2

from bus_helpers import drain_records, publish_samples, unique_topics
from conftest import config_for
from grpc_helpers import serving, unary_call
from placement_pictures import FOREGROUND, LABELS, SCENE_H, SCENE_W, scene_image
from polling import settled
from ports import reserve_ports

pytestmark = pytest.mark.stack

MAX_OVERLAP = 0.3
# ONNX on onnxruntime and torch agree to this on the heatmaps (the export's own check)
TOLERANCE = 1e-4
CALL_TIMEOUT_S = 30.0

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Fopa:
    url: str
    version: str
    reference: FopaHeatmap  # the served weights, in torch

    def torch_heatmaps(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.reference(torch.from_numpy(backgrounds), torch.from_numpy(foregrounds)).numpy()


@pytest.fixture(scope="module")
def fopa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fopa]:
    root = tmp_path_factory.mktemp("placement-triton")
    torch.manual_seed(0)
    save_fopa(FopaNet(), root / "weights")
    write_repository("embedded", root / "models", root / "weights")
    http_port, grpc_port, metrics_port = reserve_ports(3)
    server = start_tritonserver(root / "models", root / "work", http_port=http_port, grpc_port=grpc_port,
                                metrics_port=metrics_port, log_path=root / "tritonserver.log")
    try:
        yield Fopa(f"127.0.0.1:{grpc_port}", weights_version(root / "weights"),
                   FopaHeatmap(load_fopa(root / "weights")).eval())
    finally:
        stop_pid(server.pid)
        assert not pid_alive(server.pid), f"tritonserver pid {server.pid} survived stop_pid"


@pytest.fixture(scope="module")
def down_url() -> str:
    """A loopback address nothing listens on: Triton down."""
    return f"127.0.0.1:{reserve_ports(1)[0]}"


def service_config(stack: EmbeddedStack, triton_url: str) -> FreemaskConfig:
    return config_for(stack, FREEMASK_TRITON__URL=triton_url, FREEMASK_TRITON__TIMEOUT_S="5",
                      FREEMASK_PLACEMENT__MAX_OVERLAP=str(MAX_OVERLAP),
                      FREEMASK_BUS__GROUP_PREFIX=f"placement-{uuid.uuid4().hex[:8]}",
                      FREEMASK_BUS__RETRY_BACKOFF_S="0.1")


def built(config: FreemaskConfig) -> ServiceParts:
    """The service as `freemask serve placement` wires it."""
    return build(ServiceContext("placement", config, ServiceMetrics("placement")))


@pytest.fixture(scope="module")
def config(stack: EmbeddedStack, fopa: Fopa) -> FreemaskConfig:
    return service_config(stack, fopa.url)


@pytest.fixture(scope="module")
def store(config: FreemaskConfig) -> ObjectStore:
    return ObjectStore(config.store)


@pytest.fixture(scope="module")
def parts(config: FreemaskConfig) -> ServiceParts:
    return built(config)


@pytest.fixture(scope="module")
def target(config: FreemaskConfig, parts: ServiceParts) -> Iterator[str]:
    with serving(config, parts.grpc_services, "placement") as target:
        yield target


def call(target: str, method: str, request, response_type):
    return unary_call(target, "Placement", method, request, response_type, CALL_TIMEOUT_S)


# --- pictures --------------------------------------------------------------------------------------------------

def inline(pixels: np.ndarray) -> common_pb2.ImageRef:
    return common_pb2.ImageRef(png=encode_png(pixels))


def as_proto(box: Box) -> common_pb2.BoundingBox:
    x, y, width, height = box
    return common_pb2.BoundingBox(x=x, y=y, width=width, height=height)


def box_of(box: common_pb2.BoundingBox) -> Box:
    return box.x, box.y, box.width, box.height


def overlap(box: Box, other: Box) -> float:
    """Intersection over `box`'s area."""
    x, y, w, h = box
    ox, oy, ow, oh = other
    return max(0, min(x + w, ox + ow) - max(x, ox)) * max(0, min(y + h, oy + oh) - max(y, oy)) / (w * h)


def inside_scene(box: Box) -> bool:
    x, y, w, h = box
    return 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= SCENE_W and y + h <= SCENE_H


# --- gRPC ------------------------------------------------------------------------------------------------------

OCCUPIED: Box = (0, 0, 40, 30)


def test_place_with_inline_pngs_gives_the_box_torch_gives(target: str, fopa: Fopa) -> None:
    background = scene_image(1)
    response = call(target, "Place", placement_pb2.PlaceRequest(
        background=inline(background), foreground=inline(FOREGROUND), foreground_mask=inline(LABELS),
        occupied_boxes=[as_proto(OCCUPIED)], num_candidates=5, seed=3), placement_pb2.PlaceResponse)

    assert (response.model.name, response.model.version) == ("fopa", fopa.version)
    best = box_of(response.best.box)
    assert inside_scene(best) and overlap(best, OCCUPIED) <= MAX_OVERLAP
    assert len(response.candidates) == 5
    scores = [response.best.score] + [c.score for c in response.candidates]
    assert scores == sorted(scores, reverse=True)
    # torch on the same weights ranks the same boxes at the top (to within the export's tolerance)
    (expected,) = place([PlacementQuery(background, FOREGROUND, object_mask(LABELS), (OCCUPIED,), MAX_OVERLAP,
                                        num_candidates=100, seed=3)], fopa.torch_heatmaps)
    assert expected.best is not None
    assert response.best.score == pytest.approx(expected.best.score, abs=TOLERANCE)
    near_top = {p.box for p in (expected.best, *expected.candidates) if p.score >= expected.best.score - 2 * TOLERANCE}
    assert best in near_top


def test_place_reads_store_keys_like_inline_pngs(target: str, store: ObjectStore) -> None:
    prefix = f"runs/place-{uuid.uuid4().hex[:8]}/rounds/0/samples/"
    images = {prefix + "scene/image.png": encode_png(scene_image(2)), prefix + "fg/image.png": encode_png(FOREGROUND),
              prefix + "fg/label.png": encode_png(LABELS)}
    for key, data in images.items():
        store.put_bytes(key, data, "image/png")
    by_key = placement_pb2.PlaceRequest(
        background=common_pb2.ImageRef(store_key=prefix + "scene/image.png"),
        foreground=common_pb2.ImageRef(store_key=prefix + "fg/image.png"),
        foreground_mask=common_pb2.ImageRef(store_key=prefix + "fg/label.png"), num_candidates=3, seed=9)
    by_value = placement_pb2.PlaceRequest(background=inline(scene_image(2)), foreground=inline(FOREGROUND),
                                          foreground_mask=inline(LABELS), num_candidates=3, seed=9)
    assert call(target, "Place", by_key, placement_pb2.PlaceResponse) == call(
        target, "Place", by_value, placement_pb2.PlaceResponse)


def _triton_requests(url: str) -> tuple[int, int]:
    """(requests answered, items inferred) by the fopa model so far."""
    with grpcclient.InferenceServerClient(url=url) as client:
        (stats,) = client.get_inference_statistics("fopa", as_json=True, client_timeout=CALL_TIMEOUT_S)["model_stats"]
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("inference_count", 0))


def test_place_batch_is_one_triton_request(target: str, fopa: Fopa) -> None:
    requests = [placement_pb2.PlaceRequest(background=inline(scene_image(10 + i)), foreground=inline(FOREGROUND),
                                           foreground_mask=inline(LABELS), occupied_boxes=[as_proto(OCCUPIED)],
                                           seed=i) for i in range(3)]
    before = settled(lambda: _triton_requests(fopa.url))
    batch = call(target, "PlaceBatch", placement_pb2.PlaceBatchRequest(requests=requests),
                 placement_pb2.PlaceBatchResponse)
    after = settled(lambda: _triton_requests(fopa.url), other_than=before)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)
    assert len(batch.responses) == 3
    for response in batch.responses:
        best = box_of(response.best.box)
        assert inside_scene(best) and overlap(best, OCCUPIED) <= MAX_OVERLAP
        assert response.model.version == fopa.version


def _request(**fields) -> placement_pb2.PlaceRequest:
    defaults = dict(background=inline(scene_image(1)), foreground=inline(FOREGROUND), foreground_mask=inline(LABELS))
    return placement_pb2.PlaceRequest(**{**defaults, **fields})


@pytest.mark.parametrize(("request_message", "code", "fragment"), [
    (_request(foreground_mask=inline(np.zeros((40, 40), np.uint8))), grpc.StatusCode.INVALID_ARGUMENT,
     "foreground mask is empty"),
    (_request(foreground_mask=inline(LABELS[:, :30])), grpc.StatusCode.INVALID_ARGUMENT,
     "foreground mask is 30x40 bool; it must be a boolean mask the size of the foreground (40x40)"),
    (_request(background=common_pb2.ImageRef(png=b"GIF89a not a png")), grpc.StatusCode.INVALID_ARGUMENT,
     "background is not a PNG or JPEG image"),
    (_request(foreground=common_pb2.ImageRef(store_key="runs/../models/x.png")), grpc.StatusCode.INVALID_ARGUMENT,
     "foreground key 'runs/../models/x.png' has an invalid segment '..'"),
    (_request(occupied_boxes=[as_proto((90, 0, 10, 10))]), grpc.StatusCode.INVALID_ARGUMENT,
     "occupied box 0 (x=90, y=0, width=10, height=10) does not lie inside the 96x64 background"),
    (_request(max_overlap=2.0), grpc.StatusCode.INVALID_ARGUMENT, "max_overlap must be in [0, 1], got 2"),
    (_request(foreground=common_pb2.ImageRef(store_key="runs/nothing/here.png")), grpc.StatusCode.NOT_FOUND,
     "foreground: no object at 'runs/nothing/here.png'"),
])
def test_bad_requests_get_clear_status(target: str, request_message: placement_pb2.PlaceRequest,
                                       code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(target, "Place", request_message, placement_pb2.PlaceResponse)
    assert info.value.code() == code and fragment in info.value.details(), info.value.details()


def test_an_empty_batch_is_invalid(target: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(target, "PlaceBatch", placement_pb2.PlaceBatchRequest(), placement_pb2.PlaceBatchResponse)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a batch holds 1..64 requests, got 0" in info.value.details()


def test_with_triton_down_the_service_serves_health_and_answers_unavailable(stack: EmbeddedStack,
                                                                            down_url: str) -> None:
    down = service_config(stack, down_url)
    running = start_server(down.server, 0, built(down).grpc_services, ServiceMetrics("placement"))
    try:
        target = f"127.0.0.1:{running.port}"
        assert check_health(target) and check_health(target, "freemask.v1.Placement")
        with pytest.raises(grpc.RpcError) as info:
            call(target, "Place", _request(), placement_pb2.PlaceResponse)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"Triton at {down_url} is unreachable" in info.value.details(), info.value.details()
    finally:
        running.stop(1.0)


def test_the_triton_source_reads_the_served_weights_version(config: FreemaskConfig, fopa: Fopa) -> None:
    with TritonHeatmaps(config.triton) as heatmaps:
        assert heatmaps.model_version() == fopa.version
        backgrounds = np.zeros((2, 3, 64, 64), np.float32)
        foregrounds = np.ones((2, 4, 32, 32), np.float32)
        np.testing.assert_allclose(heatmaps(backgrounds, foregrounds), fopa.torch_heatmaps(backgrounds, foregrounds),
                                   rtol=0, atol=TOLERANCE)


# --- the stage -------------------------------------------------------------------------------------------------

def write_source(store: ObjectStore, run_id: str) -> generate_pb2.SingleObject:
    """The single object to paste, as the attention-mask stage leaves it in the store."""
    prefix = f"runs/{run_id}/rounds/0/samples/src-1/"
    keys = common_pb2.SampleKeys(image_key=prefix + "image.png", label_key=prefix + "label.png")
    store.put_bytes(keys.image_key, encode_png(FOREGROUND), "image/png")
    store.put_bytes(keys.label_key, encode_png(LABELS), "image/png")
    return generate_pb2.SingleObject(sample_id="src-1", run_id=run_id, round=0, class_id=5, class_name="cat",
                                     keys=keys, image_size=common_pb2.ImageSize(width=40, height=40))


def write_scene(store: ObjectStore, run_id: str, name: str, seed: int) -> tuple[str, np.ndarray]:
    key = f"runs/{run_id}/rounds/0/samples/{name}/image.png"
    pixels = scene_image(seed)
    store.put_bytes(key, encode_png(pixels), "image/png")
    return key, pixels


def placement_task(run_id: str, sample_id: str, scene_key: str, source: generate_pb2.SingleObject,
                   occupied: list[Box], **fields) -> compose_pb2.PlacementTask:
    objects = [common_pb2.ObjectInstance(class_id=3, class_name="boat", instance_id=i + 1, box=as_proto(box),
                                         visible_area_pixels=box[2] * box[3], origin=common_pb2.OBJECT_ORIGIN_GENERATED)
               for i, box in enumerate(occupied)]
    planned = compose_pb2.PlannedObject(class_id=5, class_name="cat", relation=0.3, source=source)
    defaults = dict(
        run_id=run_id, round=0, sample_id=sample_id, background_name="grass",
        scene=compose_pb2.SceneState(keys=common_pb2.SampleKeys(image_key=scene_key),
                                     image_size=common_pb2.ImageSize(width=SCENE_W, height=SCENE_H), objects=objects),
        next_object=planned, remaining_objects=[planned], step_index=0, seed=5,
        provenance=common_pb2.Provenance(models=[common_pb2.ModelVersion(name="thesaurus", version="t1")]))
    return compose_pb2.PlacementTask(**{**defaults, **fields})



def run_stage(config: FreemaskConfig, parts: ServiceParts, topic: str, count: int) -> StageWorker:
    assert parts.stage is not None and parts.stage.topic == Topics.PLACE
    worker = StageWorker("placement", topic, parts.stage.handler, config.bus, ServiceMetrics("placement"),
                         batch_handler=parts.stage.batch_handler)
    worker.run(max_messages=count, timeout_s=120)
    return worker


def dead_letters(config: FreemaskConfig, keys: list[str]) -> dict[str, dead_letter_pb2.DeadLetter]:
    return {key: dead_letter_pb2.DeadLetter.FromString(value)
            for key, value, _ in drain_records(config.bus, Topics.DLQ, keys) if key in keys}


def test_the_stage_places_each_object_clear_of_the_scene_objects(config: FreemaskConfig, store: ObjectStore,
                                                                 parts: ServiceParts, fopa: Fopa) -> None:
    run_id = f"place-{uuid.uuid4().hex[:8]}"
    source = write_source(store, run_id)
    mask = object_mask(LABELS)
    tasks, favourites = [], {}
    with TritonHeatmaps(config.triton) as heatmaps:
        for i in range(3):
            scene_key, pixels = write_scene(store, run_id, f"base-{i}", seed=20 + i)
            # The scene's object stands exactly where FOPA would put the new one with no limit,
            # so the limit has to move it.
            (free,) = place([PlacementQuery(pixels, FOREGROUND, mask, (), 1.0, seed=5 + i)], heatmaps)
            assert free.best is not None
            favourites[f"c-{run_id}-{i}"] = free.best
            tasks.append(placement_task(run_id, f"c-{run_id}-{i}", scene_key, source, [free.best.box], seed=5,
                                        step_index=i))
    scene_key, _ = write_scene(store, run_id, "base-full", seed=30)
    full = placement_task(run_id, f"c-{run_id}-full", scene_key, source, [(0, 0, SCENE_W, SCENE_H)])
    bad = placement_task(run_id, f"c-{run_id}-bad", scene_key, source, [], background_name="moon")
    (topic,) = unique_topics(config.bus, "place")
    publish_samples(config.bus, topic, [*tasks, full, bad])

    worker = run_stage(config, parts, topic, 5)

    assert (worker.stats.processed, worker.stats.dead_lettered, worker.stats.retries) == (5, 2, 0)
    harmonize = {key: compose_pb2.HarmonizeTask.FromString(value)
                 for key, value, _ in drain_records(config.bus, Topics.HARMONIZE, favourites) if key in favourites}
    for task in tasks:
        out = harmonize[task.sample_id]
        favourite = favourites[task.sample_id]
        box = box_of(out.box)
        assert inside_scene(box) and box != favourite.box
        assert overlap(box, favourite.box) <= MAX_OVERLAP
        assert out.placement_score <= favourite.score + TOLERANCE
        assert out.foreground == task.next_object and list(out.remaining_objects) == list(task.remaining_objects)
        assert (out.scene, out.step_index, out.seed) == (task.scene, task.step_index, task.seed)
        assert [(m.name, m.version) for m in out.provenance.models] == [("thesaurus", "t1"), ("fopa", fopa.version)]
    letters = dead_letters(config, [full.sample_id, bad.sample_id])
    assert (letters[full.sample_id].error_type, letters[full.sample_id].attempts) == ("Unusable", 1)
    assert "no box for the cat lies inside the scene with at most 0.3" in letters[full.sample_id].error
    assert (letters[bad.sample_id].error_type, letters[bad.sample_id].attempts) == ("InvalidInput", 1)
    assert "unknown background 'moon'" in letters[bad.sample_id].error


def test_with_triton_down_a_task_is_retried_then_dead_lettered(stack: EmbeddedStack, store: ObjectStore,
                                                               down_url: str) -> None:
    config = service_config(stack, down_url)
    run_id = f"place-{uuid.uuid4().hex[:8]}"
    scene_key, _ = write_scene(store, run_id, "base", seed=40)
    task = placement_task(run_id, f"c-{run_id}", scene_key, write_source(store, run_id), [(0, 0, 10, 10)])
    (topic,) = unique_topics(config.bus, "place")
    publish_samples(config.bus, topic, [task])

    worker = run_stage(config, built(config), topic, 1)

    attempts = config.bus.max_attempts
    assert (worker.stats.dead_lettered, worker.stats.retries) == (1, attempts - 1)
    letter = dead_letters(config, [task.sample_id])[task.sample_id]
    assert (letter.error_type, letter.attempts) == ("Unavailable", attempts)
    assert f"Triton at {down_url} is unreachable" in letter.error
    assert letter.value == task.SerializeToString() and letter.original_topic == topic  # nothing lost
