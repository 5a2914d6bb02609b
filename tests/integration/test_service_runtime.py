"""A real service process (`freemask serve attention_mask`): health, reflection,
metrics, bad input answered INVALID_ARGUMENT while the server keeps serving,
and a clean exit on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from freemask.shared.grpc_runtime import check_health
from freemask.shared.processes import stop_pid
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.v1 import attention_mask_pb2, dead_letter_pb2, generate_pb2

from conftest import PrivateStack
from ports import reserve_ports

pytestmark = pytest.mark.stack
GENERATE = "/freemask.v1.AttentionMask/Generate"
TRANSPORT_LIMIT = 2 * 1024 * 1024


class Service:
    def __init__(self, process: subprocess.Popen, target: str, metrics_url: str, log: Path, secret: str) -> None:
        self.process, self.target, self.metrics_url, self.log, self.secret = process, target, metrics_url, log, secret

    def call_raw(self, payload: bytes) -> grpc.RpcError | bytes:
        with grpc.insecure_channel(
            self.target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        ) as channel:
            call = channel.unary_unary(GENERATE, request_serializer=None, response_deserializer=None)
            try:
                return call(payload, timeout=10)
            except grpc.RpcError as err:
                return err


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """A broker and store of this module's own: these tests count what the gRPC calls generate,
    and on the session's shared broker the service's stage worker would also pick up the
    generate requests that earlier tests left on `freemask.generate.v1`."""
    owner = PrivateStack(tmp_path_factory.mktemp("runtime-stack"))
    owner.up(("seaweedfs", "tansu"))
    yield owner.stack
    owner.close()


@pytest.fixture(scope="module")
def service(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    grpc_port, metrics_port = reserve_ports(2)
    env = {
        **os.environ,
        **stack.client_env(),
        "FREEMASK_SERVER__PORTS__ATTENTION_MASK__GRPC_PORT": str(grpc_port),
        "FREEMASK_SERVER__PORTS__ATTENTION_MASK__METRICS_PORT": str(metrics_port),
        "FREEMASK_SERVER__MAX_MESSAGE_BYTES": str(TRANSPORT_LIMIT),
        "FREEMASK_ATTENTION_MASK__NUM_INFERENCE_STEPS": "3",
        "FREEMASK_ATTENTION_MASK__MAX_MASK_FRACTION": "1.0",  # 3 steps draw blurs whose masks are often large
    }
    # The real secret, given inline rather than as a file, is what must never reach the log.
    env["FREEMASK_STORE__SECRET_KEY"] = Path(env.pop("FREEMASK_STORE__SECRET_KEY_FILE")).read_text().strip()
    log = tmp_path_factory.mktemp("service") / "attention_mask.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "freemask.shared.cli", "serve", "attention_mask"],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    target = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + 60
    while not check_health(target, timeout_s=0.5):
        assert process.poll() is None, f"service exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, "service never became healthy"
        time.sleep(0.2)
    yield Service(process, target, f"http://127.0.0.1:{metrics_port}/metrics", log, env["FREEMASK_STORE__SECRET_KEY"])
    stop_pid(process.pid)
    process.wait(timeout=10)


def valid_request(**changes: object) -> generate_pb2.GenerateRequest:
    fields = dict(run_id="run-1", round=0, sample_id="s-0", class_name="dog", background_name="grass",
                  prompt="a photo of a dog on the grass", seed=1)
    fields.update(changes)
    return generate_pb2.GenerateRequest(**fields)


def assert_invalid(result: grpc.RpcError | bytes, *fragments: str) -> None:
    assert isinstance(result, grpc.RpcError), "expected an error"
    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, result.details()
    for fragment in fragments:
        assert fragment in result.details(), result.details()


def test_health_and_reflection(service: Service) -> None:
    assert check_health(service.target, "freemask.v1.AttentionMask")
    with grpc.insecure_channel(service.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"freemask.v1.AttentionMask", "grpc.health.v1.Health"} <= names


def test_health_command_answers_for_a_serving_service_and_fails_for_a_silent_port(service: Service) -> None:
    """`freemask health` is the containers' HEALTHCHECK: exit 0 only while the server answers SERVING."""
    (silent_port,) = reserve_ports(1)
    for target, code in ((service.target, 0), (f"127.0.0.1:{silent_port}", 1)):
        probe = subprocess.run(
            [sys.executable, "-m", "freemask.shared.cli", "health", "attention_mask", "--target", target,
             "--timeout", "1"], capture_output=True, text=True, timeout=60)
        assert probe.returncode == code, probe.stdout + probe.stderr


