"""Algorithm 1 end to end: every service as its own process over the real broker, store and
tritonserver, driven by the coordinator, with the coordinator killed (SIGKILL) mid-run and
started again.

Asserts: the run completes both rounds; every slot of a round is scored or dead-lettered;
each round keeps ⌈α·scored⌉ samples (more only on ties at the cut); the accepted topic holds
each retained sample exactly once, with its round's segmenter and a score at or above the
cut; the retained samples of round 0 are D_1, the dataset f_1 was trained on.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from freemask.shared.bus import Topics, ensure_topics, make_consumer
from freemask.shared.cli import start_services, stop_services
from freemask.shared.config import SERVICE_NAMES, FreemaskConfig, load_config
from freemask.shared.processes import ServerProcess
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.v1 import coordinator_pb2, samples_pb2

from grpc_helpers import unary_call
from ports import reserve_ports

pytestmark = pytest.mark.stack

ROUNDS, INITIAL, PER_ROUND, ALPHA = 2, 6, 10, 0.7
RUN_TIMEOUT_S = 420.0


@pytest.fixture(scope="module")
def env(stack: EmbeddedStack) -> dict[str, str]:
    numbers = iter(reserve_ports(2 * len(SERVICE_NAMES)))
    ports = {}
    for name in SERVICE_NAMES:
        ports[f"FREEMASK_SERVER__PORTS__{name.upper()}__GRPC_PORT"] = str(next(numbers))
        ports[f"FREEMASK_SERVER__PORTS__{name.upper()}__METRICS_PORT"] = str(next(numbers))
    return {**{k: v for k, v in os.environ.items() if not k.startswith("FREEMASK_")}, **stack.client_env(),
            **ports, "FREEMASK_BUS__GROUP_PREFIX": f"e2e-{uuid.uuid4().hex[:8]}",
            "FREEMASK_ATTENTION_MASK__NUM_INFERENCE_STEPS": "4", "FREEMASK_SCORING__INPUT_SIZE": "32",
            "FREEMASK_SCORING__BATCH_SIZE": "8", "FREEMASK_COORDINATOR__TRAIN_EPOCHS": "2",
            "FREEMASK_COORDINATOR__POLL_INTERVAL_S": "0.3"}


@pytest.fixture(scope="module")
def config(env: dict[str, str]) -> FreemaskConfig:
    return load_config(environ=env)


@pytest.fixture(scope="module")
def services(config: FreemaskConfig, env: dict[str, str],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    ensure_topics(config.bus)
    log_dir = tmp_path_factory.mktemp("e2e-logs")
    running = dict(zip(SERVICE_NAMES, start_services(config, env, log_dir), strict=True))
    running["log_dir"] = log_dir  # type: ignore[assignment]
    try:
        yield running
    finally:
        stop_services([p for name, p in running.items() if name != "log_dir"])


def coordinator_call(config: FreemaskConfig, method: str, request, response_type):
    target = f"127.0.0.1:{config.server.ports['coordinator'].grpc_port}"
    return unary_call(target, "Coordinator", method, request, response_type, 30.0)


def run_status(config: FreemaskConfig, run_id: str) -> coordinator_pb2.RunStatus:
    return coordinator_call(config, "GetRun", coordinator_pb2.GetRunRequest(run_id=run_id),
                            coordinator_pb2.GetRunResponse).run


def accepted_of(config: FreemaskConfig, run_id: str) -> list[samples_pb2.AcceptedSample]:
    consumer = make_consumer(config.bus, f"check-{uuid.uuid4().hex[:8]}", [Topics.ACCEPTED])
    found, quiet_since = [], time.monotonic()
    try:
        while time.monotonic() - quiet_since < 5.0:
            polled = consumer.poll(timeout_ms=500)
            for batch in polled.values():
                for record in batch:
                    quiet_since = time.monotonic()
                    accepted = samples_pb2.AcceptedSample.FromString(record.value)
                    if accepted.run_id == run_id:
                        found.append(accepted)
    finally:
        consumer.close(autocommit=False)
    return found


def test_a_run_completes_both_rounds_with_exactly_once_acceptance_across_a_coordinator_kill(
        config: FreemaskConfig, env: dict[str, str], services: dict) -> None:
    run_id = f"e2e-{uuid.uuid4().hex[:8]}"
    overrides = {"rounds": str(ROUNDS), "initial_samples": str(INITIAL), "samples_per_round": str(PER_ROUND),
                 "alpha": str(ALPHA)}
    started = coordinator_call(config, "StartRun", coordinator_pb2.StartRunRequest(
        run_id=run_id, seed=3, config_overrides=overrides), coordinator_pb2.StartRunResponse)
    assert started.run_id == run_id
    again = coordinator_call(config, "StartRun", coordinator_pb2.StartRunRequest(run_id=run_id, seed=3),
                             coordinator_pb2.StartRunResponse)
    assert again.run_id == run_id  # idempotent: no second run

    deadline = time.monotonic() + RUN_TIMEOUT_S
    killed = False
    while True:
        status = run_status(config, run_id)
        if status.state in (coordinator_pb2.RUN_STATE_COMPLETED, coordinator_pb2.RUN_STATE_FAILED):
            break
        if not killed and status.rounds and status.rounds[0].scored >= 3:
            process = services["coordinator"]
            os.kill(process.pid, signal.SIGKILL)
            while process.alive():  # reaps it
                time.sleep(0.05)
            (services["coordinator"],) = start_services(config, env, services["log_dir"], names=("coordinator",))
            killed = True
        assert time.monotonic() < deadline, f"run not finished after {RUN_TIMEOUT_S} s: {status}"
        time.sleep(0.5)

    assert killed, "the run finished before the coordinator could be killed"
    assert status.state == coordinator_pb2.RUN_STATE_COMPLETED, status
    assert status.total_rounds == ROUNDS and len(status.rounds) == ROUNDS
    created, finished = status.created_at.ToNanoseconds(), status.finished_at.ToNanoseconds()
    assert 0 < created < finished <= status.updated_at.ToNanoseconds() <= time.time_ns()
    for item in status.rounds:
        assert item.requested == PER_ROUND and item.scored + item.dead_lettered == PER_ROUND, item
        assert item.scored >= 1, item
        assert item.retained >= math.ceil(ALPHA * item.scored), item
        assert item.segmenter.version == f"{run_id}/{item.round}"

    accepted = accepted_of(config, run_id)
    ids = [a.sample.sample_id for a in accepted]
    assert len(ids) == len(set(ids)) == sum(item.retained for item in status.rounds), ids
    cuts = {item.round: item.score_threshold for item in status.rounds}
    for sample in accepted:
        assert sample.schema_version == 1 and sample.segmenter.version == f"{run_id}/{sample.round_accepted}"
        assert sample.score >= cuts[sample.round_accepted] - 1e-6
        assert sample.sample.kind in (samples_pb2.SAMPLE_KIND_SINGLE, samples_pb2.SAMPLE_KIND_COMPOSED)

    store = ObjectStore(config.store)
    manifest = store.get_bytes(f"runs/{run_id}/rounds/1/dataset.jsonl").decode()
    d1 = [json.loads(line) for line in manifest.splitlines()]
    round0 = {a.sample.keys.image_key for a in accepted if a.round_accepted == 0}
    assert {entry["image_key"] for entry in d1} == round0
    assert store.exists(f"models/segmenter/{run_id}/1/segmenter.json")
    log_text = (Path(services["log_dir"]) / "coordinator.log").read_text()
    assert "Traceback" not in log_text, log_text[-3000:]

    # The exports load: COCO is checked by pycocotools against the label maps before it is written.
    out = Path(services["log_dir"]).parent / f"exports-{run_id}"
    for fmt in ("coco", "voc", "jsonl"):
        exported = subprocess.run([sys.executable, "-m", "freemask.shared.cli", "export", "--run", run_id,
                                   "--format", fmt, "--out", str(out / fmt)], capture_output=True, text=True,
                                  env=env, timeout=120)
        assert exported.returncode == 0, exported.stdout + exported.stderr
        assert f"run {run_id}: {len(ids)} samples" in exported.stdout
    coco = json.loads((out / "coco" / "coco" / "annotations" / "instances.json").read_text())
    assert len(coco["images"]) == len(ids) and coco["annotations"]
    manifest = (out / "jsonl" / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["sample_id"] for line in manifest) == sorted(ids)

    # `freemask run --attach` follows a run on this running platform (here: the finished one,
    # StartRun being idempotent) and writes its exports and report.
    attached = subprocess.run([sys.executable, "-m", "freemask.shared.cli", "run", "--attach", "--run-id", run_id,
                               "--out", str(out / "attached")], capture_output=True, text=True, env=env, timeout=300)
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert f"run {run_id}: completed, {ROUNDS} of {ROUNDS} rounds" in attached.stdout
    assert "== embedded stack" not in attached.stdout and "== shutting down" not in attached.stdout
    assert (out / "attached" / "report.html").exists() and (out / "attached" / "jsonl" / "manifest.jsonl").exists()
