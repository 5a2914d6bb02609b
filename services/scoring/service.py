"""Wiring of the scoring service for `freemask serve scoring`.

Until issue #9 lands, the service answers health and reflection and every
Scoring RPC is UNIMPLEMENTED; it consumes no topic yet.
"""

from __future__ import annotations

from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.v1 import scoring_pb2


def build(context: ServiceContext) -> ServiceParts:
    return ServiceParts(grpc_services=[(scoring_pb2.DESCRIPTOR.services_by_name["Scoring"], object())])
