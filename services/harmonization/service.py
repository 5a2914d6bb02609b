"""Adapters of the harmonization service: gRPC `Harmonization` and the stage
`freemask.harmonize.v1 → freemask.place.v1 | freemask.composed.v1`, both over
`composite.paste` with a harmonizer (RAIN, statistics transfer or copy-paste).

The stage writes each intermediate scene to its step folder,
`runs/{run}/rounds/{r}/samples/{id}/steps/{step}/`, and sends it back to
placement while the plan has objects left; after the last one it writes the
sample's own image.png, label.png, instances.png and, last, meta.json, and
publishes the `Sample`. Every byte depends only on the task and the weights, so a
redelivered task rewrites identical objects and publishes the same message.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
from google.protobuf import json_format
from prometheus_client import Histogram

from freemask.harmonization.composite import PasteResult, PixelBox, instance_map_from_labels, paste
from freemask.harmonization.rain import DEFAULT_WEIGHTS_DIR, RainHarmonizer
from freemask.harmonization.transfer import COPY_PASTE, STATISTICS_TRANSFER, CopyPaste, Harmonizer, StatisticsTransfer
from freemask.shared.bus import InboundMessage, OutboundMessage, Topics
from freemask.shared.config import FreemaskConfig, HarmonizationConfig
from freemask.shared.errors import InvalidInput, Unusable, shown
from freemask.shared.image_refs import ImageReader
from freemask.shared.images import encode_png, encode_png16
from freemask.shared.keys import sample_key, step_key, within_a_sample
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.runner import ServiceContext, ServiceParts, StageSpec
from freemask.shared.scene_steps import (
    generation_record,
    validate_planned_source,
    validate_remaining,
    validate_scene_keys,
    validate_scene_step,
)
from freemask.shared.store import ObjectStore
from freemask.v1 import common_pb2, compose_pb2, harmonization_pb2, samples_pb2

RAIN = RainHarmonizer.method
RAIN_MODEL_NAME = "rain"
COMPOSED_KIND = "composed"
METHOD_ENUMS = {
    RAIN: harmonization_pb2.HARMONIZATION_METHOD_RAIN,
    STATISTICS_TRANSFER: harmonization_pb2.HARMONIZATION_METHOD_STATISTICS_TRANSFER,
    COPY_PASTE: harmonization_pb2.HARMONIZATION_METHOD_COPY_PASTE,
}
METHOD_NAMES = {enum: name for name, enum in METHOD_ENUMS.items()}
_FRACTION_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


class Harmonizers:
    """The harmonizer of each method. RAIN's weights load once: at start-up when RAIN is
    the configured default (missing weights stop the service), else on first request."""

    def __init__(self, config: HarmonizationConfig, rain: RainHarmonizer | None = None) -> None:
        self._weights = config.weights or DEFAULT_WEIGHTS_DIR
        self._by_method: dict[str, Harmonizer] = {STATISTICS_TRANSFER: StatisticsTransfer(), COPY_PASTE: CopyPaste()}
        if rain is not None:
            self._by_method[RAIN] = rain
        elif config.method == RAIN:
            self._by_method[RAIN] = RainHarmonizer.from_directory(Path(self._weights))
        self._lock = threading.Lock()

    def get(self, method: str) -> Harmonizer:
        with self._lock:
            if method not in self._by_method:
                if method != RAIN:
                    raise InvalidInput(f"unknown harmonization method {method!r}")
                try:
                    self._by_method[RAIN] = RainHarmonizer.from_directory(Path(self._weights))
                except InvalidInput as err:  # weights missing: an operator's problem, not the request's
                    raise Unusable(f"RAIN is not available: {err}") from None
            return self._by_method[method]


class HarmonizationMetrics:
    """What operators watch: how much of the image pasted objects take, and how much they hide."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._service = metrics.service
        self.area_fraction = Histogram(
            "freemask_harmonization_object_area_fraction", "share of the image the pasted object covers",
            ["service"], buckets=_FRACTION_BUCKETS, registry=metrics.registry)
        self.occluded_fraction = Histogram(
            "freemask_harmonization_occluded_fraction",
            "share of the earlier objects' visible pixels that the pasted object covers", ["service"],
            buckets=_FRACTION_BUCKETS, registry=metrics.registry)

    def observe(self, before: np.ndarray, result: PasteResult) -> None:
        self.area_fraction.labels(self._service).observe(result.object_area / result.object_mask.size)
        visible_before = int(np.count_nonzero(before))
        if visible_before:
            covered = int(np.count_nonzero((before != 0) & result.object_mask))
            self.occluded_fraction.labels(self._service).observe(covered / visible_before)


