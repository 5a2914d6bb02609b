"""Adapters of the attention-mask service: gRPC `AttentionMask` and the stage
`freemask.generate.v1 → freemask.singles.v1`, both over `MaskGenerator`.

Both write a sample's files under its deterministic keys, `meta.json` last, and
only then answer or publish; a redelivered request rewrites the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from prometheus_client import Counter, Histogram

from freemask.attention_mask.generation import GeneratedObject, MaskGenerator, ObjectPrompt
from freemask.attention_mask.refine import DEFAULT_THRESHOLDS
from freemask.attention_mask.requests import validate_generate_request
from freemask.shared.bus import BatchResult, InboundMessage, OutboundMessage, Topics
from freemask.shared.config import FreemaskConfig
from freemask.shared.errors import InvalidInput, Unusable
from freemask.shared.images import encode_npz, encode_png
from freemask.shared.keys import sample_key
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.runner import ServiceContext, ServiceParts, StageSpec
from freemask.shared.singles import single_object_meta
from freemask.shared.store import ObjectStore
from freemask.v1 import attention_mask_pb2, common_pb2, generate_pb2

GENERATOR_MODEL_NAME = "generator"
_AREA_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


class MaskMetrics:
    """What operators watch for degenerate masks: the chosen τ and the share of the image masked."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.service = metrics.service
        self.threshold = Histogram("freemask_attention_mask_threshold", "threshold τ chosen by eq. 23",
                                   ["service"], buckets=DEFAULT_THRESHOLDS, registry=metrics.registry)
        self.area_fraction = Histogram("freemask_attention_mask_area_fraction", "share of the image in the mask",
                                       ["service"], buckets=_AREA_BUCKETS, registry=metrics.registry)
        self.rejected = Counter("freemask_attention_mask_rejected", "masks refused as Unusable, by reason "
                                "(empty, too_large: over attention_mask.max_mask_fraction)",
                                ["service", "reason"], registry=metrics.registry)

    def observe(self, result: GeneratedObject) -> None:
        self.threshold.labels(self.service).observe(result.threshold)
        self.area_fraction.labels(self.service).observe(float(result.mask.mean()))


class SingleObjectWriter:
    """Runs requests through the generator and stores each result as a sample."""

    def __init__(self, config: FreemaskConfig, generator: MaskGenerator, store: ObjectStore,
                 metrics: MaskMetrics | None = None) -> None:
        self._config = config
        self._generator = generator
        self._store = store
        self._metrics = metrics

    def run(self, requests: Sequence[generate_pb2.GenerateRequest]) -> list[generate_pb2.SingleObject]:
        """Validate all, generate in batched passes, store each; all-or-nothing, also when one mask is
        Unusable (the gRPC call answers for the whole batch)."""
        prompts, results = self._generate(requests)
        for request, result in zip(requests, results):
            self._require_mask(request, result)
        return [self._store_sample(request, prompt, result) for request, prompt, result in
                zip(requests, prompts, results)]

    def run_each(self, requests: Sequence[generate_pb2.GenerateRequest]
                 ) -> list[generate_pb2.SingleObject | Unusable]:
        """Like `run`, but an Unusable mask fails only its own request: the others are stored and
        answered, in order. Bad input still fails the whole batch before anything runs."""
        prompts, results = self._generate(requests)
        outcomes: list[generate_pb2.SingleObject | Unusable] = []
        for request, prompt, result in zip(requests, prompts, results):
            try:
                self._require_mask(request, result)
            except Unusable as err:
                outcomes.append(err)
            else:
                outcomes.append(self._store_sample(request, prompt, result))
        return outcomes

    def _generate(self, requests: Sequence[generate_pb2.GenerateRequest]
                  ) -> tuple[list[ObjectPrompt], list[GeneratedObject]]:
        if not requests:
            raise InvalidInput("no requests given")
        if len(requests) > self._config.limits.max_batch:
            raise InvalidInput(f"{len(requests)} requests exceed limits.max_batch={self._config.limits.max_batch}")
        sample_ids = [r.sample_id for r in requests]
        if len(set(sample_ids)) != len(sample_ids):
            raise InvalidInput("sample ids in one batch must be distinct")
        prompts = [self._prompt(r) for r in requests]
        return prompts, self._generator.generate(prompts)

    def _require_mask(self, request: generate_pb2.GenerateRequest, result: GeneratedObject) -> None:
        try:
            result.require_mask(f"sample {request.sample_id!r} ({request.class_name}, seed {request.seed})",
                                self._config.attention_mask.max_mask_fraction)
        except Unusable:
            if self._metrics is not None:
                self._metrics.rejected.labels(self._metrics.service, "empty" if not result.mask.any()
                                              else "too_large").inc()
            raise

    def _prompt(self, request: generate_pb2.GenerateRequest) -> ObjectPrompt:
        validate_generate_request(request, self._config.world, self._config.limits)
        size = request.image_size if request.HasField("image_size") else None
        return self._generator.prompt_for(
            request.prompt, request.class_name, request.seed,
            num_inference_steps=request.num_inference_steps if request.HasField("num_inference_steps") else None,
            guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
            height=size.height if size else None, width=size.width if size else None,
        )

    def _store_sample(self, request: generate_pb2.GenerateRequest, prompt: ObjectPrompt,
                      result: GeneratedObject) -> generate_pb2.SingleObject:
        class_id = self._config.world.classes.index(request.class_name) + 1
        keys = common_pb2.SampleKeys(**{
            field: sample_key(request.run_id, request.round, request.sample_id, filename)
            for field, filename in (("image_key", "image.png"), ("softmap_key", "softmap.npz"),
                                    ("label_key", "label.png"), ("meta_key", "meta.json"))
        })
        label = np.where(result.mask, class_id, 0).astype(np.uint8)
        x, y, width, height = result.mask_box
        single = generate_pb2.SingleObject(
            sample_id=request.sample_id, run_id=request.run_id, round=request.round, class_id=class_id,
            class_name=request.class_name, background_name=request.background_name, prompt=request.prompt,
            seed=request.seed, keys=keys, image_size=common_pb2.ImageSize(width=prompt.width, height=prompt.height),
            threshold=result.threshold, mask_box=common_pb2.BoundingBox(x=x, y=y, width=width, height=height),
            mask_area_pixels=int(result.mask.sum()),
            generator=common_pb2.ModelVersion(name=GENERATOR_MODEL_NAME, version=self._generator.version),
            num_inference_steps=prompt.num_inference_steps, guidance_scale=prompt.guidance_scale,
        )
        # meta.json goes last: a reader that finds it knows the other three are complete.
        self._store.put_bytes(keys.image_key, encode_png(result.image), "image/png")
        self._store.put_bytes(keys.softmap_key, encode_npz(softmap=result.soft_map), "application/octet-stream")
        self._store.put_bytes(keys.label_key, encode_png(label), "image/png")
        self._store.put_bytes(keys.meta_key, single_object_meta(single, _mask_details(result, self._generator)),
                             "application/json")
        if self._metrics is not None:
            self._metrics.observe(result)
        return single


