"""Poison and bad input (issue #13 item 5) against every service as a real process, through gRPC
and through its Kafka stage topic, on a broker, store and tritonserver of this module's own.

Every case of `poison_cases.py` (truncated bytes, another message type, unknown classes, empty
and 10 MB strings, non-images, decompression-bomb headers, NaN and infinite floats, ids with
`../` or `/`, keys in another run or outside `runs/`) must be answered INVALID_ARGUMENT with a
short message naming the problem, or go to `freemask.dlq.v1` on the first attempt with that
message. Throughout, the store is listed raw (the whole bucket, not only the services' `fm/`
prefix) with each object's etag: refused input writes or overwrites nothing at all, and the valid
work done afterwards writes only under its own run. Afterwards every service still answers
health SERVING and handles valid requests and messages.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from freemask.scoring.models import SegmenterStore
from freemask.scoring.scorer import label_names
from freemask.scoring.segmenter import Segmenter
from freemask.shared.bus import SCHEMA_HEADER, TRACE_HEADER, Topics, ensure_topics
from freemask.shared.cli import start_services, stop_services
from freemask.shared.config import SERVICE_NAMES, FreemaskConfig, StackConfig, load_config
from freemask.shared.grpc_runtime import check_health
from freemask.shared.keys import sample_prefix
from freemask.shared.processes import ServerProcess, pid_alive
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore, make_client
from freemask.v1 import (
    attention_mask_pb2,
    compose_pb2,
    coordinator_pb2,
    dead_letter_pb2,
    generate_pb2,
    harmonization_pb2,
    placement_pb2,
    samples_pb2,
    scoring_pb2,
    thesaurus_pb2,
)

from grpc_helpers import unary_call
from poison_cases import (
    GRPC_CASES,
    GRPC_SERVICES,
    KAFKA_CASES,
    TEN_MB,
    WRONG_TYPE,
    Fixtures,
    GrpcCase,
    KafkaCase,
    TopicReader,
    changed,
    generate_request,
    truncated,
    with_declared_size,
)
from ports import reserve_ports

pytestmark = pytest.mark.stack

PREFIX = "fm/"  # the services' store prefix: nothing may appear in the bucket outside it
RUN, FOREIGN_RUN, COORDINATOR_RUN = "poison-run", "foreign-run", "after-run"
DETAIL_LIMIT = 2000  # a clear message is short: gRPC itself drops details over ~16 KB
CALL_TIMEOUT_S = 120.0
LETTER_TIMEOUT_S = 120.0
OUTPUT_TIMEOUT_S = 240.0
# What refusing input on the first attempt looks like in a dead letter (errors.InvalidInput and subclasses).
REFUSED_TYPES = {"InvalidInput", "InvalidIdError", "ModelMismatch"}
COORDINATOR_TOPICS = (Topics.SINGLES, Topics.SCORED)

M = TypeVar("M", bound=Message)
Snapshot = dict[str, str]  # raw object name in the bucket -> etag


@dataclass
class Platform:
    config: FreemaskConfig
    store: ObjectStore
    fixtures: Fixtures
    processes: dict[str, ServerProcess]
    readers: dict[str, TopicReader]
    baseline: Snapshot  # the bucket once the fixtures were written, before any bad input
    buckets: set[str]

    def target(self, service: str) -> str:
        return f"127.0.0.1:{self.config.server.ports[service].grpc_port}"

    def snapshot(self) -> Snapshot:
        client = make_client(self.config.store)
        return {o.object_name: str(o.etag) for o in client.list_objects(self.config.store.bucket, recursive=True)}

    def bucket_names(self) -> set[str]:
        return {bucket.name for bucket in make_client(self.config.store).list_buckets()}

    def wait_for(self, topic: str, key: str, timeout_s: float) -> list:
        records = self.readers[topic].wait_for(key, timeout_s)
        if not records:
            dead = self.readers[Topics.DLQ].of(key)
            why = dead_letter_pb2.DeadLetter.FromString(dead[0].value).error if dead else "no dead letter either"
            raise AssertionError(f"no record {key!r} on {topic} after {timeout_s:.0f} s ({why})")
        return records


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """Objects added, removed or overwritten (another etag) between two snapshots."""
    return sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))


# --- the platform ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """Servers of this module's own: the services' stage workers read their topics from the start,
    so on the session's broker they would also take up what earlier tests left there."""
    base = reserve_ports(17)[0]
    stack = EmbeddedStack(StackConfig(
        data_dir=tmp_path_factory.mktemp("poison-stack"), s3_port=base, kafka_port=base + 1,
        triton_http_port=base + 2, triton_grpc_port=base + 3, triton_metrics_port=base + 4,
        seaweed_port_base=base + 5))
    started: set[int] = set()
    try:
        stack.up(("seaweedfs", "tansu", "tritonserver"))
        started.update(stack.running_pids())
        yield stack
    finally:
        started.update(stack.running_pids())
        stack.down()
        left = [pid for pid in started if pid_alive(pid)]
        assert not left, f"servers still running after stack down: {left}"


