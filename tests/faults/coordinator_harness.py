"""The coordinator killed between two of its state writes, and started again: a harness.

A coordinator "process" here is the service's own parts (`assemble`, as `build` makes them) over
the real broker and store, with its clients wrapped so that they share one `Fuse`. Every state
write goes through the fuse first: a store put, a record sent to the broker, an offset commit,
and a Train call on scoring (training started is a side effect of the same kind). The fuse counts
them and blows at the `limit`-th, which then does not happen; from that moment every call into
any of that process's clients, in any thread, raises `CoordinatorKilled`. The loop does not catch
it (it is not an Exception), so its thread ends, as kill -9 would end it, and the coordinator's
cleanup (closing the consumer, flushing the producer) finds its clients dead and does nothing.
The harness then discards the real clients itself: the consumer without a commit, the producer
with nothing left in its buffer (a counted send is acknowledged before the next write is
counted, so a crash point is a clean cut: writes 1..k-1 happened, k and later did not).

The stages downstream of the coordinator are cheap deterministic stand-ins, stage workers over the
real broker (`StandIns`): a GenerateRequest becomes a SingleObject, a ComposeRequest a composed
Sample, and a Sample a ScoredSample whose score is a function of its slot (round, kind and index,
the run id left out); chosen slots are dead-lettered instead. Scoring's Train and TrainStatus are
answered by a small gRPC server on 127.0.0.1 that reads the manifest as the real one does.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from freemask.coordinator.rounds import RunRecord
from freemask.coordinator.service import (
    CONSUMER_GROUP,
    INPUT_TOPICS,
    BusClients,
    CoordinatorApi,
    RunRepository,
    ScoringClient,
    assemble,
)
from freemask.scoring.models import model_version
from freemask.shared.bus import (
    GapGuard,
    InboundMessage,
    OutboundMessage,
    Publisher,
    StageWorker,
    Topics,
    ensure_topics,
    make_producer,
    make_reader,
)
from freemask.shared.config import BusConfig, FreemaskConfig, load_config
from freemask.shared.errors import InvalidInput, NotFound
from freemask.shared.grpc_runtime import start_server
from freemask.shared.keys import sample_prefix
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectNotFound, ObjectStore
from freemask.shared.singles import single_object_instance
from freemask.v1 import common_pb2, compose_pb2, coordinator_pb2, generate_pb2, samples_pb2, scoring_pb2

T = TypeVar("T")
_FINISHED = (coordinator_pb2.RUN_STATE_COMPLETED, coordinator_pb2.RUN_STATE_FAILED, coordinator_pb2.RUN_STATE_STOPPED)


class CoordinatorKilled(BaseException):
    """The coordinator process is gone. A BaseException, so that no `except Exception` of the
    coordinator handles it and carries on as if it had merely failed."""


def slot_of(sample_id: str) -> str:
    """`{kind}-{round}-{index}`: a derived sample id without its run-specific digest."""
    return sample_id.rsplit("-", 1)[0]


def stand_in_score(slot: str) -> float:
    """S(x) of the sample in `slot`: the same in every run, distinct across slots (no ties at the cut),
    and exact in a ScoredSample's float32."""
    return int(hashlib.sha256(slot.encode()).hexdigest()[:6], 16) / 2**24


