"""Wiring of the coordinator service for `freemask serve coordinator`.

Until issue #10 lands, the service answers health and reflection and every
Coordinator RPC is UNIMPLEMENTED; it consumes no topic yet.
"""

from __future__ import annotations

from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.v1 import coordinator_pb2


def build(context: ServiceContext) -> ServiceParts:
    return ServiceParts(grpc_services=[(coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"], object())])
