"""Adapters of the coordinator: gRPC `Coordinator` and the loop that drives runs over the bus.

The loop consumes `freemask.singles.v1`, `freemask.scored.v1` and `freemask.dlq.v1`, hands
each record to its run's state machine (`rounds.py`), and for every polled batch:

1. carries out the actions: manifests written and training started on the scoring
   service, messages published;
2. saves every changed run's state to `coordinator/runs/{run}/state.json`;
3. commits the offsets.

A crash anywhere in between redelivers the batch to a machine rebuilt from the last saved
state, which derives the same actions again: ids are deterministic, so downstream stages
rewrite the same objects, and samples already on the accepted topic are read back from
it at start-up and not published twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from kafka import KafkaConsumer, KafkaProducer

from freemask.coordinator.rounds import (
    BOOTSTRAP,
    COMPLETED,
    FAILED,
    GENERATE,
    STOPPED,
    TRAIN,
    Action,
    Publish,
    RunMachine,
    RunRecord,
    RunSettings,
    Train,
)
from freemask.scoring.data import write_manifest
from freemask.scoring.models import model_version
from freemask.shared.bus import (
    GapGuard,
    OutboundMessage,
    Publisher,
    Topics,
    make_consumer,
    make_producer,
    read_to_end,
)
from freemask.shared.config import BusConfig, FreemaskConfig, ServerConfig
from freemask.shared.errors import InvalidInput, NotFound, Unusable, shown
from freemask.shared.grpc_runtime import error_from_rpc, open_channel
from freemask.shared.keys import validate_id
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.scene_steps import require_finite
from freemask.shared.singles import validate_single_object
from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.shared.store import ObjectNotFound, ObjectStore
from freemask.v1 import (
    common_pb2,
    coordinator_pb2,
    dead_letter_pb2,
    generate_pb2,
    samples_pb2,
    scoring_pb2,
    scoring_pb2_grpc,
)

log = logging.getLogger(__name__)

STATE_PREFIX = "coordinator/runs/"
CONSUMER_GROUP = "coordinator"
INPUT_TOPICS = (Topics.SINGLES, Topics.SCORED, Topics.DLQ)
# What scoring answers to a request it will never accept: asking again gets the same answer, so the
# run fails with the reason. Outages (Unavailable) and a forgotten job (NotFound) are retried instead.
SCORING_REFUSALS = (InvalidInput, Unusable)
_RUN_SETTINGS = ("rounds", "alpha", "selection", "initial_samples", "samples_per_round", "composed_fraction",
                 "objects_to_add", "train_epochs", "image_size")
_STATES = {TRAIN: coordinator_pb2.RUN_STATE_RUNNING, GENERATE: coordinator_pb2.RUN_STATE_RUNNING,
           COMPLETED: coordinator_pb2.RUN_STATE_COMPLETED, FAILED: coordinator_pb2.RUN_STATE_FAILED,
           STOPPED: coordinator_pb2.RUN_STATE_STOPPED}


def run_settings(config: FreemaskConfig, overrides: Mapping[str, str]) -> RunSettings:
    """The configured run settings with a StartRun's overrides (YAML values) on top."""
    values: dict[str, Any] = {name: getattr(config.coordinator, name) for name in _RUN_SETTINGS}
    for name, text in overrides.items():
        if name not in _RUN_SETTINGS:
            raise InvalidInput(f"unknown run setting {shown(name, 64)}; known: {', '.join(_RUN_SETTINGS)}")
        try:
            values[name] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise InvalidInput(f"run setting {name!r}: {shown(text)} is not a YAML value") from None
    try:
        checked = type(config.coordinator).model_validate({**config.coordinator.model_dump(), **values})
    except ValueError as err:
        raise InvalidInput(f"bad run settings: {err}") from None
    from freemask.world import DRAWABLE_CLASSES, allowed_backgrounds  # the reference world's placement rules

    classes = tuple(config.world.classes)
    backgrounds = {cls: tuple(b for b in allowed_backgrounds(cls) if b in config.world.backgrounds)
                   if cls in DRAWABLE_CLASSES else tuple(config.world.backgrounds) for cls in classes}
    return RunSettings(**{name: getattr(checked, name) for name in _RUN_SETTINGS}, classes=classes,
                       backgrounds=backgrounds, prompt_template=config.world.prompt_templates[0])