class Fuse:
    """The state writes of one coordinator process, and the one it dies at."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.writes: list[str] = []  # carried out, in order
        self.fatal: str | None = None  # the write it died at
        self.fatal_thread: str | None = None
        self.blown = threading.Event()
        self._lock = threading.Lock()

    def write(self, what: str) -> None:
        """Called before a write: returns if it may happen, raises if the process is (now) dead."""
        with self._lock:
            self._check()
            if self.limit is not None and len(self.writes) + 1 >= self.limit:
                self.fatal, self.fatal_thread = what, threading.current_thread().name
                self.blown.set()
                raise CoordinatorKilled(f"killed at write {self.limit}: {what}")
            self.writes.append(what)

    def check(self) -> None:
        with self._lock:
            self._check()

    def blow(self, why: str) -> None:
        """Kill the process from outside (a test giving up on it)."""
        with self._lock:
            if not self.blown.is_set():
                self.fatal, self.fatal_thread = why, threading.current_thread().name
                self.blown.set()

    def _check(self) -> None:
        if self.blown.is_set():
            raise CoordinatorKilled("the coordinator process is dead")


class FusedStore:
    """An ObjectStore whose writes go through the fuse."""

    def __init__(self, store: ObjectStore, fuse: Fuse) -> None:
        self._store = store
        self._fuse = fuse

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> Any:
        self._fuse.write(f"put {key}")
        return self._store.put_bytes(key, data, content_type)

    def put_stream(self, key: str, stream: Any, length: int = -1,
                   content_type: str = "application/octet-stream") -> Any:
        self._fuse.write(f"put {key}")
        return self._store.put_stream(key, stream, length, content_type)

    def put_file(self, key: str, path: Any, content_type: str = "application/octet-stream") -> Any:
        self._fuse.write(f"put {key}")
        return self._store.put_file(key, path, content_type)

    def delete(self, key: str) -> None:
        self._fuse.write(f"delete {key}")
        self._store.delete(key)

    def __getattr__(self, name: str) -> Any:
        self._fuse.check()
        return getattr(self._store, name)


class FusedProducer:
    """A KafkaProducer whose sends go through the fuse, each acknowledged before it counts as done."""

    def __init__(self, producer: KafkaProducer, fuse: Fuse) -> None:
        self._producer = producer
        self._fuse = fuse

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, **options: Any) -> Any:
        self._fuse.write(f"send {topic} {(key or b'').decode()}")
        future = self._producer.send(topic, value=value, key=key, **options)
        future.get(timeout=30)
        return future

    def close(self, timeout: float | None = None) -> None:
        if not self._fuse.blown.is_set():
            self._producer.close(timeout)

    def discard(self) -> None:
        """Drop the client of a dead process. Sends are acknowledged one by one, so its buffer is
        empty and a zero-timeout close has nothing left to flush onto the broker."""
        self._producer.close(timeout=0)

    def __getattr__(self, name: str) -> Any:
        self._fuse.check()
        return getattr(self._producer, name)


class FusedConsumer:
    """A KafkaConsumer whose commits go through the fuse."""

    def __init__(self, consumer: KafkaConsumer, fuse: Fuse) -> None:
        self._consumer = consumer
        self._fuse = fuse

    def commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata] | None = None) -> None:
        self._fuse.write("commit")
        self._consumer.commit(offsets) if offsets is not None else self._consumer.commit()

    def close(self, autocommit: bool = True) -> None:
        if not self._fuse.blown.is_set():
            self._consumer.close(autocommit=autocommit)

    def assigned(self) -> bool:
        """Whether the group has given it its partitions (read by the harness, not the coordinator)."""
        return bool(self._consumer.assignment())

    def discard(self, join_timeout_s: float = 15.0) -> None:
        """Drop the client of a dead process: no commit. It leaves the group on the way out, where a
        killed process would be dropped when its session times out; the offsets, which are what a
        restart depends on, are the same either way.

        One more departure from kill -9: a consumer killed while joining its group first finishes
        the join. Tansu 0.6 keeps a member dropped in the middle of a join, and the group's next
        join then never completes (a new member was still without partitions after 60 s), which
        would stall the next process on the broker instead of testing the coordinator."""
        deadline = time.monotonic() + join_timeout_s
        while not self._consumer.assignment() and time.monotonic() < deadline:
            self._consumer.poll(timeout_ms=200)  # no commit: auto-commit is off and close does not commit
        self._consumer.close(autocommit=False)

    def __getattr__(self, name: str) -> Any:
        self._fuse.check()
        return getattr(self._consumer, name)


class FusedScoring:
    """The coordinator's ScoringClient; starting a training job is a write."""

    def __init__(self, scoring: ScoringClient, fuse: Fuse) -> None:
        self._scoring = scoring
        self._fuse = fuse

    def train(self, run_id: str, action: Any, epochs: int | None, seed: int) -> str:
        self._fuse.write(f"train {run_id}/{action.round}")
        return self._scoring.train(run_id, action, epochs, seed)

    def __getattr__(self, name: str) -> Any:
        self._fuse.check()
        return getattr(self._scoring, name)


