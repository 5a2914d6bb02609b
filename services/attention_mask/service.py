"""Wiring of the attention-mask service for `freemask serve attention_mask`."""

from __future__ import annotations

from freemask.attention_mask.requests import validate_generate_request
from freemask.shared.config import FreemaskConfig
from freemask.shared.runner import ServiceContext, ServiceParts
from freemask.v1 import attention_mask_pb2, generate_pb2


class AttentionMaskApi:
    """gRPC adapter. Requests are validated in full today; generation itself lands with issue #5."""

    def __init__(self, config: FreemaskConfig) -> None:
        self._config = config

    def Generate(self, request: generate_pb2.GenerateRequest) -> attention_mask_pb2.GenerateResponse:
        validate_generate_request(request, self._config.world, self._config.limits)
        raise NotImplementedError("image generation is not implemented yet (issue #5)")


def build(context: ServiceContext) -> ServiceParts:
    descriptor = attention_mask_pb2.DESCRIPTOR.services_by_name["AttentionMask"]
    return ServiceParts(grpc_services=[(descriptor, AttentionMaskApi(context.config))])
