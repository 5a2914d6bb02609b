"""`freemask scoring train|evaluate`: the scoring core run in the calling process, on a
manifest in the configured store (the service does the same behind Scoring.Train)."""

from __future__ import annotations

from collections.abc import Callable

from freemask.scoring.data import dataset_pairs
from freemask.scoring.models import SegmenterStore, model_version
from freemask.scoring.scorer import Scorer, SegmenterCache, label_names, scoring_device
from freemask.scoring.train import SegmenterTrainer, TrainProgress, TrainSpec
from freemask.shared.config import FreemaskConfig
from freemask.shared.image_refs import ImageReader
from freemask.shared.keys import parse_segmenter_version
from freemask.shared.store import ObjectStore
from freemask.v1 import common_pb2, scoring_pb2


def _segmenter(version: str) -> common_pb2.ModelVersion:
    return model_version(*parse_segmenter_version(version))


def train_manifest(config: FreemaskConfig, manifest_key: str, run_id: str, round_index: int, epochs: int | None,
                   seed: int, init_from: str | None, report: Callable[[int, int, float], None],
                   should_stop: Callable[[], bool]) -> tuple[common_pb2.ModelVersion, TrainProgress]:
    store = ObjectStore(config.store)
    pairs = dataset_pairs(scoring_pb2.Dataset(manifest_key=manifest_key), store)
    spec = TrainSpec(run_id=run_id, round=round_index, pairs=tuple(pairs),
                     epochs=config.scoring.epochs if epochs is None else epochs, seed=seed,
                     init_from=_segmenter(init_from) if init_from else None)
    trainer = SegmenterTrainer(config.scoring, label_names(config), SegmenterStore(store),
                               ImageReader(store, config.limits), scoring_device(config))
    progress = TrainProgress()
    version = trainer.run(spec, progress, should_stop, report)
    return version, progress


def evaluate_manifest(config: FreemaskConfig, manifest_key: str, version: str) -> scoring_pb2.EvaluateResponse:
    store = ObjectStore(config.store)
    names = label_names(config)
    scorer = Scorer(SegmenterCache(SegmenterStore(store), names, 1, scoring_device(config)),
                    ImageReader(store, config.limits), config)
    return scorer.evaluate(dataset_pairs(scoring_pb2.Dataset(manifest_key=manifest_key), store),
                           _segmenter(version))
