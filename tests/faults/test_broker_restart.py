"""Issue #13 item 2: the broker stopped and started again while stages are busy, during one
end-to-end run of Algorithm 1 on a private stack (real Tansu on SeaweedFS, real tritonserver).

Tansu keeps its records and the groups' committed offsets in S3, so both survive the restart.
The services are left alone: their kafka-python clients must find the broker again by themselves.

Asserts: the run completes with the same accounting as a run with no fault (per round scored +
dead-lettered = requested, ⌈α·scored⌉ kept, dead letters on the DLQ with their errors, each
retained sample exactly once on the accepted topic); no service process died; after the broker is
back, the run moves on and every stage commits all its input. What was measured (time to
recover, messages handled twice, worker restarts) is printed, for the README's table of guarantees.

A last test crashes the broker again and again under the stages' own producer and checks that no
acknowledged record is missing: the loss the run test found only now and then, every time.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from freemask.shared.bus import OutboundMessage, Publisher, make_producer
from freemask.shared.config import load_config
from freemask.shared.processes import pid_alive
from freemask.shared.stack import EmbeddedStack
from freemask.v1 import coordinator_pb2

from bus_helpers import request, unique_topics
from conftest import PrivateStack
from e2e_run import (
    FINISHED,
    RUN_TIMEOUT_S,
    STAGE_INPUTS,
    Platform,
    RunPlan,
    StageLag,
    check_accounting,
    follow_run,
    input_records,
    phase_of,
    platform_env,
    progress,
    read_topic,
    redeliveries,
    run_status,
    run_timeout,
    start_run,
)

pytestmark = pytest.mark.stack

PLAN = RunPlan()
# Longer than a group session (bus.session_timeout_ms, 3 s): every member's session has expired
# by the time the broker is back, as after any real outage.
OUTAGE_S = 10.0
CRASHES = 8
SETTLED_GAP_WAIT_S = 2.0  # a hole in a topic no one writes any more: a lost write, not a slow one


def crash_broker(stack: EmbeddedStack) -> None:
    """SIGKILL the broker: whatever it had not written to S3 is gone."""
    (pid,) = [part.pid for part in stack.status() if part.name == "tansu" and part.running]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while pid_alive(pid):  # reaps it: the stack started it from this process
        assert time.monotonic() < deadline, f"tansu (pid {pid}) alive 10 s after SIGKILL"
        time.sleep(0.02)


@dataclass
class BrokerOutage:
    """Between status polls: once stages are busy, stop the broker, wait, start it; then time the recovery."""

    stack: EmbeddedStack
    lag: StageLag
    platform: Platform
    run_id: str
    stop_signal: signal.Signals
    busy: dict[str, int] = field(default_factory=dict)  # uncommitted records per busy stage at the stop
    phase: str = ""
    stop_s: float = 0.0  # the signal until the broker had exited
    start_s: float = 0.0  # until the broker answered again
    up_at: float | None = None
    progress_at_up: tuple[int, ...] = ()
    moved_s: float | None = None  # from the broker's return until the run's counts moved
    drained_s: dict[str, float] = field(default_factory=dict)  # from its return until each busy stage caught up

    def __call__(self, status: coordinator_pb2.RunStatus) -> None:
        if self.up_at is None:
            self._maybe_restart(status)
        else:
            self._watch_recovery(status)

    def _maybe_restart(self, status: coordinator_pb2.RunStatus) -> None:
        if not phase_of(status).startswith("round"):
            return
        busy = {stage: n for stage, n in self.lag.read().items() if n > 0}
        if not busy:
            return
        if self.stop_signal == signal.SIGTERM:
            # Tansu serves on for about 5 s after SIGTERM: stopped later than round 0, it could go
            # down after the run has ended
            if status.round > 0:
                return
        elif status.round < PLAN.rounds - 1 and len(busy) < 2 and not set(busy) - {"attention_mask"}:
            # Before the last round, only the composed branch at work or two stages at once will do (the
            # crash then catches several batches in hand); in the last round any work, so that it happens.
            return
        self.busy, self.phase = busy, phase_of(status)
        started = time.monotonic()
        self._stop_broker()
        self.stop_s = time.monotonic() - started
        self.lag.close()
        down_until = time.monotonic() + OUTAGE_S
        # Nothing can move while the broker is down, so the run as it is now is the run at its return
        # (Tansu's orderly stop goes on serving for a while: the status at the trigger may be stale).
        try:
            status = run_status(self.platform.config, self.run_id, timeout_s=OUTAGE_S / 2)
        except grpc.RpcError:
            pass  # the coordinator holds its lock while a publish waits for the broker: keep the last one
        self.progress_at_up = progress(status)
        while time.monotonic() < down_until:
            exited = self.platform.exited()
            assert not exited, f"services died while the broker was down: {exited}"
            time.sleep(0.5)
        started = time.monotonic()
        self.stack.up(("tansu",))
        self.up_at = time.monotonic()
        self.start_s = self.up_at - started

    def _stop_broker(self) -> None:
        if self.stop_signal == signal.SIGTERM:
            self.stack.down(("tansu",))  # Tansu's own shutdown
        else:
            crash_broker(self.stack)

    def _watch_recovery(self, status: coordinator_pb2.RunStatus) -> None:
        assert self.up_at is not None
        since_up = time.monotonic() - self.up_at
        if self.moved_s is None and progress(status) != self.progress_at_up:
            self.moved_s = since_up
        try:
            lags = self.lag.read()
        except Exception:  # noqa: BLE001 - our own probe reconnecting: the services are what is tested
            return
        for stage in self.busy:
            if stage not in self.drained_s and lags[stage] == 0:
                self.drained_s[stage] = since_up


# SIGKILL: a crash, the outage starts at once, with batches in hand. SIGTERM: Tansu's orderly stop,
# which goes on serving for about 5 s before it exits.
@run_timeout
@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_run_completes_across_a_broker_restart_while_stages_are_busy(
        private_stack: PrivateStack, tmp_path: Path, stop_signal: signal.Signals) -> None:
    stack = private_stack.up(("seaweedfs", "tansu", "tritonserver"))
    env = platform_env(stack, f"broker-{uuid.uuid4().hex[:8]}")
    config = load_config(environ=env)
    with Platform.running(config, env, tmp_path / "logs") as platform:
        lag = StageLag(config)
        try:
            run_id = start_run(config, PLAN)
            outage = BrokerOutage(stack, lag, platform, run_id, stop_signal)
            started = time.monotonic()
            status = follow_run(config, run_id, RUN_TIMEOUT_S, between_polls=outage, poll_s=0.05)
            run_s = time.monotonic() - started
            # the last status, and every stage busy at the outage catching up (the run may have ended first)
            deadline = time.monotonic() + 60.0
            while outage.up_at is not None and time.monotonic() < deadline:
                outage(status)
                if not set(outage.busy) - set(outage.drained_s):
                    break
                time.sleep(0.2)
        finally:
            lag.close()

        assert outage.up_at is not None, "the run ended before stages were busy enough to restart the broker"
        assert outage.progress_at_up and outage.progress_at_up[0] not in FINISHED, "the run ended before the outage"
        assert not platform.exited(), f"services died: {platform.exited()}"
        outcome = check_accounting(config, PLAN, run_id, status)
        assert not set(outage.busy) - set(outage.drained_s), (
            f"stages that never committed their input after the broker came back: {outage.busy}, {outage.drained_s}")

        handled = {stage: sum(count for name, count in platform.stage_counts(stage).items() if name != "retried")
                   for stage in STAGE_INPUTS}
        redelivered = redeliveries(handled, input_records(config))
        restarts = {name: platform.log(name).count("stage worker failed; restarting") for name in STAGE_INPUTS}
        coordinator_restarts = platform.log("coordinator").count("coordinator loop failed; restarting")
        print(f"\nrun {run_id}: completed in {run_s:.0f} s; retained {[r.retained for r in status.rounds]}, "
              f"dead-lettered {[r.dead_lettered for r in status.rounds]}, DLQ letters {len(outcome.dead_letters)}")
        print(f"  broker stopped ({stop_signal.name}) in {outage.phase} with uncommitted records {outage.busy}; "
              f"it took {outage.stop_s:.1f} s, down {OUTAGE_S:.0f} s, ready again after {outage.start_s:.1f} s")
        print(f"  after it was back: run counts moved after "
              f"{'(never)' if outage.moved_s is None else f'{outage.moved_s:.1f} s'}; busy stages committed "
              f"their input after {({s: round(t, 1) for s, t in outage.drained_s.items()})} s")
        print(f"  messages handled twice: {redelivered}; stage worker restarts: {restarts}; "
              f"coordinator loop restarts: {coordinator_restarts}")


def test_every_record_acknowledged_across_broker_crashes_mid_produce_is_readable(private_stack: PrivateStack) -> None:
    """The producer the stages publish with, against a broker killed again and again while it writes.

    Found by the run above hanging: with kafka-python's idempotent producer, Tansu 0.6 answered the
    retry of a batch it had been killed while writing as a duplicate, so a record was acknowledged
    and never stored (2 and 6 records lost in two tries of this test), and a partition that ended in
    such a hole stalled every consumer at it.
    """
    stack = private_stack.up(("seaweedfs", "tansu"))
    config = load_config(environ=stack.client_env())
    (topic,) = unique_topics(config.bus, "crash")
    acknowledged: list[str] = []
    stop = threading.Event()

    def publish_until_stopped() -> None:
        publisher = Publisher(make_producer(config.bus))
        try:
            for start in itertools.count(step=3):
                if stop.is_set():
                    return
                keys = [f"s-{start + i}" for i in range(3)]
                try:
                    publisher.publish([OutboundMessage(topic, key, request(key)) for key in keys])
                except Exception:  # noqa: BLE001 - not acknowledged: it may or may not be there
                    continue
                acknowledged.extend(keys)
        finally:
            publisher.close()

    publishing = threading.Thread(target=publish_until_stopped, name="publish")
    publishing.start()
    rng = random.Random(13)
    try:
        for _ in range(CRASHES):
            time.sleep(rng.uniform(0.3, 1.5))  # the crash lands at some point of a produce
            crash_broker(stack)
            time.sleep(1.0)
            stack.up(("tansu",))
        time.sleep(2.0)
    finally:
        stop.set()
        publishing.join(timeout=60)
    assert not publishing.is_alive(), "the publisher did not stop within 60 s"
    assert len(acknowledged) > 100, f"too few records got through to test anything: {len(acknowledged)}"

    # The publisher has stopped, so a hole left now is a write the broker lost before acknowledging
    # it, not one still being written: the read-back need not wait the stages' bus.gap_wait_s (15 s)
    # at each (with it, several holes in one partition took the read past its 60 s deadline in CI).
    settled = config.model_copy(update={"bus": config.bus.model_copy(update={"gap_wait_s": SETTLED_GAP_WAIT_S})})
    stored = {(record.key or b"").decode() for record in read_topic(settled, topic)}
    lost = [key for key in acknowledged if key not in stored]
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged records are not on the topic: {lost[:20]}"