def test_bytes_that_are_not_the_request_type(service: Service) -> None:
    assert_invalid(service.call_raw(b"\xff\xff\xff\xff garbage"), "not a valid freemask.v1.GenerateRequest")
    truncated = valid_request().SerializeToString()[:-5]
    assert_invalid(service.call_raw(truncated), "not a valid freemask.v1.GenerateRequest")
    # field 6 (prompt) declared as a string, sent as bytes that are not UTF-8
    assert_invalid(service.call_raw(b"\x32\x02\xc3\x28"), "not a valid freemask.v1.GenerateRequest")


def test_another_message_type_fails_validation(service: Service) -> None:
    other = dead_letter_pb2.DeadLetter(original_topic="x", error="boom").SerializeToString()
    assert_invalid(service.call_raw(other), "sample_id", "unknown class")


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"sample_id": "../../etc/passwd"}, "sample_id '../../etc/passwd' is not a valid id"),
        ({"run_id": "Run/1"}, "run_id 'Run/1' is not a valid id"),
        ({"class_name": "unicorn"}, "unknown class 'unicorn'"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * 1_000_000}, "prompt has 1000000 characters; the limit is 512"),
    ],
)
def test_invalid_fields_are_named(service: Service, changes: dict, fragment: str) -> None:
    assert_invalid(service.call_raw(valid_request(**changes).SerializeToString()), fragment)


def test_payload_over_the_transport_limit_is_refused_and_the_server_survives(service: Service) -> None:
    result = service.call_raw(valid_request(prompt="x" * (TRANSPORT_LIMIT + 10)).SerializeToString())
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert check_health(service.target)


def test_a_valid_request_is_generated_and_its_files_are_in_the_store(service: Service, stack: EmbeddedStack) -> None:
    with grpc.insecure_channel(service.target) as channel:
        stub = channel.unary_unary(
            GENERATE, request_serializer=generate_pb2.GenerateRequest.SerializeToString,
            response_deserializer=attention_mask_pb2.GenerateResponse.FromString,
        )
        single = stub(valid_request(sample_id="runtime-0"), timeout=60).single_object
    assert single.sample_id == "runtime-0" and single.class_name == "dog" and single.num_inference_steps == 3
    store = ObjectStore(stack.store_config())
    for key in (single.keys.image_key, single.keys.label_key, single.keys.softmap_key, single.keys.meta_key):
        assert key.startswith("runs/run-1/rounds/0/samples/runtime-0/") and store.exists(key)


def test_generate_batch_answers_in_order_and_refuses_duplicate_ids(service: Service) -> None:
    with grpc.insecure_channel(service.target) as channel:
        stub = channel.unary_unary(
            "/freemask.v1.AttentionMask/GenerateBatch",
            request_serializer=attention_mask_pb2.GenerateBatchRequest.SerializeToString,
            response_deserializer=attention_mask_pb2.GenerateBatchResponse.FromString,
        )
        requests = [valid_request(sample_id="batch-0"),
                    valid_request(sample_id="batch-1", class_name="boat", background_name="sea",
                                  prompt="a boat on the sea")]
        singles = stub(attention_mask_pb2.GenerateBatchRequest(requests=requests), timeout=60).single_objects
        assert [(s.sample_id, s.class_name) for s in singles] == [("batch-0", "dog"), ("batch-1", "boat")]
        with pytest.raises(grpc.RpcError) as caught:
            stub(attention_mask_pb2.GenerateBatchRequest(requests=[requests[0], requests[0]]), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "distinct" in caught.value.details()


def test_mask_metrics_count_every_generated_object(service: Service) -> None:
    def observed() -> float:
        text = urllib.request.urlopen(service.metrics_url, timeout=5).read().decode()
        return float(next(line for line in text.splitlines()
                          if line.startswith("freemask_attention_mask_area_fraction_count")).rsplit(" ", 1)[1])

    before = observed()
    with grpc.insecure_channel(service.target) as channel:
        stub = channel.unary_unary(GENERATE, request_serializer=generate_pb2.GenerateRequest.SerializeToString,
                                   response_deserializer=attention_mask_pb2.GenerateResponse.FromString)
        stub(valid_request(sample_id="metrics-0"), timeout=60)
    assert observed() == before + 1


def test_metrics_count_calls_by_status(service: Service) -> None:
    service.call_raw(b"\xff")
    text = urllib.request.urlopen(service.metrics_url, timeout=5).read().decode()
    line = next(
        line for line in text.splitlines()
        if line.startswith("freemask_grpc_requests_total") and 'code="INVALID_ARGUMENT"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1


def test_sigterm_stops_cleanly_and_logs_hold_no_secret(service: Service) -> None:
    assert service.process.poll() is None
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=20) == 0
    log = service.log.read_text()
    assert '"msg": "stopped"' in log
    assert len(service.secret) >= 8 and service.secret not in log
    # stdout and stderr both land in the log: every line, libraries' warnings included, is one JSON object
    not_json = [line for line in log.splitlines() if line.strip() and not _is_json_object(line)]
    assert not not_json, not_json[:5]


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
