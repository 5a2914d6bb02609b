"""The scoring core without a network: datasets, stored segmenters, training and scoring,
over an in-memory store and reference-world scenes.

Covered: unusable pairs are skipped with a logged reason; a stored segmenter is refused
when its manifest, classes or weights do not match; a tiny training run lowers the loss;
a training job stopped midway and resumed ends with exactly the weights of an
uninterrupted one; a finished model is reused; augmentation keeps pixels and labels
aligned; samples are scored with their own round's segmenter.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from freemask.scoring.data import LabelledPair, dataset_pairs, load_pairs
from freemask.scoring.models import ModelMismatch, SegmenterStore, model_version
from freemask.scoring.segmenter import Segmenter
from freemask.scoring.scorer import Scorer, SegmenterCache, label_names
from freemask.scoring.train import SegmenterTrainer, TrainingStopped, TrainProgress, TrainSpec, augment_pair
from freemask.shared.config import FreemaskConfig, ScoringConfig, load_config
from freemask.shared.errors import InvalidInput, NotFound, Unusable
from freemask.shared.image_refs import ImageReader
from freemask.shared.images import encode_png
from freemask.v1 import common_pb2, samples_pb2, scoring_pb2
from freemask.world import dataset

from memory_store import MemoryStore

SIZE = 32
SETTINGS = ScoringConfig(input_size=32, batch_size=4, checkpoint_every_steps=2, epochs=2)


@pytest.fixture(scope="module")
def config() -> FreemaskConfig:
    return load_config(environ={})


@pytest.fixture()
def store() -> MemoryStore:
    return MemoryStore()


def put_scene(store: MemoryStore, prefix: str, split: str, index: int) -> LabelledPair:
    scene = dataset(split, index, SIZE)
    pair = LabelledPair(f"{prefix}/image.png", f"{prefix}/label.png")
    store.put_bytes(pair.image_key, encode_png(scene.image))
    store.put_bytes(pair.label_key, encode_png(scene.label))
    return pair


def scene_pairs(store: MemoryStore, count: int) -> tuple[LabelledPair, ...]:
    return tuple(put_scene(store, f"data/{i}", "train", i) for i in range(count))


def trainer_for(store: MemoryStore, config: FreemaskConfig, settings: ScoringConfig = SETTINGS) -> SegmenterTrainer:
    return SegmenterTrainer(settings, label_names(config), SegmenterStore(store), ImageReader(store, config.limits))


# --- datasets ---------------------------------------------------------------------------

def test_unusable_pairs_are_skipped_with_their_reason(store: MemoryStore, config: FreemaskConfig,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    good = scene_pairs(store, 2)
    store.put_bytes("bad/not-an-image.png", b"these bytes are no PNG")
    store.put_bytes("bad/small-label.png", encode_png(np.zeros((8, 8), np.uint8)))
    store.put_bytes("bad/unknown-class.png", encode_png(np.full((SIZE, SIZE), 40, np.uint8)))
    store.put_bytes("bad/all-ignored.png", encode_png(np.full((SIZE, SIZE), 255, np.uint8)))
    bad = [LabelledPair("bad/not-an-image.png", good[0].label_key),
           LabelledPair(good[0].image_key, "bad/small-label.png"),
           LabelledPair(good[0].image_key, "bad/unknown-class.png"),
           LabelledPair(good[0].image_key, "bad/all-ignored.png"),
           LabelledPair("bad/missing.png", good[0].label_key)]
    with caplog.at_level(logging.WARNING):
        loaded = load_pairs([good[0], *bad, good[1]], ImageReader(store, config.limits), len(label_names(config)))
    assert len(loaded) == 2 and [pair for pair, _ in loaded.skipped] == bad
    reasons = [reason for _, reason in loaded.skipped]
    for reason, fragment in zip(reasons, ["not a PNG or JPEG", "8x8 px but the image is 32x32", "class ids [40]",
                                          "no labelled pixel", "no object at"]):
        assert fragment in reason
    assert sum("skipping a labelled image" in r.message for r in caplog.records) == 5


def test_a_dataset_of_only_unusable_pairs_is_refused(store: MemoryStore, config: FreemaskConfig) -> None:
    store.put_bytes("bad/a.png", b"junk")
    loaded = load_pairs([LabelledPair("bad/a.png", "bad/a.png")], ImageReader(store, config.limits), 13)
    with pytest.raises(InvalidInput, match="all 1 were skipped"):
        loaded.require_some()


def test_a_manifest_lists_pairs_and_a_malformed_one_is_refused(store: MemoryStore) -> None:
    lines = [json.dumps({"image_key": f"d/{i}/image.png", "label_key": f"d/{i}/label.png"}) for i in range(3)]
    store.put_bytes("m/good.jsonl", ("\n".join(lines) + "\n\n").encode())
    pairs = dataset_pairs(scoring_pb2.Dataset(manifest_key="m/good.jsonl"), store)
    assert pairs == [LabelledPair(f"d/{i}/image.png", f"d/{i}/label.png") for i in range(3)]
    store.put_bytes("m/bad.jsonl", (lines[0] + "\n{not json\n").encode())
    with pytest.raises(InvalidInput, match="line 2 is not JSON"):
        dataset_pairs(scoring_pb2.Dataset(manifest_key="m/bad.jsonl"), store)
    store.put_bytes("m/escape.jsonl", json.dumps({"image_key": "../x.png", "label_key": "y.png"}).encode())
    with pytest.raises(InvalidInput, match="line 1 image_key"):
        dataset_pairs(scoring_pb2.Dataset(manifest_key="m/escape.jsonl"), store)
    with pytest.raises(InvalidInput, match="does not exist"):
        dataset_pairs(scoring_pb2.Dataset(manifest_key="m/missing.jsonl"), store)
    with pytest.raises(InvalidInput, match="dataset is missing"):
        dataset_pairs(scoring_pb2.Dataset(), store)
    with pytest.raises(InvalidInput, match="holds 1..1000000 images, got 0"):
        dataset_pairs(scoring_pb2.Dataset(images=scoring_pb2.LabelledImageList()), store)


def test_a_written_manifest_reads_back_as_the_same_pairs(store: MemoryStore) -> None:
    from freemask.scoring.data import write_manifest

    pairs = [LabelledPair(f"d/{i}/image.png", f"d/{i}/label.png") for i in range(3)]
    write_manifest(store, "m/written.jsonl", pairs)
    assert dataset_pairs(scoring_pb2.Dataset(manifest_key="m/written.jsonl"), store) == pairs


# --- stored segmenters ------------------------------------------------------------------

def saved_segmenter(store: MemoryStore, config: FreemaskConfig, run_id: str = "run-a", round_index: int = 0
                    ) -> Segmenter:
    segmenter = Segmenter.create("tiny", label_names(config), 32, seed=3)
    SegmenterStore(store).save(run_id, round_index, segmenter, {"note": "untrained"})
    return segmenter


def test_a_stored_segmenter_loads_with_the_same_predictions(store: MemoryStore, config: FreemaskConfig) -> None:
    original = saved_segmenter(store, config)
    loaded = SegmenterStore(store).load(model_version("run-a", 0), label_names(config))
    images = [dataset("val", i, SIZE).image for i in range(3)]
    assert loaded.version == common_pb2.ModelVersion(name="segmenter", version="run-a/0")
    for ours, theirs in zip(original.predict(images), loaded.segmenter.predict(images)):
        np.testing.assert_array_equal(ours, theirs)


def copy_model(store: MemoryStore, source_round: int, target_round: int) -> None:
    for name in ("model.safetensors", "segmenter.json"):
        store.put_bytes(f"models/segmenter/run-a/{target_round}/{name}",
                        store.get_bytes(f"models/segmenter/run-a/{source_round}/{name}"))


def test_a_segmenter_copied_to_another_round_is_refused(store: MemoryStore, config: FreemaskConfig) -> None:
    saved_segmenter(store, config)
    copy_model(store, 0, 5)
    with pytest.raises(ModelMismatch, match="'run-a/5': its manifest says it is 'segmenter' version 'run-a/0'"):
        SegmenterStore(store).load(model_version("run-a", 5), label_names(config))


def test_overwritten_weights_are_refused(store: MemoryStore, config: FreemaskConfig) -> None:
    saved_segmenter(store, config)
    key = "models/segmenter/run-a/0/model.safetensors"
    data = bytearray(store.get_bytes(key))
    data[-1] ^= 0xFF
    store.put_bytes(key, bytes(data))
    with pytest.raises(ModelMismatch, match="does not match the sha256"):
        SegmenterStore(store).load(model_version("run-a", 0), label_names(config))


def test_a_segmenter_of_other_classes_is_refused(store: MemoryStore, config: FreemaskConfig) -> None:
    saved_segmenter(store, config)
    reordered = ("background", *reversed(config.world.classes))
    with pytest.raises(ModelMismatch, match="was trained for classes"):
        SegmenterStore(store).load(model_version("run-a", 0), reordered)


def test_missing_or_misnamed_segmenters_are_named(store: MemoryStore, config: FreemaskConfig) -> None:
    with pytest.raises(NotFound, match="'run-a/3' does not exist"):
        SegmenterStore(store).load(model_version("run-a", 3), label_names(config))
    for model, fragment in [(common_pb2.ModelVersion(name="fopa", version="run-a/0"), "is not a segmenter"),
                            (common_pb2.ModelVersion(name="segmenter", version="run-a"), "must be '{run}/{round}'"),
                            (common_pb2.ModelVersion(name="segmenter", version="Run_A/0"), "not a valid id")]:
        with pytest.raises(InvalidInput, match=fragment):
            SegmenterStore(store).load(model, label_names(config))


# --- training ---------------------------------------------------------------------------

def test_augmentation_keeps_pixels_and_labels_aligned() -> None:
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[4:12, 3:20] = 2
    label[20:30, 22:31] = 5
    image = np.stack([label * 40] * 3, axis=-1).astype(np.uint8)  # the colour spells the label
    rng = np.random.default_rng(0)
    for _ in range(20):
        out_image, out_label = augment_pair(image, label, rng, min_crop=0.5, colour_jitter=0.0)
        assert out_image.shape[:2] == out_label.shape and min(out_label.shape) >= SIZE // 2
        np.testing.assert_array_equal(out_image[..., 0] // 40, out_label)


def batch_loss(segmenter: Segmenter, store: MemoryStore, pairs: tuple[LabelledPair, ...],
               config: FreemaskConfig) -> float:
    data = load_pairs(pairs, ImageReader(store, config.limits), segmenter.num_classes)
    from freemask.scoring.segmenter import Batch

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        batch = Batch(pixels=segmenter.to_input(data.images), labels=segmenter.label_input(data.labels))
        return float(segmenter.loss(batch))


def test_a_short_training_run_lowers_the_loss(store: MemoryStore, config: FreemaskConfig) -> None:
    pairs = scene_pairs(store, 8)
    spec = TrainSpec("run-a", 0, pairs, epochs=6, seed=0)
    before = batch_loss(Segmenter.create("tiny", label_names(config), 32, seed=0), store, pairs, config)
    progress = TrainProgress()
    version = trainer_for(store, config, SETTINGS.model_copy(update={"learning_rate": 1e-3})).run(spec, progress)
    after = batch_loss(SegmenterStore(store).load(version, label_names(config)).segmenter, store, pairs, config)
    assert progress.step == progress.total_steps == 12 and progress.epoch == 6
    assert after < 0.9 * before, (before, after)


def test_a_stopped_job_resumes_to_the_weights_of_an_uninterrupted_one(config: FreemaskConfig) -> None:
    uninterrupted, interrupted = MemoryStore(), MemoryStore()
    pairs = scene_pairs(uninterrupted, 10)
    assert scene_pairs(interrupted, 10) == pairs
    spec = TrainSpec("run-a", 0, pairs, epochs=2, seed=5)  # 3 steps per epoch
    trainer_for(uninterrupted, config).run(spec)

    asked = []

    def stop_at_fourth_step() -> bool:
        asked.append(True)
        return len(asked) == 5  # asked before each step: stop before step 5 runs

    with pytest.raises(TrainingStopped, match="stopped at step 4 of 6"):
        trainer_for(interrupted, config).run(spec, should_stop=stop_at_fourth_step)
    assert interrupted.exists("models/segmenter/run-a/0/checkpoint.pt")
    assert not interrupted.exists("models/segmenter/run-a/0/segmenter.json")
    progress = TrainProgress()
    trainer_for(interrupted, config).run(spec, progress)
    assert progress.resumed_from_step == 4 and progress.step == 6
    assert not interrupted.exists("models/segmenter/run-a/0/checkpoint.pt")
    assert (interrupted.get_bytes("models/segmenter/run-a/0/model.safetensors")
            == uninterrupted.get_bytes("models/segmenter/run-a/0/model.safetensors"))


def test_a_checkpoint_of_another_spec_is_not_resumed(store: MemoryStore, config: FreemaskConfig) -> None:
    pairs = scene_pairs(store, 4)
    with pytest.raises(TrainingStopped):
        trainer_for(store, config).run(TrainSpec("run-a", 0, pairs, epochs=3, seed=1), should_stop=lambda: True)
    progress = TrainProgress()
    trainer_for(store, config).run(TrainSpec("run-a", 0, pairs, epochs=1, seed=2), progress)
    assert progress.resumed_from_step is None and progress.step == 1


def test_a_finished_model_of_the_same_spec_is_reused(store: MemoryStore, config: FreemaskConfig) -> None:
    pairs = scene_pairs(store, 4)
    spec = TrainSpec("run-a", 0, pairs, epochs=1, seed=1)
    trainer_for(store, config).run(spec)
    weights = store.get_bytes("models/segmenter/run-a/0/model.safetensors")
    for pair in pairs:  # reuse must not even read the data again
        store.delete(pair.image_key)
    progress = TrainProgress()
    assert trainer_for(store, config).run(spec, progress) == model_version("run-a", 0)
    assert progress.step == progress.total_steps == 1 and progress.images == 4  # as the stored run reported
    assert store.get_bytes("models/segmenter/run-a/0/model.safetensors") == weights


@pytest.mark.parametrize("fields, fragment", [
    ({"run_id": "../up"}, "run_id"),
    ({"round": -1}, "round"),
    ({"epochs": 0}, "epochs must be in"),
    ({"pairs": ()}, "dataset is empty"),
    ({"init_from": common_pb2.ModelVersion(name="rain", version="x")}, "is not a segmenter"),
])
def test_bad_train_specs_are_refused(fields: dict, fragment: str) -> None:
    spec = {"run_id": "run-a", "round": 0, "pairs": (LabelledPair("a.png", "b.png"),), "epochs": 1, "seed": 0,
            **fields}
    with pytest.raises(InvalidInput, match=fragment):
        TrainSpec(**spec)


# --- scoring ----------------------------------------------------------------------------

def sample(store: MemoryStore, run_id: str, round_index: int, sample_id: str, index: int) -> samples_pb2.Sample:
    prefix = f"runs/{run_id}/rounds/{round_index}/samples/{sample_id}"
    put_scene(store, prefix, "val", index)
    return samples_pb2.Sample(sample_id=sample_id, run_id=run_id, round=round_index,
                              kind=samples_pb2.SAMPLE_KIND_COMPOSED,
                              keys=common_pb2.SampleKeys(image_key=f"{prefix}/image.png",
                                                         label_key=f"{prefix}/label.png"))


def scorer_for(store: MemoryStore, config: FreemaskConfig) -> Scorer:
    cache = SegmenterCache(SegmenterStore(store), label_names(config), 2, torch.device("cpu"))
    return Scorer(cache, ImageReader(store, config.limits), config)


def test_each_sample_is_scored_by_its_own_rounds_segmenter(store: MemoryStore, config: FreemaskConfig) -> None:
    first = saved_segmenter(store, config, round_index=0)
    saved_segmenter(store, config, round_index=1)
    samples = [sample(store, "run-a", 1, "s-1", 0), sample(store, "run-a", 0, "s-0", 1)]
    scored = scorer_for(store, config).score(samples)
    assert [s.segmenter.version for s in scored] == ["run-a/1", "run-a/0"]
    assert [s.sample for s in scored] == samples
    scene = dataset("val", 1, SIZE)
    prediction = first.predict([scene.image])[0]
    names = label_names(config)
    present = sorted(set(np.unique(prediction)) | set(np.unique(scene.label)) - {255})
    assert sorted(scored[1].class_iou) == sorted(names[c] for c in present)
    assert 0.0 <= scored[1].score <= 1.0


def test_a_sample_whose_label_is_the_prediction_scores_one(store: MemoryStore, config: FreemaskConfig) -> None:
    segmenter = saved_segmenter(store, config)
    scored_sample = sample(store, "run-a", 0, "s-1", 2)
    image = dataset("val", 2, SIZE).image
    store.put_bytes(scored_sample.keys.label_key, encode_png(segmenter.predict([image])[0]))
    assert scorer_for(store, config).score([scored_sample])[0].score == pytest.approx(1.0)


def test_bad_samples_and_missing_models_are_named(store: MemoryStore, config: FreemaskConfig) -> None:
    scorer = scorer_for(store, config)
    good = sample(store, "run-a", 0, "s-1", 0)
    with pytest.raises(NotFound, match="'run-a/0' does not exist"):
        scorer.score([good])
    outside = samples_pb2.Sample()
    outside.CopyFrom(good)
    outside.keys.image_key = "runs/run-a/rounds/0/samples/other/image.png"
    with pytest.raises(InvalidInput, match="lies outside"):
        scorer.score([outside])
    with pytest.raises(Unusable, match="no segmenter is loaded yet"):
        scorer.evaluate([LabelledPair(good.keys.image_key, good.keys.label_key)], None)


def test_a_segmenter_retrained_under_its_version_replaces_the_cached_copy(store: MemoryStore,
                                                                           config: FreemaskConfig) -> None:
    scorer = scorer_for(store, config)
    scored_sample = sample(store, "run-a", 0, "s-1", 3)
    image = dataset("val", 3, SIZE).image
    first = saved_segmenter(store, config)
    store.put_bytes(scored_sample.keys.label_key, encode_png(first.predict([image])[0]))
    assert scorer.score([scored_sample])[0].score == pytest.approx(1.0)
    second = Segmenter.create("tiny", label_names(config), 32, seed=11)
    SegmenterStore(store).save("run-a", 0, second, {"note": "retrained"})
    store.put_bytes(scored_sample.keys.label_key, encode_png(second.predict([image])[0]))
    assert not np.array_equal(first.predict([image])[0], second.predict([image])[0])
    assert scorer.score([scored_sample])[0].score == pytest.approx(1.0)  # scored by the new weights


@pytest.mark.parametrize("preset, low, high", [("tiny", 1.0e6, 3.0e6), ("r50", 40e6, 50e6), ("swin-b", 100e6, 115e6)])
def test_presets_build_mask2formers_of_the_expected_size(preset: str, low: float, high: float) -> None:
    from transformers import Mask2FormerForUniversalSegmentation

    from freemask.scoring.segmenter import model_config

    with torch.device("meta"):  # shapes only: no memory, no download
        model = Mask2FormerForUniversalSegmentation(model_config(preset, num_labels=21, input_size=512))
    parameters = sum(p.numel() for p in model.parameters())
    assert low <= parameters <= high, parameters
    assert model.config.backbone_config.model_type == ("resnet" if preset == "r50" else "swin")
    assert model.config.use_pretrained_backbone is False


def test_an_unknown_preset_is_named() -> None:
    from freemask.scoring.segmenter import model_config

    with pytest.raises(InvalidInput, match="unknown segmenter preset 'vit'"):
        model_config("vit", num_labels=3, input_size=64)
