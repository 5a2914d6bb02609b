"""Algorithm 1 in one process: the coordinator's state machine and every stage's own handler,
called directly with the messages the bus would have carried (a polled batch of up to
`bus.max_poll_records` per call, as the workers do), against a real store and tritonserver.

The benchmarks use it to measure what the bus costs (bench_pipeline) and to run many
variants of a run side by side without a broker (bench_evaluation).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from freemask.coordinator.rounds import Publish, RunMachine, Train
from freemask.coordinator.service import run_settings
from freemask.shared.bus import InboundMessage, OutboundMessage, Topics
from freemask.shared.config import FreemaskConfig
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.runner import ServiceContext, StageSpec, load_builder

STAGES = ("attention_mask", "thesaurus", "placement", "harmonization", "scoring")

# What to do with a Train action: train f_t and return its validation mIoU (or None).
TrainHandler = Callable[[RunMachine, Train], float | None]


class InProcessPlatform:
    """The stages of `config`, each built as its service builds it, except those that `replaced`
    gives by service name (e.g. a generator shared by several variants)."""

    def __init__(self, config: FreemaskConfig, replaced: Mapping[str, StageSpec] | None = None) -> None:
        self.config = config
        self._parts = []
        self.stages: dict[str, StageSpec] = {}
        for name in STAGES:
            stage = (replaced or {}).get(name)
            if stage is None:
                parts = load_builder(name)(ServiceContext(name, config, ServiceMetrics(name)))
                assert parts.stage is not None
                self._parts.append(parts)
                stage = parts.stage
            self.stages[stage.topic] = stage

    def close(self) -> None:
        for parts in self._parts:
            if parts.on_stop is not None:
                parts.on_stop()

    def run(self, run_id: str, seed: int, overrides: Mapping[str, str], train: TrainHandler) -> RunMachine:
        """One whole run; returns its machine, finished."""
        machine = RunMachine.new(run_id, seed, run_settings(self.config, dict(overrides)))
        pending: deque[OutboundMessage] = deque()

        def act(actions: list) -> None:
            for action in actions:
                if isinstance(action, Publish):
                    pending.append(OutboundMessage(action.topic, action.key, action.message))
                else:
                    act(machine.on_trained(action.round, train(machine, action)))

        act(machine.start())
        while pending:
            topic = pending[0].topic
            batch = []
            while pending and pending[0].topic == topic and len(batch) < self.config.bus.max_poll_records:
                batch.append(pending.popleft())
            if topic == Topics.SINGLES:
                for out in batch:
                    act(machine.on_single(out.message))
            elif topic == Topics.SCORED:
                for out in batch:
                    act(machine.on_scored(out.message))
            elif topic != Topics.ACCEPTED:
                for key, error in self._handle(self.stages[topic], batch, pending):
                    act(machine.on_dead_letter(key, error))
        return machine

    @staticmethod
    def _handle(stage: StageSpec, batch: list[OutboundMessage], pending: deque) -> list[tuple[str, str]]:
        """One polled batch through a stage's handler, its outputs queued; returns what the worker
        would have dead-lettered (it retries first, but the handlers are deterministic)."""
        messages = [InboundMessage(out.topic, 0, 0, out.key, out.message.SerializeToString(), {}) for out in batch]
        try:
            results = stage.batch_handler(messages) if stage.batch_handler and len(messages) > 1 else None
        except Exception:  # noqa: BLE001 - as the worker does: fall back to one at a time
            results = None
        failed = []
        if results is None:
            results = []
            for message in messages:
                try:
                    results.append(stage.handler(message))
                except Exception as err:  # noqa: BLE001
                    results.append(err)
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, Exception):  # the batch handler's per-message errors too
                failed.append((message.key or "", str(result)))
            else:
                pending.extend(result)
        return failed
