"""Wiring of the harmonization service for `freemask serve harmonization`.

Until issue #8 lands, the service answers health and reflection and every
Harmonization RPC is UNIMPLEMENTED; it consumes no topic yet.
"""

from __future__ import annotations

from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.v1 import harmonization_pb2


def build(context: ServiceContext) -> ServiceParts:
    return ServiceParts(grpc_services=[(harmonization_pb2.DESCRIPTOR.services_by_name["Harmonization"], object())])
