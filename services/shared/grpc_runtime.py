"""gRPC plumbing shared by every service: handlers, errors, health, reflection.

Methods are registered from the proto's service descriptor with a pass-through
deserializer, and the request is parsed inside our wrapper. That way bytes that
are not the declared message, or values that fail validation, are answered
INVALID_ARGUMENT with a readable message (grpcio itself would answer INTERNAL),
and the server keeps serving.

A service implementation is a plain object with one method per RPC, named as
in the proto (`Generate(request) -> response`); it raises the errors below and
never touches the gRPC context.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

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
    bound = server.add_insecure_port(f"{config.host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {config.host}:{port}")
    server.start()
    running = RunningServer(server=server, health=health_servicer, port=bound, service_names=names)
    running.set_serving(True)
    return running


def check_health(target: str, service: str = "", timeout_s: float = 2.0) -> bool:
    """True if the server at `target` answers SERVING for `service`."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