class Incarnation:
    """One coordinator process: the parts `build` assembles, over fused clients; its loop starts at once."""

    def __init__(self, config: FreemaskConfig, scoring_target: str, fuse: Fuse) -> None:
        self.fuse = fuse
        self._producers: list[FusedProducer] = []
        self._consumers: list[FusedConsumer] = []
        self._scoring = ScoringClient(scoring_target)
        real = BusClients.of(config.bus)
        bus = BusClients(new_producer=lambda: self._made(self._producers, FusedProducer(real.new_producer(), fuse)),
                         new_consumer=lambda: self._made(self._consumers, FusedConsumer(real.new_consumer(), fuse)))
        before = set(threading.enumerate())
        parts = assemble(config, FusedStore(ObjectStore(config.store), fuse), FusedScoring(self._scoring, fuse), bus)
        self._loop_threads = [t for t in threading.enumerate() if t not in before and t.name == "coordinator"]
        assert len(self._loop_threads) == 1, f"expected one new coordinator loop thread: {self._loop_threads}"
        (api,) = [implementation for _, implementation in parts.grpc_services]
        assert isinstance(api, CoordinatorApi)
        self.api = api
        self._on_stop = parts.on_stop
        self._grace_s = config.server.grace_period_s

    def _made(self, made: list, client: T) -> T:
        self.fuse.check()  # a dead process makes no new clients
        made.append(client)
        return client

    def polling(self) -> bool:
        """Whether the process is up, as a readiness check would see it before a client calls: the loop
        has resumed its runs and its consumer holds its partitions."""
        return bool(self._consumers) and self._consumers[-1].assigned()

    def call(self, method: Callable[[], T]) -> T | None:
        """An API call as a client makes it: None if the process died under it or the run is unknown."""
        try:
            return method()
        except (CoordinatorKilled, NotFound):
            return None

    def stop(self) -> None:
        """The service's own graceful shutdown (SIGTERM): the loop finishes its batch and commits."""
        assert self._on_stop is not None
        self._on_stop()
        self._join_loop()
        self._scoring.close()

    def bury(self) -> None:
        """After the fuse blew: the loop thread ends at its next call into a client; then the real
        clients are dropped without a commit or a flush."""
        self._join_loop()
        for consumer in self._consumers:
            consumer.discard()
        for producer in self._producers:
            producer.discard()
        self._scoring.close()

    def _join_loop(self) -> None:
        for thread in self._loop_threads:
            thread.join(self._grace_s + 20.0)
            assert not thread.is_alive(), "the coordinator loop thread did not end"


# --- stand-ins for the stages and for scoring's training ------------------------------------------


