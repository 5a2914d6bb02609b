"""The scoring core: segmenters loaded from the store, S(x) for samples, mIoU for datasets.

Each sample is scored by its own round's segmenter f_t (`models/segmenter/{run}/{round}/`)
unless a caller names another; the version used is in every ScoredSample.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from freemask.scoring.data import LabelledPair, check_label_map, load_pairs
from freemask.scoring.iou import ConfusionAccumulator, sample_score
from freemask.scoring.metrics import ScoringMetrics
from freemask.scoring.models import LoadedSegmenter, SegmenterStore, check_model_version, model_version
from freemask.shared.config import FreemaskConfig
from freemask.shared.devices import resolve_device
from freemask.shared.errors import InvalidInput, Unusable, shown
from freemask.shared.image_refs import ImageReader
from freemask.shared.keys import key_within, sample_prefix, validate_id, validate_round
from freemask.shared.scene_steps import require_finite
from freemask.v1 import common_pb2, samples_pb2, scoring_pb2

BACKGROUND_NAME = "background"


def scoring_device(config: FreemaskConfig) -> torch.device:
    return resolve_device(config.scoring.device, "scoring.device")


def label_names(config: FreemaskConfig) -> tuple[str, ...]:
    """Names of label ids 0..C: background, then the configured classes in order."""
    return (BACKGROUND_NAME, *config.world.classes)


class SegmenterCache:
    """The last few segmenters used, by version; loading checks each one (models.py), and
    each use compares the stored manifest's weights digest with the copy in memory."""

    def __init__(self, models: SegmenterStore, class_names: Sequence[str], capacity: int,
                 device: torch.device) -> None:
        self._models = models
        self._class_names = tuple(class_names)
        self._capacity = capacity
        self._device = device
        self._loaded: OrderedDict[str, LoadedSegmenter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: common_pb2.ModelVersion | None) -> LoadedSegmenter:
        """`model`, or with None the one used last (FAILED_PRECONDITION if none is loaded yet)."""
        with self._lock:
            if model is None:
                if not self._loaded:
                    raise Unusable("no segmenter is loaded yet: name one (name 'segmenter', version '{run}/{round}')")
                return next(reversed(self._loaded.values()))
            run_id, round_index = check_model_version(model)
            cached = self._loaded.get(model.version)
            if cached is not None:
                # A version retrained under the same name (another spec) has new weights: the
                # manifest's digest says whether the copy in memory is still the stored one.
                manifest = self._models.manifest(run_id, round_index)
                if manifest is not None and manifest.get("weights_sha256") == cached.manifest["weights_sha256"]:
                    self._loaded.move_to_end(model.version)
                    return cached
            loaded = self._models.load(model, self._class_names, self._device)
            self._loaded[model.version] = loaded
            while len(self._loaded) > self._capacity:
                self._loaded.popitem(last=False)
            return loaded


