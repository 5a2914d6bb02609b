"""`freemask placement publish`: FOPA's Triton repository uploaded under a store prefix, and the
S3 URL a Triton reads it from. tests/integration/test_triton_s3_repository.py serves it from a real S3.

Random weights (seed 0) stand in for the shipped ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from freemask.placement.model import weights_version
from freemask.placement.publish import publish_repository, repository_url
from freemask.placement.triton_repo import fopa_model, render_config
from freemask.shared.config import StoreConfig
from freemask.shared.keys import InvalidIdError
from freemask.shared.store import ObjectInfo

from memory_store import MemoryStore

# The pattern tritonserver 2.51 (nvidia-pytriton's binary) matches a custom-endpoint S3 repository against.
TRITON_S3_PATTERN = re.compile(
    r"s3://(http://|https://|)([0-9a-zA-Z\-.]+):([0-9]+)/([0-9a-z.\-]+)(((/[0-9a-zA-Z.\-_]+)*)?)")


class RecordingStore(MemoryStore):
    """Remembers the order of uploads, which the dict alone loses when a key is written twice."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        self.order.append(key)
        return super().put_bytes(key, data, content_type)


@pytest.fixture(scope="module")
def published(fopa_weights_dir: Path) -> RecordingStore:
    store = RecordingStore()
    publish_repository(store, "triton/repository/", "production", fopa_weights_dir)
    return store


def test_publish_uploads_the_production_model_with_its_config_last(published: RecordingStore,
                                                                   fopa_weights_dir: Path) -> None:
    assert published.order == ["triton/repository/fopa/1/model.onnx", "triton/repository/fopa/config.pbtxt"]
    config = published.objects["triton/repository/fopa/config.pbtxt"].decode()
    assert config == render_config("production", fopa_model(weights_version(fopa_weights_dir)))
    onnx.checker.check_model(onnx.load_from_string(published.objects["triton/repository/fopa/1/model.onnx"]))


def test_publish_of_the_embedded_target_carries_its_python_model(fopa_weights_dir: Path) -> None:
    store = RecordingStore()

    keys = publish_repository(store, "repo", "embedded", fopa_weights_dir)

    assert keys == store.order
    assert sorted(keys) == ["repo/fopa/1/model.onnx", "repo/fopa/1/model.py", "repo/fopa/config.pbtxt"]
    assert keys[-1] == "repo/fopa/config.pbtxt"


@pytest.mark.parametrize("prefix", ["../models", "a//b", "/abs", "Upper/case", ""])
def test_a_prefix_outside_the_key_layout_uploads_nothing(prefix: str, fopa_weights_dir: Path) -> None:
    store = RecordingStore()

    with pytest.raises(InvalidIdError, match="repository prefix"):
        publish_repository(store, prefix, "production", fopa_weights_dir)

    assert store.order == []


@pytest.mark.parametrize(("store", "url"), [
    (StoreConfig(endpoint="minio:9000", bucket="freemask"), "s3://http://minio:9000/freemask/triton/repository"),
    (StoreConfig(endpoint="minio.data:9000", bucket="freemask", prefix="team-a/", secure=True),
     "s3://https://minio.data:9000/freemask/team-a/triton/repository"),
    (StoreConfig(endpoint="s3.eu-west-1.amazonaws.com", bucket="data.freemask", secure=True),
     "s3://https://s3.eu-west-1.amazonaws.com:443/data.freemask/triton/repository"),
    (StoreConfig(endpoint="10.0.0.7", bucket="freemask"), "s3://http://10.0.0.7:80/freemask/triton/repository"),
])
def test_repository_url_is_tritons_custom_endpoint_form(store: StoreConfig, url: str) -> None:
    assert repository_url(store, "triton/repository/") == url
    assert TRITON_S3_PATTERN.fullmatch(url)
