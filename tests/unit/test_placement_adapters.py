"""The placement adapters without a network: `PlacementApi` and `PlaceStage` over an
in-memory store and a hand-made heatmap model, so every answer is known in advance,
and `TritonHeatmaps` over a stand-in client (its errors, version and batching)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from freemask.placement.geometry import HEATMAP_SIDE, NUM_SCALES, candidate_boxes, pixel_box
from freemask.placement.heatmaps import TritonError, TritonHeatmaps
from freemask.placement.service import PlaceStage, PlacementApi, PlacementMetrics, Placer, placement_seed
from freemask.shared.bus import InboundMessage, Topics
from freemask.shared.config import FreemaskConfig, TritonConfig, load_config
from freemask.shared.errors import InvalidInput, NotFound, Unavailable, Unusable
from freemask.shared.image_refs import ImageReader, object_mask
from freemask.shared.images import encode_png
from freemask.shared.metrics import ServiceMetrics
from freemask.v1 import common_pb2, compose_pb2, generate_pb2, placement_pb2

from memory_store import MemoryStore

SIDE = 64
PEAK = (3, 8, 8)  # (scale, row, column) of the best cell
RUNNER_UP = (3, 24, 24)


class TwoPeaks:
    """FOPA stand-in: every heatmap peaks at PEAK (0.9) and RUNNER_UP (0.6); counts its calls."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
        self.batches.append(len(backgrounds))
        heatmaps = np.full((len(backgrounds), NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE), 0.05, np.float32)
        heatmaps[(slice(None), *PEAK)] = 0.9
        heatmaps[(slice(None), *RUNNER_UP)] = 0.6
        return heatmaps

    def model_version(self) -> str:
        return "sha256-test"


def box_of(cell: tuple[int, int, int], aspect: float = 1.0) -> tuple[int, int, int, int]:
    return pixel_box(candidate_boxes(aspect, SIDE, SIDE)[cell], SIDE, SIDE)


def as_proto(box: tuple[int, int, int, int]) -> common_pb2.BoundingBox:
    x, y, width, height = box
    return common_pb2.BoundingBox(x=x, y=y, width=width, height=height)


def proto_box(box: common_pb2.BoundingBox) -> tuple[int, int, int, int]:
    return box.x, box.y, box.width, box.height


@pytest.fixture(scope="module")
def config() -> FreemaskConfig:
    return load_config(environ={"FREEMASK_PLACEMENT__MAX_OVERLAP": "0.25"})


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def model() -> TwoPeaks:
    return TwoPeaks()


@pytest.fixture
def api(config: FreemaskConfig, store: MemoryStore, model: TwoPeaks) -> PlacementApi:
    return PlacementApi(ImageReader(store, config.limits), Placer(model), config.placement)


@pytest.fixture
def stage(config: FreemaskConfig, store: MemoryStore, model: TwoPeaks) -> PlaceStage:
    return PlaceStage(ImageReader(store, config.limits), Placer(model), config)


BACKGROUND = encode_png(np.full((SIDE, SIDE, 3), 120, np.uint8))
FOREGROUND = encode_png(np.full((12, 12, 3), 200, np.uint8))
LABELS = np.zeros((12, 12), np.uint8)
LABELS[2:10, 2:10] = 7  # an 8x8 object of class 7: aspect 1


def inline(png: bytes) -> common_pb2.ImageRef:
    return common_pb2.ImageRef(png=png)


def request(**fields) -> placement_pb2.PlaceRequest:
    defaults = dict(background=inline(BACKGROUND), foreground=inline(FOREGROUND),
                    foreground_mask=inline(encode_png(LABELS)))
    return placement_pb2.PlaceRequest(**{**defaults, **fields})


def test_place_answers_the_best_box_the_model_and_runners_up(api: PlacementApi, model: TwoPeaks) -> None:
    response = api.Place(request(num_candidates=2))
    assert proto_box(response.best.box) == box_of(PEAK)
    assert response.best.score == pytest.approx(0.9) and response.best.scale_index == PEAK[0]
    assert [c.score for c in response.candidates] == pytest.approx([0.6, 0.05])
    assert proto_box(response.candidates[0].box) == box_of(RUNNER_UP)
    assert (response.model.name, response.model.version) == ("fopa", "sha256-test")
    assert model.batches == [1]


