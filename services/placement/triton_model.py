"""FOPA on Triton's python backend (the embedded stack), with one of two runtimes:

- `runtime: onnxruntime` (target embedded): the ONNX file, on CPU;
- `runtime: torch` (target embedded-gpu): a `torch.export` program, on the GPU Triton
  names for the instance, or on the first CUDA device (KIND_MODEL), or else on CPU.

`freemask placement export --target embedded|embedded-gpu` copies this file to
`fopa/1/model.py`. It runs inside triton_python_backend_stub, so it stays
self-contained: numpy, the runtime's package and the stub's
`triton_python_backend_utils`, never freemask. Each runtime is imported only when
chosen, so a host needs only its own.

Dynamic batching only pays off if the model runs the whole batch at once: the
python backend hands `execute` the queued requests one by one, so their rows are
concatenated into one runtime call and the output is split back per request.
A bad request gets an error on its own response; the others are still answered.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

LOGGER = logging.getLogger("fopa")


class BadRequest(ValueError):
    """A request this model will never accept; answered with INVALID_ARG."""


Runtime = Callable[[dict[str, np.ndarray]], np.ndarray]  # inputs by name -> the one output


def onnxruntime_runtime(path: Path, inputs: list[str], output: str, threads: int, args: dict[str, str]) -> Runtime:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph_inputs = {node.name for node in session.get_inputs()}
    if graph_inputs != set(inputs):
        raise RuntimeError(f"{path} takes inputs {sorted(graph_inputs)}, config.pbtxt declares {sorted(inputs)}")
    LOGGER.info("fopa: onnxruntime on CPU, %d intra-op threads", threads)
    return lambda feed: session.run([output], feed)[0]


def torch_runtime(path: Path, inputs: list[str], output: str, threads: int, args: dict[str, str]) -> Runtime:
    import torch
    from torch.export.passes import move_to_device_pass

    if args.get("model_instance_kind") == "GPU":
        device = torch.device("cuda", int(args["model_instance_device_id"]))
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads)
    module = move_to_device_pass(torch.export.load(str(path)), device).module()
    # the program's positional inputs are forward()'s arguments, in config.pbtxt's order

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            result = module(*(torch.from_numpy(feed[name]).to(device, non_blocking=True) for name in inputs))
            return result.cpu().numpy()

    LOGGER.info("fopa: torch %s on %s", torch.__version__,
                torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    return run


RUNTIMES: dict[str, Callable[..., Runtime]] = {"onnxruntime": onnxruntime_runtime, "torch": torch_runtime}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config: dict[str, Any] = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        # model_repository is this model's own directory; the version directory holds the file
        path = Path(args["model_repository"]) / args["model_version"] / parameters["model_file"]
        # (name -> per-row shape, dtype) as config.pbtxt declares them; the JSON config spells int64 dims as strings
        self.inputs = {
            tensor["name"]: (tuple(int(d) for d in tensor["dims"]),
                             np.dtype(pb_utils.triton_string_to_numpy(tensor["data_type"])))
            for tensor in config["input"]
        }
        (output,) = config["output"]
        self.output_name: str = output["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        runtime = parameters["runtime"]
        if runtime not in RUNTIMES:
            raise RuntimeError(f"unknown runtime {runtime!r}; expected one of {sorted(RUNTIMES)}")
        self.runtime = RUNTIMES[runtime](path, list(self.inputs), self.output_name,
                                         int(parameters["intra_op_threads"]), args)
        LOGGER.info("fopa %s ready: %s, weights %s", args.get("model_instance_name", "?"), path,
                    parameters.get("weights_version", "?"))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        accepted: list[tuple[int, dict[str, np.ndarray]]] = []
        for index, request in enumerate(requests):
            try:
                accepted.append((index, self._read(request)))
            except BadRequest as exc:
                responses[index] = _error(str(exc), pb_utils.TritonError.INVALID_ARG)
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
                LOGGER.exception("fopa: reading a request failed")
                responses[index] = _error(f"fopa failed: {exc}", pb_utils.TritonError.INTERNAL)
        if accepted:
            indices, batches = zip(*accepted, strict=True)
            for index, response in zip(indices, self._run(list(batches)), strict=True):
                responses[index] = response
        return responses

    def _read(self, request: Any) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for name, (row_shape, dtype) in self.inputs.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise BadRequest(f"input {name} is missing")
            values = tensor.as_numpy()
            if values.dtype != dtype or values.ndim != len(row_shape) + 1 or values.shape[1:] != row_shape:
                raise BadRequest(f"input {name} must be {dtype} of shape [batch, {', '.join(map(str, row_shape))}], "
                                 f"got {values.dtype} {list(values.shape)}")
            if not np.isfinite(values).all():
                raise BadRequest(f"input {name} must be finite (no NaN or infinity)")
            arrays[name] = values
        rows = {name: values.shape[0] for name, values in arrays.items()}
        if len(set(rows.values())) != 1:
            raise BadRequest(f"inputs must have the same batch size, got {rows}")
        return arrays

    def _run(self, batches: list[dict[str, np.ndarray]]) -> list[Any]:
        """One runtime call for every accepted request; one response per request, in order."""
        try:
            feed = {name: np.concatenate([arrays[name] for arrays in batches]) for name in self.inputs}
            heatmaps = self.runtime(feed)
            sizes = [next(iter(arrays.values())).shape[0] for arrays in batches]
            parts = np.split(heatmaps.astype(self.output_dtype, copy=False), np.cumsum(sizes)[:-1])
            return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)])
                    for part in parts]
        except Exception as exc:  # noqa: BLE001 - every request gets an answer, never a raised error
            LOGGER.exception("fopa: running a batch of %d requests failed", len(batches))
            return [_error(f"fopa failed: {exc}", pb_utils.TritonError.INTERNAL) for _ in batches]

    def finalize(self) -> None:
        LOGGER.info("fopa unloaded")


def _error(message: str, code: int) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
