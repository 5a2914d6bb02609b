"""The thesaurus on the real store, a real gRPC server and the real broker: versioned
indexes, corpora under an S3 prefix, the query API and its errors, the CLI, and the
compose stage planning from single objects that exist in the store."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from freemask.shared.bus import InboundMessage, StageWorker, Topics
from freemask.shared.cli import main as freemask_main
from freemask.shared.config import FreemaskConfig
from freemask.shared.errors import InvalidInput, NotFound
from freemask.shared.grpc_runtime import RunningServer, start_server
from freemask.shared.images import encode_png
from freemask.shared.keys import sample_key
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.runner import ServiceContext
from freemask.shared.singles import single_object_meta
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.thesaurus.corpus import open_corpus
from freemask.thesaurus.index import build_index
from freemask.thesaurus.service import IndexRepository, ThesaurusApi, build, build_and_publish, normalizer_for
from freemask.v1 import common_pb2, compose_pb2, dead_letter_pb2, generate_pb2, thesaurus_pb2

from bus_helpers import drain_records, publish_samples, unique_topics
from conftest import config_for
from grpc_helpers import unary_call

pytestmark = pytest.mark.stack
CAPTIONS = ["a boat on the sea", "two boats at sea", "a plane over the ocean", "a dog on the grass",
            "a bus on the road", "a car on the road", "a man on the road"]


@pytest.fixture(scope="module")
def config(stack: EmbeddedStack) -> FreemaskConfig:
    return config_for(stack, FREEMASK_BUS__GROUP_PREFIX=f"thesaurus-{uuid.uuid4().hex[:8]}",
                      FREEMASK_THESAURUS__REFERENCE_CAPTIONS="5000")


@pytest.fixture(scope="module")
def store(config: FreemaskConfig) -> ObjectStore:
    return ObjectStore(config.store)


def hand_index(config: FreemaskConfig, captions: list[str] = CAPTIONS):
    return build_index(captions, normalizer_for(config), {"name": "hand"})


def test_versions_are_stored_once_and_never_change(config: FreemaskConfig, store: ObjectStore) -> None:
    repository = IndexRepository(store)
    index = hand_index(config)
    version = repository.publish(index)
    assert version == index.content_version()
    assert store.exists(f"thesaurus/{version}/index.json")
    assert repository.publish(index) == version  # the same bytes again: a no-op
    assert IndexRepository(store).load(version) == index
    named = f"v-{uuid.uuid4().hex[:8]}.1"
    assert repository.publish(index, named) == named
    with pytest.raises(InvalidInput, match="already exists with other counts"):
        repository.publish(hand_index(config, CAPTIONS[:3]), named)
    assert IndexRepository(store).load(named) == index
    with pytest.raises(NotFound, match="no thesaurus index 'absent-1'"):
        repository.load("absent-1")


def test_a_corpus_under_an_s3_prefix_is_read_object_by_object(config: FreemaskConfig, store: ObjectStore) -> None:
    prefix = f"corpora/{uuid.uuid4().hex[:8]}/"
    store.put_bytes(prefix + "a.txt", b"a boat on the sea\na plane over the ocean\n")
    store.put_bytes(prefix + "b.jsonl.gz", gzip.compress(b'"a dog on the grass"\n{"caption": "two boats at sea"}\n'))
    corpus = open_corpus(f"s3://{config.store.bucket}/{prefix}", config)
    assert list(corpus) == ["a boat on the sea", "a plane over the ocean", "a dog on the grass", "two boats at sea"]
    _, index = build_and_publish(config, IndexRepository(store), corpus)
    assert index.relation("boat", "sea").relation == pytest.approx(2 / 3)
    with pytest.raises(InvalidInput, match="holds no objects"):
        open_corpus(f"s3://{config.store.bucket}/corpora/none-{uuid.uuid4().hex[:8]}/", config)


@pytest.fixture(scope="module")
def server(config: FreemaskConfig, store: ObjectStore) -> Iterator[tuple[str, str]]:
    repository = IndexRepository(store)
    version = repository.publish(hand_index(config))
    descriptor = thesaurus_pb2.DESCRIPTOR.services_by_name["Thesaurus"]
    running: RunningServer = start_server(config.server, 0, [(descriptor, ThesaurusApi(repository, version))],
                                          ServiceMetrics("thesaurus"))
    yield f"127.0.0.1:{running.port}", version
    running.stop(1.0)


def call(target: str, method: str, request, response_type):
    return unary_call(target, "Thesaurus", method, request, response_type, 10)


def test_relation_and_top_objects_over_grpc(server: tuple[str, str]) -> None:
    target, version = server
    found = call(target, "Relation", thesaurus_pb2.RelationRequest(object_name="Boats", background_name="ocean"),
                 thesaurus_pb2.RelationResponse)
    assert (found.relation, found.co_occurrence_count, found.background_count, found.thesaurus_version) == (
        pytest.approx(2 / 3), 2, 3, version)
    top = call(target, "TopObjects", thesaurus_pb2.TopObjectsRequest(background_name="road", k=2, exclude=["people"]),
               thesaurus_pb2.TopObjectsResponse)
    assert [(o.object_name, o.co_occurrence_count) for o in top.objects] == [("bus", 1), ("car", 1)]
    assert top.background_count == 3 and top.thesaurus_version == version


@pytest.mark.parametrize(("method", "request_message", "code", "fragment"), [
    ("Relation", thesaurus_pb2.RelationRequest(object_name="unicorn", background_name="sea"),
     grpc.StatusCode.INVALID_ARGUMENT, "this index knows 12 objects (19 words in all)"),
    ("Relation", thesaurus_pb2.RelationRequest(object_name="boat", background_name="sky"),
     grpc.StatusCode.INVALID_ARGUMENT, "'sky' appears in none of the index's 7 captions"),
    ("TopObjects", thesaurus_pb2.TopObjectsRequest(background_name="sea", k=0),
     grpc.StatusCode.INVALID_ARGUMENT, "k must be in 1..1000"),
    ("Relation", thesaurus_pb2.RelationRequest(object_name="boat", background_name="sea", thesaurus_version="nope-1"),
     grpc.StatusCode.NOT_FOUND, "no thesaurus index 'nope-1'"),
    ("Relation", thesaurus_pb2.RelationRequest(object_name="boat", background_name="sea", thesaurus_version="../x"),
     grpc.StatusCode.INVALID_ARGUMENT, "is not a valid version"),
])
def test_bad_queries_get_clear_status(server: tuple[str, str], method: str, request_message, code: grpc.StatusCode,
                                      fragment: str) -> None:
    target, _ = server
    response_type = {"Relation": thesaurus_pb2.RelationResponse, "TopObjects": thesaurus_pb2.TopObjectsResponse}
    with pytest.raises(grpc.RpcError) as info:
        call(target, method, request_message, response_type[method])
    assert info.value.code() == code and fragment in info.value.details(), info.value.details()


def test_the_cli_builds_a_named_version_from_a_file(stack: EmbeddedStack, store: ObjectStore, tmp_path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "captions.jsonl"
    corpus.write_text("\n".join(json.dumps(c) for c in CAPTIONS) + "\n", encoding="utf-8")
    for name, value in stack.client_env().items():
        monkeypatch.setenv(name, value)
    version = f"cli-{uuid.uuid4().hex[:8]}"
    assert freemask_main(["thesaurus", "build", "--corpus", str(corpus), "--version", version]) == 0
    assert f"thesaurus {version}: 7 captions" in capsys.readouterr().out
    assert IndexRepository(store).load(version).relation("car", "road").relation == pytest.approx(1 / 3)
    assert freemask_main(["thesaurus", "build", "--corpus", str(tmp_path / "missing.txt")]) == 1
    assert "is not a file" in capsys.readouterr().err


def write_single(store: ObjectStore, config: FreemaskConfig, run_id: str, sample_id: str, cls: str,
                 background: str) -> generate_pb2.SingleObject:
    """A single object as the attention-mask stage leaves it: image, label, then meta.json."""
    keys = common_pb2.SampleKeys(**{field: sample_key(run_id, 0, sample_id, name) for field, name in (
        ("image_key", "image.png"), ("label_key", "label.png"), ("meta_key", "meta.json"))})
    class_id = config.world.classes.index(cls) + 1
    label = np.zeros((32, 32), np.uint8)
    label[10:20, 8:24] = class_id
    single = generate_pb2.SingleObject(
        sample_id=sample_id, run_id=run_id, round=0, class_id=class_id, class_name=cls, background_name=background,
        prompt=f"a {cls} on the {background}", seed=3, keys=keys, image_size=common_pb2.ImageSize(width=32, height=32),
        threshold=0.55, mask_box=common_pb2.BoundingBox(x=8, y=10, width=16, height=10), mask_area_pixels=160,
        generator=common_pb2.ModelVersion(name="generator", version="test"))
    store.put_bytes(keys.image_key, encode_png(np.full((32, 32, 3), 90, np.uint8)), "image/png")
    store.put_bytes(keys.label_key, encode_png(label), "image/png")
    store.put_bytes(keys.meta_key, single_object_meta(single, {}), "application/json")
    return single


def test_the_compose_stage_plans_from_singles_in_the_store(config: FreemaskConfig, store: ObjectStore) -> None:
    run_id = f"compose-{uuid.uuid4().hex[:8]}"
    base = write_single(store, config, run_id, "s-base", "boat", "sea")
    for i, (cls, background) in enumerate([("boat", "sea"), ("aeroplane", "sky"), ("bird", "sky"),
                                           ("car", "road"), ("dog", "grass")]):
        write_single(store, config, run_id, f"s-{i}", cls, background)
    parts = build(ServiceContext("thesaurus", config, ServiceMetrics("thesaurus")))  # the reference index
    assert parts.stage is not None and parts.stage.topic == Topics.COMPOSE
    requests = [compose_pb2.ComposeRequest(run_id=run_id, round=0, sample_id=f"c-{i}", base_scene=base,
                                           background_name="sea", num_objects_to_add=4, seed=i) for i in range(3)]
    bad = compose_pb2.ComposeRequest(run_id=run_id, round=0, sample_id="c-bad", base_scene=base,
                                     background_name="moon", num_objects_to_add=2, seed=1)
    (source,) = unique_topics(config.bus, "compose")
    publish_samples(config.bus, source, (*requests, bad))
    worker = StageWorker("thesaurus", source, parts.stage.handler, config.bus, ServiceMetrics("thesaurus"))
    worker.run(max_messages=4, timeout_s=60)
    assert worker.stats.processed == 4 and worker.stats.dead_lettered == 1

    records = drain_records(config.bus, Topics.PLACE, [r.sample_id for r in requests])
    tasks = {key: compose_pb2.PlacementTask.FromString(value) for key, value, _ in records
             if key in {r.sample_id for r in requests}}
    sea_objects = {"boat", "aeroplane", "bird"}  # what the reference world puts on the sea and has a source here
    for request in requests:
        task = tasks[request.sample_id]
        assert task.run_id == run_id and task.scene.objects[0].source_sample_id == "s-base"
        for planned in (task.next_object, *task.remaining_objects):
            assert planned.class_name in sea_objects and planned.relation > 0
            assert planned.source.sample_id != "s-base"
            assert store.exists(planned.source.keys.image_key) and store.exists(planned.source.keys.label_key)
        redelivered = InboundMessage(source, 0, 99, request.sample_id, request.SerializeToString(), {})
        assert [out.message for out in parts.stage.handler(redelivered)] == [task]  # the same plan again
    letters = [dead_letter_pb2.DeadLetter.FromString(value)
               for key, value, _ in drain_records(config.bus, Topics.DLQ, ["c-bad"]) if key == "c-bad"]
    assert letters and "unknown background 'moon'" in letters[-1].error
