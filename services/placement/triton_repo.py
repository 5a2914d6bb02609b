"""The Triton model repository for FOPA, generated for three targets from one description.

- **embedded** (`make run`, tests, CI): the wheel's tritonserver bundles only the python
  backend, so `triton_model.py` runs the ONNX file with onnxruntime on CPU;
- **embedded-gpu** (the same server on a GPU host): `triton_model.py` runs a
  `torch.export` program with torch, on CUDA when the host has it (else on CPU). The
  python backend's onnxruntime is the CPU build, and its GPU build is a separate
  wheel of several hundred MB;
- **production** (the NGC Triton image): its onnxruntime backend runs the ONNX file on GPU.

Clients rely on what all share — the model name, tensor names, dims, batching and the
`weights_version` parameter — so that text comes from `FOPA_TENSORS` and
`fopa_model(...)` alone, and only the backend, placement, model file and backend
parameters differ per target.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

from freemask.placement.export import export_onnx, export_program
from freemask.placement.geometry import BACKGROUND_SIDE, FOREGROUND_SIDE, HEATMAP_SIDE, NUM_SCALES
from freemask.placement.model import DEFAULT_WEIGHTS_DIR, FopaNet, load_fopa, weights_version
from freemask.shared.errors import InvalidInput

Target = Literal["embedded", "embedded-gpu", "production"]
TARGETS: tuple[str, ...] = get_args(Target)

MODEL_NAME = "fopa"
MODEL_VERSION = "1"
ONNX_FILE = "model.onnx"
PROGRAM_FILE = "model.pt2"  # torch.export.save's format, chosen by this suffix
CONFIG_FILE = "config.pbtxt"
PYTHON_MODEL_FILE = "model.py"  # the name the python backend loads from the version directory
PYTHON_MODEL_SOURCE = Path(__file__).resolve().with_name("triton_model.py")
# The embedded server shares a few CPU cores with every service; onnxruntime's
# default would take them all for one batch.
EMBEDDED_INTRA_OP_THREADS = 2


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # a Triton TYPE_* name
    dims: tuple[int, ...]  # without the batch dimension, which max_batch_size adds


@dataclass(frozen=True)
class ModelSpec:
    """What every client of the model relies on, whatever serves it."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_microseconds: int
    parameters: tuple[tuple[str, str], ...]  # (key, string value), read by clients via get_model_config
    dynamic_batching: bool = True  # off only to measure what it gains (tests/benchmarks/bench_placement.py)


@dataclass(frozen=True)
class TargetSpec:
    """How one kind of Triton runs the model."""

    backend: str
    platform: str | None
    instance_kind: str
    default_model_filename: str | None
    parameters: tuple[tuple[str, str], ...]  # read by the backend, not by clients
    model_file: str  # in the version directory
    export: Callable[[FopaNet, Path], Path]  # writes model_file, verified against torch


FOPA_TENSORS: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] = (
    (
        TensorSpec("BACKGROUND", "TYPE_FP32", (3, BACKGROUND_SIDE, BACKGROUND_SIDE)),
        TensorSpec("FOREGROUND", "TYPE_FP32", (4, FOREGROUND_SIDE, FOREGROUND_SIDE)),
    ),
    (TensorSpec("HEATMAP", "TYPE_FP32", (NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE)),),
)


def _python_backend(runtime: str, model_file: str, instance_kind: str,
                    export: Callable[[FopaNet, Path], Path]) -> TargetSpec:
    """A target that `triton_model.py` serves: it reads the runtime and file from the parameters."""
    return TargetSpec(
        backend="python",
        platform=None,
        instance_kind=instance_kind,
        default_model_filename=None,  # the python backend's file is model.py, found by name
        parameters=(("runtime", runtime), ("model_file", model_file),
                    ("intra_op_threads", str(EMBEDDED_INTRA_OP_THREADS))),
        model_file=model_file,
        export=export,
    )


TARGET_SPECS: dict[str, TargetSpec] = {
    "embedded": _python_backend("onnxruntime", ONNX_FILE, "KIND_CPU", export_onnx),
    # KIND_MODEL: the model picks its device (CUDA if the host has one), so the same
    # repository also loads on a host without a GPU, where KIND_GPU would fail
    "embedded-gpu": _python_backend("torch", PROGRAM_FILE, "KIND_MODEL", export_program),
    "production": TargetSpec(
        backend="onnxruntime",
        platform="onnxruntime_onnx",
        instance_kind="KIND_GPU",
        default_model_filename=ONNX_FILE,
        parameters=(),
        model_file=ONNX_FILE,
        export=export_onnx,
    ),
}


def fopa_model(version: str) -> ModelSpec:
    """FOPA's description, carrying the version of the weights it was exported from."""
    inputs, outputs = FOPA_TENSORS
    return ModelSpec(
        name=MODEL_NAME,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=64,
        preferred_batch_sizes=(8, 16, 32),
        max_queue_delay_microseconds=2000,
        parameters=(("weights_version", version),),
    )