class Scorer:
    """The core both adapters use: S(x) for samples, mIoU for labelled datasets."""

    def __init__(self, cache: SegmenterCache, reader: ImageReader, config: FreemaskConfig,
                 metrics: ScoringMetrics | None = None) -> None:
        self._cache = cache
        self._reader = reader
        self._names = label_names(config)
        self._batch = config.scoring.score_batch
        self._metrics = metrics

    def score(self, samples: Sequence[samples_pb2.Sample],
              model: common_pb2.ModelVersion | None = None) -> list[samples_pb2.ScoredSample]:
        """Score every sample (with its own round's segmenter unless `model` is given); all or nothing."""
        for sample in samples:
            validate_sample(sample, self._names[1:])
        if model is not None:
            check_model_version(model)
        pixels = [self._read(sample) for sample in samples]
        by_model: dict[str, tuple[common_pb2.ModelVersion, list[int]]] = {}
        for index, sample in enumerate(samples):
            version = model if model is not None else model_version(sample.run_id, sample.round)
            by_model.setdefault(version.version, (version, []))[1].append(index)
        scored: list[samples_pb2.ScoredSample | None] = [None] * len(samples)
        for version, indices in by_model.values():
            loaded = self._cache.get(version)
            predictions = self._predict(loaded, [pixels[i][0] for i in indices])
            for index, prediction in zip(indices, predictions):
                result = sample_score(pixels[index][1], prediction, len(self._names))
                scored[index] = samples_pb2.ScoredSample(
                    sample=samples[index], score=result.score, segmenter=loaded.version,
                    class_iou={self._names[c]: iou for c, iou in result.class_iou.items()})
                if self._metrics is not None:
                    self._metrics.scores.observe(result.score)
        return [s for s in scored if s is not None]

    def evaluate(self, pairs: Sequence[LabelledPair], model: common_pb2.ModelVersion | None
                 ) -> scoring_pb2.EvaluateResponse:
        """mIoU and per-class IoU of a segmenter over labelled pairs (unusable pairs skipped)."""
        loaded = self._cache.get(model)
        data = load_pairs(pairs, self._reader, len(self._names)).require_some()
        accumulator = ConfusionAccumulator(len(self._names))
        for label, prediction in zip(data.labels, self._predict(loaded, data.images)):
            accumulator.add(label, prediction)
        mean_iou, ious = accumulator.result()
        if self._metrics is not None:
            self._metrics.skipped.inc(len(data.skipped))
        return scoring_pb2.EvaluateResponse(
            mean_iou=mean_iou, class_iou={self._names[c]: iou for c, iou in ious.items()}, num_images=len(data),
            skipped_images=len(data.skipped), model=loaded.version)

    def _predict(self, loaded: LoadedSegmenter, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        predictions: list[np.ndarray] = []
        for start in range(0, len(images), self._batch):
            predictions.extend(loaded.segmenter.predict(images[start:start + self._batch]))
        return predictions

    def _read(self, sample: samples_pb2.Sample) -> tuple[np.ndarray, np.ndarray]:
        image = self._reader.stored_image(sample.keys.image_key, f"sample {sample.sample_id} image")
        label = self._reader.stored_labels(sample.keys.label_key, f"sample {sample.sample_id} label map")
        try:
            check_label_map(label, image, len(self._names))
        except InvalidInput as err:
            raise InvalidInput(f"sample {sample.sample_id}: {err}") from None
        return image, label


def validate_sample(sample: samples_pb2.Sample, class_names: Sequence[str] | None = None) -> None:
    """InvalidInput naming what is wrong with a Sample before anything is read; with `class_names`
    (the configured classes), every object must name one of them."""
    validate_id(sample.sample_id, "sample_id")
    validate_id(sample.run_id, "run_id")
    validate_round(sample.round)
    if sample.kind == samples_pb2.SAMPLE_KIND_UNSPECIFIED:
        raise InvalidInput(f"sample {sample.sample_id}: kind is unspecified")
    if sample.kind not in (samples_pb2.SAMPLE_KIND_SINGLE, samples_pb2.SAMPLE_KIND_COMPOSED):
        raise InvalidInput(f"sample {sample.sample_id}: kind {sample.kind} is not a known SampleKind")
    # The sample travels on to the coordinator and the accepted topic as it came: a NaN in it would
    # reach every consumer, and a NaN score compares false with the α cut.
    require_finite(sample, f"sample {sample.sample_id}")
    if class_names is not None:
        for index, instance in enumerate(sample.objects):
            if instance.class_name not in class_names:
                raise InvalidInput(f"sample {sample.sample_id}: objects[{index}] has unknown class "
                                   f"{shown(instance.class_name, 64)}; known classes: {', '.join(class_names)}")
    prefix = sample_prefix(sample.run_id, sample.round, sample.sample_id)
    for field in ("image_key", "label_key"):
        if not getattr(sample.keys, field):
            raise InvalidInput(f"sample {sample.sample_id}: keys.{field} is missing")
        key_within(getattr(sample.keys, field), prefix, f"sample {sample.sample_id} keys.{field}")
