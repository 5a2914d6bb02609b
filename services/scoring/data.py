"""Labelled datasets for training and evaluation: which pairs, and their decoded pixels.

A `Dataset` names (image, label map) pairs in the store, inline or through a JSONL
manifest. Pairs are read once, each checked as it is decoded. One that cannot be used
(missing object, not an image, sizes that differ, class ids the model does not know,
no labelled pixel) is skipped with a logged reason and counted, so one bad file among
thousands never stops a training job. Checking the request itself (no pairs, a key
that escapes the store layout, a malformed manifest line) is strict: that is the
caller's mistake, answered with InvalidInput before anything runs.

The decoded pairs are held in memory (3 bytes per pixel for the image and one for the
label: 4 KiB for a 32 px pair, 1 MiB at 512 px).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
from tqdm import tqdm

from freemask.shared.errors import InvalidInput, NotFound, shown
from freemask.shared.image_refs import ImageReader
from freemask.shared.images import encode_png
from freemask.shared.keys import run_prefix, validate_key
from freemask.shared.store import ObjectStore
from freemask.v1 import scoring_pb2
from freemask.world.names import IGNORE_ID

log = logging.getLogger(__name__)

MAX_DATASET_IMAGES = 1_000_000
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
RUNS_PREFIX = "runs/"


@dataclass(frozen=True)
class LabelledPair:
    image_key: str
    label_key: str


def _pair(image_key: object, label_key: object, where: str) -> LabelledPair:
    if not isinstance(image_key, str) or not isinstance(label_key, str):
        raise InvalidInput(f"{where}: image_key and label_key must both be strings")
    return LabelledPair(validate_key(image_key, f"{where} image_key"), validate_key(label_key, f"{where} label_key"))


def _manifest_pairs(store: ObjectStore, key: str) -> list[LabelledPair]:
    validate_key(key, "dataset manifest_key")
    try:
        text = store.get_bytes(key, max_bytes=MAX_MANIFEST_BYTES).decode("utf-8")
    except NotFound:
        raise InvalidInput(f"dataset manifest {key!r} does not exist") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"dataset manifest {key!r} is not UTF-8 text") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"manifest {key!r} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise InvalidInput(f"{where} is not JSON: {err.msg}") from None
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where} must be an object with image_key and label_key")
        pairs.append(_pair(entry.get("image_key"), entry.get("label_key"), where))
        if len(pairs) > MAX_DATASET_IMAGES:
            break
    return pairs


def write_manifest(store: ObjectStore, key: str, pairs: Sequence[LabelledPair]) -> None:
    """`pairs` as the JSONL manifest `dataset_pairs` reads: one {image_key, label_key} object per line."""
    lines = "".join(json.dumps({"image_key": p.image_key, "label_key": p.label_key}) + "\n" for p in pairs)
    store.put_bytes(validate_key(key, "manifest key"), lines.encode("utf-8"), "application/x-ndjson")


def write_reference_split(store: ObjectStore, split: str, image_size: int, count: int,
                          progress_file: TextIO = sys.stderr) -> tuple[list[LabelledPair], str]:
    """The reference world's first `count` scenes of `split` and their exact label maps in the store,
    under `reference/{split}/{size}/`, with their manifest; returns the pairs and the manifest's key."""
    from freemask.world import dataset

    prefix = f"reference/{split}/{image_size}"
    pairs = []
    for index in tqdm(range(count), desc=f"reference {split} scenes", unit="scene", file=progress_file):
        scene = dataset(split, index, image_size)
        pair = LabelledPair(f"{prefix}/{index}/image.png", f"{prefix}/{index}/label.png")
        store.put_bytes(pair.image_key, encode_png(scene.image), "image/png")
        store.put_bytes(pair.label_key, encode_png(scene.label), "image/png")
        pairs.append(pair)
    write_manifest(store, f"{prefix}/manifest.jsonl", pairs)
    return pairs, f"{prefix}/manifest.jsonl"


