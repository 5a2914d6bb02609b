"""FOPA heatmaps from NVIDIA Triton: the `HeatmapSource` the service runs on.

The contract with the model repository (model `triton.model_name`, "fopa" by
default): inputs `BACKGROUND` FP32 [B, 3, 64, 64] and `FOREGROUND` FP32
[B, 4, 32, 32], output `HEATMAP` FP32 [B, 8, 32, 32], and a config parameter
`weights_version` naming the weights it serves (ModelVersion.version of every
placement).

The gRPC channel is opened lazily, so the service starts, and answers health,
while Triton is still down; each call then fails with `Unavailable`, which the
gRPC adapter answers UNAVAILABLE and the stage worker retries before it
dead-letters. The model's config (version and largest batch) is read on the
first call that reaches Triton and kept: Triton serves a model repository fixed
at its start (`--model-control-mode=none`), so new weights mean a new Triton.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from freemask.shared.config import TritonConfig
from freemask.shared.errors import InvalidInput, Unavailable
from freemask.shared.keys import InvalidIdError, validate_version

BACKGROUND_INPUT = "BACKGROUND"
FOREGROUND_INPUT = "FOREGROUND"
HEATMAP_OUTPUT = "HEATMAP"
VERSION_PARAMETER = "weights_version"

# Statuses after which a later call may succeed: Triton down, restarting or out of
# time, or up without the model ready (still loading, or its queue full).
_UNREACHABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}
_MODEL_NOT_READY = {"StatusCode.NOT_FOUND", "StatusCode.RESOURCE_EXHAUSTED"}


class TritonError(RuntimeError):
    """Triton answered, but not as the contract says (a missing parameter, a failing model)."""


@dataclass(frozen=True)
class ServedModel:
    version: str  # the config's weights_version
    max_batch_size: int  # the config's max_batch_size; 0 = the model takes no batch dimension


class TritonHeatmaps:
    """A HeatmapSource over `tritonclient.grpc`; call `close()` when done with it."""

    def __init__(self, config: TritonConfig, client: grpcclient.InferenceServerClient | None = None) -> None:
        self._config = config
        self._client = client or grpcclient.InferenceServerClient(url=config.url)
        self._served: ServedModel | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self._config.url

    def model_version(self) -> str:
        """The weights_version of the served model (read once, then cached)."""
        return self._model().version

    def __call__(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
        """Heatmaps for a batch, in one request, or in the fewest the model's max_batch_size allows."""
        served = self._model()
        if served.max_batch_size < 1:
            raise TritonError(f"model {self._config.model_name!r} on Triton at {self.url} has max_batch_size "
                              f"{served.max_batch_size}; FOPA is served with a batch dimension")
        step = served.max_batch_size
        return np.concatenate([self._infer(backgrounds[i:i + step], foregrounds[i:i + step])
                               for i in range(0, len(backgrounds), step)])

    def _infer(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
        inputs = []
        for name, values in ((BACKGROUND_INPUT, backgrounds), (FOREGROUND_INPUT, foregrounds)):
            tensor = grpcclient.InferInput(name, list(values.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(values, dtype=np.float32))
            inputs.append(tensor)
        try:
            result = self._client.infer(self._config.model_name, inputs,
                                        outputs=[grpcclient.InferRequestedOutput(HEATMAP_OUTPUT)],
                                        client_timeout=self._config.timeout_s)
        except InferenceServerException as err:
            raise self._translate(err, "inference") from None
        heatmaps = result.as_numpy(HEATMAP_OUTPUT)
        if heatmaps is None:
            raise TritonError(f"model {self._config.model_name!r} on Triton at {self.url} returned no "
                              f"{HEATMAP_OUTPUT} output")
        return heatmaps

    def _model(self) -> ServedModel:
        with self._lock:
            if self._served is None:
                self._served = self._read_model()
            return self._served

    def _read_model(self) -> ServedModel:
        name = self._config.model_name
        try:
            config = self._client.get_model_config(name, client_timeout=self._config.timeout_s).config
        except InferenceServerException as err:
            raise self._translate(err, "reading the model config") from None
        parameter = config.parameters.get(VERSION_PARAMETER)
        if parameter is None or not parameter.string_value:
            raise TritonError(f"model {name!r} on Triton at {self.url} has no {VERSION_PARAMETER!r} parameter; "
                              "its config.pbtxt must name the weights it serves")
        try:
            version = validate_version(parameter.string_value, f"{name} {VERSION_PARAMETER}")
        except InvalidIdError as err:  # the deployment's fault, not the caller's
            raise TritonError(f"model {name!r} on Triton at {self.url}: {err}") from None
        return ServedModel(version=version, max_batch_size=int(config.max_batch_size))

    def _translate(self, err: InferenceServerException, doing: str) -> Exception:
        status, message = err.status(), err.message() or str(err)
        if status == "StatusCode.DEADLINE_EXCEEDED":  # maybe up but slow: name the limit it missed
            return Unavailable(f"Triton at {self.url} is unreachable: no answer within triton.timeout_s = "
                               f"{self._config.timeout_s:g} s ({doing} for model {self._config.model_name!r})")
        if status in _UNREACHABLE:
            return Unavailable(f"Triton at {self.url} is unreachable ({doing} for model "
                               f"{self._config.model_name!r}: {status}: {message})")
        if status in _MODEL_NOT_READY:
            return Unavailable(f"Triton at {self.url} cannot serve model {self._config.model_name!r} now "
                               f"({doing}: {status}: {message})")
        if status == "StatusCode.INVALID_ARGUMENT":
            return InvalidInput(f"Triton refused the {self._config.model_name!r} request: {message}")
        return TritonError(f"Triton at {self.url} failed {doing} for model {self._config.model_name!r}: "
                           f"{status or 'no status'}: {message}")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonHeatmaps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
