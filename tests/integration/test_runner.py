"""The service runner wires a stage into a running service: the worker consumes,
publishes and is stopped gracefully with the gRPC server."""

from __future__ import annotations

import threading

import pytest

from freemask.shared.bus import InboundMessage, OutboundMessage
from freemask.shared.config import FreemaskConfig
from freemask.shared.grpc_runtime import check_health
from freemask.shared import runner
from freemask.v1 import generate_pb2

from bus_helpers import drain, produce, unique_topics
from ports import reserve_ports

pytestmark = pytest.mark.stack


def test_a_service_runs_its_stage_and_stops_cleanly(
    stack_config: FreemaskConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = stack_config.bus
    source, sink = unique_topics(bus, "in", "out")
    grpc_port, metrics_port = reserve_ports(2)
    config = stack_config.model_copy(
        update={
            "bus": bus.model_copy(update={"group_prefix": f"runner-{source}"}),
            "server": stack_config.server.model_copy(update={"ports": {
                **stack_config.server.ports,
                "thesaurus": stack_config.server.ports["thesaurus"].model_copy(
                    update={"grpc_port": grpc_port, "metrics_port": metrics_port}),
            }}),
        }
    )

    def forward(message: InboundMessage) -> list[OutboundMessage]:
        request = message.decode(generate_pb2.GenerateRequest)
        return [OutboundMessage(sink, request.sample_id, request)]

    real_builder = runner.load_builder("thesaurus")

    def build_with_stage(context: runner.ServiceContext) -> runner.ServiceParts:
        parts = real_builder(context)
        parts.stage = runner.StageSpec(topic=source, handler=forward)
        return parts

    monkeypatch.setattr(runner, "load_builder", lambda name: build_with_stage)
    process = runner.ServiceProcess("thesaurus", config)
    ready = threading.Event()
    thread = threading.Thread(target=process.run, args=(ready,))
    thread.start()
    try:
        assert ready.wait(30)
        assert check_health(f"127.0.0.1:{grpc_port}", "freemask.v1.Thesaurus")
        ids = [f"s-{i}" for i in range(50)]
        produce(bus, source, ids)
        assert sorted(key for key, _, _ in drain(bus, sink, len(ids))) == sorted(ids)
    finally:
        process.stop()
        thread.join(timeout=30)
    assert not thread.is_alive(), "the service did not stop"
    assert not check_health(f"127.0.0.1:{grpc_port}", timeout_s=0.5)