class RunRepository:
    """Run states in the object store, one JSON document per run."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @staticmethod
    def key(run_id: str) -> str:
        return f"{STATE_PREFIX}{validate_id(run_id, 'run id')}/state.json"

    def save(self, record: RunRecord) -> RunRecord:
        """Stamp the record's times and write it; returns a copy of what was written."""
        now = time.time()
        record.created_at = record.created_at or now
        record.updated_at = now
        if record.finished and record.finished_at is None:
            record.finished_at = now
        document = record.to_json()  # a deep copy: the returned record shares nothing with `record`
        self._store.put_bytes(self.key(record.run_id), json.dumps(document, sort_keys=True).encode(),
                              "application/json")
        return RunRecord.from_json(document)

    def load(self, run_id: str) -> RunRecord | None:
        try:
            return RunRecord.from_json(json.loads(self._store.get_bytes(self.key(run_id))))
        except ObjectNotFound:
            return None

    def all(self) -> list[RunRecord]:
        return [RunRecord.from_json(json.loads(self._store.get_bytes(info.key)))
                for info in self._store.list(STATE_PREFIX) if info.key.endswith("/state.json")]


class ScoringClient:
    """Training f_t on the scoring service, over gRPC."""

    def __init__(self, target: str, timeout_s: float = 30.0, server: ServerConfig | None = None) -> None:
        self._channel = open_channel(target, server)
        self._stub = scoring_pb2_grpc.ScoringStub(self._channel)
        self._timeout_s = timeout_s

    def train(self, run_id: str, action: Train, epochs: int | None, seed: int) -> str:
        request = scoring_pb2.TrainRequest(run_id=run_id, round=action.round, seed=seed,
                                           dataset=scoring_pb2.Dataset(manifest_key=action.manifest_key))
        if epochs is not None:
            request.epochs = epochs
        if action.init_from is not None:
            request.init_from.CopyFrom(action.init_from)
        return self._call(self._stub.Train, request).job_id

    def status(self, job_id: str) -> scoring_pb2.TrainStatusResponse:
        return self._call(self._stub.TrainStatus, scoring_pb2.TrainStatusRequest(job_id=job_id))

    def mean_iou(self, manifest_key: str, segmenter: common_pb2.ModelVersion) -> float:
        request = scoring_pb2.EvaluateRequest(dataset=scoring_pb2.Dataset(manifest_key=manifest_key), model=segmenter)
        return self._call(self._stub.Evaluate, request).mean_iou

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout_s)
        except grpc.RpcError as err:
            raise error_from_rpc(err, "scoring service") from None

    def close(self) -> None:
        self._channel.close()


