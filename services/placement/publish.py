"""FOPA's Triton model repository in the object store, for a Triton that loads it from S3.

`freemask placement publish --prefix triton/repository` (the Helm chart's publish Job)
exports the repository to a scratch directory and uploads it under that key prefix;
the chart's Triton starts with `--model-repository=` `repository_url(...)` of the same
prefix, so the model reaches Triton through the store and never through a volume.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

from freemask.shared.config import StoreConfig
from freemask.shared.keys import validate_key
from freemask.shared.store import ObjectInfo

DEFAULT_TARGET = "production"


class KeyWriter(Protocol):
    def put_file(self, key: str, path: Path, content_type: str = ...) -> ObjectInfo: ...


def publish_repository(store: KeyWriter, prefix: str, target: str = DEFAULT_TARGET,
                       weights_dir: Path | None = None) -> list[str]:
    """Upload `{prefix}/fopa/...` for `target` from `weights_dir` (default: the shipped weights);
    return the keys in the order they were written.

    config.pbtxt goes last: a model directory is a model only once its config is there, so
    a Triton that lists the prefix mid-upload never finds a config whose model file is
    still missing.
    """
    # torch is imported here, not with the module: the chart tests need only repository_url
    from freemask.placement.model import DEFAULT_WEIGHTS_DIR
    from freemask.placement.triton_repo import CONFIG_FILE, write_repository

    prefix = validate_key(prefix.rstrip("/"), "repository prefix")
    with tempfile.TemporaryDirectory(prefix="fopa-publish-") as scratch:
        model_dir = write_repository(target, Path(scratch) / "repository", weights_dir or DEFAULT_WEIGHTS_DIR)
        files = sorted((path for path in model_dir.rglob("*") if path.is_file()),
                       key=lambda path: (path.name == CONFIG_FILE, path.as_posix()))
        written = []
        for path in files:
            key = f"{prefix}/{model_dir.name}/{path.relative_to(model_dir).as_posix()}"
            store.put_file(key, path)
            written.append(key)
    return written


def repository_url(store: StoreConfig, prefix: str) -> str:
    """Triton's `--model-repository` for `prefix` in this store.

    Triton reads a non-AWS S3 endpoint from the URL itself, as
    `s3://[http://|https://]host:port/bucket/path` with the port required and no trailing
    slash (the pattern tritonserver 2.51 matches; docs/user_guide/model_repository.md#s3 in
    triton-inference-server/server). An endpoint without a port gets its scheme's default
    port, as the pattern requires one.
    """
    scheme, default_port = ("https://", 443) if store.secure else ("http://", 80)
    endpoint = store.endpoint if ":" in store.endpoint else f"{store.endpoint}:{default_port}"
    path = f"{store.prefix}{validate_key(prefix.rstrip('/'), 'repository prefix')}"
    return f"s3://{scheme}{endpoint}/{store.bucket}/{path}"
