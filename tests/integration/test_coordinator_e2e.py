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

from freemask.shared.bus import ensure_topics
from freemask.shared.cli import start_services, stop_services
from freemask.shared.config import SERVICE_NAMES, FreemaskConfig, load_config
from freemask.shared.processes import ServerProcess
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.v1 import coordinator_pb2, samples_pb2

from e2e_run import RUN_TIMEOUT_S, accepted_of, coordinator_call, platform_env, run_status, run_timeout

pytestmark = pytest.mark.stack

ROUNDS, INITIAL, PER_ROUND, ALPHA = 2, 6, 10, 0.7


@pytest.fixture(scope="module")
def env(stack: EmbeddedStack) -> dict[str, str]:
    return platform_env(stack, f"e2e-{uuid.uuid4().hex[:8]}")


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


@run_timeout
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
