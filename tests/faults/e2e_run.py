"""One end-to-end run of Algorithm 1 on real servers, for tests that break something during it.

What the coordinator end-to-end test and the fault tests share: every service as its own process
on reserved loopback ports (`Platform`), starting and following a run over the coordinator's gRPC
API, reading topics back from their start, a stage group's uncommitted records (`StageLag`), the
stage counters of a service's /metrics, and the accounting every faulted run must still satisfy
(`check_accounting`).
"""

from __future__ import annotations

import math
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client.parser import text_string_to_metric_families

from freemask.coordinator.service import RunRepository
from freemask.shared.bus import Topics, ensure_topics, read_to_end
from freemask.shared.cli import start_services, stop_services
from freemask.shared.config import SERVICE_NAMES, FreemaskConfig
from freemask.shared.processes import ServerProcess
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.v1 import coordinator_pb2, dead_letter_pb2, samples_pb2

from grpc_helpers import unary_call
from ports import reserve_ports

# How long one run of Algorithm 1 on a private platform may take; a test that waits for one carries
# `run_timeout`, the suite's pytest timeout raised above that deadline, so that the deadline is what
# reports a slow run (the suite-wide 300 s cut one short before it could).
RUN_TIMEOUT_S = 420.0
run_timeout = pytest.mark.timeout(RUN_TIMEOUT_S + 180)

# The stage workers and the topic each consumes (its consumer group is `{group_prefix}.{service}`).
STAGE_INPUTS: dict[str, str] = {
    "attention_mask": Topics.GENERATE,
    "thesaurus": Topics.COMPOSE,
    "placement": Topics.PLACE,
    "harmonization": Topics.HARMONIZE,
    "scoring": Topics.COMPOSED,
}
FINISHED = (coordinator_pb2.RUN_STATE_COMPLETED, coordinator_pb2.RUN_STATE_FAILED, coordinator_pb2.RUN_STATE_STOPPED)

# Small models and short training: a whole two-round run takes about a minute on two idle cores.
# 4 steps draw blurs whose masks are often large, so the mask size limit is off.
_SMALL_RUN = {"FREEMASK_ATTENTION_MASK__NUM_INFERENCE_STEPS": "4", "FREEMASK_ATTENTION_MASK__MAX_MASK_FRACTION": "1.0",
              "FREEMASK_SCORING__INPUT_SIZE": "32",
              "FREEMASK_SCORING__BATCH_SIZE": "8", "FREEMASK_COORDINATOR__TRAIN_EPOCHS": "2",
              "FREEMASK_COORDINATOR__POLL_INTERVAL_S": "0.3"}


@dataclass(frozen=True)
class RunPlan:
    rounds: int = 2
    initial: int = 6
    per_round: int = 10
    alpha: float = 0.7

    def overrides(self) -> dict[str, str]:
        return {"rounds": str(self.rounds), "initial_samples": str(self.initial),
                "samples_per_round": str(self.per_round), "alpha": str(self.alpha)}


def platform_env(stack: EmbeddedStack, group_prefix: str) -> dict[str, str]:
    """The environment of every service of one platform on `stack`: its own ports and consumer groups."""
    numbers = iter(reserve_ports(2 * len(SERVICE_NAMES)))
    ports = {}
    for name in SERVICE_NAMES:
        ports[f"FREEMASK_SERVER__PORTS__{name.upper()}__GRPC_PORT"] = str(next(numbers))
        ports[f"FREEMASK_SERVER__PORTS__{name.upper()}__METRICS_PORT"] = str(next(numbers))
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("FREEMASK_")}
    return {**inherited, **stack.client_env(), **ports, "FREEMASK_BUS__GROUP_PREFIX": group_prefix, **_SMALL_RUN}