class Coordinator:
    """The runs this process drives, their state machines, and the side effects of their actions.

    One lock serialises every change to a run, and a change can wait on the broker (publish) or the
    scoring service (train, status) for as long as their timeouts. Reads do not take it: `record`
    answers from a copy of each run's last saved state, so a status query stays fast during an outage
    and never sees a run halfway through a batch.
    """

    def __init__(self, config: FreemaskConfig, repository: RunRepository, store: ObjectStore,
                 scoring: ScoringClient, publish: Callable[[Sequence[OutboundMessage]], None]) -> None:
        self._config = config
        self._repository = repository
        self._store = store
        self._scoring = scoring
        self._publish = publish
        self._machines: dict[str, RunMachine] = {}
        self._jobs: dict[str, str] = {}  # run id -> training job id of its current round
        self._saved: dict[str, RunRecord] = {}  # run id -> copy of its last saved state, for readers
        self._lock = threading.RLock()

    def resume(self, already_accepted: Mapping[str, set[str]]) -> None:
        """Load every run; an unfinished one carries on from its saved phase. The loop calls this
        again after every failure, so what a failed batch changed but did not save is dropped here and
        its actions (a Train the scoring service did not take, say) are carried out again."""
        with self._lock:
            for record in self._repository.all():
                machine = RunMachine(record)
                self._machines[record.run_id] = machine
                self._saved[record.run_id] = record.copy()
                if machine.finished:
                    continue
                for sample_id in sorted(already_accepted.get(record.run_id, set()) - set(record.accepted)):
                    record.accepted.append(sample_id)  # published just before a crash: never again
                self._carry_out(machine, machine.training_again() if record.phase == TRAIN
                                else machine.start() if record.phase == BOOTSTRAP else [])
                self._save(record)

    def start_run(self, run_id: str, seed: int, overrides: Mapping[str, str]) -> RunRecord:
        """Start a run, or return the existing one of that id."""
        with self._lock:
            if run_id in self._machines:
                return self.record(run_id)
            settings = run_settings(self._config, overrides)
            existing = self._repository.load(run_id)
            if existing is not None:
                self._machines[run_id] = RunMachine(existing.copy())
                self._saved[run_id] = existing
                return existing
            machine = RunMachine.new(run_id, seed, settings)
            self._carry_out(machine, machine.start())
            saved = self._save(machine.record)
            # Only now: a StartRun that failed to publish or save leaves no run behind, and its retry starts afresh.
            self._machines[run_id] = machine
            return saved

    def record(self, run_id: str) -> RunRecord:
        """A run's last saved state, without waiting for the lock (see the class docstring); a run
        this process has not loaded yet is read from the store."""
        saved = self._saved.get(validate_id(run_id, "run_id")) or self._repository.load(run_id)
        if saved is None:
            raise NotFound(f"no run {run_id!r}")
        return saved

    def stop_run(self, run_id: str, reason: str) -> RunRecord:
        with self._lock:
            machine = self._machines.get(validate_id(run_id, "run_id"))
            if machine is None:
                saved = self._repository.load(run_id)
                if saved is None:
                    raise NotFound(f"no run {run_id!r}")
                machine = self._machines[run_id] = RunMachine(saved)
            machine.stop(reason)
            return self._save(machine.record)

    def handle(self, records: Sequence[Any]) -> None:
        """A polled batch of bus records: route, act (publishing first), then save the runs changed."""
        with self._lock:
            changed: set[str] = set()
            for record in records:
                routed = self._route(record)
                if routed is not None:
                    machine, actions = routed
                    self._carry_out(machine, actions)
                    changed.add(machine.record.run_id)
            for run_id in changed:
                self._save(self._machines[run_id].record)

    def tick(self) -> None:
        """Poll the training jobs of runs waiting on f_t."""
        with self._lock:
            for run_id, machine in self._machines.items():
                job_id = self._jobs.get(run_id)
                if machine.record.phase != TRAIN or job_id is None:
                    continue
                try:
                    status = self._scoring.status(job_id)
                    if status.state == scoring_pb2.TRAIN_STATE_SUCCEEDED:
                        manifest = self._config.coordinator.validation_manifest
                        miou = (self._scoring.mean_iou(manifest, model_version(run_id, machine.record.round))
                                if manifest else None)
                        self._carry_out(machine, machine.on_trained(machine.record.round, miou))
                    elif status.state == scoring_pb2.TRAIN_STATE_FAILED:
                        machine.on_training_failed(status.error)
                    else:
                        continue
                except SCORING_REFUSALS as err:
                    machine.on_training_failed(str(err))
                self._save(machine.record)

    def _save(self, record: RunRecord) -> RunRecord:
        """Persist a run, then show readers the copy: only what is saved is ever shown."""
        self._saved[record.run_id] = saved = self._repository.save(record)
        return saved

    def _route(self, record: Any) -> tuple[RunMachine, list[Action]] | None:
        message_type = {Topics.SINGLES: generate_pb2.SingleObject,
                        Topics.SCORED: samples_pb2.ScoredSample}.get(record.topic, dead_letter_pb2.DeadLetter)
        try:
            message = message_type.FromString(record.value)
        except Exception:  # noqa: BLE001 - not ours to judge: the stage that made it dead-letters its own
            log.warning("coordinator skipped an undecodable record", extra={"topic": record.topic})
            return None
        # Only decoding is guarded: an error of the run's own machine must not pass for a bad record.
        if isinstance(message, generate_pb2.SingleObject):
            machine = self._machines.get(message.run_id)
            if machine is None:
                return None
            try:
                validate_single_object(message, message.run_id, message.round, machine.record.settings.classes)
            except InvalidInput as err:
                return machine, [refused(record, err)]
            return machine, machine.on_single(message)
        if isinstance(message, samples_pb2.ScoredSample):
            machine = self._machines.get(message.sample.run_id)
            if machine is None:
                return None
            try:
                validate_scored(message)
            except InvalidInput as err:
                return machine, [refused(record, err)]
            return machine, machine.on_scored(message)
        key = message.key.decode("utf-8", "replace")
        for machine in self._machines.values():  # a dead letter names its sample, not its run
            if not machine.finished and machine.owns(key):
                return machine, machine.on_dead_letter(key, f"{message.stage}: {message.error}")
        return None

    def _carry_out(self, machine: RunMachine, actions: Sequence[Action]) -> None:
        """Manifests and training first, then the messages: all before the state is saved."""
        record = machine.record
        for action in actions:
            if isinstance(action, Train):
                if action.pairs:
                    write_manifest(self._store, action.manifest_key, action.pairs)
                try:
                    self._jobs[record.run_id] = self._scoring.train(record.run_id, action,
                                                                    record.settings.train_epochs, record.seed)
                except SCORING_REFUSALS as err:
                    machine.on_training_failed(str(err))
        self._publish([OutboundMessage(a.topic, a.key, a.message) for a in actions if isinstance(a, Publish)])


