"""Prometheus metrics for one service, in a registry that the service owns.

Nothing here is module-global: each service builds one `ServiceMetrics`, passes
it to its server and worker, and exposes it on its own `/metrics` port. Tests
can build as many as they like without collisions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class ServiceMetrics:
    service: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        labels = ["service"]
        r = self.registry
        self.grpc_requests = Counter(
            "freemask_grpc_requests", "gRPC calls by method and status code", labels + ["method", "code"], registry=r
        )
        self.grpc_latency = Histogram(
            "freemask_grpc_latency_seconds", "gRPC call latency", labels + ["method"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.messages = Counter(
            "freemask_stage_messages", "stage messages by outcome (ok, retried, dead_lettered)",
            labels + ["topic", "outcome"], registry=r,
        )
        self.message_latency = Histogram(
            "freemask_stage_processing_seconds", "time to process one message, outputs included",
            labels + ["topic"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.dead_letters = Counter(
            "freemask_dlq_messages", "messages sent to the dead-letter topic", labels + ["topic"], registry=r
        )
        self.offset_gaps = Counter(
            "freemask_bus_offset_gaps", "times a poll skipped an offset, held back until it was readable",
            labels + ["topic"], registry=r,
        )
        self.skipped_offsets = Counter(
            "freemask_bus_skipped_offsets", "offsets passed over after bus.gap_wait_s without becoming readable",
            labels + ["topic"], registry=r,
        )
        self.lag = Gauge(
            "freemask_stage_lag_messages", "records behind the partition's high-water mark",
            labels + ["topic", "partition"], registry=r,
        )
        self.gpu_memory = Gauge(
            "freemask_gpu_memory_bytes", "GPU memory allocated by this process", labels + ["device"], registry=r
        )

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Expose /metrics on host:port; returns the function that stops it."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop

    def sample_gpu_memory(self) -> None:
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                self.gpu_memory.labels(self.service, str(index)).set(torch.cuda.memory_allocated(index))
