"""Wiring of the thesaurus service for `freemask serve thesaurus`.

Until issue #6 lands, the service answers health and reflection and every
Thesaurus RPC is UNIMPLEMENTED; it consumes no topic yet.
"""

from __future__ import annotations

from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.v1 import thesaurus_pb2


def build(context: ServiceContext) -> ServiceParts:
    return ServiceParts(grpc_services=[(thesaurus_pb2.DESCRIPTOR.services_by_name["Thesaurus"], object())])