def _mask_details(result: GeneratedObject, generator: MaskGenerator) -> dict[str, object]:
    """How the mask was found (meta.json's `mask` section)."""
    config = generator.refine_config
    return {
        "threshold_iou": round(result.threshold_iou, 6),
        "threshold_grid": list(config.thresholds),
        "class_token_positions": list(result.token_positions),
        "cross_attention_resolutions": [list(r) for r in result.cross_attention_resolutions],
        "affinity_resolution": list(result.affinity_resolution),
        "affinity_source": generator.affinity_source,
        "refine_beta": config.beta,
        "refine_iterations": config.iterations,
        "refine_cut": config.cut,
        "refine_reference_threshold": config.reference_threshold,
        "min_component_fraction": config.min_component_fraction,
    }


class AttentionMaskApi:
    """gRPC servicer: the same path as the stage, answered instead of published."""

    def __init__(self, writer: SingleObjectWriter) -> None:
        self._writer = writer

    def Generate(self, request: generate_pb2.GenerateRequest) -> attention_mask_pb2.GenerateResponse:
        return attention_mask_pb2.GenerateResponse(single_object=self._writer.run([request])[0])

    def GenerateBatch(self, request: attention_mask_pb2.GenerateBatchRequest
                      ) -> attention_mask_pb2.GenerateBatchResponse:
        return attention_mask_pb2.GenerateBatchResponse(single_objects=self._writer.run(list(request.requests)))


class GenerateStage:
    """Stage adapter: a GenerateRequest in, its SingleObject out on `freemask.singles.v1`."""

    def __init__(self, writer: SingleObjectWriter) -> None:
        self._writer = writer

    def handle(self, message: InboundMessage) -> list[OutboundMessage]:
        return [_single_out(single) for single in self._writer.run([message.decode(generate_pb2.GenerateRequest)])]

    def handle_batch(self, messages: Sequence[InboundMessage]) -> list[BatchResult]:
        """One diffusion pass for the whole poll; a message whose mask is Unusable is answered with
        that error (dead-lettered at once), so the others need not be generated again one by one."""
        requests = [m.decode(generate_pb2.GenerateRequest) for m in messages]
        outcomes = self._writer.run_each(requests)
        return [outcome if isinstance(outcome, Unusable) else [_single_out(outcome)] for outcome in outcomes]


def _single_out(single: generate_pb2.SingleObject) -> OutboundMessage:
    return OutboundMessage(Topics.SINGLES, single.sample_id, single)


def build(context: ServiceContext) -> ServiceParts:
    generator = MaskGenerator.from_config(context.config.attention_mask)
    writer = SingleObjectWriter(context.config, generator, context.store, MaskMetrics(context.metrics))
    stage = GenerateStage(writer)
    descriptor = attention_mask_pb2.DESCRIPTOR.services_by_name["AttentionMask"]
    return ServiceParts(grpc_services=[(descriptor, AttentionMaskApi(writer))],
                        stage=StageSpec(Topics.GENERATE, stage.handle, batch_handler=stage.handle_batch))
