"""freemask.shared.metrics: each ServiceMetrics owns its registry; nothing is global."""

from __future__ import annotations

import prometheus_client
from prometheus_client import generate_latest

from freemask.shared.metrics import ServiceMetrics

# Names as exposed: prometheus_client appends _total to counters.
METRIC_TYPES = {
    "freemask_grpc_requests_total": "counter",
    "freemask_grpc_latency_seconds": "histogram",
    "freemask_stage_messages_total": "counter",
    "freemask_stage_processing_seconds": "histogram",
    "freemask_dlq_messages_total": "counter",
    "freemask_bus_offset_gaps_total": "counter",
    "freemask_bus_skipped_offsets_total": "counter",
    "freemask_stage_lag_messages": "gauge",
    "freemask_gpu_memory_bytes": "gauge",
}


def test_two_instances_have_separate_registries() -> None:
    a, b = ServiceMetrics("scoring"), ServiceMetrics("scoring")  # same names: would collide in one registry
    assert a.registry is not b.registry
    a.grpc_requests.labels("scoring", "Score", "OK").inc(2)
    labels = {"service": "scoring", "method": "Score", "code": "OK"}
    assert a.registry.get_sample_value("freemask_grpc_requests_total", labels) == 2
    assert b.registry.get_sample_value("freemask_grpc_requests_total", labels) is None


def test_nothing_lands_in_the_global_registry() -> None:
    metrics = ServiceMetrics("thesaurus")
    metrics.messages.labels("thesaurus", "freemask.generate.v1", "ok").inc()
    labels = {"service": "thesaurus", "topic": "freemask.generate.v1", "outcome": "ok"}
    assert prometheus_client.REGISTRY.get_sample_value("freemask_stage_messages_total", labels) is None
    assert b"freemask_" not in generate_latest(prometheus_client.REGISTRY)


def test_counters_gauges_and_histograms_record_their_labels() -> None:
    m = ServiceMetrics("placement")
    m.messages.labels("placement", "t.v1", "ok").inc()
    m.messages.labels("placement", "t.v1", "ok").inc()
    m.messages.labels("placement", "t.v1", "dead_lettered").inc()
    m.dead_letters.labels("placement", "t.v1").inc()
    m.lag.labels("placement", "t.v1", "2").set(17)
    m.grpc_latency.labels("placement", "Place").observe(0.03)
    m.message_latency.labels("placement", "t.v1").observe(3.0)
    value = m.registry.get_sample_value
    assert value("freemask_stage_messages_total", {"service": "placement", "topic": "t.v1", "outcome": "ok"}) == 2
    assert (
        value("freemask_stage_messages_total", {"service": "placement", "topic": "t.v1", "outcome": "dead_lettered"})
        == 1
    )
    assert value("freemask_dlq_messages_total", {"service": "placement", "topic": "t.v1"}) == 1
    assert value("freemask_stage_lag_messages", {"service": "placement", "topic": "t.v1", "partition": "2"}) == 17
    place = {"service": "placement", "method": "Place"}
    assert value("freemask_grpc_latency_seconds_count", place) == 1
    assert value("freemask_grpc_latency_seconds_bucket", {**place, "le": "0.025"}) == 0
    assert value("freemask_grpc_latency_seconds_bucket", {**place, "le": "0.05"}) == 1
    assert value("freemask_stage_processing_seconds_sum", {"service": "placement", "topic": "t.v1"}) == 3.0


def test_generate_latest_names_every_metric_and_label() -> None:
    m = ServiceMetrics("harmonization")
    m.grpc_requests.labels("harmonization", "Harmonize", "INVALID_ARGUMENT").inc()
    text = generate_latest(m.registry).decode()
    for name, kind in METRIC_TYPES.items():
        assert f"# TYPE {name} {kind}\n" in text
    assert (
        'freemask_grpc_requests_total{code="INVALID_ARGUMENT",method="Harmonize",service="harmonization"} 1.0'
        in text
    )


def test_sample_gpu_memory_never_raises() -> None:
    m = ServiceMetrics("attention_mask")
    m.sample_gpu_memory()  # without a GPU (or torch) this records nothing and returns
    text = generate_latest(m.registry).decode()
    assert "# TYPE freemask_gpu_memory_bytes gauge" in text
