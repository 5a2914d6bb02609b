"""The attention-mask stage on the real broker and store: GenerateRequests in,
SingleObjects out whose files exist and agree with the message; a bad request
goes to the DLQ; a mask over the size limit is dead-lettered alone, inside its batch;
a redelivery rewrites identical bytes."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from PIL import Image

from freemask.attention_mask.generation import MaskGenerator
from freemask.attention_mask.service import GenerateStage, SingleObjectWriter
from freemask.shared.bus import BatchResult, InboundMessage, OutboundMessage, StageWorker, Topics
from freemask.shared.config import FreemaskConfig
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.singles import single_object_from_meta
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.v1 import dead_letter_pb2, generate_pb2

from bus_helpers import drain_records, publish_samples, unique_topics
from conftest import config_for

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def config(stack: EmbeddedStack) -> FreemaskConfig:
    # 3 steps draw blurs whose masks are often large: the size limit is off except where a test sets it
    return config_for(stack, FREEMASK_ATTENTION_MASK__NUM_INFERENCE_STEPS="3",
                      FREEMASK_ATTENTION_MASK__MAX_MASK_FRACTION="1.0",
                      FREEMASK_BUS__GROUP_PREFIX=f"attention-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def generator(config: FreemaskConfig, one_torch_thread: None) -> MaskGenerator:
    return MaskGenerator.from_config(config.attention_mask)


@pytest.fixture(scope="module")
def writer(config: FreemaskConfig, generator: MaskGenerator) -> SingleObjectWriter:
    return SingleObjectWriter(config, generator, ObjectStore(config.store))


def generate_request(sample_id: str, cls: str = "cow", background: str = "field") -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(run_id="stage-run", round=1, sample_id=sample_id, class_name=cls,
                                        background_name=background, prompt=f"a photo of a {cls} in a {background}",
                                        seed=11)


def run_stage(config: FreemaskConfig, writer: SingleObjectWriter, requests: list[generate_pb2.GenerateRequest]
              ) -> tuple[StageWorker, list[int]]:
    """Run the stage over `requests`; returns the worker and the size of every call of a handler
    (1 for a message handled alone)."""
    (source,) = unique_topics(config.bus, "generate")
    publish_samples(config.bus, source, requests)
    stage = GenerateStage(writer)
    batch_sizes: list[int] = []

    def counted_batch(messages: list[InboundMessage]) -> list[BatchResult]:
        batch_sizes.append(len(messages))
        return stage.handle_batch(messages)

    def counted_one(message: InboundMessage) -> list[OutboundMessage]:
        batch_sizes.append(1)
        return stage.handle(message)

    worker = StageWorker("attention_mask", source, counted_one, config.bus, ServiceMetrics("attention_mask"),
                         batch_handler=counted_batch)
    worker.run(max_messages=len(requests), timeout_s=120)
    return worker, batch_sizes


def test_requests_become_single_objects_whose_files_exist_and_agree(
        config: FreemaskConfig, writer: SingleObjectWriter) -> None:
    suffix = uuid.uuid4().hex[:8]
    requests = [generate_request(f"ok-{suffix}-{i}", cls, bg)
                for i, (cls, bg) in enumerate([("cow", "field"), ("boat", "sea"), ("bus", "road")])]
    worker, batch_sizes = run_stage(config, writer, requests)
    assert worker.stats.processed == 3 and worker.stats.dead_lettered == 0
    assert max(batch_sizes) > 1, "the stage should have generated several prompts in one pass"
    records = drain_records(config.bus, Topics.SINGLES, [r.sample_id for r in requests])
    singles = {key: generate_pb2.SingleObject.FromString(value) for key, value, _ in records}
    store = ObjectStore(config.store)
    for request in requests:
        single = singles[request.sample_id]
        prefix = f"runs/stage-run/rounds/1/samples/{request.sample_id}/"
        assert single.keys.image_key == prefix + "image.png" and single.class_name == request.class_name
        assert single.class_id == config.world.classes.index(request.class_name) + 1
        image = np.asarray(Image.open(io.BytesIO(store.get_bytes(single.keys.image_key))))
        label = np.asarray(Image.open(io.BytesIO(store.get_bytes(single.keys.label_key))))
        soft = np.load(io.BytesIO(store.get_bytes(single.keys.softmap_key)))["softmap"]
        meta = json.loads(store.get_bytes(single.keys.meta_key))
        assert image.shape == (32, 32, 3) and label.shape == soft.shape == (32, 32)
        assert set(np.unique(label)) == {0, single.class_id}
        assert int((label == single.class_id).sum()) == single.mask_area_pixels
        box = single.mask_box
        rows, cols = np.nonzero(label)
        assert (box.x, box.y, box.x + box.width - 1, box.y + box.height - 1) == (
            cols.min(), rows.min(), cols.max(), rows.max())
        assert single_object_from_meta(store.get_bytes(single.keys.meta_key)) == single
        assert 0 <= meta["mask"]["threshold_iou"] <= 1
        assert meta["seed"] == 11 and meta["generator"]["version"] == single.generator.version


def test_a_redelivered_request_rewrites_identical_bytes(config: FreemaskConfig, writer: SingleObjectWriter) -> None:
    request = generate_request(f"again-{uuid.uuid4().hex[:8]}")
    store = ObjectStore(config.store)
    first = writer.run([request])[0]
    before = {key: store.get_bytes(key) for key in (first.keys.image_key, first.keys.label_key,
                                                     first.keys.softmap_key, first.keys.meta_key)}
    second = writer.run([request])[0]
    assert second == first
    assert {key: store.get_bytes(key) for key in before} == before


def test_a_bad_request_is_dead_lettered_and_writes_nothing(config: FreemaskConfig,
                                                          writer: SingleObjectWriter) -> None:
    suffix = uuid.uuid4().hex[:8]
    good, bad = generate_request(f"good-{suffix}"), generate_request(f"bad-{suffix}", cls="unicorn")
    worker, _ = run_stage(config, writer, [good, bad])
    assert worker.stats.processed == 2 and worker.stats.dead_lettered == 1  # a dead letter counts as processed
    (letter,) = [dead_letter_pb2.DeadLetter.FromString(value)
                 for key, value, _ in drain_records(config.bus, Topics.DLQ, [bad.sample_id]) if key == bad.sample_id]
    assert "unknown class 'unicorn'" in letter.error and letter.attempts == 1
    assert generate_pb2.GenerateRequest.FromString(letter.value) == bad
    store = ObjectStore(config.store)
    assert list(store.list(f"runs/stage-run/rounds/1/samples/{bad.sample_id}/")) == []
    assert store.exists(f"runs/stage-run/rounds/1/samples/{good.sample_id}/meta.json")


def test_a_mask_over_the_size_limit_is_dead_lettered_alone_inside_its_batch(
        config: FreemaskConfig, generator: MaskGenerator) -> None:
    suffix = uuid.uuid4().hex[:8]
    requests = [generate_request(f"size-{suffix}-{i}", cls, bg)
                for i, (cls, bg) in enumerate([("cow", "field"), ("boat", "sea"), ("bus", "road"), ("bird", "sky")])]
    results = generator.generate([generator.prompt_for(r.prompt, r.class_name, r.seed) for r in requests])
    fractions = [float(result.mask.mean()) for result in results]
    assert max(fractions) > min(fractions) > 0, "the test needs masks of different sizes"
    limit = (max(fractions) + min(fractions)) / 2
    limited = config.model_copy(update={"attention_mask": config.attention_mask.model_copy(
        update={"max_mask_fraction": limit})})
    too_large = {r.sample_id for r, fraction in zip(requests, fractions) if fraction > limit}

    worker, batch_sizes = run_stage(limited, SingleObjectWriter(limited, generator, ObjectStore(config.store)),
                                    requests)

    assert worker.stats.processed == 4 and worker.stats.dead_lettered == len(too_large)
    assert max(batch_sizes) > 1, "the stage should have generated several prompts in one pass"
    assert sum(batch_sizes) == 4, "each message handled once: no batch fell back to one message at a time"
    letters = [dead_letter_pb2.DeadLetter.FromString(value)
               for key, value, _ in drain_records(config.bus, Topics.DLQ, sorted(too_large)) if key in too_large]
    assert {letter.key.decode() for letter in letters} == too_large
    assert all("max_mask_fraction" in letter.error and letter.attempts == 1 and letter.error_type == "Unusable"
               for letter in letters)
    store = ObjectStore(config.store)
    for request in requests:
        stored = store.exists(f"runs/stage-run/rounds/1/samples/{request.sample_id}/meta.json")
        assert stored == (request.sample_id not in too_large)