@pytest.fixture(scope="module")
def platform(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    numbers = iter(reserve_ports(2 * len(SERVICE_NAMES)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEMASK_")}
    env.update(stack.client_env())
    for name in SERVICE_NAMES:
        env[f"FREEMASK_SERVER__PORTS__{name.upper()}__GRPC_PORT"] = str(next(numbers))
        env[f"FREEMASK_SERVER__PORTS__{name.upper()}__METRICS_PORT"] = str(next(numbers))
    env.update({
        "FREEMASK_STORE__PREFIX": PREFIX, "FREEMASK_BUS__GROUP_PREFIX": f"poison-{uuid.uuid4().hex[:8]}",
        "FREEMASK_BUS__RETRY_BACKOFF_S": "0.2", "FREEMASK_ATTENTION_MASK__NUM_INFERENCE_STEPS": "3",
        "FREEMASK_ATTENTION_MASK__MAX_MASK_FRACTION": "1.0",  # 3 steps draw blurs whose masks are often large
        "FREEMASK_THESAURUS__REFERENCE_CAPTIONS": "10000", "FREEMASK_SCORING__INPUT_SIZE": "32",
        "FREEMASK_SCORING__DEVICE": "cpu", "FREEMASK_COORDINATOR__POLL_INTERVAL_S": "0.3",
        "FREEMASK_COORDINATOR__IMAGE_SIZE": "32",
    })
    config = load_config(environ=env)
    ensure_topics(config.bus)
    store = ObjectStore(config.store)
    store.ensure_bucket()
    processes = dict(zip(SERVICE_NAMES, start_services(config, env, tmp_path_factory.mktemp("poison-logs")),
                         strict=True))
    readers: dict[str, TopicReader] = {}
    try:
        fixtures = make_fixtures(config, store, f"127.0.0.1:{config.server.ports['attention_mask'].grpc_port}")
        for topic in (Topics.DLQ, Topics.SINGLES, Topics.PLACE, Topics.HARMONIZE, Topics.COMPOSED, Topics.SCORED):
            readers[topic] = TopicReader(config.bus, topic)
        platform = Platform(config, store, fixtures, processes, readers, {}, set())
        platform.baseline, platform.buckets = platform.snapshot(), platform.bucket_names()
        yield platform
    finally:
        for reader in readers.values():
            reader.close()
        stop_services(list(processes.values()))
        left = [p.name for p in processes.values() if pid_alive(p.pid)]
        assert not left, f"services still running: {left}"


def make_fixtures(config: FreemaskConfig, store: ObjectStore, attention_mask: str) -> Fixtures:
    """Two generated dogs of RUN, a copy of one under FOREIGN_RUN, RUN's objects that are not
    images or declare 20000x20000 pixels, and an (untrained) segmenter for RUN's round 0."""
    requests = [generate_request(RUN, "single-a", seed=11), generate_request(RUN, "single-b", seed=12)]
    first, second = unary_call(attention_mask, "AttentionMask", "GenerateBatch",
                               attention_mask_pb2.GenerateBatchRequest(requests=requests),
                               attention_mask_pb2.GenerateBatchResponse, CALL_TIMEOUT_S).single_objects
    pngs = {"scene": store.get_bytes(first.keys.image_key), "scene_label": store.get_bytes(first.keys.label_key),
            "foreground": store.get_bytes(second.keys.image_key), "mask": store.get_bytes(second.keys.label_key)}

    def stored_single(run_id: str, sample_id: str, image: bytes, label: bytes) -> generate_pb2.SingleObject:
        prefix = sample_prefix(run_id, 0, sample_id)
        store.put_bytes(prefix + "image.png", image, "image/png")
        store.put_bytes(prefix + "label.png", label, "image/png")

        def change(single: generate_pb2.SingleObject) -> None:
            single.run_id, single.sample_id = run_id, sample_id
            single.keys.Clear()
            single.keys.image_key, single.keys.label_key = prefix + "image.png", prefix + "label.png"
        return changed(second, change)

    fixtures = Fixtures(
        run=RUN, foreign_run=FOREIGN_RUN, singles=(first, second),
        foreign_single=stored_single(FOREIGN_RUN, second.sample_id, pngs["foreground"], pngs["mask"]),
        junk_single=stored_single(RUN, "junk-text", b"this is not an image, only text", b"GIF89a nor is this"),
        bomb_single=stored_single(RUN, "bomb", with_declared_size(pngs["foreground"], 20000, 20000),
                                  with_declared_size(pngs["mask"], 20000, 20000)),
        pngs=pngs)
    segmenter = Segmenter.create(config.scoring.preset, label_names(config), config.scoring.input_size, seed=0)
    SegmenterStore(store).save(RUN, 0, segmenter, {"note": "untrained: the poison tests only need a model"})
    return fixtures


# --- gRPC -----------------------------------------------------------------------------------------------------

def call_raw(target: str, path: str, payload: bytes) -> grpc.RpcError | bytes:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        try:
            return call(payload, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            return err


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c.id for c in GRPC_CASES])
def test_bad_grpc_request_is_refused_and_writes_nothing(platform: Platform, case: GrpcCase) -> None:
    target = platform.target(case.service)
    before = platform.snapshot()
    result = call_raw(target, f"/freemask.v1.{GRPC_SERVICES[case.service]}/{case.method}",
                      case.payload(platform.fixtures))

    assert isinstance(result, grpc.RpcError), f"{case.id}: the call succeeded"
    details = result.details() or ""
    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{result.code().name}: {details[:500]}"
    assert len(details) <= DETAIL_LIMIT, f"a {len(details)}-character message: {details[:300]}…"
    for fragment in case.fragments:
        assert fragment in details, details
    assert changes(before, platform.snapshot()) == []
    assert check_health(target), f"{case.service} is not SERVING after {case.case}"


# --- Kafka ----------------------------------------------------------------------------------------------------

def producer(config: FreemaskConfig) -> KafkaProducer:
    # Larger than the services' own limit: what a broker accepts is what a stage may be handed.
    return KafkaProducer(bootstrap_servers=config.bus.bootstrap_servers, acks="all",
                         max_request_size=64 * 1024 * 1024)


def send(config: FreemaskConfig, records: list[tuple[str, str, bytes, bytes | None]]) -> None:
    """(topic, key, value, schema header or None), each acknowledged by the broker."""
    sender = producer(config)
    try:
        futures = []
        for topic, key, value, schema in records:
            headers = [(TRACE_HEADER, uuid.uuid4().hex.encode())]
            if schema is not None:
                headers.append((SCHEMA_HEADER, schema))
            futures.append(sender.send(topic, key=key.encode(), value=value, headers=headers))
        for future in futures:
            future.get(timeout=60)
    finally:
        sender.close(timeout=10)


@dataclass(frozen=True)
class Sent:
    values: dict[str, bytes]  # case id -> the record's value
    coordinator_ends: dict[TopicPartition, int]  # end offsets of the coordinator's topics after the bad records


def coordinator_poison(fixtures: Fixtures) -> list[tuple[str, str, bytes, bytes | None]]:
    """Bad records on the topics the coordinator reads: they are other stages' outputs, so the
    coordinator skips what does not decode or names no run of its own (it dead-letters nothing)."""
    single = fixtures.singles[0]
    nan_scored = samples_pb2.ScoredSample(sample=fixtures.sample(), score=float("nan"))
    stranger = changed(single, lambda s: setattr(s, "run_id", "../../etc"))
    records = []
    for topic, valid, schema in ((Topics.SINGLES, single, b"freemask.v1.SingleObject"),
                                 (Topics.SCORED, nan_scored, b"freemask.v1.ScoredSample")):
        records += [(topic, "c-garbage", b"\xff\xfe garbage", schema), (topic, "c-truncated", truncated(valid), schema),
                    (topic, "c-wrong-type", WRONG_TYPE, b"freemask.v1.DeadLetter")]
    records += [(Topics.SCORED, "c-nan", nan_scored.SerializeToString(), b"freemask.v1.ScoredSample"),
                (Topics.SINGLES, "c-dotdot", stranger.SerializeToString(), b"freemask.v1.SingleObject")]
    return records


def end_offsets(config: FreemaskConfig, topics: tuple[str, ...]) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=config.bus.bootstrap_servers, group_id=None, enable_auto_commit=False)
    try:
        consumer.topics()  # loads the cluster metadata, so the topics' partitions are known
        partitions = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        return dict(consumer.end_offsets(partitions))
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def sent(platform: Platform) -> Sent:
    """Every bad record, produced at once after the gRPC cases: the stages work through them while
    the tests below look for their dead letters one by one."""
    values = {case.id: case.payload(platform.fixtures, case.key) for case in KAFKA_CASES}
    send(platform.config, [(case.topic, case.key, values[case.id], case.header()) for case in KAFKA_CASES]
         + coordinator_poison(platform.fixtures))
    return Sent(values, end_offsets(platform.config, COORDINATOR_TOPICS))


def dead_letter(platform: Platform, key: str) -> dead_letter_pb2.DeadLetter:
    letters = platform.readers[Topics.DLQ].wait_for(key, LETTER_TIMEOUT_S)
    assert letters, f"no dead letter for {key!r} after {LETTER_TIMEOUT_S:.0f} s"
    assert len(letters) == 1, f"{len(letters)} dead letters for {key!r}: the record was handled more than once"
    return dead_letter_pb2.DeadLetter.FromString(letters[0].value)


@pytest.mark.parametrize("case", KAFKA_CASES, ids=[c.id for c in KAFKA_CASES])
def test_bad_record_is_dead_lettered_at_once_with_its_reason(platform: Platform, sent: Sent, case: KafkaCase) -> None:
    letter = dead_letter(platform, case.key)

    assert (letter.original_topic, letter.stage) == (case.topic, case.service)
    assert letter.value == sent.values[case.id], "the dead letter must carry the original bytes"
    assert letter.attempts == 1 and letter.error_type in REFUSED_TYPES, (
        f"{letter.error_type} after {letter.attempts} attempts (retried instead of refused): {letter.error}")
    assert len(letter.error) <= DETAIL_LIMIT, letter.error[:300]
    for fragment in case.fragments:
        assert fragment in letter.error, letter.error
    # nothing written for it: stored keys carry the sample id, which is the record's key here
    written = [name for name in changes(platform.baseline, platform.snapshot()) if case.key in name]
    assert written == []


def test_the_coordinator_reads_past_bad_records_on_its_topics(platform: Platform, sent: Sent) -> None:
    group = f"{platform.config.bus.group_prefix}.coordinator"
    admin = KafkaAdminClient(bootstrap_servers=platform.config.bus.bootstrap_servers)
    deadline = time.monotonic() + LETTER_TIMEOUT_S
    try:
        while True:
            offsets = admin.list_group_offsets({group: list(sent.coordinator_ends)}).get(group, {})
            committed = {tp: meta.offset for tp, meta in offsets.items()}
            behind = {tp: end for tp, end in sent.coordinator_ends.items() if end > committed.get(tp, 0)}
            if not behind:
                break
            assert time.monotonic() < deadline, f"coordinator still behind on {behind} (committed {committed})"
            time.sleep(0.5)
    finally:
        admin.close()
    assert platform.processes["coordinator"].alive() and check_health(platform.target("coordinator"))


def test_refused_input_left_the_store_as_it_was(platform: Platform, sent: Sent) -> None:
    for case in KAFKA_CASES:  # every bad record settled (most waited for above already)
        assert platform.readers[Topics.DLQ].wait_for(case.key, LETTER_TIMEOUT_S), f"{case.id} not dead-lettered"
    after = platform.snapshot()
    assert changes(platform.baseline, after) == []
    assert [name for name in after if not name.startswith(PREFIX)] == []
    assert platform.bucket_names() == platform.buckets


# --- afterwards: every service serves valid requests and messages -------------------------------------------------

def test_every_service_is_serving_and_answers_a_valid_call(platform: Platform, sent: Sent) -> None:
    fx = platform.fixtures
    for name, process in platform.processes.items():
        assert process.alive(), f"{name} exited"
        assert check_health(platform.target(name)), f"{name} is not SERVING"

    def call(service: str, method: str, request, response_type):
        return unary_call(platform.target(service), GRPC_SERVICES[service], method, request, response_type,
                          CALL_TIMEOUT_S)

    single = call("attention_mask", "Generate", fx.generate("after-grpc"), attention_mask_pb2.GenerateResponse)
    assert single.single_object.keys.meta_key == sample_prefix(RUN, 0, "after-grpc") + "meta.json"
    relation = call("thesaurus", "Relation", thesaurus_pb2.RelationRequest(object_name="dog", background_name="grass"),
                    thesaurus_pb2.RelationResponse)
    assert 0.0 < relation.relation <= 1.0
    placed = call("placement", "Place", fx.place_request(), placement_pb2.PlaceResponse)
    assert placed.best.box.width >= 1 and placed.model.name == "fopa"
    pasted = call("harmonization", "Harmonize", fx.harmonize_request(), harmonization_pb2.HarmonizeResponse)
    assert pasted.object_area_pixels > 0 and pasted.image.png
    (scored,) = call("scoring", "Score", fx.score_request(), scoring_pb2.ScoreResponse).scored_samples
    assert 0.0 <= scored.score <= 1.0 and scored.segmenter == fx.segmenter
    with pytest.raises(grpc.RpcError) as unknown:  # a valid question with a clear answer
        call("coordinator", "GetRun", coordinator_pb2.GetRunRequest(run_id="no-such-run"),
             coordinator_pb2.GetRunResponse)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_every_stage_handles_valid_messages_after_the_bad_ones(platform: Platform, sent: Sent) -> None:
    fx = platform.fixtures
    own = b"freemask.v1."
    send(platform.config, [
        (Topics.GENERATE, "after-gen", fx.generate("after-gen").SerializeToString(), own + b"GenerateRequest"),
        (Topics.COMPOSE, "c-after", fx.compose("c-after").SerializeToString(), own + b"ComposeRequest"),
        (Topics.PLACE, "p-after", fx.placement_task("p-after").SerializeToString(), own + b"PlacementTask"),
        (Topics.HARMONIZE, "h-after", fx.harmonize_task("h-after").SerializeToString(), own + b"HarmonizeTask"),
        (Topics.COMPOSED, "single-a", fx.sample().SerializeToString(), own + b"Sample"),
    ])

    def output(topic: str, key: str, message_type: type[M]) -> M:
        return message_type.FromString(platform.wait_for(topic, key, OUTPUT_TIMEOUT_S)[0].value)

    single = output(Topics.SINGLES, "after-gen", generate_pb2.SingleObject)
    assert single.keys.meta_key == sample_prefix(RUN, 0, "after-gen") + "meta.json"
    planned = output(Topics.PLACE, "c-after", compose_pb2.PlacementTask)
    assert (planned.run_id, planned.next_object.source.run_id) == (RUN, RUN)
    task = output(Topics.HARMONIZE, "p-after", compose_pb2.HarmonizeTask)  # then harmonization and scoring
    assert 0.0 <= task.placement_score <= 1.0
    for sample_id in ("p-after", "h-after"):
        composed = output(Topics.COMPOSED, sample_id, samples_pb2.Sample)
        assert composed.keys.meta_key == sample_prefix(RUN, 0, sample_id) + "meta.json"
        assert platform.store.exists(composed.keys.meta_key)
    for sample_id in ("p-after", "h-after", "single-a"):
        scored = output(Topics.SCORED, sample_id, samples_pb2.ScoredSample)
        assert math.isfinite(scored.score) and 0.0 <= scored.score <= 1.0


def test_the_coordinator_still_runs_a_run(platform: Platform, sent: Sent) -> None:
    """A run of one single object, stopped at once: it ends STOPPED once its one GenerateRequest
    has come back through attention_mask, past the bad records on the coordinator's topics."""
    target = platform.target("coordinator")
    started = unary_call(target, "Coordinator", "StartRun", platform.fixtures.start_run(COORDINATOR_RUN),
                         coordinator_pb2.StartRunResponse, CALL_TIMEOUT_S)
    assert started.run_id == COORDINATOR_RUN
    unary_call(target, "Coordinator", "StopRun", coordinator_pb2.StopRunRequest(run_id=COORDINATOR_RUN, reason="test"),
               coordinator_pb2.StopRunResponse, CALL_TIMEOUT_S)
    deadline = time.monotonic() + OUTPUT_TIMEOUT_S
    while True:
        run = unary_call(target, "Coordinator", "GetRun", coordinator_pb2.GetRunRequest(run_id=COORDINATOR_RUN),
                         coordinator_pb2.GetRunResponse, CALL_TIMEOUT_S).run
        if run.state == coordinator_pb2.RUN_STATE_STOPPED:
            break
        assert time.monotonic() < deadline, f"run not stopped after {OUTPUT_TIMEOUT_S:.0f} s: {run}"
        time.sleep(0.5)


def test_valid_work_wrote_only_under_its_own_run(platform: Platform) -> None:
    allowed = tuple(PREFIX + p for p in (f"runs/{RUN}/", f"runs/{COORDINATOR_RUN}/",
                                         f"coordinator/runs/{COORDINATOR_RUN}/"))
    changed_names = changes(platform.baseline, platform.snapshot())
    assert changed_names, "the valid requests wrote nothing"
    assert [name for name in changed_names if not name.startswith(allowed)] == []
    # the fixtures were not overwritten: valid work writes its own samples' files only
    fixture_prefixes = tuple(PREFIX + sample_prefix(RUN, 0, s) for s in ("single-a", "single-b", "junk-text", "bomb"))
    assert [name for name in changed_names if name.startswith(fixture_prefixes)] == []
    assert platform.bucket_names() == platform.buckets


# --- oversized input ------------------------------------------------------------------------------------------

def test_a_record_over_the_bus_limit_is_dead_lettered(platform: Platform) -> None:
    """A record larger than the stage's producer may send (Tansu accepts 10 MB) is dead-lettered with
    its value cut to fit, instead of wedging the partition on a DLQ publish that can never succeed."""
    request = changed(platform.fixtures.generate("k-huge-prompt"), lambda r: setattr(r, "prompt", "x" * TEN_MB))
    send(platform.config, [(Topics.GENERATE, "k-huge-prompt", request.SerializeToString(),
                            b"freemask.v1.GenerateRequest")])
    letters = platform.readers[Topics.DLQ].wait_for("k-huge-prompt", 20.0)
    assert letters, "no dead letter for a 10 MB GenerateRequest"
    letter = dead_letter_pb2.DeadLetter.FromString(letters[0].value)
    assert letter.attempts == 1 and "prompt has 10000000 characters" in letter.error
    assert "value cut to its first" in letter.error
    assert 0 < len(letter.value) <= platform.config.bus.max_message_bytes
    assert request.SerializeToString().startswith(letter.value)


def test_a_10mb_setting_name_is_refused_with_a_short_message(platform: Platform) -> None:
    request = platform.fixtures.start_run("c-long-setting", **{"x" * TEN_MB: "1"})
    result = call_raw(platform.target("coordinator"), "/freemask.v1.Coordinator/StartRun", request.SerializeToString())
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.INVALID_ARGUMENT, result
    assert len(result.details() or "") <= DETAIL_LIMIT