def validate_scored(scored: samples_pb2.ScoredSample) -> None:
    """A score the α cut can use: finite numbers only (a NaN sorts nowhere and would make the cut
    keep nothing), S(x) an IoU in [0, 1]."""
    require_finite(scored, "scored sample")
    if not 0.0 <= scored.score <= 1.0:
        raise InvalidInput(f"score {scored.score} of {shown(scored.sample.sample_id, 64)} is outside [0, 1]")


def refused(record: Any, error: InvalidInput) -> Publish:
    """A stage's output that the run cannot use goes to the DLQ under its sample id, like any poison
    message; the coordinator reads it back from there and counts the slot as dead-lettered."""
    now = Timestamp()
    now.GetCurrentTime()
    letter = dead_letter_pb2.DeadLetter(
        original_topic=record.topic, partition=record.partition, offset=record.offset, key=record.key or b"",
        value=record.value, headers=dict(record.headers or ()), stage="coordinator", error=str(error),
        error_type=type(error).__name__, attempts=1, first_failure_time=now, last_failure_time=now)
    log.warning("coordinator dead-lettered an unusable record", extra={"topic": record.topic, "error": str(error)})
    return Publish(Topics.DLQ, (record.key or b"").decode("utf-8", "replace"), letter)


def run_status(record: RunRecord) -> coordinator_pb2.RunStatus:
    """The persisted record as the API's RunStatus."""
    state = coordinator_pb2.RUN_STATE_PENDING if record.phase == "bootstrap" else _STATES[record.phase]
    if record.stop_requested and state == coordinator_pb2.RUN_STATE_RUNNING:
        state = coordinator_pb2.RUN_STATE_STOPPING
    status = coordinator_pb2.RunStatus(run_id=record.run_id, state=state, round=record.round,
                                       total_rounds=record.settings.rounds, error=record.error)
    for round_record in record.rounds:
        slots = round_record.slots
        scored = sum(slot.score is not None for slot in slots)
        item = coordinator_pb2.RoundStatus(
            round=round_record.round, requested=len(slots), received=scored, scored=scored,
            retained=len(round_record.retained), dead_lettered=sum(slot.dead_letter is not None for slot in slots),
            score_threshold=round_record.threshold or 0.0, validation_mean_iou=round_record.validation_mean_iou or 0.0,
            class_score_thresholds=round_record.class_thresholds)
        item.segmenter.CopyFrom(model_version(record.run_id, round_record.round))  # each round trains its own f_t
        status.rounds.append(item)
    for field in ("requested", "received", "scored", "retained", "dead_lettered"):
        setattr(status, field, sum(getattr(item, field) for item in status.rounds))
    for field in ("created_at", "updated_at", "finished_at"):
        seconds = getattr(record, field)
        if seconds is not None:
            getattr(status, field).FromNanoseconds(int(seconds * 1e9))
    return status


def accepted_ids(config: FreemaskConfig, timeout_s: float = 60.0) -> dict[str, set[str]]:
    """Sample ids already on the accepted topic, by run, read to its true end (`bus.read_to_end`)."""
    found: dict[str, set[str]] = {}
    for record in read_to_end(config.bus, Topics.ACCEPTED, timeout_s):
        accepted = samples_pb2.AcceptedSample.FromString(record.value)
        found.setdefault(accepted.run_id, set()).add(accepted.sample.sample_id)
    return found