def test_an_unset_max_overlap_is_the_configured_one(api: PlacementApi) -> None:
    over_peak = [as_proto(box_of(PEAK))]
    assert proto_box(api.Place(request(occupied_boxes=over_peak)).best.box) == box_of(RUNNER_UP)  # 0.25 applies
    assert proto_box(api.Place(request(occupied_boxes=over_peak, max_overlap=1.0)).best.box) == box_of(PEAK)
    # a limit of 0 is a real value, not "unset"
    blocked = api.Place(request(occupied_boxes=[as_proto((0, 0, SIDE, SIDE))], max_overlap=0.0))
    assert not blocked.HasField("best") and not blocked.candidates


def test_images_come_from_store_keys_too(api: PlacementApi, store: MemoryStore) -> None:
    store.objects = {"runs/r/rounds/0/samples/a/image.png": BACKGROUND,
                     "runs/r/rounds/0/samples/b/image.png": FOREGROUND,
                     "runs/r/rounds/0/samples/b/label.png": encode_png(LABELS)}
    response = api.Place(request(
        background=common_pb2.ImageRef(store_key="runs/r/rounds/0/samples/a/image.png"),
        foreground=common_pb2.ImageRef(store_key="runs/r/rounds/0/samples/b/image.png"),
        foreground_mask=common_pb2.ImageRef(store_key="runs/r/rounds/0/samples/b/label.png")))
    assert proto_box(response.best.box) == box_of(PEAK)


def test_the_chosen_scores_are_measured(config: FreemaskConfig, store: MemoryStore, model: TwoPeaks) -> None:
    metrics = ServiceMetrics("placement")
    api = PlacementApi(ImageReader(store, config.limits), Placer(model, PlacementMetrics(metrics)), config.placement)
    api.PlaceBatch(placement_pb2.PlaceBatchRequest(requests=[request(), request(max_overlap=0.0, occupied_boxes=[
        as_proto((0, 0, SIDE, SIDE))])]))  # the second places nothing, so it is not measured
    labels = {"service": "placement"}
    assert metrics.registry.get_sample_value("freemask_placement_score_count", labels) == 1
    assert metrics.registry.get_sample_value("freemask_placement_score_sum", labels) == pytest.approx(0.9)


def test_masks_are_label_maps_or_binary_pngs() -> None:
    labels = np.array([[0, 3, 255], [254, 0, 1]], np.uint8)
    assert object_mask(labels).tolist() == [[False, True, False], [True, False, True]]
    binary = np.array([[0, 255], [255, 0]], np.uint8)  # a 0/255 mask: no class id, so 255 is the object
    assert object_mask(binary).tolist() == [[False, True], [True, False]]


def test_a_batch_is_one_model_call_and_all_or_nothing(api: PlacementApi, model: TwoPeaks) -> None:
    batch = api.PlaceBatch(placement_pb2.PlaceBatchRequest(requests=[request(seed=i) for i in range(5)]))
    assert len(batch.responses) == 5 and model.batches == [5]
    with pytest.raises(InvalidInput, match=r"^request 1: foreground mask is empty"):
        api.PlaceBatch(placement_pb2.PlaceBatchRequest(requests=[
            request(), request(foreground_mask=inline(encode_png(np.zeros((12, 12), np.uint8))))]))
    with pytest.raises(InvalidInput, match="a batch holds 1..64 requests, got 0"):
        api.PlaceBatch(placement_pb2.PlaceBatchRequest())
    assert model.batches == [5]


