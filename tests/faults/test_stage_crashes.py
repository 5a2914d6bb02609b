"""Issue #13 item 1: every stage service killed with SIGKILL once, while it has work, during one
end-to-end run of Algorithm 1 on the real broker, store and tritonserver, and started again.

A stage has work when its consumer group has records on its input topic that it has not
committed: a batch in hand or one waiting. The kill loses that batch's progress; the restarted
process gets the records again from the committed offsets. (A stage whose work would come and go
between two looks is held with SIGSTOP from when its feeder is busy until its work has come.)

Asserts: the run completes; per round scored + dead-lettered = requested and ⌈α·scored⌉ are kept;
every dead-lettered slot's letter is on the DLQ with its error; the accepted topic holds the run's
retained samples each exactly once; no service died other than by our hand. What was measured
(restart times, redeliveries) is printed, for the README's table of guarantees.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from freemask.shared.config import load_config
from freemask.v1 import coordinator_pb2

from conftest import PrivateStack
from e2e_run import (
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
    redeliveries,
    run_timeout,
    start_run,
)

pytestmark = pytest.mark.stack

PLAN = RunPlan()


# The stages whose outputs become each stage's input (through the coordinator for thesaurus and
# scoring); attention_mask is fed by the coordinator alone, at the start of every phase.
FEEDERS = {"thesaurus": ("attention_mask",), "placement": ("thesaurus", "harmonization"),
           "harmonization": ("placement",), "scoring": ("attention_mask", "harmonization")}
# A held stage whose work has not come by then is let go again, to be held at its next chance.
HOLD_LIMIT_S = 15.0


@dataclass
class Kill:
    stage: str
    lag: int  # uncommitted records on its input when it was killed
    run_s: float  # seconds into the run
    phase: str
    handled_before: float  # messages the killed process had handled (ok + dead-lettered)
    held_s: float  # how long it was held (SIGSTOP) before its work came; 0: not held
    restart_s: float | None = None  # until the new process answered health
    drained_s: float | None = None  # from healthy until its group had committed everything on its input


class StageKiller:
    """Between status polls: kill each stage not yet killed once it has work, and start it again in the
    background.

    A light stage (the thesaurus plans five requests a round) commits its work within a fraction of a
    second, often between two looks at its lag. So during a round, a stage whose feeder has work is
    held with SIGSTOP: its work then arrives and waits, uncommitted, perhaps polled, until the kill.
    """

    def __init__(self, platform: Platform, lag: StageLag, pool: ThreadPoolExecutor) -> None:
        self._platform = platform
        self._lag = lag
        self._pool = pool
        self._started = time.monotonic()
        self._healthy_at: dict[str, float] = {}
        self._held: dict[str, tuple[float, float]] = {}  # stage -> (held since, messages it had handled)
        self.pending = list(STAGE_INPUTS)
        self.kills: dict[str, Kill] = {}
        self.restarts: dict[str, Future[float]] = {}
        self.probes = 0

    def __call__(self, status: coordinator_pb2.RunStatus) -> None:
        for stage, restart in self.restarts.items():
            if restart.done() and stage not in self._healthy_at:
                self.kills[stage].restart_s = restart.result()  # a failed restart fails the test here
                self._healthy_at[stage] = time.monotonic()
        lags = self._lag.read()
        self.probes += 1
        now = time.monotonic()
        for stage, healthy_at in self._healthy_at.items():
            if self.kills[stage].drained_s is None and lags[stage] == 0:
                self.kills[stage].drained_s = now - healthy_at
        for stage in list(self.pending):
            held = self._held.get(stage)
            if lags[stage] > 0:
                self._kill(stage, lags[stage], status, held)
            elif held is None and phase_of(status).startswith("round") and any(
                    lags[feeder] > 0 for feeder in FEEDERS.get(stage, ())):
                self._held[stage] = (now, self._handled(stage))
                self._platform.pause(stage)
            elif held is not None and now - held[0] > HOLD_LIMIT_S:
                self._platform.resume(stage)
                del self._held[stage]

    def release(self) -> None:
        """Let every held stage go on (a test that fails midway must not leave one stopped)."""
        for stage in list(self._held):
            self._platform.resume(stage)
            del self._held[stage]

    def _handled(self, stage: str) -> float:
        counts = self._platform.stage_counts(stage)
        return counts["ok"] + counts["dead_lettered"]

    def _kill(self, stage: str, lag: int, status: coordinator_pb2.RunStatus, held: tuple[float, float] | None) -> None:
        # a held process answers no /metrics: what it had handled was read when it was held
        handled = self._handled(stage) if held is None else held[1]
        self._platform.kill(stage)
        self._held.pop(stage, None)
        now = time.monotonic()
        self.kills[stage] = Kill(stage, lag, now - self._started, phase_of(status), handled,
                                 0.0 if held is None else now - held[0])
        self.pending.remove(stage)
        self.restarts[stage] = self._pool.submit(self._platform.restart, stage)


@run_timeout
def test_a_run_completes_with_every_stage_killed_once_while_it_has_work(private_stack: PrivateStack,
                                                                        tmp_path: Path) -> None:
    stack = private_stack.up(("seaweedfs", "tansu", "tritonserver"))
    env = platform_env(stack, f"crash-{uuid.uuid4().hex[:8]}")
    config = load_config(environ=env)
    with Platform.running(config, env, tmp_path / "logs") as platform:
        lag = StageLag(config)
        try:
            with ThreadPoolExecutor(max_workers=len(STAGE_INPUTS), thread_name_prefix="restart") as pool:
                killer = StageKiller(platform, lag, pool)
                run_id = start_run(config, PLAN)
                started = time.monotonic()
                try:
                    status = follow_run(config, run_id, RUN_TIMEOUT_S, between_polls=killer, poll_s=0.05)
                finally:
                    killer.release()
                run_s = time.monotonic() - started
                for stage, restart in killer.restarts.items():
                    killer.kills[stage].restart_s = restart.result(timeout=120)
        finally:
            lag.close()

        assert not killer.pending, f"the run ended before these stages had work to be killed in: {killer.pending}"
        assert not platform.exited(), f"services died on their own: {platform.exited()}"
        outcome = check_accounting(config, PLAN, run_id, status)

        handled = {stage: killer.kills[stage].handled_before + sum(
            count for outcome_name, count in platform.stage_counts(stage).items() if outcome_name != "retried")
            for stage in STAGE_INPUTS}
        redelivered = redeliveries(handled, input_records(config))
        print(f"\nrun {run_id}: completed in {run_s:.0f} s (work looked for every {run_s / killer.probes:.2f} s); "
              f"retained {[r.retained for r in status.rounds]}, "
              f"dead-lettered {[r.dead_lettered for r in status.rounds]}, DLQ letters {len(outcome.dead_letters)}")
        for kill in killer.kills.values():
            held = f", held {kill.held_s:.1f} s before" if kill.held_s else ""
            print(f"  {kill.stage:<14} killed at {kill.run_s:5.1f} s ({kill.phase}{held}) with {kill.lag} uncommitted; "
                  f"healthy again after {kill.restart_s:.1f} s; input committed to its end "
                  f"{'(not seen)' if kill.drained_s is None else f'{kill.drained_s:.1f} s'} later; "
                  f"messages handled twice: {redelivered[kill.stage]}")
