"""The object store against the real S3 API of the embedded SeaweedFS."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from freemask.shared.config import StoreConfig
from freemask.shared.keys import InvalidIdError, sample_key
from freemask.shared.store import ObjectNotFound, ObjectStore
from freemask.shared.stack import EmbeddedStack

pytestmark = pytest.mark.stack


@pytest.fixture
def store(stack: EmbeddedStack, request: pytest.FixtureRequest) -> ObjectStore:
    # each test writes under its own prefix, so tests never see each other's objects
    prefix = request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "") + "/"
    config = stack.store_config().model_copy(update={"prefix": prefix})
    return ObjectStore(config)


def test_put_get_overwrite_and_list(store: ObjectStore) -> None:
    key = sample_key("run-1", 0, "s-0", "meta.json")
    store.put_bytes(key, b'{"v": 1}', "application/json")
    assert store.get_bytes(key) == b'{"v": 1}'
    store.put_bytes(key, b'{"v": 2}', "application/json")
    assert store.get_bytes(key) == b'{"v": 2}'
    store.put_bytes(sample_key("run-1", 0, "s-1", "meta.json"), b"{}")
    store.put_bytes(sample_key("run-2", 0, "s-0", "meta.json"), b"{}")
    listed = [info.key for info in store.list("runs/run-1/")]
    assert listed == ["runs/run-1/rounds/0/samples/s-0/meta.json", "runs/run-1/rounds/0/samples/s-1/meta.json"]
    assert store.exists(key)
    store.delete(key)
    assert not store.exists(key)


def test_missing_object_is_a_clear_error(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound, match="no object at 'runs/none/x.json'"):
        store.get_bytes("runs/none/x.json")


def test_large_object_streams_in_parts(store: ObjectStore, tmp_path: Path) -> None:
    """40 MiB of unknown length goes up as multipart and comes back byte-identical."""
    payload = os.urandom(40 * 1024 * 1024)
    source = io.BufferedReader(io.BytesIO(payload))  # length unknown to the store: -1
    info = store.put_stream("models/big/v1/weights.bin", source)
    assert info.size == len(payload)
    target = tmp_path / "weights.bin"
    assert store.download("models/big/v1/weights.bin", target) == len(payload)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file is left behind"


def test_get_bytes_refuses_objects_over_a_limit(store: ObjectStore) -> None:
    store.put_bytes("runs/r/big.bin", b"x" * 2048)
    with pytest.raises(Exception, match="over the 1024-byte limit"):
        store.get_bytes("runs/r/big.bin", max_bytes=1024)


@pytest.mark.parametrize(
    "bad_key",
    ["../escape", "runs/../../etc/passwd", "/absolute/key", "runs//double", "runs/./dot", "", "Runs/Upper",
     "runs/sp ace", "runs/x\x00y"],
)
def test_bad_keys_are_refused_before_any_request(store: ObjectStore, bad_key: str) -> None:
    with pytest.raises(InvalidIdError):
        store.put_bytes(bad_key, b"x")
    with pytest.raises(InvalidIdError):
        store.get_bytes(bad_key)


def test_missing_credentials_fail_loudly() -> None:
    with pytest.raises(Exception, match="store credentials are missing"):
        ObjectStore(StoreConfig(endpoint="127.0.0.1:1"))
