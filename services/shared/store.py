"""The object store: one bucket behind the S3 API, reached through the `minio` client.

The same code talks to SeaweedFS (embedded) and to MinIO or AWS S3 (production).
Every key is validated (keys.validate_key) before the prefix is applied, so a
caller can never address anything outside `{bucket}/{prefix}`. An S3 PUT is
atomic, so a reader sees the old object or the new one, never half of one;
large objects are streamed in parts rather than held in memory twice.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.error import S3Error

from freemask.shared.config import StoreConfig
from freemask.shared.errors import NotFound, Unavailable
from freemask.shared.keys import validate_key

_STREAM_CHUNK = 1024 * 1024


class StoreError(Unavailable):
    """The store could not complete an operation; the message names key and cause."""


class ObjectNotFound(NotFound):
    """No object at that key (gRPC: NOT_FOUND; never retried as an outage)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


class ObjectStore:
    def __init__(self, config: StoreConfig, client: Minio | None = None) -> None:
        self._config = config
        self._client = client or make_client(config)

    @property
    def bucket(self) -> str:
        return self._config.bucket

    def ensure_bucket(self) -> None:
        try:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket, location=self._config.region)
        except S3Error as err:
            if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreError(f"cannot create bucket {self.bucket!r}: {err.code}: {err.message}") from None

    def _object_name(self, key: str) -> str:
        return self._config.prefix + validate_key(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        return self.put_stream(key, io.BytesIO(data), len(data), content_type)

    def put_stream(
        self, key: str, stream: BinaryIO, length: int = -1, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        """Upload from a stream; with length -1 the client sends fixed-size parts as it reads."""
        name = self._object_name(key)
        part_size = self._config.multipart_threshold_bytes if length < 0 else 0
        try:
            result = self._client.put_object(
                self.bucket, name, stream, length, content_type=content_type, part_size=part_size
            )
        except S3Error as err:
            raise StoreError(f"put {key!r} failed: {err.code}: {err.message}") from None
        size = length if length >= 0 else self.stat(key).size
        return ObjectInfo(key=key, size=size, etag=result.etag)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        with open(path, "rb") as handle:
            return self.put_stream(key, handle, os.fstat(handle.fileno()).st_size, content_type)

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """Read a whole object; `max_bytes` guards against loading something unexpectedly huge."""
        if max_bytes is not None:
            size = self.stat(key).size
            if size > max_bytes:
                raise StoreError(f"object {key!r} is {size} bytes, over the {max_bytes}-byte limit")
        with self.open(key) as stream:
            return stream.read()

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        """A readable stream of the object; the connection is released on exit."""
        name = self._object_name(key)
        try:
            response = self._client.get_object(self.bucket, name)
        except S3Error as err:
            raise self._translate(err, key) from None
        try:
            yield response  # urllib3 responses are file-like: .read(n), .stream()
        finally:
            response.close()
            response.release_conn()

    def download(self, key: str, path: Path) -> int:
        """Stream an object to a file; the file appears whole or not at all."""
        path.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as out, self.open(key) as stream:
                while chunk := stream.read(_STREAM_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return written

    def stat(self, key: str) -> ObjectInfo:
        try:
            info = self._client.stat_object(self.bucket, self._object_name(key))
        except S3Error as err:
            raise self._translate(err, key) from None
        return ObjectInfo(key=key, size=int(info.size or 0), etag=str(info.etag))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix` (recursively), in key order."""
        if prefix:
            validate_key(prefix.rstrip("/"), "prefix")
        full_prefix = self._config.prefix + prefix
        try:
            for obj in self._client.list_objects(self.bucket, prefix=full_prefix, recursive=True):
                yield ObjectInfo(
                    key=obj.object_name[len(self._config.prefix) :], size=int(obj.size or 0), etag=str(obj.etag)
                )
        except S3Error as err:
            raise StoreError(f"list {prefix!r} failed: {err.code}: {err.message}") from None

    def delete(self, key: str) -> None:
        try:
            self._client.remove_object(self.bucket, self._object_name(key))
        except S3Error as err:
            raise StoreError(f"delete {key!r} failed: {err.code}: {err.message}") from None

    def ping(self) -> bool:
        """True if the store answers and the bucket exists (a readiness probe)."""
        try:
            return bool(self._client.bucket_exists(self.bucket))
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    @staticmethod
    def _translate(err: S3Error, key: str) -> StoreError | ObjectNotFound:
        if err.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
            return ObjectNotFound(f"no object at {key!r}")
        return StoreError(f"{key!r}: {err.code}: {err.message}")


def make_client(config: StoreConfig) -> Minio:
    if config.access_key is None or config.secret_key is None:
        raise StoreError(
            "store credentials are missing: set FREEMASK_STORE__ACCESS_KEY / FREEMASK_STORE__SECRET_KEY "
            "or the *_FILE variants"
        )
    # Bounded retries and timeouts: a dead store must surface as an error the
    # stage can retry or dead-letter, not as a hang.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=60.0),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        maxsize=8,
    )
    return Minio(
        config.endpoint,
        access_key=config.access_key.get_secret_value(),
        secret_key=config.secret_key.get_secret_value(),
        secure=config.secure,
        region=config.region,
        http_client=http,
    )