def _target(target: str) -> TargetSpec:
    if target not in TARGET_SPECS:
        raise InvalidInput(f"unknown Triton target {target!r}; expected one of {', '.join(TARGETS)}")
    return TARGET_SPECS[target]


def _quote(text: str) -> str:
    # protobuf text format accepts C-style escapes, which JSON's are a subset of
    return json.dumps(text)


def _tensors(field: str, tensors: Iterable[TensorSpec]) -> str:
    entries = ",\n".join(
        f"  {{\n    name: {_quote(t.name)}\n    data_type: {t.data_type}\n"
        f"    dims: [ {', '.join(str(d) for d in t.dims)} ]\n  }}"
        for t in tensors
    )
    return f"{field} [\n{entries}\n]"


def _parameters(pairs: Iterable[tuple[str, str]]) -> str:
    entries = ",\n".join(f"  {{ key: {_quote(k)}, value: {{ string_value: {_quote(v)} }} }}" for k, v in pairs)
    return f"parameters [\n{entries}\n]"


def render_interface(model: ModelSpec) -> str:
    """The part of config.pbtxt that clients rely on; identical for every target."""
    parts = [f"max_batch_size: {model.max_batch_size}", _tensors("input", model.inputs),
             _tensors("output", model.outputs)]
    if model.dynamic_batching:
        # No default_queue_policy, although one would let Triton drop requests their client gave up on:
        # on tritonserver 2.51 any policy (a timeout, or only max_queue_size) cut the embedded model's
        # batched rate at concurrency 8 from about 300 to 65-110 pairs/s (measured 2026-11-26).
        parts.append("dynamic_batching {\n"
                     f"  preferred_batch_size: [ {', '.join(str(size) for size in model.preferred_batch_sizes)} ]\n"
                     f"  max_queue_delay_microseconds: {model.max_queue_delay_microseconds}\n"
                     "}")
    return "\n".join(parts)


def render_config(target: str, model: ModelSpec) -> str:
    """config.pbtxt of `model` for `target` (one of TARGETS)."""
    spec = _target(target)
    serving = [f"backend: {_quote(spec.backend)}"]
    if spec.platform:
        serving.append(f"platform: {_quote(spec.platform)}")
    if spec.default_model_filename:
        serving.append(f"default_model_filename: {_quote(spec.default_model_filename)}")
    return "\n".join([
        f"# Generated by `freemask placement export --target {target}`; do not edit.",
        f"name: {_quote(model.name)}",
        *serving,
        render_interface(model),
        f"instance_group [\n  {{\n    kind: {spec.instance_kind}\n    count: 1\n  }}\n]",
        _parameters(model.parameters + spec.parameters),
    ]) + "\n"


def _swap_in(staging: Path, final: Path, retired: Path) -> None:
    """Put the finished `staging` directory at `final`, replacing what was there.

    Linux cannot exchange two directories in one rename, so the old one steps aside
    to `retired` first and is put back if the new one cannot take its place.
    """
    shutil.rmtree(retired, ignore_errors=True)
    had_old = final.exists()
    if had_old:
        os.rename(final, retired)
    try:
        os.rename(staging, final)
    except BaseException:
        if had_old:
            os.rename(retired, final)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def write_repository(target: str, out_dir: Path, weights_dir: Path = DEFAULT_WEIGHTS_DIR, name: str = MODEL_NAME,
                     dynamic_batching: bool = True) -> Path:
    """Write `out_dir/{name}/` for `target` from the weights in `weights_dir`; return that directory.

    The model is built beside it and moved into place only when complete, so a failed
    export leaves the previous model (or none) untouched, never half a model.
    """
    spec = _target(target)
    net = load_fopa(Path(weights_dir))
    model = replace(fopa_model(weights_version(weights_dir)), name=name, dynamic_batching=dynamic_batching)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / model.name
    # Beside the repository, not in it: Triton loads every directory of a repository,
    # hidden ones too, and fails to start on a half-written one. Same filesystem, so
    # the final move is a rename.
    scratch = f".{out_dir.name}.{model.name}.{os.getpid()}"
    staging, retired = out_dir.parent / f"{scratch}.staging", out_dir.parent / f"{scratch}.old"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        version_dir = staging / MODEL_VERSION
        version_dir.mkdir(parents=True)
        spec.export(net, version_dir / spec.model_file)
        if spec.backend == "python":
            shutil.copyfile(PYTHON_MODEL_SOURCE, version_dir / PYTHON_MODEL_FILE)
        (staging / CONFIG_FILE).write_text(render_config(target, model), encoding="utf-8")
        _swap_in(staging, final, retired)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