@pytest.mark.parametrize(("fields", "error", "fragment"), [
    (dict(background=common_pb2.ImageRef()), InvalidInput, "background is missing: set exactly one of store_key"),
    (dict(foreground=inline(b"not a png")), InvalidInput, "foreground is not a PNG or JPEG image"),
    (dict(foreground=inline(b"\x89PNG" + bytes(4 * 1024 * 1024))), InvalidInput,
     "foreground is 4194308 bytes inline; the limit is 4194304"),
    (dict(foreground_mask=inline(encode_png(np.ones((12, 10), np.uint8)))), InvalidInput,
     "foreground mask is 10x12 bool; it must be a boolean mask the size of the foreground (12x12)"),
    (dict(foreground_mask=inline(FOREGROUND)), InvalidInput, "foreground_mask has mode RGB"),
    (dict(background=common_pb2.ImageRef(store_key="../etc/passwd")), InvalidInput, "background key '../etc/passwd'"),
    (dict(background=common_pb2.ImageRef(store_key="runs/none/image.png")), NotFound,
     "background: no object at 'runs/none/image.png'"),
    (dict(occupied_boxes=[common_pb2.BoundingBox(x=50, y=0, width=20, height=5)]), InvalidInput,
     "occupied box 0 (x=50, y=0, width=20, height=5) does not lie inside the 64x64 background"),
    (dict(max_overlap=float("nan")), InvalidInput, "max_overlap must be in [0, 1], got nan"),
    (dict(num_candidates=101), InvalidInput, "num_candidates must be in 0..100"),
])
def test_bad_requests_are_refused_clearly_before_the_model_runs(api: PlacementApi, model: TwoPeaks, fields: dict,
                                                                 error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        api.Place(request(**fields))
    assert fragment in str(info.value)
    assert model.batches == []


# --- the stage -------------------------------------------------------------------------------------------------

SCENE_KEY = "runs/run-a/rounds/0/samples/base-1/image.png"
SOURCE_PREFIX = "runs/run-a/rounds/0/samples/src-1/"


def planned(sample_id: str = "src-1") -> compose_pb2.PlannedObject:
    prefix = f"runs/run-a/rounds/0/samples/{sample_id}/"
    return compose_pb2.PlannedObject(class_id=7, class_name="cat", relation=0.4, source=generate_pb2.SingleObject(
        sample_id=sample_id, run_id="run-a", round=0, class_id=7, class_name="cat",
        keys=common_pb2.SampleKeys(image_key=prefix + "image.png", label_key=prefix + "label.png")))


def task(**fields) -> compose_pb2.PlacementTask:
    base = common_pb2.ObjectInstance(class_id=3, class_name="boat", instance_id=1, box=as_proto(box_of(PEAK)),
                                     visible_area_pixels=100, origin=common_pb2.OBJECT_ORIGIN_GENERATED)
    defaults = dict(
        run_id="run-a", round=0, sample_id="c-1", background_name="sea",
        scene=compose_pb2.SceneState(keys=common_pb2.SampleKeys(image_key=SCENE_KEY),
                                     image_size=common_pb2.ImageSize(width=SIDE, height=SIDE), objects=[base]),
        next_object=planned(), remaining_objects=[planned("src-2")], step_index=1, seed=41,
        provenance=common_pb2.Provenance(models=[common_pb2.ModelVersion(name="thesaurus", version="t1")],
                                         compose_seed=41))
    return compose_pb2.PlacementTask(**{**defaults, **fields})


def message(placement_task: compose_pb2.PlacementTask, offset: int = 0) -> InboundMessage:
    return InboundMessage(Topics.PLACE, 0, offset, placement_task.sample_id, placement_task.SerializeToString(),
                          {"schema": b"freemask.v1.PlacementTask"})


@pytest.fixture
def scene(store: MemoryStore) -> MemoryStore:
    store.objects = {SCENE_KEY: BACKGROUND, SOURCE_PREFIX + "image.png": FOREGROUND,
                     SOURCE_PREFIX + "label.png": encode_png(LABELS)}
    return store


def test_a_task_becomes_a_harmonize_task_that_avoids_the_scene_objects(stage: PlaceStage, scene: MemoryStore) -> None:
    placement_task = task()
    (out,) = stage.handle(message(placement_task))
    assert out.topic == Topics.HARMONIZE and out.key == "c-1"
    harmonize = out.message
    assert isinstance(harmonize, compose_pb2.HarmonizeTask)
    assert proto_box(harmonize.box) == box_of(RUNNER_UP)  # the peak is under the base object
    assert harmonize.placement_score == pytest.approx(0.6)
    assert harmonize.foreground == placement_task.next_object
    assert list(harmonize.remaining_objects) == list(placement_task.remaining_objects)
    assert harmonize.scene == placement_task.scene
    assert (harmonize.run_id, harmonize.round, harmonize.sample_id, harmonize.background_name,
            harmonize.step_index, harmonize.seed) == ("run-a", 0, "c-1", "sea", 1, 41)
    assert [(m.name, m.version) for m in harmonize.provenance.models] == [("thesaurus", "t1"), ("fopa", "sha256-test")]
    assert harmonize.provenance.compose_seed == 41
    # a later step (or a redelivery) records fopa once and publishes the same task
    again = task(provenance=harmonize.provenance)
    (out_again,) = stage.handle(message(again))
    assert out_again.message == harmonize


def test_a_fully_covered_object_takes_no_room(stage: PlaceStage, scene: MemoryStore) -> None:
    covered = task()
    covered.scene.objects[0].visible_area_pixels = 0
    assert proto_box(stage.handle(message(covered))[0].message.box) == box_of(PEAK)


def test_a_polled_batch_is_one_model_call(stage: PlaceStage, scene: MemoryStore, model: TwoPeaks) -> None:
    outputs = stage.handle_batch([message(task(sample_id=f"c-{i}", seed=i), offset=i) for i in range(4)])
    assert [out.key for (out,) in outputs] == ["c-0", "c-1", "c-2", "c-3"]
    assert model.batches == [4]


def test_the_seed_of_a_step_moves_with_the_step_and_wraps() -> None:
    assert placement_seed(task(seed=41, step_index=1)) == 42
    assert placement_seed(task(seed=2**64 - 1, step_index=2)) == 1


def test_no_box_within_the_limit_is_unusable(stage: PlaceStage, scene: MemoryStore) -> None:
    everywhere = task()
    everywhere.scene.objects[0].box.CopyFrom(as_proto((0, 0, SIDE, SIDE)))
    with pytest.raises(Unusable, match=r"sample 'c-1' step 1: no box for the cat lies inside the scene with at most "
                                       r"0.25 of it over the scene's 1 object\(s\)"):
        stage.handle(message(everywhere))


def _without(field: str) -> compose_pb2.PlacementTask:
    bare = task()
    bare.ClearField(field)
    return bare


def _with_source_key(key: str) -> compose_pb2.PlacementTask:
    changed = task()
    changed.next_object.source.keys.label_key = key
    return changed


@pytest.mark.parametrize(("placement_task", "fragment"), [
    (task(run_id="Run A"), "run id 'Run A' is not a valid id"),
    (task(sample_id="../x"), "sample id '../x' is not a valid id"),
    (task(background_name="moon"), "unknown background 'moon'"),
    (_without("scene"), "scene is missing"),
    (_without("next_object"), "next_object (with its source single object) is missing"),
    (task(scene=compose_pb2.SceneState(keys=common_pb2.SampleKeys(image_key="models/fopa/x/image.png"),
                                       image_size=common_pb2.ImageSize(width=SIDE, height=SIDE))),
     "scene image_key 'models/fopa/x/image.png' lies outside 'runs/'"),
    (_with_source_key("runs/run-a/rounds/0/samples/other/label.png"),
     "next_object source label_key 'runs/run-a/rounds/0/samples/other/label.png' lies outside "
     "'runs/run-a/rounds/0/samples/src-1/'"),
    (task(scene=compose_pb2.SceneState(keys=common_pb2.SampleKeys(image_key=SCENE_KEY),
                                       image_size=common_pb2.ImageSize(width=32, height=SIDE))),
     "scene image 'runs/run-a/rounds/0/samples/base-1/image.png' is 64x64 px; scene.image_size says 32x64"),
])
def test_bad_tasks_are_invalid_input(stage: PlaceStage, scene: MemoryStore, model: TwoPeaks,
                                     placement_task: compose_pb2.PlacementTask, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        stage.handle(message(placement_task))
    assert fragment in str(info.value)
    assert model.batches == []


def test_a_message_of_another_schema_is_invalid_input(stage: PlaceStage) -> None:
    wrong = InboundMessage(Topics.PLACE, 0, 0, "c-1", b"", {"schema": b"freemask.v1.ComposeRequest"})
    with pytest.raises(InvalidInput, match="expected 'freemask.v1.PlacementTask'"):
        stage.handle(wrong)


# --- the Triton source, over a stand-in client ------------------------------------------------------------------

class FakeTritonClient:
    """Answers like tritonclient's InferenceServerClient: a model config, then heatmaps (or an error)."""

    def __init__(self, max_batch_size: int = 64, version: str | None = "sha256-abc",
                 error: InferenceServerException | None = None) -> None:
        parameters = {} if version is None else {
            "weights_version": model_config_pb2.ModelParameter(string_value=version)}
        self.config = service_pb2.ModelConfigResponse(config=model_config_pb2.ModelConfig(
            name="fopa", max_batch_size=max_batch_size, parameters=parameters))
        self.error = error
        self.config_reads = 0
        self.batches: list[int] = []

    def get_model_config(self, name: str, client_timeout: float) -> service_pb2.ModelConfigResponse:
        self.config_reads += 1
        return self.config

    def infer(self, model_name: str, inputs, outputs, client_timeout: float):
        if self.error is not None:
            raise self.error
        rows = inputs[0].shape()[0]
        self.batches.append(rows)
        heatmaps = np.full((rows, NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE), 0.5, np.float32)
        return SimpleNamespace(as_numpy=lambda name: heatmaps if name == "HEATMAP" else None)

    def close(self) -> None:
        pass


def triton(client: FakeTritonClient) -> TritonHeatmaps:
    return TritonHeatmaps(TritonConfig(url="triton.test:8001"), client=client)  # type: ignore[arg-type]


def inputs(rows: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((rows, 3, 64, 64), np.float32), np.zeros((rows, 4, 32, 32), np.float32)


def test_the_version_is_read_once_and_a_batch_is_one_request() -> None:
    client = FakeTritonClient()
    source = triton(client)
    assert source(*inputs(5)).shape == (5, NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE)
    assert source.model_version() == "sha256-abc"
    assert client.batches == [5] and client.config_reads == 1


def test_a_batch_over_the_models_max_batch_size_is_split() -> None:
    client = FakeTritonClient(max_batch_size=2)
    assert triton(client)(*inputs(5)).shape[0] == 5
    assert client.batches == [2, 2, 1]


@pytest.mark.parametrize(("status", "error", "fragment"), [
    ("StatusCode.UNAVAILABLE", Unavailable, "Triton at triton.test:8001 is unreachable (inference for model 'fopa'"),
    ("StatusCode.DEADLINE_EXCEEDED", Unavailable, "Triton at triton.test:8001 is unreachable"),
    ("StatusCode.NOT_FOUND", Unavailable, "Triton at triton.test:8001 cannot serve model 'fopa' now"),
    ("StatusCode.INVALID_ARGUMENT", InvalidInput, "Triton refused the 'fopa' request: boom"),
    ("StatusCode.INTERNAL", TritonError, "Triton at triton.test:8001 failed inference for model 'fopa'"),
])
def test_triton_errors_become_the_platforms_errors(status: str, error: type[Exception], fragment: str) -> None:
    source = triton(FakeTritonClient(error=InferenceServerException("boom", status=status)))
    with pytest.raises(error) as info:
        source(*inputs(1))
    assert fragment in str(info.value)


@pytest.mark.parametrize(("client", "fragment"), [
    (FakeTritonClient(version=None), "has no 'weights_version' parameter"),
    (FakeTritonClient(version="Not A Version"), "is not a valid version"),
    (FakeTritonClient(max_batch_size=0), "has max_batch_size 0"),
])
def test_a_model_config_off_the_contract_is_a_server_fault(client: FakeTritonClient, fragment: str) -> None:
    with pytest.raises(TritonError, match=fragment):
        triton(client)(*inputs(1))
