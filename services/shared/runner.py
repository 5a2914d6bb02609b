"""`freemask serve <service>`: one process = one service's gRPC server + its stage worker.

Each service package has a `service.py` with `build(context) -> ServiceParts`:
the gRPC implementations it offers and, if it is a pipeline stage, the topic it
consumes and the handler for one message. This module wires those to the
shared runtime (health, reflection, metrics, JSON logs, the Kafka loop) and
owns the shutdown order on SIGTERM:

1. health goes NOT_SERVING, so the orchestrator stops routing to us;
2. the stage worker finishes the message in hand, commits, and returns;
3. the gRPC server drains in-flight calls for `server.grace_period_s`.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from google.protobuf.descriptor import ServiceDescriptor

from freemask.shared.bus import BatchHandler, Handler, StageWorker
from freemask.shared.config import SERVICE_NAMES, FreemaskConfig
from freemask.shared.grpc_runtime import start_server
from freemask.shared.logs import configure_logging
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.store import ObjectStore

log = logging.getLogger(__name__)

_WORKER_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class StageSpec:
    topic: str
    handler: Handler
    batch_handler: BatchHandler | None = None


@dataclass
class ServiceParts:
    grpc_services: list[tuple[ServiceDescriptor, object]]
    stage: StageSpec | None = None
    # Called once on shutdown, after the stage has stopped and before the server does:
    # background work (a training job) saves its state here.
    on_stop: Callable[[], None] | None = None


@dataclass
class ServiceContext:
    """What a service's `build` may use. The store client is made on first use."""

    name: str
    config: FreemaskConfig
    metrics: ServiceMetrics

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.config.store)


def load_builder(name: str) -> Callable[[ServiceContext], ServiceParts]:
    if name not in SERVICE_NAMES:
        raise ValueError(f"unknown service {name!r}; choose one of {', '.join(SERVICE_NAMES)}")
    return importlib.import_module(f"freemask.{name}.service").build


@dataclass
class ServiceProcess:
    """A running service; `stop()` performs the graceful shutdown described above."""

    name: str
    config: FreemaskConfig
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self, ready: threading.Event | None = None) -> None:
        metrics = ServiceMetrics(self.name)
        ports = self.config.server.ports[self.name]
        stop_metrics = metrics.serve(self.config.server.host, ports.metrics_port)
        try:
            parts = load_builder(self.name)(ServiceContext(self.name, self.config, metrics))
            server = start_server(self.config.server, ports.grpc_port, parts.grpc_services, metrics)
            log.info("serving", extra={"grpc": f"{self.config.server.host}:{server.port}",
                                       "metrics": f"{self.config.server.host}:{ports.metrics_port}"})
            worker = None
            worker_thread = None
            if parts.stage is not None:
                worker = StageWorker(self.name, parts.stage.topic, parts.stage.handler, self.config.bus, metrics,
                                     batch_handler=parts.stage.batch_handler)
                worker_thread = threading.Thread(target=self._supervise, args=(worker,), name="stage", daemon=True)
                worker_thread.start()
            if ready is not None:
                ready.set()
            while not self.stopping.wait(5.0):
                metrics.sample_gpu_memory()
            log.info("shutting down")
            server.set_serving(False)
            if worker is not None and worker_thread is not None:
                worker.stop()
                worker_thread.join()
            if parts.on_stop is not None:
                parts.on_stop()
            server.stop(self.config.server.grace_period_s)
        finally:
            stop_metrics()
        log.info("stopped")

    def _supervise(self, worker: StageWorker) -> None:
        """Keep the stage loop alive across broker outages, with a pause that grows while it fails."""
        failures = 0
        while not self.stopping.is_set():
            committed = worker.stats.committed_batches
            try:
                worker.run()
                return
            except Exception:  # noqa: BLE001 - logged, then the loop restarts
                if worker.stats.committed_batches > committed:
                    # it got work through before it failed: a new outage, not the same one going on,
                    # so the pause starts short again instead of at the longest an old outage reached
                    failures = 0
                pause = _WORKER_RESTART_BACKOFF_S[min(failures, len(_WORKER_RESTART_BACKOFF_S) - 1)]
                failures += 1
                log.exception("stage worker failed; restarting", extra={"pause_s": pause})
                self.stopping.wait(pause)

    def stop(self) -> None:
        self.stopping.set()


def serve(name: str, config: FreemaskConfig) -> int:
    """Entry point of `freemask serve`: runs until SIGTERM or SIGINT."""
    configure_logging(name, config.log_level)
    process = ServiceProcess(name, config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: process.stop())
    process.run()
    return 0