class Compositor:
    """The core with its harmonizers, shared by both adapters."""

    def __init__(self, harmonizers: Harmonizers, feather_px: int, metrics: HarmonizationMetrics | None = None) -> None:
        self._harmonizers = harmonizers
        self._feather_px = feather_px
        self._metrics = metrics

    def run(self, scene: np.ndarray, labels: np.ndarray, instances: np.ndarray, foreground: np.ndarray,
            mask: np.ndarray, box: PixelBox, class_id: int, instance_id: int, method: str
            ) -> tuple[PasteResult, Harmonizer]:
        harmonizer = self._harmonizers.get(method)
        result = paste(scene, labels, instances, foreground, mask, box, class_id, instance_id, harmonizer,
                       self._feather_px)
        if self._metrics is not None:
            self._metrics.observe(instances, result)
        return result, harmonizer


def _pixel_box(box: common_pb2.BoundingBox) -> PixelBox:
    return box.x, box.y, box.width, box.height


def _bounding_box(box: PixelBox) -> common_pb2.BoundingBox:
    x, y, width, height = box
    return common_pb2.BoundingBox(x=x, y=y, width=width, height=height)


def _model(harmonizer: Harmonizer) -> common_pb2.ModelVersion | None:
    """The weights that touched the pixels; None for a non-learned method."""
    return None if harmonizer.version is None else common_pb2.ModelVersion(name=RAIN_MODEL_NAME,
                                                                            version=harmonizer.version)


def _write_maps(store: ObjectStore, keys: common_pb2.SampleKeys, result: PasteResult) -> None:
    store.put_bytes(keys.image_key, encode_png(result.image), "image/png")
    store.put_bytes(keys.label_key, encode_png(result.labels), "image/png")
    store.put_bytes(keys.instance_map_key, encode_png16(result.instances), "image/png")


class HarmonizationApi:
    """gRPC servicer: one paste, answered as inline PNGs or written under the caller's keys."""

    def __init__(self, reader: ImageReader, compositor: Compositor, store: ObjectStore,
                 config: HarmonizationConfig) -> None:
        self._reader = reader
        self._compositor = compositor
        self._store = store
        self._config = config

    def Harmonize(self, request: harmonization_pb2.HarmonizeRequest) -> harmonization_pb2.HarmonizeResponse:
        method = self._method(request.method)
        keys = self._output_keys(request.output_keys) if request.HasField("output_keys") else None
        if not request.HasField("box"):
            raise InvalidInput("box is missing")
        scene = self._reader.image(request.scene_image, "scene image")
        size = scene.shape[:2]
        labels = (self._reader.labels(request.scene_label_map, "scene label map")
                  if request.HasField("scene_label_map") else np.zeros(size, np.uint8))
        instances = (self._reader.instances(request.scene_instance_map, "scene instance map")
                     if request.HasField("scene_instance_map") else np.zeros(size, np.uint16))
        result, harmonizer = self._compositor.run(
            scene, labels, instances, self._reader.image(request.foreground_image, "foreground image"),
            self._reader.mask(request.foreground_mask, "foreground mask"), _pixel_box(request.box),
            request.class_id, request.instance_id, method)
        if keys is not None:  # everything was checked and computed: nothing is half-written on bad input
            _write_maps(self._store, keys, result)
            image, label_map, instance_map = (common_pb2.ImageRef(store_key=k) for k in
                                              (keys.image_key, keys.label_key, keys.instance_map_key))
        else:
            image, label_map, instance_map = (common_pb2.ImageRef(png=png) for png in
                                              (encode_png(result.image), encode_png(result.labels),
                                               encode_png16(result.instances)))
        return harmonization_pb2.HarmonizeResponse(
            image=image, label_map=label_map, instance_map=instance_map, object_box=_bounding_box(result.object_box),
            object_area_pixels=result.object_area, method=METHOD_ENUMS[harmonizer.method], model=_model(harmonizer))

    def _method(self, requested: int) -> str:
        if requested == harmonization_pb2.HARMONIZATION_METHOD_UNSPECIFIED:
            return self._config.method
        if requested not in METHOD_NAMES:
            raise InvalidInput(f"unknown harmonization method {requested}")
        return METHOD_NAMES[requested]

    @staticmethod
    def _output_keys(keys: common_pb2.SampleKeys) -> common_pb2.SampleKeys:
        for field in ("image_key", "label_key", "instance_map_key"):
            if not getattr(keys, field):
                raise InvalidInput(f"output_keys.{field} is missing: set image_key, label_key and instance_map_key")
            within_a_sample(getattr(keys, field), f"output_keys.{field}")
        for field in ("softmap_key", "meta_key"):
            if getattr(keys, field):
                raise InvalidInput(f"output_keys.{field} must be empty: Harmonize writes only the image and its maps")
        # One paste is one scene: its three files go to one folder, never into several samples at once.
        folders = {getattr(keys, field).rsplit("/", 1)[0] for field in ("image_key", "label_key", "instance_map_key")}
        if len(folders) != 1:
            raise InvalidInput(f"output_keys name {len(folders)} folders ({', '.join(sorted(map(shown, folders)))}); "
                               "the image, label map and instance map of one paste go to one folder")
        return keys


