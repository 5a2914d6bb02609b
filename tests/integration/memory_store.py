"""An ObjectStore stand-in over a dict, for unit tests of cores that read and write keys.

It implements the calls the cores make (stat, get_bytes, put_bytes, put_file, exists, delete, list)
with the store's errors; tests that need the real S3 API use the embedded stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from freemask.shared.store import ObjectInfo, ObjectNotFound, StoreError


class MemoryStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def stat(self, key: str) -> ObjectInfo:
        if key not in self.objects:
            raise ObjectNotFound(f"no object at {key!r}")
        return ObjectInfo(key, len(self.objects[key]), "etag")

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        size = self.stat(key).size
        if max_bytes is not None and size > max_bytes:
            raise StoreError(f"object {key!r} is {size} bytes, over the {max_bytes}-byte limit")
        return self.objects[key]

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        self.objects[key] = bytes(data)
        return ObjectInfo(key, len(data), "etag")

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        return self.put_bytes(key, path.read_bytes(), content_type)

    def exists(self, key: str) -> bool:
        return key in self.objects

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for key in sorted(self.objects):
            if key.startswith(prefix):
                yield self.stat(key)
