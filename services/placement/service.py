"""Wiring of the placement service for `freemask serve placement`.

Until issue #7 lands, the service answers health and reflection and every
Placement RPC is UNIMPLEMENTED; it consumes no topic yet.
"""

from __future__ import annotations

from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.v1 import placement_pb2


def build(context: ServiceContext) -> ServiceParts:
    return ServiceParts(grpc_services=[(placement_pb2.DESCRIPTOR.services_by_name["Placement"], object())])