class CoordinatorApi:
    """gRPC servicer over the Coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def StartRun(self, request: coordinator_pb2.StartRunRequest) -> coordinator_pb2.StartRunResponse:
        run_id = request.run_id or f"run-{uuid.uuid4().hex[:12]}"
        validate_id(run_id, "run_id")
        record = self._coordinator.start_run(run_id, request.seed, dict(request.config_overrides))
        return coordinator_pb2.StartRunResponse(run_id=record.run_id)

    def GetRun(self, request: coordinator_pb2.GetRunRequest) -> coordinator_pb2.GetRunResponse:
        return coordinator_pb2.GetRunResponse(run=run_status(self._coordinator.record(request.run_id)))

    def StopRun(self, request: coordinator_pb2.StopRunRequest) -> coordinator_pb2.StopRunResponse:
        return coordinator_pb2.StopRunResponse(run=run_status(self._coordinator.stop_run(request.run_id,
                                                                                         request.reason)))


@dataclass(frozen=True)
class BusClients:
    """How the coordinator reaches the bus: makers of its producer and of its consumer of singles,
    scores and dead letters. Each loop attempt makes a fresh consumer, so a broken client is dropped."""

    new_producer: Callable[[], KafkaProducer]
    new_consumer: Callable[[], KafkaConsumer]

    @classmethod
    def of(cls, config: BusConfig) -> BusClients:
        return cls(lambda: make_producer(config), lambda: make_consumer(config, CONSUMER_GROUP, INPUT_TOPICS))


class LazyPublisher:
    """A Publisher made on first use, so the service starts (and answers health) while the
    broker is still coming up."""

    def __init__(self, new_producer: Callable[[], KafkaProducer]) -> None:
        self._new_producer = new_producer
        self._publisher: Publisher | None = None
        self._lock = threading.Lock()

    def publish(self, outputs: Sequence[OutboundMessage]) -> None:
        if not outputs:
            return
        with self._lock:
            if self._publisher is None:
                self._publisher = Publisher(self._new_producer())
            self._publisher.publish(outputs)

    def close(self) -> None:
        with self._lock:
            if self._publisher is not None:
                self._publisher.close()


class CoordinatorLoop:
    """The bus side: polls singles, scores and dead letters, and polls training jobs."""

    def __init__(self, config: FreemaskConfig, coordinator: Coordinator,
                 new_consumer: Callable[[], KafkaConsumer], metrics: ServiceMetrics | None = None) -> None:
        self._config = config
        self._coordinator = coordinator
        self._new_consumer = new_consumer
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="coordinator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self._run()
            except Exception:  # noqa: BLE001 - logged; the loop starts over from the committed offsets
                log.exception("coordinator loop failed; restarting")
                self._stop.wait(self._config.coordinator.poll_interval_s)

    def _run(self) -> None:
        self._coordinator.resume(accepted_ids(self._config))
        consumer = self._new_consumer()
        guard = GapGuard(self._config.bus.gap_wait_s, self._metrics)
        try:
            while not self._stop.is_set():
                polled = guard.poll(consumer, int(self._config.coordinator.poll_interval_s * 1000))
                records = [record for batch in polled.values() for record in batch]
                if records:
                    self._coordinator.handle(records)
                    consumer.commit()
                self._coordinator.tick()
        finally:
            consumer.close(autocommit=False)


def assemble(config: FreemaskConfig, store: ObjectStore, scoring: ScoringClient, bus: BusClients,
             metrics: ServiceMetrics | None = None) -> ServiceParts:
    """The coordinator over these clients, its loop started; `build` passes the configured ones."""
    publisher = LazyPublisher(bus.new_producer)
    coordinator = Coordinator(config, RunRepository(store), store, scoring, publisher.publish)
    loop = CoordinatorLoop(config, coordinator, bus.new_consumer, metrics)
    loop.start()

    def stop() -> None:
        loop.stop(config.server.grace_period_s)
        publisher.close()

    return ServiceParts(grpc_services=[(coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
                                        CoordinatorApi(coordinator))], on_stop=stop)


def build(context: ServiceContext) -> ServiceParts:
    config = context.config
    target = config.coordinator.scoring_target or f"{config.server.host}:{config.server.ports['scoring'].grpc_port}"
    return assemble(config, context.store, ScoringClient(target, server=config.server), BusClients.of(config.bus),
                    context.metrics)