def validate_task(task: compose_pb2.HarmonizeTask, config: FreemaskConfig) -> None:
    """InvalidInput naming the first thing wrong with a HarmonizeTask, before anything is read."""
    validate_scene_step(task, config.world.backgrounds)
    scene = task.scene
    if not scene.keys.label_key:
        raise InvalidInput("scene label_key is missing")
    validate_scene_keys(task)
    ids = [o.instance_id for o in scene.objects]
    if ids != list(range(1, len(ids) + 1)):
        raise InvalidInput(f"scene.objects must hold instances 1..n in paste order, the base object first; got "
                           f"instance ids {ids[:20]}")
    if not scene.keys.instance_map_key and len(ids) != 1:
        raise InvalidInput(f"scene has {len(ids)} objects but no instance_map_key; only the base scene (one object) "
                           "has no instance map")
    validate_planned_source(task.foreground, task.HasField("foreground"), "foreground", task, config.world.classes)
    validate_remaining(task.remaining_objects, task, config.world.classes)
    if not task.HasField("box"):
        raise InvalidInput("box is missing")
    if not 0.0 <= task.placement_score <= 1.0:  # a FOPA heatmap value; NaN fails the test too
        raise InvalidInput(f"placement_score {task.placement_score} is outside [0, 1]")


def composed_sample_meta(sample: samples_pb2.Sample, method: str, feather_px: int) -> bytes:
    """The `meta.json` of a composed sample: the whole Sample in proto3 JSON (objects, keys,
    provenance; `json_format.ParseDict` rebuilds it) and how it was harmonized. No timings."""
    meta = {"kind": COMPOSED_KIND, "method": method, "feather_px": feather_px,
            "sample": json_format.MessageToDict(sample, preserving_proto_field_name=True)}
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")


