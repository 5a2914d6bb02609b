"""Issue #13 item 4: Triton down or slow under the placement stage, on a tritonserver of this
module's own (its own ports: the session stack's Triton is never touched), with the session's
broker and store.

- Triton stopped while the stage has a backlog, then started again: every task published
  ends placed (a HarmonizeTask) or dead-lettered with its reason, none missing; tasks that
  failed were retried with exponential backoff before they were dead-lettered; once Triton
  is back, new tasks are placed.
- Triton slower than `triton.timeout_s` (a python-backend `fopa` that sleeps): `Place`
  answers UNAVAILABLE naming the timeout instead of hanging, the stage retries and then
  dead-letters, and gRPC health answers SERVING throughout.
"""

from __future__ import annotations

import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from freemask.placement.service import build
from freemask.shared.bus import StageWorker, Topics
from freemask.shared.config import FreemaskConfig
from freemask.shared.grpc_runtime import check_health, start_server
from freemask.shared.images import encode_png
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.shared.stack import DEFAULT_MODEL_REPOSITORY, EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.v1 import common_pb2, compose_pb2, dead_letter_pb2, placement_pb2

from bus_helpers import publish_samples, unique_topics
from grpc_helpers import unary_call
from service_procs import (
    stack_config,
    FOREGROUND,
    LABELS,
    PrivateTriton,
    metric_sum,
    read_outcomes,
    scene_image,
    write_placement_run,
)

pytestmark = pytest.mark.stack

MAX_ATTEMPTS = 3
BACKOFF_S = 0.25  # the first retry's pause; each later one doubles (bus.retry_backoff_s)
TRITON_TIMEOUT_S = 1.0
SLOW_MODEL_DELAY_S = 4.0  # well past TRITON_TIMEOUT_S
OUTCOME_TIMEOUT_S = 120.0


def fault_config(stack: EmbeddedStack, triton_url: str) -> FreemaskConfig:
    return stack_config(stack, FREEMASK_TRITON__URL=triton_url, FREEMASK_TRITON__TIMEOUT_S=str(TRITON_TIMEOUT_S),
                      FREEMASK_BUS__GROUP_PREFIX=f"triton-faults-{uuid.uuid4().hex[:8]}",
                      FREEMASK_BUS__MAX_ATTEMPTS=str(MAX_ATTEMPTS), FREEMASK_BUS__RETRY_BACKOFF_S=str(BACKOFF_S),
                      FREEMASK_BUS__RETRY_BACKOFF_MAX_S="5")


def built(config: FreemaskConfig, metrics: ServiceMetrics) -> ServiceParts:
    """The service as `freemask serve placement` wires it (one Placer behind gRPC and the stage)."""
    return build(ServiceContext("placement", config, metrics))


class RunningStage:
    """The placement stage worker on a topic of the test's own, in a thread, as the runner runs it."""

    def __init__(self, config: FreemaskConfig, parts: ServiceParts, metrics: ServiceMetrics, topic: str) -> None:
        assert parts.stage is not None and parts.stage.topic == Topics.PLACE
        self.worker = StageWorker("placement", topic, parts.stage.handler, config.bus, metrics,
                                  batch_handler=parts.stage.batch_handler)
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as err:  # noqa: BLE001 - reported by the test, not lost in the thread
            self.failure = err

    def stop(self) -> None:
        self.worker.stop()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the stage worker did not stop within 60 s"
        assert self.failure is None, f"the stage worker failed: {self.failure!r}"


@pytest.fixture
def triton(tmp_path: Path) -> Iterator[PrivateTriton]:
    server = PrivateTriton(tmp_path / "triton")
    yield server
    server.stop()