@dataclass
class Platform:
    """All six services, each its own process; a killed one can be started again in its place."""

    config: FreemaskConfig
    env: dict[str, str]
    log_dir: Path
    processes: dict[str, ServerProcess] = field(default_factory=dict)

    @classmethod
    @contextmanager
    def running(cls, config: FreemaskConfig, env: dict[str, str], log_dir: Path) -> Iterator[Platform]:
        """Topics created, every service healthy; every process (restarted ones too) stopped at the end."""
        ensure_topics(config.bus)
        platform = cls(config, env, log_dir)
        try:
            platform.processes = dict(zip(SERVICE_NAMES, start_services(config, env, log_dir), strict=True))
            yield platform
        finally:
            stop_services(list(platform.processes.values()))

    def kill(self, name: str, timeout_s: float = 10.0) -> None:
        """SIGKILL: no shutdown path runs, nothing in hand is committed."""
        process = self.processes[name]
        os.kill(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while process.alive():  # reaps it, so its pid cannot be taken for ours
            assert time.monotonic() < deadline, f"{name} (pid {process.pid}) still alive {timeout_s} s after SIGKILL"
            time.sleep(0.05)

    def pause(self, name: str) -> None:
        """SIGSTOP: the process holds whatever it has, answers nothing, and misses its group heartbeats."""
        os.kill(self.processes[name].pid, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        os.kill(self.processes[name].pid, signal.SIGCONT)

    def restart(self, name: str) -> float:
        """Start `name` again (its log appended to); the seconds until it answered health."""
        started = time.monotonic()
        (self.processes[name],) = start_services(self.config, self.env, self.log_dir, names=(name,))
        return time.monotonic() - started

    def exited(self) -> list[str]:
        return [name for name, process in self.processes.items() if not process.alive()]

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stage_counts(self, name: str) -> dict[str, float]:
        """The stage counters (`ok`, `retried`, `dead_lettered`) of the running process `name`."""
        port = self.config.server.ports[name].metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        counts = {"ok": 0.0, "retried": 0.0, "dead_lettered": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name != "freemask_stage_messages":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["outcome"]] += sample.value
        return counts


# --- the coordinator's API ------------------------------------------------------------------

def coordinator_call(config: FreemaskConfig, method: str, request, response_type, timeout_s: float = 30.0):
    target = f"127.0.0.1:{config.server.ports['coordinator'].grpc_port}"
    return unary_call(target, "Coordinator", method, request, response_type, timeout_s)


def run_status(config: FreemaskConfig, run_id: str, timeout_s: float = 30.0) -> coordinator_pb2.RunStatus:
    return coordinator_call(config, "GetRun", coordinator_pb2.GetRunRequest(run_id=run_id),
                            coordinator_pb2.GetRunResponse, timeout_s).run


def start_run(config: FreemaskConfig, plan: RunPlan, seed: int = 3) -> str:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    started = coordinator_call(config, "StartRun", coordinator_pb2.StartRunRequest(
        run_id=run_id, seed=seed, config_overrides=plan.overrides()), coordinator_pb2.StartRunResponse)
    assert started.run_id == run_id
    return run_id


def follow_run(config: FreemaskConfig, run_id: str, timeout_s: float,
               between_polls: Callable[[coordinator_pb2.RunStatus], None] = lambda _: None,
               poll_s: float = 0.5) -> coordinator_pb2.RunStatus:
    """Poll the run until it ends, calling `between_polls` with each status read.

    A GetRun that fails or times out is polled again: the coordinator holds its lock while it
    publishes, so a broker outage can stall its answers without anything being wrong.
    """
    deadline = time.monotonic() + timeout_s
    status = coordinator_pb2.RunStatus()
    while True:
        try:
            status = run_status(config, run_id, timeout_s=10.0)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        if status.state in FINISHED:
            return status
        between_polls(status)
        assert time.monotonic() < deadline, f"run {run_id} not finished after {timeout_s:.0f} s: {status}"
        time.sleep(poll_s)


def phase_of(status: coordinator_pb2.RunStatus) -> str:
    if status.state == coordinator_pb2.RUN_STATE_PENDING:
        return "bootstrap"
    if not status.rounds or status.rounds[-1].requested == 0:
        return f"training f_{status.round}"
    return f"round {status.round}"


def progress(status: coordinator_pb2.RunStatus) -> tuple[int, ...]:
    """Something that changes whenever the run moves on: its round and every round's counts."""
    return (status.state, status.round, *(n for item in status.rounds
                                          for n in (item.scored, item.dead_lettered, item.retained)))


# --- topics and groups ----------------------------------------------------------------------
#
# Tansu 0.6 answers ListOffsets(latest) with 1 for any non-empty partition, so `end_offsets` is
# useless here: how far a partition goes is read from the high-water mark of fetch responses.

def _tail_reader(config: FreemaskConfig, topics: Iterable[str]) -> tuple[KafkaConsumer, list[TopicPartition]]:
    """A reader in no group, at the start of every partition of `topics`, with short fetch waits."""
    reader = KafkaConsumer(bootstrap_servers=config.bus.bootstrap_servers, group_id=None, enable_auto_commit=False,
                           fetch_max_wait_ms=50, request_timeout_ms=10000)
    partitions = [TopicPartition(topic, p) for topic in topics for p in range(config.bus.partitions_of(topic))]
    reader.assign(partitions)
    reader.seek_to_beginning(*partitions)
    return reader, partitions


def read_topic(config: FreemaskConfig, topic: str, timeout_s: float = 60.0) -> list[ConsumerRecord]:
    """Every record of `topic`, read to its true end as the coordinator reads the accepted topic."""
    return list(read_to_end(config.bus, topic, timeout_s))


def accepted_of(config: FreemaskConfig, run_id: str) -> list[samples_pb2.AcceptedSample]:
    found = (samples_pb2.AcceptedSample.FromString(record.value) for record in read_topic(config, Topics.ACCEPTED))
    return [accepted for accepted in found if accepted.run_id == run_id]


class StageLag:
    """Records on each stage's input topic that its consumer group has not committed: the stage's
    work in hand or waiting. A reader follows the input topics to their ends; the groups' offsets
    come from the broker. Its clients are made again after a failure (a broker restart)."""

    def __init__(self, config: FreemaskConfig) -> None:
        self._config = config
        self._admin: KafkaAdminClient | None = None
        self._reader: KafkaConsumer | None = None
        self._partitions = {stage: [TopicPartition(topic, p) for p in range(config.bus.partitions_of(topic))]
                            for stage, topic in STAGE_INPUTS.items()}

    def read(self) -> dict[str, int]:
        """Uncommitted records per stage; raises if the broker does not answer."""
        groups = {f"{self._config.bus.group_prefix}.{stage}": stage for stage in STAGE_INPUTS}
        try:
            if self._admin is None or self._reader is None:
                self._admin = KafkaAdminClient(bootstrap_servers=self._config.bus.bootstrap_servers,
                                               request_timeout_ms=5000)
                self._reader, _ = _tail_reader(self._config, STAGE_INPUTS.values())
            # committed first: a record written meanwhile can only add to the lag, never hide it
            committed = self._admin.list_group_offsets({group: self._partitions[stage]
                                                        for group, stage in groups.items()})
            self._reader.poll(timeout_ms=20)  # brings the last fetch's high-water marks, and sends the next
            ends = {p: max(self._reader.position(p), self._reader.highwater(p) or 0)
                    for partitions in self._partitions.values() for p in partitions}
        except Exception:
            self.close()
            raise
        lag = {}
        for group, stage in groups.items():
            offsets = committed.get(group, {})
            lag[stage] = sum(max(0, ends[p] - max(0, offsets[p].offset if p in offsets else 0))
                             for p in self._partitions[stage])
        return lag

    def close(self) -> None:
        for client in (self._admin, self._reader):
            if client is not None:
                client.close()
        self._admin = self._reader = None


def input_records(config: FreemaskConfig) -> dict[str, int]:
    """Records ever written to each stage's input topic (the platform's own stack: all of them this run's)."""
    return {stage: len(read_topic(config, topic)) for stage, topic in STAGE_INPUTS.items()}


# --- what every run must satisfy, whatever broke during it ----------------------------------

@dataclass(frozen=True)
class RunOutcome:
    status: coordinator_pb2.RunStatus
    accepted: list[samples_pb2.AcceptedSample]
    dead_letters: dict[str, list[dead_letter_pb2.DeadLetter]]  # by the dead-lettered sample's id


def check_accounting(config: FreemaskConfig, plan: RunPlan, run_id: str,
                     status: coordinator_pb2.RunStatus) -> RunOutcome:
    """The run completed and every requested sample is accounted for.

    Per round, scored + dead-lettered = requested and at least ⌈α·scored⌉ are retained; every slot
    that ended by a dead letter has one on the DLQ with its error; the accepted topic holds the
    run's retained samples, each once.
    """
    assert status.state == coordinator_pb2.RUN_STATE_COMPLETED, status
    assert status.total_rounds == plan.rounds and len(status.rounds) == plan.rounds, status
    for item in status.rounds:
        assert item.requested == plan.per_round, item
        assert item.scored + item.dead_lettered == item.requested, item
        assert item.scored >= 1 and item.retained >= math.ceil(plan.alpha * item.scored), item

    record = RunRepository(ObjectStore(config.store)).load(run_id)
    assert record is not None, f"no saved state of run {run_id}"
    rounds = [record.bootstrap, *(r.slots for r in record.rounds)]
    assert [sum(slot.dead_letter is not None for slot in slots) for slots in rounds[1:]] == [
        item.dead_lettered for item in status.rounds]
    letters: dict[str, list[dead_letter_pb2.DeadLetter]] = {}
    for dlq_record in read_topic(config, Topics.DLQ):
        letters.setdefault((dlq_record.key or b"").decode(), []).append(
            dead_letter_pb2.DeadLetter.FromString(dlq_record.value))
    ours = {slot_id: letters.get(slot_id, []) for slots in rounds for slot in slots
            for slot_id in (slot.generate_id, slot.composed_id) if slot_id}
    for slots in rounds:
        for slot in slots:
            if slot.dead_letter is None:
                continue
            found = ours[slot.generate_id] + (ours[slot.composed_id] if slot.composed_id else [])
            assert found, f"slot {slot.final_id} ended by a dead letter ({slot.dead_letter}) that is not on the DLQ"
    for sample_id, found in ours.items():
        for letter in found:
            assert letter.error.strip(), f"dead letter of {sample_id} from {letter.stage} gives no reason"

    accepted = accepted_of(config, run_id)
    ids = [a.sample.sample_id for a in accepted]
    assert len(ids) == len(set(ids)), f"duplicates on the accepted topic: {sorted(ids)}"
    assert len(ids) == sum(item.retained for item in status.rounds), (ids, status)
    assert set(ids) == {i for r in record.rounds for i in r.retained}
    return RunOutcome(status, accepted, {k: v for k, v in ours.items() if v})


def redeliveries(handled: Mapping[str, float], written: Mapping[str, int]) -> dict[str, int]:
    """Per stage, messages handled more than once: handled (every incarnation's counters) less written."""
    return {stage: int(handled[stage]) - written[stage] for stage in STAGE_INPUTS}
