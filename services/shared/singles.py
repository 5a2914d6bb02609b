"""A single object's `meta.json`: written by the attention-mask stage, read by every
stage that reuses the object (the thesaurus picks paste sources from them).

The file holds the whole `SingleObject` message as plain JSON, so a reader rebuilds
exactly what the stage published without the topic, plus a `mask` section with how
the mask was found. Floats are written from the message's own float32 values, so
the round trip is exact, and nothing in it is a timing: a redelivery writes the
same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from freemask.shared.errors import InvalidInput, shown
from freemask.shared.keys import key_within, sample_prefix, validate_id, validate_round
from freemask.shared.scene_steps import require_finite
from freemask.v1 import common_pb2, generate_pb2

SINGLE_KIND = "single"
_KEY_FIELDS = ("image_key", "label_key", "softmap_key", "meta_key")


def single_object_meta(single: generate_pb2.SingleObject, mask_details: Mapping[str, Any]) -> bytes:
    """The `meta.json` bytes of `single`; `mask_details` says how its mask was found."""
    meta = {
        "kind": SINGLE_KIND,
        "sample_id": single.sample_id, "run_id": single.run_id, "round": single.round,
        "class_name": single.class_name, "class_id": single.class_id, "background_name": single.background_name,
        "prompt": single.prompt, "seed": single.seed,
        "num_inference_steps": single.num_inference_steps, "guidance_scale": single.guidance_scale,
        "generator": {"name": single.generator.name, "version": single.generator.version},
        "affinity": ({"name": single.affinity.name, "version": single.affinity.version}
                     if single.HasField("affinity") else None),
        "image_size": {"width": single.image_size.width, "height": single.image_size.height},
        "keys": {field: getattr(single.keys, field) for field in _KEY_FIELDS},
        "threshold": single.threshold,
        "mask_area_pixels": single.mask_area_pixels,
        "mask_box": {"x": single.mask_box.x, "y": single.mask_box.y, "width": single.mask_box.width,
                     "height": single.mask_box.height},
        "mask": dict(mask_details),
    }
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")


def is_single_object_meta(meta: Mapping[str, Any]) -> bool:
    return meta.get("kind") == SINGLE_KIND


def single_object_from_meta(data: bytes, what: str = "meta.json") -> generate_pb2.SingleObject:
    """Rebuild the `SingleObject` a `meta.json` was written from; InvalidInput if it is not one."""
    try:
        meta = json.loads(data)
        if not isinstance(meta, dict) or not is_single_object_meta(meta):
            raise InvalidInput(f"{what} does not describe a single object (no \"kind\": \"{SINGLE_KIND}\")")
        return generate_pb2.SingleObject(
            sample_id=meta["sample_id"], run_id=meta["run_id"], round=meta["round"],
            class_id=meta["class_id"], class_name=meta["class_name"], background_name=meta["background_name"],
            prompt=meta["prompt"], seed=meta["seed"],
            keys=common_pb2.SampleKeys(**{field: meta["keys"][field] for field in _KEY_FIELDS}),
            image_size=common_pb2.ImageSize(**meta["image_size"]),
            threshold=meta["threshold"], mask_box=common_pb2.BoundingBox(**meta["mask_box"]),
            mask_area_pixels=meta["mask_area_pixels"],
            generator=common_pb2.ModelVersion(**meta["generator"]),
            affinity=common_pb2.ModelVersion(**meta["affinity"]) if meta["affinity"] else None,
            num_inference_steps=meta["num_inference_steps"], guidance_scale=meta["guidance_scale"],
        )
    except InvalidInput:
        raise
    except (ValueError, KeyError, TypeError) as err:  # JSON errors are ValueErrors
        raise InvalidInput(f"{what} is not a readable single-object record: {type(err).__name__}: {err}") from None


def validate_single_object(single: generate_pb2.SingleObject, run_id: str, round_index: int,
                           classes: Sequence[str], what: str = "single object") -> None:
    """InvalidInput unless `single` is one of run `run_id`'s round `round_index` objects, as the
    attention-mask stage makes them: valid ids, a configured class, its files in its own sample
    folder and finite numbers. Whoever builds on a single object from a message (a compose
    request's base scene, a coordinator's D_0) checks it here before reading its files."""
    validate_id(single.sample_id, f"{what} sample id")
    validate_id(single.run_id, f"{what} run id")
    validate_round(single.round)
    if (single.run_id, single.round) != (run_id, round_index):
        raise InvalidInput(f"{what} {single.sample_id!r} belongs to run {single.run_id!r} round {single.round}; "
                           f"a message of run {run_id!r} round {round_index} builds only on objects generated in "
                           "its own run and round")
    if single.class_name not in classes:
        raise InvalidInput(f"{what} class {shown(single.class_name, 64)} is not one of {', '.join(classes)}")
    prefix = sample_prefix(single.run_id, single.round, single.sample_id)
    for field in _KEY_FIELDS:
        key = getattr(single.keys, field)
        if key or field in ("image_key", "label_key"):
            key_within(key, prefix, f"{what} {field}")
    require_finite(single, what)


def single_object_instance(single: generate_pb2.SingleObject) -> common_pb2.ObjectInstance:
    """The generated object of `single` as instance 1 of a scene: the base of a composed
    sample, or the only object of a single-object sample."""
    return common_pb2.ObjectInstance(
        class_id=single.class_id, class_name=single.class_name, instance_id=1, box=single.mask_box,
        visible_area_pixels=single.mask_area_pixels, origin=common_pb2.OBJECT_ORIGIN_GENERATED,
        source_sample_id=single.sample_id, source_keys=single.keys, placement_score=0.0)
