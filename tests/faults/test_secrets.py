"""Issue #13 item 7a: credentials come only from env and secret files, and never reach a log
line or a /metrics page.

A stack of this module's own is started with S3 keys made for this test (its servers take
them from the same files), so every credential is a string nothing else contains. All six
services then run as `freemask serve` processes at DEBUG level, each given

- the S3 access key inline (FREEMASK_STORE__ACCESS_KEY) and the secret key as a file;
- Kafka SASL credentials, the username inline and the password as a file (the embedded broker
  speaks PLAINTEXT, so they are not sent, but they pass through the config into every
  Kafka client's settings as they would in production).

Traffic: a valid generation that writes to the store, bad requests to every service, a
placement that fails (Triton is down) and one that reads a missing key, a failing coordinator
call, undecodable records on every stage's input topic (each dead-lettered). Then SIGTERM.
No log line, no /metrics page and no error printed by a refused start contains a credential.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from freemask.shared.bus import Topics, make_producer
from freemask.shared.config import SERVICE_NAMES
from freemask.shared.images import encode_png
from freemask.v1 import attention_mask_pb2, common_pb2, coordinator_pb2, generate_pb2, placement_pb2

from grpc_helpers import unary_call
from ports import reserve_ports
from service_procs import (
    FOREGROUND,
    LABELS,
    ServiceProc,
    base_env,
    scene_image,
    spawn_service,
    stack_config,
    wait_healthy,
)

pytestmark = pytest.mark.stack

# every stage's input, and the method a garbage request goes to on each service
STAGE_INPUTS = {"attention_mask": Topics.GENERATE, "thesaurus": Topics.COMPOSE, "placement": Topics.PLACE,
                "harmonization": Topics.HARMONIZE, "scoring": Topics.COMPOSED}
GARBAGE_METHODS = {"attention_mask": "AttentionMask/Generate", "thesaurus": "Thesaurus/Relation",
                   "placement": "Placement/Place", "harmonization": "Harmonization/Harmonize",
                   "scoring": "Scoring/Score", "coordinator": "Coordinator/StartRun"}


def credential(kind: str) -> str:
    """A value found nowhere but where this test puts it (letters and digits: S3 signs with it)."""
    return f"{kind}{secrets.token_hex(12)}"


def garbage_call(target: str, method: str) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/freemask.v1.{method}", request_serializer=None, response_deserializer=None)
        try:
            call(b"\xff\xff\xff\xff not a message", timeout=30)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def wait_dead_lettered(services: dict[str, ServiceProc], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(STAGE_INPUTS)
    while pending:
        for name in sorted(pending):
            if services[name].metric("freemask_dlq_messages_total", topic=STAGE_INPUTS[name]) >= 1:
                pending.discard(name)
        assert not pending or time.monotonic() < deadline, f"no dead letter from {sorted(pending)}"
        time.sleep(0.5)


@pytest.mark.timeout(600)
def test_no_credential_reaches_a_log_line_or_a_metrics_page(private_stack, tmp_path: Path) -> None:
    stack = private_stack.stack
    needles = {name: credential(name) for name in ("ak", "sk", "kafkauser", "kafkapw")}
    client_env = stack.client_env()
    # the stack reads its S3 keys from these files when it first starts, and so do the services
    Path(client_env["FREEMASK_STORE__ACCESS_KEY_FILE"]).parent.mkdir(parents=True, mode=0o700)
    Path(client_env["FREEMASK_STORE__ACCESS_KEY_FILE"]).write_text(needles["ak"])
    Path(client_env["FREEMASK_STORE__SECRET_KEY_FILE"]).write_text(needles["sk"])
    private_stack.up(("seaweedfs", "tansu"))
    password_file = tmp_path / "kafka-password"
    password_file.write_text(needles["kafkapw"] + "\n")
    password_file.chmod(0o600)
    (closed,) = reserve_ports(1)
    settings = {
        **{k: v for k, v in client_env.items() if k != "FREEMASK_STORE__ACCESS_KEY_FILE"},
        "FREEMASK_STORE__ACCESS_KEY": needles["ak"],
        "FREEMASK_BUS__SASL_MECHANISM": "PLAIN", "FREEMASK_BUS__SASL_USERNAME": needles["kafkauser"],
        "FREEMASK_BUS__SASL_PASSWORD_FILE": str(password_file),
        "FREEMASK_TRITON__URL": f"127.0.0.1:{closed}", "FREEMASK_TRITON__TIMEOUT_S": "2",
        "FREEMASK_LOG_LEVEL": "DEBUG",
        "FREEMASK_THESAURUS__REFERENCE_CAPTIONS": "500", "FREEMASK_ATTENTION_MASK__NUM_INFERENCE_STEPS": "2",
        "FREEMASK_ATTENTION_MASK__MAX_MASK_FRACTION": "1.0",  # 2 steps draw blurs whose masks are often large
        "FREEMASK_BUS__MAX_ATTEMPTS": "2", "FREEMASK_BUS__RETRY_BACKOFF_S": "0.1",
    }
    # every service's ports, so the coordinator can find scoring
    ports = {name: reserve_ports(2) for name in SERVICE_NAMES}
    for name, (grpc_port, metrics_port) in ports.items():
        settings[f"FREEMASK_SERVER__PORTS__{name.upper()}__GRPC_PORT"] = str(grpc_port)
        settings[f"FREEMASK_SERVER__PORTS__{name.upper()}__METRICS_PORT"] = str(metrics_port)
    env = base_env(settings)
    config = stack_config(stack, **{k: v for k, v in settings.items() if k.startswith("FREEMASK_")})
    assert config.store.access_key.get_secret_value() == needles["ak"]  # the needles are what the services use
    assert config.bus.sasl_password.get_secret_value() == needles["kafkapw"]

    services = {name: spawn_service(name, env, tmp_path / "logs", ports=ports[name]) for name in SERVICE_NAMES}
    metrics_pages: dict[str, str] = {}
    exit_codes: dict[str, int] = {}
    try:
        wait_healthy(services.values(), timeout_s=300)
        # the store is reached with the credentials: a generation writes its files
        generate = generate_pb2.GenerateRequest(run_id="secrets", sample_id="s-0", class_name="dog",
                                                background_name="grass", prompt="a photo of a dog on the grass", seed=1)
        single = unary_call(services["attention_mask"].target, "AttentionMask", "Generate", generate,
                            attention_mask_pb2.GenerateResponse, 120)
        assert single.single_object.keys.image_key
        for name, method in GARBAGE_METHODS.items():
            assert garbage_call(services[name].target, method) == grpc.StatusCode.INVALID_ARGUMENT, name
        inline = placement_pb2.PlaceRequest(background=common_pb2.ImageRef(png=encode_png(scene_image(1))),
                                            foreground=common_pb2.ImageRef(png=encode_png(FOREGROUND)),
                                            foreground_mask=common_pb2.ImageRef(png=encode_png(LABELS)))
        missing = placement_pb2.PlaceRequest(background=common_pb2.ImageRef(store_key="runs/secrets/none.png"),
                                             foreground=inline.foreground, foreground_mask=inline.foreground_mask)
        for request, code in ((inline, grpc.StatusCode.UNAVAILABLE), (missing, grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as info:
                unary_call(services["placement"].target, "Placement", "Place", request, placement_pb2.PlaceResponse,
                           60)
            assert info.value.code() == code, info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            unary_call(services["coordinator"].target, "Coordinator", "GetRun",
                       coordinator_pb2.GetRunRequest(run_id="no-such-run"), coordinator_pb2.GetRunResponse, 30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
        producer = make_producer(config.bus)
        try:
            for topic in STAGE_INPUTS.values():
                producer.send(topic, key=b"secrets-poison", value=b"\xff\xfe not a message").get(timeout=30)
        finally:
            producer.close(timeout=5)
        wait_dead_lettered(services, 180)
        metrics_pages = {name: service.metrics_text() for name, service in services.items()}
        exit_codes = {name: service.terminate() for name, service in services.items()}
    finally:
        for service in services.values():
            service.stop()

    assert exit_codes == dict.fromkeys(SERVICE_NAMES, 0), exit_codes
    logs = {name: service.log_path.read_text(errors="replace") for name, service in services.items()}
    for name, text in logs.items():
        assert '"msg": "stopped"' in text, f"{name} did not shut down cleanly:\n{text[-2000:]}"
    refused = subprocess.run([sys.executable, "-m", "freemask.shared.cli", "serve", "placement"],
                             env={**env, "FREEMASK_BUS__MAX_ATTEMPTS": "0"}, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "bus.max_attempts" in refused.stderr, refused.stderr
    outputs = {**{f"{name} log": text for name, text in logs.items()},
               **{f"{name} /metrics": text for name, text in metrics_pages.items()},
               "refused start": refused.stdout + refused.stderr}
    lines = sum(text.count("\n") for text in logs.values())
    print(f"\n[secrets] {len(logs)} services at DEBUG: {lines} log lines, {len(metrics_pages)} metrics pages, "
          f"searched for {len(needles)} credentials")
    leaks = [f"{needle_name} in {where}" for where, text in outputs.items()
             for needle_name, needle in needles.items() if needle in text]
    assert not leaks, leaks
