"""Adapters of the placement service: gRPC `Placement` and the stage
`freemask.place.v1 → freemask.harmonize.v1`, both over `placer.place` with FOPA
heatmaps from Triton (`heatmaps.TritonHeatmaps`).

Placement writes nothing: it reads the scene and the foreground from the store
(or inline PNGs on gRPC) and answers or publishes a box. The box depends only on
the input, the weights and the seed, so a redelivered task publishes the same
HarmonizeTask. A polled batch of tasks is one Triton request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from prometheus_client import Histogram

from freemask.placement.heatmaps import TritonHeatmaps
from freemask.placement.placer import (
    MAX_QUERIES,
    MAX_SEED,
    HeatmapSource,
    PixelBox,
    Placement,
    PlacementQuery,
    PlacementResult,
    UniformHeatmaps,
    place,
)
from freemask.shared.bus import InboundMessage, OutboundMessage, Topics
from freemask.shared.config import FreemaskConfig, PlacementConfig
from freemask.shared.errors import InvalidInput, Unusable
from freemask.shared.image_refs import ImageReader
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.runner import ServiceContext, ServiceParts, StageSpec
from freemask.shared.scene_steps import (
    validate_planned_source,
    validate_remaining,
    validate_scene_keys,
    validate_scene_step,
)
from freemask.v1 import common_pb2, compose_pb2, placement_pb2

FOPA_MODEL_NAME = "fopa"
UNIFORM_MODEL_NAME = "uniform-placement"
_SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class HeatmapModel(HeatmapSource, Protocol):
    """A heatmap source that can name the weights it runs (TritonHeatmaps)."""

    def model_version(self) -> str: ...


class PlacementMetrics:
    """What operators watch: how plausible FOPA finds the boxes it chooses."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._service = metrics.service
        self.score = Histogram("freemask_placement_score", "FOPA heatmap value of each chosen box", ["service"],
                               buckets=_SCORE_BUCKETS, registry=metrics.registry)

    def observe(self, results: Sequence[PlacementResult]) -> None:
        for result in results:
            if result.best is not None:
                self.score.labels(self._service).observe(result.best.score)


class Placer:
    """The core with its model, shared by both adapters: places queries and names the weights."""

    def __init__(self, model: HeatmapModel, metrics: PlacementMetrics | None = None,
                 model_name: str = FOPA_MODEL_NAME) -> None:
        self._model = model
        self._metrics = metrics
        self._model_name = model_name

    def run(self, queries: Sequence[PlacementQuery]) -> tuple[list[PlacementResult], common_pb2.ModelVersion]:
        results = place(queries, self._model)
        version = common_pb2.ModelVersion(name=self._model_name, version=self._model.model_version())
        if self._metrics is not None:
            self._metrics.observe(results)
        return results, version


@contextmanager
def _numbered(index: int, count: int) -> Iterator[None]:
    """Name the request an InvalidInput is about, in a batch of more than one."""
    try:
        yield
    except InvalidInput as err:
        if count == 1:
            raise
        raise InvalidInput(f"request {index}: {err}") from None


class PlacementApi:
    """gRPC servicer: PlaceRequests (inline PNGs or store keys) to boxes; batches all-or-nothing."""

    def __init__(self, reader: ImageReader, placer: Placer, config: PlacementConfig) -> None:
        self._reader = reader
        self._placer = placer
        self._config = config

    def Place(self, request: placement_pb2.PlaceRequest) -> placement_pb2.PlaceResponse:
        return self._answer([request])[0]

    def PlaceBatch(self, request: placement_pb2.PlaceBatchRequest) -> placement_pb2.PlaceBatchResponse:
        return placement_pb2.PlaceBatchResponse(responses=self._answer(list(request.requests)))

    def _answer(self, requests: Sequence[placement_pb2.PlaceRequest]) -> list[placement_pb2.PlaceResponse]:
        if not 1 <= len(requests) <= MAX_QUERIES:  # before reading any image
            raise InvalidInput(f"a batch holds 1..{MAX_QUERIES} requests, got {len(requests)}")
        queries = []
        for index, request in enumerate(requests):
            with _numbered(index, len(requests)):
                queries.append(self._query(request))
        results, model = self._placer.run(queries)
        return [placement_pb2.PlaceResponse(best=_candidate(result.best) if result.best else None,
                                            candidates=[_candidate(c) for c in result.candidates], model=model)
                for result in results]

    def _query(self, request: placement_pb2.PlaceRequest) -> PlacementQuery:
        return PlacementQuery(
            background=self._reader.image(request.background, "background"),
            foreground=self._reader.image(request.foreground, "foreground"),
            foreground_mask=self._reader.mask(request.foreground_mask, "foreground_mask"),
            occupied=tuple((b.x, b.y, b.width, b.height) for b in request.occupied_boxes),
            max_overlap=request.max_overlap if request.HasField("max_overlap") else self._config.max_overlap,
            num_candidates=request.num_candidates, seed=request.seed)


def _bounding_box(box: PixelBox) -> common_pb2.BoundingBox:
    x, y, width, height = box
    return common_pb2.BoundingBox(x=x, y=y, width=width, height=height)