class StandInScoring:
    """Scoring's Train and TrainStatus: a job succeeds at once. Train reads the manifest, as the real
    service does, and the datasets each round was trained on are kept to be checked."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self.datasets: dict[int, tuple[str, ...]] = {}  # round -> image keys of D_t
        self.errors: list[str] = []

    def Train(self, request: scoring_pb2.TrainRequest) -> scoring_pb2.TrainResponse:  # noqa: N802 - the RPC's name
        try:
            lines = self._store.get_bytes(request.dataset.manifest_key).decode().splitlines()
        except ObjectNotFound:
            self._error(f"Train of round {request.round} before its manifest {request.dataset.manifest_key} exists")
            raise NotFound(f"no manifest {request.dataset.manifest_key}") from None
        images = tuple(sorted(json.loads(line)["image_key"] for line in lines))
        expected_init = model_version(request.run_id, request.round - 1) if request.round > 0 else None
        if (request.init_from if request.HasField("init_from") else None) != expected_init:
            self._error(f"f_{request.round} not trained from f_{request.round - 1}: {request.init_from}")
        with self._lock:
            earlier = self.datasets.setdefault(request.round, images)
        if earlier != images:
            self._error(f"f_{request.round} trained again on another D_{request.round}: {earlier} then {images}")
        return scoring_pb2.TrainResponse(job_id=f"job-{request.run_id}-{request.round}")

    def TrainStatus(self, request: scoring_pb2.TrainStatusRequest) -> scoring_pb2.TrainStatusResponse:  # noqa: N802
        return scoring_pb2.TrainStatusResponse(job_id=request.job_id, state=scoring_pb2.TRAIN_STATE_SUCCEEDED)

    def _error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)


def _keys(run_id: str, round_index: int, sample_id: str) -> common_pb2.SampleKeys:
    prefix = sample_prefix(run_id, round_index, sample_id)
    return common_pb2.SampleKeys(image_key=f"{prefix}image.png", label_key=f"{prefix}label.png",
                                 meta_key=f"{prefix}meta.json")


class StandInStages:
    """Stage workers over the real broker for one run: generate, compose and score. Messages of
    other runs (earlier runs, earlier tests) are consumed and ignored; slots in `dead` fail."""

    def __init__(self, bus: BusConfig, run_id: str, dead: frozenset[str]) -> None:
        self._run_id = run_id
        self._dead = dead
        self.errors: list[str] = []
        self._workers = [StageWorker(f"stand-in-{name}", topic, handler, bus, ServiceMetrics(f"stand-in-{name}"))
                         for name, topic, handler in (("generate", Topics.GENERATE, self._generate),
                                                      ("compose", Topics.COMPOSE, self._compose),
                                                      ("score", Topics.COMPOSED, self._score))]
        self._threads = [threading.Thread(target=self._work, args=(worker,), name=worker.stage, daemon=True)
                         for worker in self._workers]
        for thread in self._threads:
            thread.start()

    def _work(self, worker: StageWorker) -> None:
        try:
            worker.run()
        except Exception as err:  # noqa: BLE001 - reported by the test, which then fails
            self.errors.append(f"{worker.stage}: {type(err).__name__}: {err}")

    def close(self, timeout_s: float = 30.0) -> None:
        for worker in self._workers:
            worker.stop()
        for thread in self._threads:
            thread.join(timeout_s)
            assert not thread.is_alive(), f"stand-in {thread.name} did not stop"

    def _ours(self, message: InboundMessage, message_type: type[T], run_of: Callable[[T], str]) -> T | None:
        try:
            decoded = message.decode(message_type)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - another test's bytes: not ours to dead-letter
            return None
        return decoded if run_of(decoded) == self._run_id else None

    def _fail_if_dead(self, sample_id: str) -> None:
        if slot_of(sample_id) in self._dead:
            raise InvalidInput(f"stand-in: slot {slot_of(sample_id)} is dead-lettered by design")

    def _generate(self, message: InboundMessage) -> list[OutboundMessage]:
        request = self._ours(message, generate_pb2.GenerateRequest, lambda r: r.run_id)
        if request is None:
            return []
        self._fail_if_dead(request.sample_id)
        single = generate_pb2.SingleObject(
            sample_id=request.sample_id, run_id=request.run_id, round=request.round, class_id=1,
            class_name=request.class_name, background_name=request.background_name, prompt=request.prompt,
            seed=request.seed, keys=_keys(request.run_id, request.round, request.sample_id),
            image_size=request.image_size, threshold=0.5, mask_area_pixels=4,
            mask_box=common_pb2.BoundingBox(x=1, y=1, width=2, height=2))
        return [OutboundMessage(Topics.SINGLES, request.sample_id, single)]

    def _compose(self, message: InboundMessage) -> list[OutboundMessage]:
        request = self._ours(message, compose_pb2.ComposeRequest, lambda r: r.run_id)
        if request is None:
            return []
        self._fail_if_dead(request.sample_id)
        sample = samples_pb2.Sample(
            sample_id=request.sample_id, run_id=request.run_id, round=request.round,
            kind=samples_pb2.SAMPLE_KIND_COMPOSED, keys=_keys(request.run_id, request.round, request.sample_id),
            image_size=request.base_scene.image_size, background_name=request.background_name,
            objects=[single_object_instance(request.base_scene)])
        return [OutboundMessage(Topics.COMPOSED, request.sample_id, sample)]

    def _score(self, message: InboundMessage) -> list[OutboundMessage]:
        sample = self._ours(message, samples_pb2.Sample, lambda s: s.run_id)
        if sample is None:
            return []
        scored = samples_pb2.ScoredSample(sample=sample, score=stand_in_score(slot_of(sample.sample_id)),
                                          segmenter=model_version(sample.run_id, sample.round))
        return [OutboundMessage(Topics.SCORED, sample.sample_id, scored)]


@contextmanager
def stand_ins(config: FreemaskConfig, run_id: str, dead: frozenset[str]) -> Iterator[tuple[str, StandInScoring,
                                                                                            StandInStages]]:
    """The stand-ins of one run; yields scoring's target, the scoring stand-in and the stages."""
    scoring = StandInScoring(ObjectStore(config.store))
    server = start_server(config.server, 0, [(scoring_pb2.DESCRIPTOR.services_by_name["Scoring"], scoring)],
                          ServiceMetrics("stand-in-scoring"))
    try:
        # The stand-ins read a polled batch at a time, as stages do; only the coordinator polls one by one.
        stages = StandInStages(config.bus.model_copy(update={"max_poll_records": 16}), run_id, dead)
        try:
            yield f"127.0.0.1:{server.port}", scoring, stages
        finally:
            stages.close()
    finally:
        server.stop(1.0)


