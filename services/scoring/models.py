"""Segmenter weights in the object store, under `models/segmenter/{run}/{round}/`.

- `model.safetensors`: the weights of f_t;
- `segmenter.json`: the manifest, written last (a reader that finds it knows the
  weights are complete): version, classes, input size, the Mask2Former config, the
  weights' sha256 and how training went;
- `checkpoint.pt`: a training job's state while it runs (weights, optimiser, position),
  removed when the job finishes.

Loading checks that the manifest names the version asked for, that the weights are
the ones it describes (sha256) and that the model knows the configured classes in
the same order, so a segmenter copied to the wrong round, overwritten halfway or
trained for another class list is refused instead of silently scoring with it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from freemask.scoring.segmenter import Segmenter
from freemask.shared.errors import InvalidInput, NotFound, shown
from freemask.shared.keys import parse_segmenter_version, segmenter_prefix, segmenter_version
from freemask.shared.store import ObjectNotFound, ObjectStore
from freemask.v1 import common_pb2

SEGMENTER_MODEL_NAME = "segmenter"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "segmenter.json"
CHECKPOINT_FILE = "checkpoint.pt"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_WEIGHTS_BYTES = 4 * 1024 * 1024 * 1024


class ModelMismatch(InvalidInput):
    """Stored weights are not what their manifest, the request or the config says."""


def model_version(run_id: str, round_index: int) -> common_pb2.ModelVersion:
    return common_pb2.ModelVersion(name=SEGMENTER_MODEL_NAME, version=segmenter_version(run_id, round_index))


def check_model_version(model: common_pb2.ModelVersion) -> tuple[str, int]:
    """(run, round) of a segmenter ModelVersion; InvalidInput for another family or a bad version."""
    if model.name != SEGMENTER_MODEL_NAME:
        raise InvalidInput(f"model name {shown(model.name)} is not a segmenter; use name {SEGMENTER_MODEL_NAME!r}")
    return parse_segmenter_version(model.version)


@dataclass(frozen=True)
class LoadedSegmenter:
    segmenter: Segmenter
    version: common_pb2.ModelVersion
    manifest: dict[str, Any]


class SegmenterStore:
    """Reads and writes segmenters and training checkpoints in the object store."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @staticmethod
    def key(run_id: str, round_index: int, filename: str) -> str:
        return segmenter_prefix(run_id, round_index) + filename

    def manifest(self, run_id: str, round_index: int) -> dict[str, Any] | None:
        """The finished model's manifest, or None while there is none."""
        try:
            data = self._store.get_bytes(self.key(run_id, round_index, MANIFEST_FILE), max_bytes=MAX_MANIFEST_BYTES)
        except ObjectNotFound:
            return None
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelMismatch(f"the manifest of segmenter {run_id}/{round_index} is not JSON") from None
        if not isinstance(manifest, dict):
            raise ModelMismatch(f"the manifest of segmenter {run_id}/{round_index} is not a JSON object")
        return manifest

    def save(self, run_id: str, round_index: int, segmenter: Segmenter, training: dict[str, Any]) -> dict[str, Any]:
        """Write the weights, then the manifest that vouches for them; returns the manifest."""
        weights = save_safetensors(segmenter.state())
        version = model_version(run_id, round_index)
        manifest = {
            "name": version.name,
            "version": version.version,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "classes": list(segmenter.class_names),
            "input_size": segmenter.input_size,
            "model_config": segmenter.config_dict(),
            "training": training,
        }
        self._store.put_bytes(self.key(run_id, round_index, WEIGHTS_FILE), weights)
        self._store.put_bytes(self.key(run_id, round_index, MANIFEST_FILE),
                              (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), "application/json")
        return manifest

    def load(self, model: common_pb2.ModelVersion, class_names: Sequence[str],
             device: torch.device | str = "cpu") -> LoadedSegmenter:
        """The segmenter `model` names, after checking it is what it claims; NotFound if absent."""
        run_id, round_index = check_model_version(model)
        manifest = self.manifest(run_id, round_index)
        if manifest is None:
            raise NotFound(f"segmenter {model.version!r} does not exist (no {MANIFEST_FILE} under "
                           f"{segmenter_prefix(run_id, round_index)}); train it first")
        if manifest.get("name") != SEGMENTER_MODEL_NAME or manifest.get("version") != model.version:
            raise ModelMismatch(f"segmenter {model.version!r}: its manifest says it is "
                                f"{manifest.get('name')!r} version {manifest.get('version')!r}")
        if manifest.get("classes") != list(class_names):
            raise ModelMismatch(f"segmenter {model.version!r} was trained for classes {manifest.get('classes')}; "
                                f"this service is configured for {list(class_names)}")
        try:
            weights = self._store.get_bytes(self.key(run_id, round_index, WEIGHTS_FILE), max_bytes=MAX_WEIGHTS_BYTES)
        except ObjectNotFound:
            raise ModelMismatch(f"segmenter {model.version!r} has a manifest but no {WEIGHTS_FILE}") from None
        if hashlib.sha256(weights).hexdigest() != manifest.get("weights_sha256"):
            raise ModelMismatch(f"segmenter {model.version!r}: {WEIGHTS_FILE} does not match the sha256 in its "
                                "manifest (overwritten or partly written)")
        segmenter = Segmenter.from_state(manifest["model_config"], load_safetensors(weights), class_names,
                                         int(manifest["input_size"]), device)
        return LoadedSegmenter(segmenter=segmenter, version=model, manifest=manifest)

    def save_checkpoint(self, run_id: str, round_index: int, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._store.put_bytes(self.key(run_id, round_index, CHECKPOINT_FILE), buffer.getvalue())

    def load_checkpoint(self, run_id: str, round_index: int) -> dict[str, Any] | None:
        try:
            data = self._store.get_bytes(self.key(run_id, round_index, CHECKPOINT_FILE), max_bytes=MAX_WEIGHTS_BYTES)
        except ObjectNotFound:
            return None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def drop_checkpoint(self, run_id: str, round_index: int) -> None:
        self._store.delete(self.key(run_id, round_index, CHECKPOINT_FILE))