def _candidate(placement: Placement) -> placement_pb2.PlacementCandidate:
    return placement_pb2.PlacementCandidate(box=_bounding_box(placement.box), score=placement.score,
                                            scale_index=placement.scale_index)


def validate_task(task: compose_pb2.PlacementTask, config: FreemaskConfig) -> None:
    """InvalidInput naming the first thing wrong with a PlacementTask, before anything is read."""
    validate_scene_step(task, config.world.backgrounds)
    validate_scene_keys(task)
    validate_planned_source(task.next_object, task.HasField("next_object"), "next_object", task,
                            config.world.classes)
    validate_remaining(task.remaining_objects, task, config.world.classes)


def placement_seed(task: compose_pb2.PlacementTask) -> int:
    """Tie-break seed of one step: the plan's seed moved by the step, so each step of a
    plan breaks ties its own way and a redelivered step the same way (wraps at 2**64)."""
    return (task.seed + task.step_index) % (MAX_SEED + 1)


class PlaceStage:
    """Stage adapter: a PlacementTask in, a HarmonizeTask out on `freemask.harmonize.v1`.

    A task whose object fits nowhere within the overlap limit is Unusable: the same
    scene, object and weights give the same answer, so it goes to the DLQ at once.
    """

    def __init__(self, reader: ImageReader, placer: Placer, config: FreemaskConfig) -> None:
        self._reader = reader
        self._placer = placer
        self._config = config

    def handle(self, message: InboundMessage) -> list[OutboundMessage]:
        return self.handle_batch([message])[0]

    def handle_batch(self, messages: Sequence[InboundMessage]) -> list[list[OutboundMessage]]:
        tasks = [m.decode(compose_pb2.PlacementTask) for m in messages]
        queries = []
        for index, task in enumerate(tasks):
            with _numbered(index, len(tasks)):
                queries.append(self._query(task))
        results, model = self._placer.run(queries)
        return [[OutboundMessage(Topics.HARMONIZE, task.sample_id, self._harmonize_task(task, query, result, model))]
                for task, query, result in zip(tasks, queries, results)]

    def _query(self, task: compose_pb2.PlacementTask) -> PlacementQuery:
        validate_task(task, self._config)
        scene, source = task.scene, task.next_object.source
        background = self._reader.stored_image(scene.keys.image_key, "scene image")
        if background.shape[:2] != (scene.image_size.height, scene.image_size.width):
            raise InvalidInput(f"scene image {scene.keys.image_key!r} is {background.shape[1]}x{background.shape[0]} "
                               f"px; scene.image_size says {scene.image_size.width}x{scene.image_size.height}")
        return PlacementQuery(
            background=background,
            foreground=self._reader.stored_image(source.keys.image_key, "next object's image"),
            foreground_mask=self._reader.stored_mask(source.keys.label_key, "next object's mask"),
            # a fully covered object has no visible pixels left, so it takes no room
            occupied=tuple((o.box.x, o.box.y, o.box.width, o.box.height)
                           for o in scene.objects if o.visible_area_pixels > 0),
            max_overlap=self._config.placement.max_overlap, num_candidates=0, seed=placement_seed(task))

    @staticmethod
    def _harmonize_task(task: compose_pb2.PlacementTask, query: PlacementQuery, result: PlacementResult,
                        model: common_pb2.ModelVersion) -> compose_pb2.HarmonizeTask:
        if result.best is None:
            raise Unusable(f"sample {task.sample_id!r} step {task.step_index}: no box for the "
                           f"{task.next_object.class_name or 'next object'} lies inside the scene with at most "
                           f"{query.max_overlap:g} of it over the scene's {len(query.occupied)} object(s)")
        provenance = common_pb2.Provenance()
        provenance.CopyFrom(task.provenance)
        if not any(m == model for m in provenance.models):  # one entry per model, in first-use order
            provenance.models.append(model)
        return compose_pb2.HarmonizeTask(
            run_id=task.run_id, round=task.round, sample_id=task.sample_id, background_name=task.background_name,
            scene=task.scene, foreground=task.next_object, box=_bounding_box(result.best.box),
            placement_score=result.best.score, remaining_objects=task.remaining_objects,
            step_index=task.step_index, seed=task.seed, provenance=provenance)


def build(context: ServiceContext) -> ServiceParts:
    config = context.config
    # Lives as long as the process: the runner has no shutdown hook, and the client's
    # channel closes with it. Creating it does not connect, so the service starts and
    # answers health while Triton is down, and each call answers UNAVAILABLE until it is up.
    if config.placement.model == "uniform":
        placer = Placer(UniformHeatmaps(), PlacementMetrics(context.metrics), model_name=UNIFORM_MODEL_NAME)
    else:
        placer = Placer(TritonHeatmaps(config.triton), PlacementMetrics(context.metrics))
    reader = ImageReader(context.store, config.limits)
    stage = PlaceStage(reader, placer, config)
    descriptor = placement_pb2.DESCRIPTOR.services_by_name["Placement"]
    return ServiceParts(grpc_services=[(descriptor, PlacementApi(reader, placer, config.placement))],
                        stage=StageSpec(Topics.PLACE, stage.handle, batch_handler=stage.handle_batch))
