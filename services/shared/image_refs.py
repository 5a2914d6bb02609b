"""Pictures named in requests: `ImageRef`s (a store key or inline PNG bytes) and
store keys, decoded within the configured limits. Shared by every service that
reads scenes, foregrounds, masks and label maps.
"""

from __future__ import annotations

import numpy as np

from freemask.shared.config import LimitsConfig
from freemask.shared.errors import InvalidInput, NotFound
from freemask.shared.images import decode_image, decode_instance_map, decode_mask
from freemask.shared.keys import validate_key
from freemask.shared.store import ObjectNotFound, ObjectStore
from freemask.v1 import common_pb2

MAX_INLINE_PNG_BYTES = 4 * 1024 * 1024  # ImageRef.png: larger images go through the store


def object_mask(labels: np.ndarray) -> np.ndarray:
    """The object's pixels in a single-channel mask.

    A label map marks the object with its class id (1..254; 0 is background and 255
    "ignore"). A binary PNG marks it with 1, or with 255 when saved as 0/255: a mask
    with no class id at all but some 255 pixels is read that way.
    """
    mask = (labels != 0) & (labels != 255)
    return mask if mask.any() else labels == 255


class ImageReader:
    """Decoded pixels from store keys or inline PNGs (`ImageRef`), within the configured limits.

    Each kind of picture has a reader by reference and one by store key: RGB images,
    object masks (`object_mask`), class-id label maps and 16-bit instance maps.
    """

    def __init__(self, store: ObjectStore, limits: LimitsConfig) -> None:
        self._store = store
        self._limits = limits

    def stored_image(self, key: str, what: str) -> np.ndarray:
        return decode_image(self._stored(key, what), self._limits, what)

    def stored_mask(self, key: str, what: str) -> np.ndarray:
        return object_mask(decode_mask(self._stored(key, what), self._limits, what))

    def image(self, ref: common_pb2.ImageRef, what: str) -> np.ndarray:
        return decode_image(self._referenced(ref, what), self._limits, what)

    def mask(self, ref: common_pb2.ImageRef, what: str) -> np.ndarray:
        return object_mask(decode_mask(self._referenced(ref, what), self._limits, what))

    def labels(self, ref: common_pb2.ImageRef, what: str) -> np.ndarray:
        return decode_mask(self._referenced(ref, what), self._limits, what)

    def stored_labels(self, key: str, what: str) -> np.ndarray:
        return decode_mask(self._stored(key, what), self._limits, what)

    def instances(self, ref: common_pb2.ImageRef, what: str) -> np.ndarray:
        return decode_instance_map(self._referenced(ref, what), self._limits, what)

    def stored_instances(self, key: str, what: str) -> np.ndarray:
        return decode_instance_map(self._stored(key, what), self._limits, what)

    def _referenced(self, ref: common_pb2.ImageRef, what: str) -> bytes:
        source = ref.WhichOneof("source")
        if source == "store_key":
            return self._stored(ref.store_key, what)
        if source == "png":
            if len(ref.png) > MAX_INLINE_PNG_BYTES:
                raise InvalidInput(f"{what} is {len(ref.png)} bytes inline; the limit is {MAX_INLINE_PNG_BYTES}: "
                                   "send larger images as a store_key")
            return ref.png
        raise InvalidInput(f"{what} is missing: set exactly one of store_key or png")

    def _stored(self, key: str, what: str) -> bytes:
        validate_key(key, f"{what} key")
        try:
            size = self._store.stat(key).size  # refuse an oversized object before reading it
            if size > self._limits.max_image_bytes:
                raise InvalidInput(f"{what} {key!r} is {size} bytes; the limit is {self._limits.max_image_bytes}")
            return self._store.get_bytes(key)
        except ObjectNotFound:
            raise NotFound(f"{what}: no object at {key!r}") from None
