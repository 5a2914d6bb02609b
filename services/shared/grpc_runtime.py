"""gRPC plumbing shared by every service: handlers, errors, health, reflection.

Methods are registered from the proto's service descriptor with a pass-through
deserializer, and the request is parsed inside our wrapper. That way bytes that
are not the declared message, or values that fail validation, are answered
INVALID_ARGUMENT with a readable message (grpcio itself would answer INTERNAL),
and the server keeps serving.

A service implementation is a plain object with one method per RPC, named as
in the proto (`Generate(request) -> response`); it raises the errors below and
never touches the gRPC context.

Transport security comes from `ServerConfig`: servers listen with TLS (and ask
clients for certificates, mutual TLS) when its `tls_*` server files are set,
and every in-repo client opens its channel through `open_channel`, which uses
TLS when `tls_ca_file` is set. The files are paths, read when the server or
channel starts; certificates and keys never sit in the config itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from freemask.shared.config import ServerConfig
from freemask.shared.errors import InvalidInput, NotFound, Unavailable, Unusable
from freemask.shared.metrics import ServiceMetrics

log = logging.getLogger(__name__)


_ERROR_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unusable, grpc.StatusCode.FAILED_PRECONDITION),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)


def status_for(err: BaseException) -> grpc.StatusCode:
    for error_type, code in _ERROR_CODES:
        if isinstance(err, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(err: grpc.RpcError, peer: str) -> Exception:
    """`status_for` read backwards, for a client: the core's error for a call to `peer` that failed.

    A refusal that a retry cannot change (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION) keeps
    its kind, so the caller can give up at once; anything else, a peer that is down or a deadline
    passed included, is Unavailable, which callers retry.
    """
    code = err.code()
    message = f"{peer}: {code.name}: {err.details()}"
    for error_type, error_code in _ERROR_CODES:
        if code == error_code and error_type in (InvalidInput, NotFound, Unusable):
            return error_type(message)
    return Unavailable(message)


# gRPC drops a status whose details exceed its metadata limit (about 16 KB) and answers
# RESOURCE_EXHAUSTED instead: a message that quotes a huge input must still arrive as its own code.
MAX_STATUS_DETAIL_CHARS = 4000


def _unary_handler(
    service_name: str, method_name: str, request_type: type[Message], call: Callable[[Message], Message],
    metrics: ServiceMetrics,
) -> grpc.RpcMethodHandler:
    full_name = request_type.DESCRIPTOR.full_name

    def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            try:
                request = request_type.FromString(raw)
            except DecodeError as err:
                raise InvalidInput(f"request is not a valid {full_name}: {err}") from None
            response = call(request)
            return response.SerializeToString()
        except Exception as err:  # noqa: BLE001 - every failure becomes a status, never a crash
            code = status_for(err)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("internal error", extra={"method": f"{service_name}/{method_name}"})
                detail = f"internal error in {method_name}; see the service log"
            else:
                detail = str(err)
                if len(detail) > MAX_STATUS_DETAIL_CHARS:
                    detail = f"{detail[:MAX_STATUS_DETAIL_CHARS]}… (message cut from {len(detail)} characters)"
            context.abort(code, detail)
        finally:
            metrics.grpc_requests.labels(metrics.service, method_name, code.name).inc()
            metrics.grpc_latency.labels(metrics.service, method_name).observe(time.perf_counter() - started)

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=None, response_serializer=None)


def service_handler(
    descriptor: ServiceDescriptor, implementation: object, metrics: ServiceMetrics
) -> grpc.GenericRpcHandler:
    """Register every RPC the implementation defines; the others answer UNIMPLEMENTED."""
    handlers = {}
    for method in descriptor.methods:
        call = getattr(implementation, method.name, None)
        if call is None:
            continue
        request_type = message_factory.GetMessageClass(method.input_type)
        handlers[method.name] = _unary_handler(descriptor.full_name, method.name, request_type, call, metrics)
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_names: tuple[str, ...]

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace_s: float) -> None:
        self.set_serving(False)
        self.server.stop(grace_s).wait()


def start_server(
    config: ServerConfig,
    port: int,
    services: list[tuple[ServiceDescriptor, object]],
    metrics: ServiceMetrics,
) -> RunningServer:
    limit = config.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    names = tuple(descriptor.full_name for descriptor, _ in services)
    for descriptor, implementation in services:
        server.add_generic_rpc_handlers((service_handler(descriptor, implementation, metrics),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{port}"
    credentials = server_credentials(config)
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    running = RunningServer(server=server, health=health_servicer, port=bound, service_names=names)
    running.set_serving(True)
    return running


class TlsFileError(OSError):
    """A certificate or key file named in the config cannot be read; the message names the setting."""


def _read_pem(path: Path, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TlsFileError(f"server.{setting}: cannot read {path}: {err.strerror}") from None
    if not data.strip():
        raise TlsFileError(f"server.{setting}: {path} is empty")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of the servers, or None for plaintext; mutual TLS when a client CA is set."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    key = _read_pem(config.tls_key_file, "tls_key_file")
    chain = _read_pem(config.tls_cert_file, "tls_cert_file")
    client_ca = None
    if config.tls_client_ca_file is not None:
        client_ca = _read_pem(config.tls_client_ca_file, "tls_client_ca_file")
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def channel_credentials(config: ServerConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials of this process's clients, or None for plaintext."""
    if config.tls_ca_file is None:
        return None
    key = chain = None
    if config.tls_client_cert_file is not None and config.tls_client_key_file is not None:
        key = _read_pem(config.tls_client_key_file, "tls_client_key_file")
        chain = _read_pem(config.tls_client_cert_file, "tls_client_cert_file")
    return grpc.ssl_channel_credentials(root_certificates=_read_pem(config.tls_ca_file, "tls_ca_file"),
                                        private_key=key, certificate_chain=chain)


def open_channel(target: str, config: ServerConfig | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to one of the platform's servers: TLS as `config` says, plaintext without one.

    Every in-repo client goes through here, so that turning TLS on in the config turns
    it on for all of them.
    """
    credentials = None if config is None else channel_credentials(config)
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))


def check_health(target: str, service: str = "", timeout_s: float = 2.0, server: ServerConfig | None = None) -> bool:
    """True if the server at `target` answers SERVING for `service` (over TLS when `server` says so)."""
    with open_channel(target, server) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
