"""A single object's meta.json gives back exactly the SingleObject it was written from."""

from __future__ import annotations

import json

import pytest

from freemask.shared.errors import InvalidInput
from freemask.shared.singles import single_object_from_meta, single_object_meta
from freemask.v1 import common_pb2, generate_pb2


def single() -> generate_pb2.SingleObject:
    prefix = "runs/r-1/rounds/2/samples/s-9/"
    return generate_pb2.SingleObject(
        sample_id="s-9", run_id="r-1", round=2, class_id=4, class_name="bus", background_name="road",
        prompt="a bus on the road", seed=2**63 + 5,
        keys=common_pb2.SampleKeys(image_key=prefix + "image.png", label_key=prefix + "label.png",
                                   softmap_key=prefix + "softmap.npz", meta_key=prefix + "meta.json"),
        image_size=common_pb2.ImageSize(width=32, height=24), threshold=0.7123456,
        mask_box=common_pb2.BoundingBox(x=3, y=4, width=10, height=6), mask_area_pixels=41,
        generator=common_pb2.ModelVersion(name="generator", version="sha256-00ff"), num_inference_steps=25,
        guidance_scale=3.3)


def test_round_trip_is_exact() -> None:
    data = single_object_meta(single(), {"threshold_iou": 0.5})
    assert single_object_from_meta(data) == single()
    learned = single()
    learned.affinity.CopyFrom(common_pb2.ModelVersion(name="affinity", version="a1"))
    assert single_object_from_meta(single_object_meta(learned, {})) == learned
    meta = json.loads(data)
    assert meta["kind"] == "single" and meta["mask"] == {"threshold_iou": 0.5} and meta["seed"] == 2**63 + 5
    assert single_object_meta(single(), {"threshold_iou": 0.5}) == data


@pytest.mark.parametrize(("data", "fragment"), [
    (b"{", "not a readable single-object record"),
    (b'{"kind": "composed"}', "does not describe a single object"),
    (b'["kind"]', "does not describe a single object"),
    (b'{"kind": "single", "sample_id": "x"}', "KeyError"),
])
def test_other_files_are_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        single_object_from_meta(data)