class HarmonizeStage:
    """Stage adapter: a HarmonizeTask in; the next PlacementTask, or the finished Sample, out."""

    def __init__(self, reader: ImageReader, compositor: Compositor, store: ObjectStore,
                 config: FreemaskConfig) -> None:
        self._reader = reader
        self._compositor = compositor
        self._store = store
        self._config = config

    def handle(self, message: InboundMessage) -> list[OutboundMessage]:
        task = message.decode(compose_pb2.HarmonizeTask)
        validate_task(task, self._config)
        result, harmonizer = self._paste(task)
        objects = self._objects_after(task, result)
        provenance = self._provenance(task, harmonizer)
        if task.remaining_objects:
            return [OutboundMessage(Topics.PLACE, task.sample_id, self._next_step(task, result, objects, provenance))]
        return [OutboundMessage(Topics.COMPOSED, task.sample_id,
                                self._finish(task, result, objects, provenance, harmonizer))]

    def _paste(self, task: compose_pb2.HarmonizeTask) -> tuple[PasteResult, Harmonizer]:
        scene, source = task.scene, task.foreground.source
        image = self._reader.stored_image(scene.keys.image_key, "scene image")
        if image.shape[:2] != (scene.image_size.height, scene.image_size.width):
            raise InvalidInput(f"scene image {scene.keys.image_key!r} is {image.shape[1]}x{image.shape[0]} px; "
                               f"scene.image_size says {scene.image_size.width}x{scene.image_size.height}")
        labels = self._reader.stored_labels(scene.keys.label_key, "scene label map")
        if scene.keys.instance_map_key:
            instances = self._reader.stored_instances(scene.keys.instance_map_key, "scene instance map")
        else:  # step 0: the base single object's label map, whose one object is instance 1
            base = scene.objects[0]
            instances = instance_map_from_labels(labels, base.class_id, base.instance_id)
        return self._compositor.run(
            image, labels, instances, self._reader.stored_image(source.keys.image_key, "foreground image"),
            self._reader.stored_mask(source.keys.label_key, "foreground mask"), _pixel_box(task.box),
            task.foreground.class_id, len(scene.objects) + 1, self._config.harmonization.method)

    @staticmethod
    def _objects_after(task: compose_pb2.HarmonizeTask, result: PasteResult) -> list[common_pb2.ObjectInstance]:
        """The scene's objects with what is left visible of them, then the new one on top."""
        objects = []
        for old in task.scene.objects:
            updated = common_pb2.ObjectInstance()
            updated.CopyFrom(old)
            extent = result.earlier.get(old.instance_id)
            updated.visible_area_pixels = extent.area if extent else 0
            updated.ClearField("box")  # a fully covered object has no box left
            if extent is not None and extent.box is not None:
                updated.box.CopyFrom(_bounding_box(extent.box))
            objects.append(updated)
        source = task.foreground.source
        objects.append(common_pb2.ObjectInstance(
            class_id=task.foreground.class_id, class_name=task.foreground.class_name,
            instance_id=len(task.scene.objects) + 1, box=_bounding_box(result.object_box),
            visible_area_pixels=result.object_area, origin=common_pb2.OBJECT_ORIGIN_PASTED,
            source_sample_id=source.sample_id, source_keys=source.keys, placement_score=task.placement_score))
        return objects

    @staticmethod
    def _provenance(task: compose_pb2.HarmonizeTask, harmonizer: Harmonizer) -> common_pb2.Provenance:
        provenance = common_pb2.Provenance()
        provenance.CopyFrom(task.provenance)
        provenance.generations.append(generation_record(task.foreground.source))
        model = _model(harmonizer)
        if model is not None and not any(m == model for m in provenance.models):  # once, in first-use order
            provenance.models.append(model)
        return provenance

    def _next_step(self, task: compose_pb2.HarmonizeTask, result: PasteResult,
                   objects: list[common_pb2.ObjectInstance], provenance: common_pb2.Provenance
                   ) -> compose_pb2.PlacementTask:
        def key(filename: str) -> str:
            return step_key(task.run_id, task.round, task.sample_id, task.step_index, filename)

        keys = common_pb2.SampleKeys(image_key=key("image.png"), label_key=key("label.png"),
                                     instance_map_key=key("instances.png"))
        _write_maps(self._store, keys, result)
        return compose_pb2.PlacementTask(
            run_id=task.run_id, round=task.round, sample_id=task.sample_id, background_name=task.background_name,
            scene=compose_pb2.SceneState(keys=keys, image_size=task.scene.image_size, objects=objects),
            next_object=task.remaining_objects[0], remaining_objects=task.remaining_objects[1:],
            step_index=task.step_index + 1, seed=task.seed, provenance=provenance)

    def _finish(self, task: compose_pb2.HarmonizeTask, result: PasteResult, objects: list[common_pb2.ObjectInstance],
                provenance: common_pb2.Provenance, harmonizer: Harmonizer) -> samples_pb2.Sample:
        def key(filename: str) -> str:
            return sample_key(task.run_id, task.round, task.sample_id, filename)

        keys = common_pb2.SampleKeys(image_key=key("image.png"), label_key=key("label.png"),
                                     instance_map_key=key("instances.png"), meta_key=key("meta.json"))
        sample = samples_pb2.Sample(
            sample_id=task.sample_id, run_id=task.run_id, round=task.round, kind=samples_pb2.SAMPLE_KIND_COMPOSED,
            keys=keys, image_size=task.scene.image_size, background_name=task.background_name, objects=objects,
            provenance=provenance)
        _write_maps(self._store, keys, result)
        # meta.json goes last: a reader that finds it knows the maps are complete.
        self._store.put_bytes(keys.meta_key, composed_sample_meta(sample, harmonizer.method,
                                                                  self._config.harmonization.feather_px),
                              "application/json")
        return sample


def build(context: ServiceContext) -> ServiceParts:
    config = context.config
    compositor = Compositor(Harmonizers(config.harmonization), config.harmonization.feather_px,
                            HarmonizationMetrics(context.metrics))
    reader = ImageReader(context.store, config.limits)
    stage = HarmonizeStage(reader, compositor, context.store, config)
    descriptor = harmonization_pb2.DESCRIPTOR.services_by_name["Harmonization"]
    return ServiceParts(grpc_services=[(descriptor, HarmonizationApi(reader, compositor, context.store,
                                                                     config.harmonization))],
                        stage=StageSpec(Topics.HARMONIZE, stage.handle))