# --- reading the broker back ----------------------------------------------------------------------


def _read_to_end(bus: BusConfig, consumer: KafkaConsumer, topics: Sequence[str],
                 deadline: float) -> list[ConsumerRecord]:
    """Every record of `topics`, each partition read from its start until polls bring nothing and its
    position has reached the high-water mark of the fetches (Tansu's ListOffsets reports too little)."""
    consumer.topics()
    partitions = [TopicPartition(topic, p) for topic in topics for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    guard = GapGuard(bus.gap_wait_s)
    records: list[ConsumerRecord] = []
    quiet = 0
    while quiet < 2:  # a second empty poll: nothing was still in flight
        polled = guard.poll(consumer, 300)
        records.extend(record for batch in polled.values() for record in batch)
        caught_up = all(consumer.highwater(p) is not None and consumer.position(p) >= consumer.highwater(p)
                        for p in partitions)
        quiet = quiet + 1 if not polled and caught_up else 0
        assert time.monotonic() < deadline, f"reading {topics} to the end took too long"
    return records


def skip_group_to_end(bus: BusConfig, group: str, topics: Sequence[str], timeout_s: float = 60.0) -> None:
    """Commit `group`'s offsets at the current end of `topics`, so that a coordinator of a new group
    reads only what comes after (the session's broker holds other runs' and other tests' records)."""
    consumer = KafkaConsumer(bootstrap_servers=bus.bootstrap_servers, client_id="crash-harness",
                             group_id=f"{bus.group_prefix}.{group}", enable_auto_commit=False)
    try:
        _read_to_end(bus, consumer, topics, time.monotonic() + timeout_s)
        consumer.commit({p: OffsetAndMetadata(consumer.position(p), "", -1) for p in consumer.assignment()})
    finally:
        consumer.close(autocommit=False)


def accepted_of(bus: BusConfig, run_id: str, timeout_s: float = 60.0) -> list[samples_pb2.AcceptedSample]:
    consumer = make_reader(bus)
    try:
        records = _read_to_end(bus, consumer, [Topics.ACCEPTED], time.monotonic() + timeout_s)
    finally:
        consumer.close()
    accepted = [samples_pb2.AcceptedSample.FromString(record.value) for record in records]
    return [sample for sample in accepted if sample.run_id == run_id]


def publish_backlog(bus: BusConfig, run_id: str, count: int) -> None:
    publisher = Publisher(make_producer(bus))
    try:
        publisher.publish([OutboundMessage(Topics.ACCEPTED, f"s-{i}", samples_pb2.AcceptedSample(
            schema_version=1, run_id=run_id, sample=samples_pb2.Sample(sample_id=f"s-{i}", run_id=run_id)))
            for i in range(count)])
    finally:
        publisher.close()


# --- one run, crashed at the given writes ---------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    seed: int
    rounds: int
    initial_samples: int
    samples_per_round: int
    alpha: float
    dead_slots: frozenset[str]  # slots whose requests the stand-ins dead-letter

    def overrides(self) -> dict[str, str]:
        return {"rounds": str(self.rounds), "initial_samples": str(self.initial_samples),
                "samples_per_round": str(self.samples_per_round), "alpha": str(self.alpha),
                # the global cut: the tests check the retained set against the top scores of each round
                "selection": "global", "composed_fraction": "0.5", "objects_to_add": "1", "train_epochs": "1"}


@dataclass
class Crash:
    incarnation: int
    write_number: int
    write: str
    thread: str


@dataclass
class RunOutcome:
    run_id: str
    record: RunRecord  # the saved state at the end
    accepted: list[samples_pb2.AcceptedSample]  # this run's records on the accepted topic
    writes: list[list[str]]  # per process: the writes it carried out
    crashes: list[Crash]
    datasets: dict[int, tuple[str, ...]]  # round -> image keys that f_t was trained on
    errors: list[str] = field(default_factory=list)  # from the stand-ins


def run_with_crashes(stack: EmbeddedStack, plan: RunPlan, limits: Sequence[int], backlog: int = 0,
                     timeout_s: float = 150.0) -> RunOutcome:
    """One run from StartRun to its end, each process killed at its `limits[i]`-th write (the last
    process lives); every process after a crash is new (no in-memory state survives) and resumes
    against the same broker, store and consumer group. `backlog` accepted samples of another run
    are published first, so that the run's own lie beyond what one poll reads back."""
    tag = uuid.uuid4().hex[:8]
    run_id = f"crash-{tag}"
    config = load_config(environ={**stack.client_env(), "FREEMASK_STORE__PREFIX": f"crash-{tag}/",
                                  "FREEMASK_BUS__GROUP_PREFIX": f"crash-{tag}", "FREEMASK_BUS__MAX_POLL_RECORDS": "1",
                                  "FREEMASK_COORDINATOR__POLL_INTERVAL_S": "0.2"})
    ensure_topics(config.bus)
    skip_group_to_end(config.bus, CONSUMER_GROUP, INPUT_TOPICS)
    if backlog:
        publish_backlog(config.bus, f"backlog-{tag}", backlog)
    deadline = time.monotonic() + timeout_s
    pending = list(limits)
    writes: list[list[str]] = []
    crashes: list[Crash] = []
    with stand_ins(config, run_id, plan.dead_slots) as (target, scoring, stages):
        started = False
        while True:
            fuse = Fuse(pending.pop(0) if pending else None)
            process = Incarnation(config, target, fuse)
            try:
                started = _drive(process, run_id, plan, started, deadline, stages, writes)
            except BaseException:
                fuse.blow("the test gave up on this process")
                process.bury()
                raise
            if fuse.blown.is_set():
                process.bury()
            writes.append(list(fuse.writes))
            if fuse.fatal is None:
                break
            crashes.append(Crash(len(writes) - 1, len(fuse.writes) + 1, fuse.fatal, fuse.fatal_thread or "?"))
        errors = stages.errors + scoring.errors
    record = RunRepository(ObjectStore(config.store)).load(run_id)
    assert record is not None, f"run {run_id} has no saved state"
    return RunOutcome(run_id, record, accepted_of(config.bus, run_id), writes, crashes, dict(scoring.datasets),
                      errors)


def _drive(process: Incarnation, run_id: str, plan: RunPlan, started: bool, deadline: float,
           stages: StandInStages, writes: list[list[str]]) -> bool:
    """Follow one process until it dies or the run ends (then stop it gracefully); returns whether
    StartRun has been answered (a client whose call failed calls again, as StartRun is idempotent)."""
    fuse = process.fuse

    def waiting(what: str) -> None:
        assert not stages.errors, f"a stand-in failed: {stages.errors}"
        assert time.monotonic() < deadline, (f"{what}; writes of this process so far: {fuse.writes[-12:]}; "
                                             f"earlier processes: {[len(w) for w in writes]}")
        time.sleep(0.1)

    while not (process.polling() or fuse.blown.is_set()):
        waiting("the coordinator never started polling its partitions")
    if not started and not fuse.blown.is_set():
        started = process.call(lambda: process.api.StartRun(coordinator_pb2.StartRunRequest(
            run_id=run_id, seed=plan.seed, config_overrides=plan.overrides()))) is not None
    while not fuse.blown.is_set():
        response = process.call(lambda: process.api.GetRun(coordinator_pb2.GetRunRequest(run_id=run_id)))
        if response is not None and response.run.state in _FINISHED:
            process.stop()  # the final commit may be the write it dies at
            break
        waiting(f"run {run_id} not finished: {response.run if response else 'unknown'}")
    return started


# --- what a finished run comes to, by slot --------------------------------------------------------


@dataclass(frozen=True)
class RoundSummary:
    requested: tuple[str, ...]
    scores: tuple[tuple[str, float], ...]
    dead_lettered: tuple[str, ...]
    threshold: float | None
    retained: tuple[str, ...]


@dataclass(frozen=True)
class RunSummary:
    phase: str
    bootstrap: tuple[str, ...]  # D_0's slots that were generated
    rounds: tuple[RoundSummary, ...]
    accepted: tuple[tuple[str, int, int], ...]  # (slot, round accepted, times on the topic)
    datasets: tuple[tuple[int, tuple[str, ...]], ...]  # round -> slots f_t was trained on


def summary(outcome: RunOutcome) -> RunSummary:
    """The outcome with the run id left out of every id, comparable across runs of the same seed."""
    record = outcome.record
    rounds = tuple(RoundSummary(
        requested=tuple(sorted(slot_of(slot.final_id) for slot in r.slots)),
        scores=tuple(sorted((slot_of(slot.final_id), slot.score) for slot in r.slots if slot.score is not None)),
        dead_lettered=tuple(sorted(slot_of(slot.final_id) for slot in r.slots if slot.dead_letter is not None)),
        threshold=r.threshold, retained=tuple(sorted(slot_of(i) for i in r.retained))) for r in record.rounds)
    times = Counter(sample.sample.sample_id for sample in outcome.accepted)
    rounds_of = {sample.sample.sample_id: sample.round_accepted for sample in outcome.accepted}
    accepted = tuple(sorted((slot_of(i), rounds_of[i], n) for i, n in times.items()))
    datasets = tuple((t, tuple(sorted(slot_of(key.split("/")[-2]) for key in images)))
                     for t, images in sorted(outcome.datasets.items()))
    return RunSummary(phase=record.phase, rounds=rounds, accepted=accepted, datasets=datasets,
                      bootstrap=tuple(sorted(slot_of(s.generate_id) for s in record.bootstrap if s.single)))