def dataset_pairs(dataset: scoring_pb2.Dataset, store: ObjectStore) -> list[LabelledPair]:
    """The pairs a Dataset names, in order; InvalidInput if the request itself is wrong."""
    source = dataset.WhichOneof("source")
    if source == "images":
        pairs = [_pair(item.image_key, item.label_key, f"dataset image {i}")
                 for i, item in enumerate(dataset.images.images)]
    elif source == "manifest_key":
        pairs = _manifest_pairs(store, dataset.manifest_key)
    else:
        raise InvalidInput("dataset is missing: set images or manifest_key")
    if not 1 <= len(pairs) <= MAX_DATASET_IMAGES:
        raise InvalidInput(f"a dataset holds 1..{MAX_DATASET_IMAGES} images, got "
                           f"{len(pairs) if len(pairs) <= MAX_DATASET_IMAGES else 'more'}")
    return pairs


def require_own_run(dataset: scoring_pb2.Dataset, pairs: Sequence[LabelledPair], run_id: str) -> None:
    """InvalidInput if a run's training data reads another run's samples: keys under `runs/` must lie
    under `runs/{run_id}/` (labelled data elsewhere in the store, such as a reference split, is shared).
    Called with no pairs, it checks the manifest key alone, before the manifest is read."""
    own = run_prefix(run_id)
    keys = [(f"dataset image {i} {field}", getattr(pair, field)) for i, pair in enumerate(pairs)
            for field in ("image_key", "label_key")]
    if dataset.WhichOneof("source") == "manifest_key":
        keys.insert(0, ("dataset manifest_key", dataset.manifest_key))
    for what, key in keys:
        if key.startswith(RUNS_PREFIX) and not key.startswith(own):
            raise InvalidInput(f"{what} {shown(key)} lies under another run; training run {run_id!r} reads samples "
                               f"only under {own!r}")


def check_label_map(label: np.ndarray, image: np.ndarray, num_classes: int) -> None:
    """InvalidInput unless `label` can supervise or score `image` for a model of `num_classes`."""
    if label.shape != image.shape[:2]:
        raise InvalidInput(f"the label map is {label.shape[1]}x{label.shape[0]} px but the image is "
                           f"{image.shape[1]}x{image.shape[0]}")
    ids = np.unique(label)
    unknown = ids[(ids >= num_classes) & (ids != IGNORE_ID)]
    if unknown.size:
        raise InvalidInput(f"the label map holds class ids {unknown.tolist()[:5]}; the model knows 0..{num_classes - 1} "
                           "(and 255 = ignore)")
    if not (label != IGNORE_ID).any():
        raise InvalidInput("the label map has no labelled pixel (all 255)")


@dataclass
class LabelledImages:
    """Decoded pairs that passed their checks, and the ones that did not, with why."""

    images: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W, 3)
    labels: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W)
    skipped: list[tuple[LabelledPair, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def require_some(self) -> LabelledImages:
        """Self, or InvalidInput when every pair was skipped (nothing to train or measure on)."""
        if not self.images:
            first = self.skipped[0][1] if self.skipped else "none listed"
            raise InvalidInput(f"no usable image in the dataset: all {len(self.skipped)} were skipped "
                               f"(first reason: {first})")
        return self


def load_pairs(pairs: Sequence[LabelledPair], reader: ImageReader, num_classes: int,
               progress: Callable[[int], None] | None = None) -> LabelledImages:
    """Read and check every pair; a pair that fails is skipped, logged and counted."""
    loaded = LabelledImages()
    for pair in pairs:
        try:
            image = reader.stored_image(pair.image_key, "image")
            label = reader.stored_labels(pair.label_key, "label map")
            check_label_map(label, image, num_classes)
        except (InvalidInput, NotFound) as err:
            log.warning("skipping a labelled image", extra={"image_key": pair.image_key,
                                                             "label_key": pair.label_key, "reason": str(err)})
            loaded.skipped.append((pair, str(err)))
        else:
            loaded.images.append(image)
            loaded.labels.append(label)
        if progress is not None:
            progress(1)
    return loaded