def wait_for(condition, what: str, timeout_s: float, stage: RunningStage | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if stage is not None and stage.failure is not None:
            raise AssertionError(f"the stage worker failed while waiting for {what}: {stage.failure!r}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.1)


def seconds(stamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


@pytest.mark.timeout(300)
def test_a_triton_outage_under_a_backlog_loses_no_task(stack: EmbeddedStack, triton: PrivateTriton) -> None:
    triton.start(DEFAULT_MODEL_REPOSITORY)
    config = fault_config(stack, triton.url)
    metrics = ServiceMetrics("placement")
    run = write_placement_run(ObjectStore(config.store), f"outage-{uuid.uuid4().hex[:8]}")
    (topic,) = unique_topics(config.bus, "place")
    stage = RunningStage(config, built(config, metrics), metrics, topic)
    try:
        before = [run.task(f"before-{i}") for i in range(3)]
        publish_samples(config.bus, topic, before)
        wait_for(lambda: stage.worker.stats.processed >= len(before), "tasks placed while Triton is up", 60, stage)

        triton.stop()
        backlog = [run.task(f"backlog-{i}") for i in range(12)]
        publish_samples(config.bus, topic, backlog)
        # Triton stays down until the stage has given up on a task or two, then comes back
        # while the rest of the backlog is still waiting.
        wait_for(lambda: stage.worker.stats.dead_lettered >= 2, "tasks dead-lettered while Triton is down", 60,
                 stage)
        down_for = triton.start(DEFAULT_MODEL_REPOSITORY)
        back_at = time.monotonic()
        after = [run.task(f"after-{i}") for i in range(3)]
        publish_samples(config.bus, topic, after)
        published = before + backlog + after
        wait_for(lambda: stage.worker.stats.processed >= len(published), "every task handled", OUTCOME_TIMEOUT_S,
                 stage)
        recovered_in = time.monotonic() - back_at
    finally:
        stage.stop()

    keys = [task.sample_id for task in published]
    outcomes = read_outcomes(config.bus, [Topics.HARMONIZE, Topics.DLQ], keys, OUTCOME_TIMEOUT_S)
    placed = {key: compose_pb2.HarmonizeTask.FromString(value)
              for key, value in outcomes[Topics.HARMONIZE].items() if key in keys}
    dead = {key: dead_letter_pb2.DeadLetter.FromString(value)
            for key, value in outcomes[Topics.DLQ].items() if key in keys}
    missing = sorted(set(keys) - placed.keys() - dead.keys())
    backlog_keys = {t.sample_id for t in backlog}
    retried = metric_sum_of(metrics, "freemask_stage_messages_total", outcome="retried")
    print(f"\n[triton outage] published {len(keys)}: placed {len(placed)}, dead-lettered {len(dead)}, missing "
          f"{len(missing)}; backlog {len(backlog)}: {len(backlog_keys & placed.keys())} placed after Triton came "
          f"back, {len(backlog_keys & dead.keys())} dead-lettered; Triton restart took {down_for:.1f} s; the rest "
          f"handled {recovered_in:.1f} s after it was ready; retries {retried:.0f}")

    assert not missing, f"tasks neither placed nor dead-lettered: {missing}"
    assert stage.worker.stats.processed == len(keys)
    # the tasks around the outage are placed: the stage recovered without a restart of its own
    assert {t.sample_id for t in before + after} <= placed.keys()
    assert dead and set(dead) <= backlog_keys, f"unexpected dead letters: {sorted(set(dead) - backlog_keys)}"
    pauses = sum(BACKOFF_S * 2 ** i for i in range(MAX_ATTEMPTS - 1))  # between the first and last attempt
    for key, letter in dead.items():
        # the reason, the original bytes, and every attempt spent, spaced by the backoff
        assert (letter.error_type, letter.attempts, letter.stage) == ("Unavailable", MAX_ATTEMPTS, "placement")
        assert f"Triton at {triton.url}" in letter.error, letter.error
        assert letter.value == next(t for t in backlog if t.sample_id == key).SerializeToString()
        assert letter.original_topic == topic
        spent = seconds(letter.last_failure_time) - seconds(letter.first_failure_time)
        assert spent >= 0.9 * pauses, f"{key}: {MAX_ATTEMPTS} attempts within {spent:.2f} s, backoff {pauses:.2f} s"
    assert retried >= len(dead) * (MAX_ATTEMPTS - 1)


def metric_sum_of(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    from prometheus_client import generate_latest

    return metric_sum(generate_latest(metrics.registry).decode(), name, **labels)


# --- a slow Triton ------------------------------------------------------------------------------------------------

def slow_fopa_repository(root: Path, delay_s: float) -> Path:
    """A `fopa` with FOPA's inputs, output and version parameter whose every execution sleeps `delay_s`."""
    model = root / "fopa"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(textwrap.dedent(f"""\
        name: "fopa"
        backend: "python"
        max_batch_size: 64
        input [
          {{ name: "BACKGROUND", data_type: TYPE_FP32, dims: [ 3, 64, 64 ] }},
          {{ name: "FOREGROUND", data_type: TYPE_FP32, dims: [ 4, 32, 32 ] }}
        ]
        output [ {{ name: "HEATMAP", data_type: TYPE_FP32, dims: [ 8, 32, 32 ] }} ]
        instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
        dynamic_batching {{ max_queue_delay_microseconds: 1000 }}
        parameters [
          {{ key: "weights_version", value: {{ string_value: "slow-1" }} }},
          {{ key: "delay_s", value: {{ string_value: "{delay_s}" }} }}
        ]
        """))
    (model / "1" / "model.py").write_text(textwrap.dedent("""\
        import json
        import time

        import numpy as np
        import triton_python_backend_utils as pb_utils


        class TritonPythonModel:
            def initialize(self, args):
                config = json.loads(args["model_config"])
                self.delay_s = float(config["parameters"]["delay_s"]["string_value"])

            def execute(self, requests):
                time.sleep(self.delay_s)
                responses = []
                for request in requests:
                    rows = pb_utils.get_input_tensor_by_name(request, "BACKGROUND").as_numpy().shape[0]
                    heatmap = np.full((rows, 8, 32, 32), 0.5, np.float32)
                    responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("HEATMAP", heatmap)]))
                return responses
        """))
    return root


class HealthWatch:
    """Asks gRPC health every 100 ms from a thread, recording each answer and how long it took."""

    def __init__(self, target: str) -> None:
        self.answers: list[tuple[bool, float]] = []
        self._target = target
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="health-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            started = time.perf_counter()
            serving = check_health(self._target, timeout_s=5.0)
            self.answers.append((serving, time.perf_counter() - started))

    def stop(self) -> list[tuple[bool, float]]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.answers


@pytest.mark.timeout(300)
def test_a_slow_triton_is_answered_unavailable_and_dead_lettered_while_health_serves(
        stack: EmbeddedStack, triton: PrivateTriton, tmp_path: Path) -> None:
    triton.start(slow_fopa_repository(tmp_path / "slow-models", SLOW_MODEL_DELAY_S))
    config = fault_config(stack, triton.url)
    metrics = ServiceMetrics("placement")
    parts = built(config, metrics)
    server = start_server(config.server, 0, parts.grpc_services, metrics)
    target = f"127.0.0.1:{server.port}"
    run = write_placement_run(ObjectStore(config.store), f"slow-{uuid.uuid4().hex[:8]}")
    (topic,) = unique_topics(config.bus, "place")
    watch = HealthWatch(target)
    stage = None
    try:
        request = placement_pb2.PlaceRequest(background=common_pb2.ImageRef(png=encode_png(scene_image(2))),
                                             foreground=common_pb2.ImageRef(png=encode_png(FOREGROUND)),
                                             foreground_mask=common_pb2.ImageRef(png=encode_png(LABELS)))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            unary_call(target, "Placement", "Place", request, placement_pb2.PlaceResponse, timeout_s=60)
        answered_in = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert f"Triton at {triton.url}" in info.value.details(), info.value.details()
        assert f"{TRITON_TIMEOUT_S:g} s" in info.value.details(), info.value.details()

        tasks = [run.task(f"slow-{i}") for i in range(2)]
        stage = RunningStage(config, parts, metrics, topic)
        publish_samples(config.bus, topic, tasks)
        wait_for(lambda: stage.worker.stats.processed >= len(tasks), "slow tasks dead-lettered", OUTCOME_TIMEOUT_S,
                 stage)
    finally:
        if stage is not None:
            stage.stop()
        answers = watch.stop()
        server.stop(1.0)

    outcomes = read_outcomes(config.bus, [Topics.HARMONIZE, Topics.DLQ], [t.sample_id for t in tasks],
                             OUTCOME_TIMEOUT_S)
    dead = {key: dead_letter_pb2.DeadLetter.FromString(value)
            for key, value in outcomes[Topics.DLQ].items() if key.startswith("slow-") and key in
            {t.sample_id for t in tasks}}
    latencies = sorted(seconds_taken for _, seconds_taken in answers)
    print(f"\n[slow triton] Place answered UNAVAILABLE in {answered_in:.2f} s (timeout {TRITON_TIMEOUT_S:g} s, "
          f"model {SLOW_MODEL_DELAY_S:g} s); {len(dead)}/{len(tasks)} tasks dead-lettered after {MAX_ATTEMPTS} "
          f"attempts; {len(answers)} health checks, all SERVING: {all(s for s, _ in answers)}, slowest "
          f"{latencies[-1] if latencies else float('nan'):.3f} s")

    # answered within the timeout (plus the model-config read and scheduling), not after the slow model
    assert answered_in < SLOW_MODEL_DELAY_S, f"Place took {answered_in:.1f} s: it waited for the slow model"
    assert len(answers) >= 10 and all(serving for serving, _ in answers), answers
    assert set(dead) == {t.sample_id for t in tasks} and not (outcomes[Topics.HARMONIZE].keys() & dead.keys())
    for letter in dead.values():
        assert (letter.error_type, letter.attempts) == ("Unavailable", MAX_ATTEMPTS)
        assert f"{TRITON_TIMEOUT_S:g} s" in letter.error, letter.error
