"""The scoring service on real servers: SeaweedFS for pixels and weights, Tansu for
samples, and a tiny Mask2Former trained here on a few 32 px scenes of the reference world.

Covered: `Train` over a real gRPC server (one job per run and round, polled to
SUCCEEDED, the model and its manifest in the store, no checkpoint left; a restarted
service reusing the finished model); a JSONL manifest with an unreadable image and a
mismatched pair trains with both skipped, a dataset of nothing usable fails its job;
bad Train requests answered INVALID_ARGUMENT with nothing written; `Score` giving
S(x) = IoU(f_t(x), y_pseudo), 1.0 when the label is the model's own prediction;
unknown models NOT_FOUND, bad samples and model names INVALID_ARGUMENT; a segmenter
copied to another round or overwritten refused; `Evaluate`; the stage
`composed → scored` through the broker, a sample of an untrained round retried and
dead-lettered, a bad one dead-lettered at once; `freemask scoring train` killed with
SIGKILL, resumed from its checkpoint to the very weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from freemask.coordinator.rounds import Train
from freemask.coordinator.service import ScoringClient
from freemask.scoring.iou import sample_score
from freemask.scoring.models import SegmenterStore
from freemask.scoring.scorer import label_names
from freemask.scoring.service import build
from freemask.shared.bus import StageWorker, Topics
from freemask.shared.config import FreemaskConfig
from freemask.shared.errors import InvalidInput, NotFound, Unavailable
from freemask.shared.images import encode_png
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.v1 import common_pb2, dead_letter_pb2, samples_pb2, scoring_pb2
from freemask.world import dataset

from bus_helpers import drain_records, publish_samples, unique_topics
from conftest import config_for
from grpc_helpers import serving, unary_call

pytestmark = pytest.mark.stack

SIZE = 32
BATCH = 4
EPOCHS = 2
TRAIN_IMAGES = 8
MAX_ATTEMPTS = 2
CALL_TIMEOUT_S = 60.0
TRAIN_TIMEOUT_S = 120.0
SETTINGS = {"FREEMASK_SCORING__INPUT_SIZE": str(SIZE), "FREEMASK_SCORING__BATCH_SIZE": str(BATCH),
            "FREEMASK_SCORING__EPOCHS": str(EPOCHS), "FREEMASK_SCORING__DEVICE": "cpu"}


@pytest.fixture(scope="module")
def config(stack: EmbeddedStack) -> FreemaskConfig:
    return config_for(stack, **SETTINGS, FREEMASK_BUS__GROUP_PREFIX=f"scoring-{uuid.uuid4().hex[:8]}",
                      FREEMASK_BUS__MAX_ATTEMPTS=str(MAX_ATTEMPTS), FREEMASK_BUS__RETRY_BACKOFF_S="0.1")


@pytest.fixture(scope="module")
def store(config: FreemaskConfig) -> ObjectStore:
    return ObjectStore(config.store)


@pytest.fixture(scope="module")
def parts(config: FreemaskConfig, one_torch_thread: None) -> Iterator[ServiceParts]:
    """The service as `freemask serve scoring` wires it; its training thread stopped at the end."""
    built = build(ServiceContext("scoring", config, ServiceMetrics("scoring")))
    yield built
    assert built.on_stop is not None
    built.on_stop()


@pytest.fixture(scope="module")
def target(config: FreemaskConfig, parts: ServiceParts) -> Iterator[str]:
    with serving(config, parts.grpc_services, "scoring") as target:
        yield target


def call(target: str, method: str, request, response_type):
    return unary_call(target, "Scoring", method, request, response_type, CALL_TIMEOUT_S)


def train(target: str, request: scoring_pb2.TrainRequest) -> str:
    return call(target, "Train", request, scoring_pb2.TrainResponse).job_id


def status(target: str, job_id: str) -> scoring_pb2.TrainStatusResponse:
    return call(target, "TrainStatus", scoring_pb2.TrainStatusRequest(job_id=job_id),
                scoring_pb2.TrainStatusResponse)


def finished(target: str, job_id: str) -> scoring_pb2.TrainStatusResponse:
    """TrainStatus once the job has succeeded or failed."""
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        answer = status(target, job_id)
        if answer.state in (scoring_pb2.TRAIN_STATE_SUCCEEDED, scoring_pb2.TRAIN_STATE_FAILED):
            return answer
        assert time.monotonic() < deadline, f"job {job_id} still {answer} after {TRAIN_TIMEOUT_S} s"
        time.sleep(0.2)


def rpc_error(target: str, method: str, request, response_type) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(target, method, request, response_type)
    return info.value


def segmenter(version: str) -> common_pb2.ModelVersion:
    return common_pb2.ModelVersion(name="segmenter", version=version)


def new_run() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


# --- data ------------------------------------------------------------------------------------------------------

def write_pair(store: ObjectStore, prefix: str, image: np.ndarray, label: np.ndarray) -> scoring_pb2.LabelledImage:
    pair = scoring_pb2.LabelledImage(image_key=prefix + "image.png", label_key=prefix + "label.png")
    store.put_bytes(pair.image_key, encode_png(image), "image/png")
    store.put_bytes(pair.label_key, encode_png(label), "image/png")
    return pair


def world_pairs(store: ObjectStore, tag: str, split: str, count: int) -> list[scoring_pb2.LabelledImage]:
    """`count` scenes of the reference world at 32 px, written under `datasets/{tag}/`."""
    pairs = []
    for index in range(count):
        scene = dataset(split, index, SIZE)
        pairs.append(write_pair(store, f"datasets/{tag}/{index}/", scene.image, scene.label))
    return pairs


def inline(pairs: list[scoring_pb2.LabelledImage]) -> scoring_pb2.Dataset:
    return scoring_pb2.Dataset(images=scoring_pb2.LabelledImageList(images=pairs))


def write_manifest(store: ObjectStore, key: str, lines: list[str]) -> str:
    store.put_bytes(key, ("\n".join(lines) + "\n").encode(), "application/x-ndjson")
    return key


def manifest_lines(pairs: list[scoring_pb2.LabelledImage]) -> list[str]:
    return [json.dumps({"image_key": p.image_key, "label_key": p.label_key}) for p in pairs]


def keys_under(store: ObjectStore, prefix: str) -> list[str]:
    return [info.key for info in store.list(prefix)]


def sample(store: ObjectStore, run_id: str, round_index: int, sample_id: str, image: np.ndarray,
           label: np.ndarray) -> samples_pb2.Sample:
    """A composed sample as harmonization leaves it: its files in the store under its prefix."""
    prefix = f"runs/{run_id}/rounds/{round_index}/samples/{sample_id}/"
    pair = write_pair(store, prefix, image, label)
    return samples_pb2.Sample(
        sample_id=sample_id, run_id=run_id, round=round_index, kind=samples_pb2.SAMPLE_KIND_COMPOSED,
        keys=common_pb2.SampleKeys(image_key=pair.image_key, label_key=pair.label_key),
        image_size=common_pb2.ImageSize(width=image.shape[1], height=image.shape[0]), background_name="sea")


def score(target: str, samples: list[samples_pb2.Sample],
          model: common_pb2.ModelVersion | None = None) -> list[samples_pb2.ScoredSample]:
    request = scoring_pb2.ScoreRequest(samples=samples, model=model)
    return list(call(target, "Score", request, scoring_pb2.ScoreResponse).scored_samples)


# --- the model every other test uses ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Trained:
    run_id: str
    job_ids: tuple[str, str]
    final: scoring_pb2.TrainStatusResponse
    pairs: list[scoring_pb2.LabelledImage]

    @property
    def version(self) -> str:
        return f"{self.run_id}/0"


@pytest.fixture(scope="module")
def trained(target: str, store: ObjectStore) -> Trained:
    run_id = new_run()
    pairs = world_pairs(store, run_id, "train", TRAIN_IMAGES)
    request = scoring_pb2.TrainRequest(run_id=run_id, round=0, dataset=inline(pairs), seed=3)
    first = train(target, request)
    second = train(target, request)  # a retried Train: the same job, not a second one
    return Trained(run_id, (first, second), finished(target, first), pairs)


def test_train_runs_one_job_per_run_and_round_to_a_stored_model(trained: Trained, target: str,
                                                                store: ObjectStore, config: FreemaskConfig) -> None:
    first, second = trained.job_ids
    assert re.fullmatch(r"[a-z0-9-]{1,64}", first) and second == first
    final = trained.final
    total_steps = -(-TRAIN_IMAGES // BATCH) * EPOCHS
    assert final.state == scoring_pb2.TRAIN_STATE_SUCCEEDED, final.error
    assert (final.job_id, final.step, final.epoch, final.total_epochs, final.skipped_images, final.error) == (
        first, total_steps, EPOCHS, EPOCHS, 0, "")
    assert (final.model.name, final.model.version) == ("segmenter", trained.version)
    assert final.loss > 0 and np.isfinite(final.loss)
    assert final.HasField("started_at") and final.HasField("finished_at")
    assert final.finished_at.ToNanoseconds() >= final.started_at.ToNanoseconds()

    prefix = f"models/segmenter/{trained.version}/"
    assert sorted(keys_under(store, prefix)) == [prefix + "model.safetensors", prefix + "segmenter.json"]
    manifest = json.loads(store.get_bytes(prefix + "segmenter.json"))
    assert (manifest["name"], manifest["version"], manifest["input_size"]) == ("segmenter", trained.version, SIZE)
    assert manifest["classes"] == ["background", *config.world.classes] == list(label_names(config))
    assert (manifest["training"]["steps"], manifest["training"]["epochs"], manifest["training"]["images"],
            manifest["training"]["seed"]) == (total_steps, EPOCHS, TRAIN_IMAGES, 3)

    # the job is kept: asked again, it answers the same
    again = status(target, first)
    assert (again.state, again.step, again.model.version) == (final.state, final.step, final.model.version)


def test_a_restarted_service_reports_a_finished_model_as_trained(trained: Trained, config: FreemaskConfig) -> None:
    """Jobs live in memory: after a restart the same Train finds the finished model and reuses it,
    and its status must still say how far that model was trained."""
    restarted = build(ServiceContext("scoring", config, ServiceMetrics("scoring")))
    try:
        api = restarted.grpc_services[0][1]
        request = scoring_pb2.TrainRequest(run_id=trained.run_id, round=0, dataset=inline(trained.pairs), seed=3)
        job_id = api.Train(request).job_id
        assert job_id == trained.job_ids[0]
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        while (answer := api.TrainStatus(scoring_pb2.TrainStatusRequest(job_id=job_id))).state not in (
                scoring_pb2.TRAIN_STATE_SUCCEEDED, scoring_pb2.TRAIN_STATE_FAILED):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        assert restarted.on_stop is not None
        restarted.on_stop()
    assert answer.state == scoring_pb2.TRAIN_STATE_SUCCEEDED, answer.error
    assert (answer.model.version, answer.epoch, answer.total_epochs) == (trained.version, EPOCHS, EPOCHS)
    # reused, not retrained: the same weights (their manifest is untouched)
    assert answer.step == trained.final.step, f"a reused model reports step {answer.step} of {trained.final.step}"


def test_an_unknown_job_is_not_found(target: str) -> None:
    error = rpc_error(target, "TrainStatus", scoring_pb2.TrainStatusRequest(job_id="train-0000000000000000"),
                      scoring_pb2.TrainStatusResponse)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "train-0000000000000000" in error.details()


# --- datasets --------------------------------------------------------------------------------------------------

def test_a_manifest_with_an_unreadable_and_a_mismatched_pair_trains_on_the_rest(target: str,
                                                                                store: ObjectStore) -> None:
    run_id = new_run()
    pairs = world_pairs(store, run_id, "train", 4)
    scene = dataset("train", 10, SIZE)
    corrupt = scoring_pb2.LabelledImage(image_key=f"datasets/{run_id}/corrupt/image.png",
                                        label_key=f"datasets/{run_id}/corrupt/label.png")
    store.put_bytes(corrupt.image_key, b"GIF89a this is not a png", "image/png")
    store.put_bytes(corrupt.label_key, encode_png(scene.label), "image/png")
    mismatched = write_pair(store, f"datasets/{run_id}/mismatched/", scene.image, scene.label[:, : SIZE - 4])
    key = write_manifest(store, f"datasets/{run_id}/dataset.jsonl",
                         manifest_lines([pairs[0], corrupt, pairs[1], mismatched, pairs[2], pairs[3]]))

    job_id = train(target, scoring_pb2.TrainRequest(run_id=run_id, round=2,
                                                     dataset=scoring_pb2.Dataset(manifest_key=key), epochs=1))
    final = finished(target, job_id)

    assert final.state == scoring_pb2.TRAIN_STATE_SUCCEEDED, final.error
    assert (final.skipped_images, final.step, final.epoch, final.model.version) == (2, 1, 1, f"{run_id}/2")
    manifest = json.loads(store.get_bytes(f"models/segmenter/{run_id}/2/segmenter.json"))
    assert (manifest["training"]["images"], manifest["training"]["skipped_images"]) == (4, 2)


def test_a_dataset_of_nothing_usable_fails_the_job_and_writes_no_model(target: str, store: ObjectStore) -> None:
    run_id = new_run()
    scene = dataset("train", 0, SIZE)
    bad = write_pair(store, f"datasets/{run_id}/0/", scene.image, scene.label[:16])
    job_id = train(target, scoring_pb2.TrainRequest(run_id=run_id, round=0, dataset=inline([bad]), epochs=1))
    final = finished(target, job_id)
    assert final.state == scoring_pb2.TRAIN_STATE_FAILED
    assert "no usable image in the dataset: all 1 were skipped" in final.error and final.skipped_images == 1
    assert final.HasField("finished_at") and not final.HasField("model")
    assert keys_under(store, f"models/segmenter/{run_id}/") == []


@pytest.mark.parametrize("case", ["non-json line", "missing manifest", "empty list", "bad run id", "zero epochs"])
def test_bad_train_requests_are_invalid_and_write_nothing(target: str, store: ObjectStore, case: str) -> None:
    run_id = new_run()
    pairs = world_pairs(store, run_id, "train", 1)
    request = scoring_pb2.TrainRequest(run_id=run_id, round=0, dataset=inline(pairs), epochs=1)
    if case == "non-json line":
        key = write_manifest(store, f"datasets/{run_id}/dataset.jsonl", [*manifest_lines(pairs), "{not json"])
        request.dataset.CopyFrom(scoring_pb2.Dataset(manifest_key=key))
        fragment = f"manifest {key!r} line 2 is not JSON"
    elif case == "missing manifest":
        key = f"datasets/{run_id}/absent.jsonl"
        request.dataset.CopyFrom(scoring_pb2.Dataset(manifest_key=key))
        fragment = f"dataset manifest {key!r} does not exist"
    elif case == "empty list":
        request.dataset.CopyFrom(inline([]))
        fragment = "a dataset holds 1..1000000 images, got 0"
    elif case == "bad run id":
        request.run_id = "../x"
        fragment = "'../x' is not a valid id"
    else:
        request.epochs = 0
        fragment = "epochs must be in [1, 1000], got 0"
    models_before = keys_under(store, "models/segmenter/")

    error = rpc_error(target, "Train", request, scoring_pb2.TrainResponse)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.details(), error.details()
    time.sleep(0.5)  # were a job started by mistake, it would have written its first files by now
    assert keys_under(store, f"models/segmenter/{run_id}/") == []
    assert keys_under(store, "models/segmenter/") == models_before


def test_the_coordinators_client_tells_a_refusal_from_an_outage(target: str) -> None:
    """The coordinator gives a run up on a refusal and retries an outage, so its client must not
    report every failed call as Unavailable."""
    client = ScoringClient(target)
    try:
        run_id = new_run()
        missing = f"datasets/{run_id}/absent.jsonl"
        with pytest.raises(InvalidInput, match="INVALID_ARGUMENT: dataset manifest .* does not exist"):
            client.train(run_id, Train(0, missing, (), None), epochs=1, seed=0)
        with pytest.raises(NotFound, match="train-0000000000000000"):
            client.status("train-0000000000000000")
    finally:
        client.close()
    nobody = ScoringClient("127.0.0.1:1", timeout_s=5.0)  # nothing listens on port 1
    try:
        with pytest.raises(Unavailable, match="UNAVAILABLE"):
            nobody.status("train-0000000000000000")
    finally:
        nobody.close()


# --- Score -----------------------------------------------------------------------------------------------------

def test_score_gives_the_iou_of_the_prediction_and_the_label(trained: Trained, target: str, store: ObjectStore,
                                                            config: FreemaskConfig) -> None:
    names = label_names(config)
    scenes = [dataset("val", index, SIZE) for index in range(3)]
    samples = [sample(store, trained.run_id, 0, f"v-{index}", scene.image, scene.label)
               for index, scene in enumerate(scenes)]

    by_default = score(target, samples)  # each sample's own round: f_0 of its run
    named = score(target, samples, segmenter(trained.version))

    loaded = SegmenterStore(store).load(segmenter(trained.version), names)
    predictions = loaded.segmenter.predict([scene.image for scene in scenes])
    assert [s.sample for s in by_default] == samples
    for scored, again, scene, prediction in zip(by_default, named, scenes, predictions):
        expected = sample_score(scene.label, prediction, len(names))
        assert 0.0 <= scored.score <= 1.0
        assert scored.score == pytest.approx(expected.score, abs=1e-6)
        assert dict(scored.class_iou) == pytest.approx({names[c]: iou for c, iou in expected.class_iou.items()},
                                                       abs=1e-6)
        present = {names[c] for c in np.unique(scene.label) if c != 255}
        assert present <= set(scored.class_iou) <= set(names)
        assert (scored.segmenter.name, scored.segmenter.version) == ("segmenter", trained.version)
        assert (again.score, dict(again.class_iou), again.segmenter) == (
            scored.score, dict(scored.class_iou), scored.segmenter)

    # the model's own prediction as y_pseudo: S(x) = 1
    own = sample(store, trained.run_id, 0, "own", scenes[0].image, predictions[0])
    (perfect,) = score(target, [own])
    assert perfect.score == 1.0
    assert set(perfect.class_iou.values()) == {1.0}
    assert set(perfect.class_iou) == {names[c] for c in np.unique(predictions[0])}


def test_score_with_a_model_never_trained_is_not_found(trained: Trained, target: str, store: ObjectStore) -> None:
    scene = dataset("val", 0, SIZE)
    samples = [sample(store, trained.run_id, 0, "nf", scene.image, scene.label)]
    error = rpc_error(target, "Score", scoring_pb2.ScoreRequest(samples=samples, model=segmenter(
        f"{trained.run_id}/9")), scoring_pb2.ScoreResponse)
    assert error.code() == grpc.StatusCode.NOT_FOUND and f"{trained.run_id}/9" in error.details(), error.details()

    # and by default, a sample of an untrained round
    samples = [sample(store, trained.run_id, 9, "nf", scene.image, scene.label)]
    error = rpc_error(target, "Score", scoring_pb2.ScoreRequest(samples=samples), scoring_pb2.ScoreResponse)
    assert error.code() == grpc.StatusCode.NOT_FOUND and f"{trained.run_id}/9" in error.details(), error.details()


@pytest.mark.parametrize(("edit", "fragment"), [
    ("outside", "lies outside"),
    ("other sample", "lies outside"),
    ("no kind", "kind is unspecified"),
    ("label size", "the label map is 28x32 px but the image is 32x32"),
    ("bad model name", "is not a segmenter"),
])
def test_bad_score_requests_are_invalid(trained: Trained, target: str, store: ObjectStore, edit: str,
                                        fragment: str) -> None:
    scene = dataset("val", 1, SIZE)
    good = sample(store, trained.run_id, 0, "ok", scene.image, scene.label)
    bad = samples_pb2.Sample()
    bad.CopyFrom(good)
    bad.sample_id = "bad"
    model = segmenter(trained.version)
    if edit == "outside":
        store.put_bytes(f"datasets/{trained.run_id}/stray/image.png", encode_png(scene.image), "image/png")
        bad.keys.image_key = f"datasets/{trained.run_id}/stray/image.png"
    elif edit == "other sample":  # the keys of another sample of the same run and round
        pass
    elif edit == "no kind":
        bad = sample(store, trained.run_id, 0, "bad", scene.image, scene.label)
        bad.kind = samples_pb2.SAMPLE_KIND_UNSPECIFIED
    elif edit == "label size":
        bad = sample(store, trained.run_id, 0, "bad", scene.image, scene.label[:, :28])
    else:
        bad = sample(store, trained.run_id, 0, "bad", scene.image, scene.label)
        model = common_pb2.ModelVersion(name="fopa", version=trained.version)
    error = rpc_error(target, "Score", scoring_pb2.ScoreRequest(samples=[good, bad], model=model),
                      scoring_pb2.ScoreResponse)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.details(), error.details()


# --- model versions --------------------------------------------------------------------------------------------

def copy_model(store: ObjectStore, source: str, destination: str) -> None:
    for name in ("model.safetensors", "segmenter.json"):
        store.put_bytes(f"models/segmenter/{destination}/{name}", store.get_bytes(f"models/segmenter/{source}/{name}"))


def test_a_model_copied_to_another_round_is_refused(trained: Trained, target: str, store: ObjectStore) -> None:
    scene = dataset("val", 2, SIZE)
    samples = [sample(store, trained.run_id, 7, "copied", scene.image, scene.label)]
    copy = f"{trained.run_id}/7"
    copy_model(store, trained.version, copy)

    for request in (scoring_pb2.ScoreRequest(samples=samples, model=segmenter(copy)),
                    scoring_pb2.ScoreRequest(samples=samples)):  # round 7's own model by default
        error = rpc_error(target, "Score", request, scoring_pb2.ScoreResponse)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert f"segmenter {copy!r}: its manifest says it is 'segmenter' version {trained.version!r}" in \
            error.details()


def test_overwritten_weights_are_refused(trained: Trained, target: str, store: ObjectStore,
                                        config: FreemaskConfig) -> None:
    scene = dataset("val", 2, SIZE)
    samples = [sample(store, trained.run_id, 8, "overwritten", scene.image, scene.label)]
    copy = f"{trained.run_id}/8"
    copy_model(store, trained.version, copy)
    manifest = json.loads(store.get_bytes(f"models/segmenter/{copy}/segmenter.json"))
    manifest["version"] = copy  # a consistent copy: it loads as it is
    store.put_bytes(f"models/segmenter/{copy}/segmenter.json", json.dumps(manifest).encode())
    assert SegmenterStore(store).load(segmenter(copy), label_names(config)).version.version == copy

    weights = bytearray(store.get_bytes(f"models/segmenter/{copy}/model.safetensors"))
    weights[-1] ^= 0xFF
    store.put_bytes(f"models/segmenter/{copy}/model.safetensors", bytes(weights))

    for request in (scoring_pb2.ScoreRequest(samples=samples, model=segmenter(copy)),
                    scoring_pb2.ScoreRequest(samples=samples)):
        error = rpc_error(target, "Score", request, scoring_pb2.ScoreResponse)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in error.details(), error.details()
        assert repr(copy) in error.details()


# --- Evaluate --------------------------------------------------------------------------------------------------

def test_evaluate_measures_miou_per_class(trained: Trained, target: str, store: ObjectStore,
                                          config: FreemaskConfig) -> None:
    names = label_names(config)
    pairs = world_pairs(store, f"{trained.run_id}-val", "val", 4)
    request = scoring_pb2.EvaluateRequest(dataset=inline(pairs), model=segmenter(trained.version))
    result = call(target, "Evaluate", request, scoring_pb2.EvaluateResponse)

    assert (result.num_images, result.skipped_images) == (4, 0)
    assert (result.model.name, result.model.version) == ("segmenter", trained.version)
    assert 0.0 <= result.mean_iou <= 1.0
    assert set(result.class_iou) <= set(names) and len(result.class_iou) >= 2
    assert all(0.0 <= iou <= 1.0 for iou in result.class_iou.values())
    assert result.mean_iou == pytest.approx(np.mean(list(result.class_iou.values())), abs=1e-9)
    labelled = {names[c] for index in range(4) for c in np.unique(dataset("val", index, SIZE).label) if c != 255}
    assert labelled <= set(result.class_iou)

    error = rpc_error(target, "Evaluate", scoring_pb2.EvaluateRequest(dataset=inline(pairs), model=segmenter(
        f"{trained.run_id}/42")), scoring_pb2.EvaluateResponse)
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()


# --- the stage -------------------------------------------------------------------------------------------------

def test_the_stage_scores_composed_samples_and_dead_letters_an_untrained_round(
        trained: Trained, target: str, config: FreemaskConfig, store: ObjectStore, parts: ServiceParts) -> None:
    assert parts.stage is not None and parts.stage.topic == Topics.COMPOSED
    tag = uuid.uuid4().hex[:6]
    scenes = [dataset("val", index, SIZE) for index in range(2)]
    good = [sample(store, trained.run_id, 0, f"st-{tag}-{i}", s.image, s.label) for i, s in enumerate(scenes)]
    untrained = sample(store, trained.run_id, 5, f"st-{tag}-untrained", scenes[0].image, scenes[0].label)
    invalid = sample(store, trained.run_id, 0, f"st-{tag}-invalid", scenes[1].image, scenes[1].label)
    invalid.kind = samples_pb2.SAMPLE_KIND_UNSPECIFIED
    (topic,) = unique_topics(config.bus, "composed")
    publish_samples(config.bus, topic, [good[0], untrained, invalid, good[1]])

    worker = StageWorker("scoring", topic, parts.stage.handler, config.bus, ServiceMetrics("scoring"),
                         batch_handler=parts.stage.batch_handler)
    worker.run(max_messages=4, timeout_s=120)

    # NotFound is retried (the model may yet appear); a bad sample is dead-lettered at once
    assert (worker.stats.processed, worker.stats.dead_lettered, worker.stats.retries) == (4, 2, MAX_ATTEMPTS - 1)
    ids = [s.sample_id for s in good]
    scored = {key: samples_pb2.ScoredSample.FromString(value)
              for key, value, _ in drain_records(config.bus, Topics.SCORED, ids) if key in ids}
    expected = {s.sample.sample_id: s for s in score(target, good)}
    assert sorted(scored) == sorted(ids)
    for sample_id, result in scored.items():
        assert result.sample == next(s for s in good if s.sample_id == sample_id)
        assert (result.segmenter.name, result.segmenter.version) == ("segmenter", trained.version)
        assert 0.0 <= result.score <= 1.0 and result.score == expected[sample_id].score
        assert dict(result.class_iou) == dict(expected[sample_id].class_iou)

    dead = [untrained.sample_id, invalid.sample_id]
    letters = {key: dead_letter_pb2.DeadLetter.FromString(value)
               for key, value, _ in drain_records(config.bus, Topics.DLQ, dead) if key in dead}
    letter = letters[untrained.sample_id]
    assert (letter.original_topic, letter.error_type, letter.attempts, letter.stage) == (
        topic, "NotFound", MAX_ATTEMPTS, "scoring")
    assert f"{trained.run_id}/5" in letter.error and letter.value == untrained.SerializeToString()
    letter = letters[invalid.sample_id]
    assert (letter.original_topic, letter.error_type, letter.attempts) == (topic, "InvalidInput", 1)
    assert "kind is unspecified" in letter.error and letter.value == invalid.SerializeToString()
    assert not {untrained.sample_id, invalid.sample_id} & {
        key for key, _, _ in drain_records(config.bus, Topics.SCORED, ids)}


# --- the command line: killed and resumed ----------------------------------------------------------------------

def cli_env(stack: EmbeddedStack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEMASK_")}
    return {**env, **stack.client_env(), **SETTINGS, "FREEMASK_SCORING__CHECKPOINT_EVERY_STEPS": "1",
            "OMP_NUM_THREADS": "1"}


def test_a_killed_training_resumes_from_its_checkpoint(stack: EmbeddedStack, store: ObjectStore,
                                                       tmp_path: Path) -> None:
    run_id, images, epochs = new_run(), 16, 4
    total_steps = images // BATCH * epochs
    key = write_manifest(store, f"datasets/{run_id}/dataset.jsonl",
                         manifest_lines(world_pairs(store, run_id, "train", images)))
    command = [sys.executable, "-m", "freemask.shared.cli", "scoring", "train", "--manifest", key, "--run", run_id,
               "--round", "0", "--epochs", str(epochs)]
    prefix = f"models/segmenter/{run_id}/0/"
    env = cli_env(stack)

    log_path = tmp_path / "killed.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + TRAIN_TIMEOUT_S
            while not store.exists(prefix + "checkpoint.pt"):
                assert process.poll() is None, f"training exited early:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"no checkpoint after {TRAIN_TIMEOUT_S} s"
                time.sleep(0.05)
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(30) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(30)
    assert not store.exists(prefix + "segmenter.json"), "training finished before it could be killed"
    assert store.exists(prefix + "checkpoint.pt")

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, env=env)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    resumed = re.search(r"resumed at step (\d+)", rerun.stdout)
    assert resumed is not None, rerun.stdout
    assert 1 <= int(resumed.group(1)) < total_steps
    assert f"segmenter {run_id}/0: {total_steps} steps" in rerun.stdout
    assert f"{images} images (0 skipped)" in rerun.stdout
    manifest = json.loads(store.get_bytes(prefix + "segmenter.json"))
    assert (manifest["version"], manifest["training"]["steps"], manifest["training"]["epochs"]) == (
        f"{run_id}/0", total_steps, epochs)
    assert sorted(keys_under(store, prefix)) == [prefix + "model.safetensors", prefix + "segmenter.json"]

    # the same spec trained without interruption (under another run) gives the very same weights
    other = new_run()
    straight = subprocess.run([*command[:command.index("--run") + 1], other, *command[command.index("--run") + 2:]],
                              capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S, env=env)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "resumed" not in straight.stdout
    reference = json.loads(store.get_bytes(f"models/segmenter/{other}/0/segmenter.json"))
    assert reference["training"]["fingerprint"] == manifest["training"]["fingerprint"]
    assert reference["weights_sha256"] == manifest["weights_sha256"], (
        f"resumed at step {resumed.group(1)}: loss {manifest['training']['loss']} vs {reference['training']['loss']}")

    evaluated = subprocess.run([sys.executable, "-m", "freemask.shared.cli", "scoring", "evaluate", "--manifest", key,
                                "--model", f"{run_id}/0"], capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S,
                               env=env)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert re.search(rf"^segmenter {run_id}/0: mIoU [01]\.\d{{4}} over {images} images \(0 skipped\)$",
                     evaluated.stdout, re.MULTILINE), evaluated.stdout
    assert re.search(r"^  background +[01]\.\d{4}$", evaluated.stdout, re.MULTILINE), evaluated.stdout
