"""FOPA's ONNX and torch.export exports, the Triton configs rendered for every target, the all-or-nothing
repository writer, and the python-backend model's batching (with a stand-in for the stub's
`triton_python_backend_utils`; tests/integration/test_placement_triton.py runs the real one).

Random weights (seed 0) stand in for the shipped ones.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from freemask.placement import triton_repo
from freemask.placement.export import (
    OPSET_VERSION,
    ExportMismatch,
    export_onnx,
    export_program,
    verify_onnx,
    verify_program,
)
from freemask.placement.model import FopaHeatmap, FopaNet, load_fopa, weights_version
from freemask.placement.triton_repo import (
    TARGETS,
    fopa_model,
    render_config,
    render_interface,
    write_repository,
)
from freemask.shared.errors import InvalidInput

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(fopa_weights_dir: Path) -> FopaHeatmap:
    return FopaHeatmap(load_fopa(fopa_weights_dir)).eval()


@pytest.fixture(scope="module")
def repositories(fopa_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`fopa/` as written for each target (one export each, shared by the tests below)."""
    root = tmp_path_factory.mktemp("repositories")
    return {target: write_repository(target, root / target, fopa_weights_dir) for target in TARGETS}


@pytest.fixture(scope="module")
def onnx_path(repositories: dict[str, Path]) -> Path:
    return repositories["production"] / "1" / "model.onnx"


@pytest.fixture(scope="module")
def program_path(repositories: dict[str, Path]) -> Path:
    return repositories["embedded-gpu"] / "1" / "model.pt2"


def _batch(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (rows, 3, 64, 64)).astype(np.float32),
            rng.uniform(-1, 1, (rows, 4, 32, 32)).astype(np.float32))


def _expected(reference: FopaHeatmap, background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.from_numpy(background), torch.from_numpy(foreground)).numpy()


def _parse(config_text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(config_text, model_config_pb2.ModelConfig())


# --- ONNX export ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_onnx_equals_torch_at_any_batch_size(onnx_path: Path, reference: FopaHeatmap, rows: int) -> None:
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    background, foreground = _batch(rows, seed=rows)

    (heatmap,) = session.run(["HEATMAP"], {"BACKGROUND": background, "FOREGROUND": foreground})

    assert heatmap.shape == (rows, 8, 32, 32)
    np.testing.assert_allclose(heatmap, _expected(reference, background, foreground), rtol=0, atol=TOLERANCE)


def test_export_from_a_weights_dir_writes_one_self_contained_file(fopa_weights_dir: Path, tmp_path: Path) -> None:
    path = export_onnx(fopa_weights_dir, tmp_path / "out" / "fopa.onnx")

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fopa.onnx"]  # no external data, no leftovers
    model = onnx.load(str(path))
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == OPSET_VERSION
    batch_dims = [value.type.tensor_type.shape.dim[0] for value in (*model.graph.input, *model.graph.output)]
    assert all(dim.dim_param and not dim.dim_value for dim in batch_dims), "the batch axis must stay dynamic"


def test_export_leaves_a_net_in_its_own_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = FopaNet().train()
    monkeypatch.setattr(torch.onnx, "export", _failing_export)

    with pytest.raises(RuntimeError):
        export_onnx(net, tmp_path / "fopa.onnx")

    assert net.training


def test_missing_weights_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"no FOPA weights in .*missing config\.json, fopa\.safetensors"):
        export_onnx(tmp_path, tmp_path / "fopa.onnx")


def _failing_export(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("exporter crashed")


def _tampered(onnx_path: Path, destination: Path) -> Path:
    """A copy of the export whose first floating-point weight is shifted: a graph that runs but is wrong."""
    model = onnx.load(str(onnx_path))
    initializer = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    values = onnx.numpy_helper.to_array(initializer) + 0.5
    initializer.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), initializer.name))
    onnx.save(model, str(destination))
    return destination


def _exporting(source: Path) -> Callable[..., None]:
    """A stand-in for torch.onnx.export that writes `source` where the real one would write."""
    def fake_export(model: Any, args: Any, path: str, **kwargs: Any) -> None:
        shutil.copyfile(source, path)
    return fake_export


def test_verify_catches_a_graph_that_computes_something_else(
    onnx_path: Path, reference: FopaHeatmap, tmp_path: Path
) -> None:
    assert verify_onnx(reference, onnx_path) <= TOLERANCE
    with pytest.raises(ExportMismatch, match=r"differs from torch by .* on a batch of 1"):
        verify_onnx(reference, _tampered(onnx_path, tmp_path / "wrong.onnx"))


def test_a_wrong_export_is_never_published(
    onnx_path: Path, fopa_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = _tampered(onnx_path, tmp_path / "wrong.onnx")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(torch.onnx, "export", _exporting(wrong))

    with pytest.raises(ExportMismatch):
        export_onnx(fopa_weights_dir, out / "fopa.onnx")

    assert list(out.iterdir()) == []


# --- torch.export program (embedded-gpu) --------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_program_equals_torch_at_any_batch_size(program_path: Path, reference: FopaHeatmap, rows: int) -> None:
    program = torch.export.load(str(program_path)).module()
    background, foreground = _batch(rows, seed=rows)

    with torch.inference_mode():
        heatmap = program(torch.from_numpy(background), torch.from_numpy(foreground)).numpy()

    assert heatmap.shape == (rows, 8, 32, 32)
    np.testing.assert_allclose(heatmap, _expected(reference, background, foreground), rtol=0, atol=TOLERANCE)


def test_verify_catches_a_program_that_computes_something_else(
    program_path: Path, reference: FopaHeatmap, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    other = export_program(FopaNet(), tmp_path / "other.pt2")  # a valid program of different weights

    assert verify_program(reference, program_path) <= TOLERANCE
    with pytest.raises(ExportMismatch, match=r"torch.export export of FOPA differs from torch by .* batch of 1"):
        verify_program(reference, other)


def test_a_wrong_program_is_never_published(
    fopa_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    wrong = torch.export.export(FopaHeatmap(FopaNet()).eval(), (torch.zeros(2, 3, 64, 64), torch.zeros(2, 4, 32, 32)))
    save = torch.export.save
    monkeypatch.setattr(torch.export, "save", lambda program, path: save(wrong, path))
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(ExportMismatch):
        export_program(fopa_weights_dir, out / "model.pt2")

    assert list(out.iterdir()) == []


# --- config.pbtxt for every target ---------------------------------------------------------------------------


def test_all_targets_share_the_client_contract() -> None:
    model = fopa_model("sha256-0123456789abcdef")
    texts = {target: render_config(target, model) for target in TARGETS}
    configs = {target: _parse(text) for target, text in texts.items()}

    assert all(render_interface(model) in text for text in texts.values())
    for config in configs.values():
        assert config.name == "fopa"
        assert config.max_batch_size == 64
        assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
            ("BACKGROUND", "TYPE_FP32", [3, 64, 64]),
            ("FOREGROUND", "TYPE_FP32", [4, 32, 32]),
        ]
        assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == [
            ("HEATMAP", "TYPE_FP32", [8, 32, 32]),
        ]
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert config.parameters["weights_version"].string_value == "sha256-0123456789abcdef"
        assert len(config.instance_group) == 1 and config.instance_group[0].count == 1


@pytest.mark.parametrize(("target", "kind", "runtime", "model_file"), [
    ("embedded", "KIND_CPU", "onnxruntime", "model.onnx"),
    # KIND_MODEL: the model picks CUDA when there is one, so the repository also loads without a GPU
    ("embedded-gpu", "KIND_MODEL", "torch", "model.pt2"),
])
def test_embedded_targets_run_the_python_backend(target: str, kind: str, runtime: str, model_file: str) -> None:
    config = _parse(render_config(target, fopa_model("v")))

    assert config.backend == "python" and not config.platform
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == kind
    assert config.parameters["runtime"].string_value == runtime
    assert config.parameters["model_file"].string_value == model_file
    assert int(config.parameters["intra_op_threads"].string_value) >= 1


def test_production_runs_the_onnxruntime_backend_on_gpu() -> None:
    config = _parse(render_config("production", fopa_model("v")))

    assert (config.backend, config.platform) == ("onnxruntime", "onnxruntime_onnx")
    assert config.default_model_filename == "model.onnx"
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    assert set(config.parameters) == {"weights_version"}


def test_unknown_target_is_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown Triton target 'staging'; expected one of embedded, embedded-gpu, production"):
        render_config("staging", fopa_model("v"))


def test_config_matches_the_exported_graph(onnx_path: Path) -> None:
    """Names and per-row dims in config.pbtxt are those of the ONNX graph the backend will run."""
    config = _parse(render_config("production", fopa_model("v")))
    graph = onnx.load(str(onnx_path)).graph

    def dims(values: Any) -> dict[str, list[int]]:
        return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim[1:]] for v in values}

    assert dims(graph.input) == {t.name: list(t.dims) for t in config.input}
    assert dims(graph.output) == {t.name: list(t.dims) for t in config.output}


# --- the repository writer -----------------------------------------------------------------------------------


def test_repository_layout_per_target(repositories: dict[str, Path], fopa_weights_dir: Path) -> None:
    embedded, gpu, production = repositories["embedded"], repositories["embedded-gpu"], repositories["production"]

    assert sorted(str(p.relative_to(embedded)) for p in embedded.rglob("*")) == [
        "1", "1/model.onnx", "1/model.py", "config.pbtxt"]
    assert sorted(str(p.relative_to(gpu)) for p in gpu.rglob("*")) == [
        "1", "1/model.pt2", "1/model.py", "config.pbtxt"]
    assert sorted(str(p.relative_to(production)) for p in production.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt"]
    for repository in (embedded, gpu):
        assert (repository / "1" / "model.py").read_bytes() == triton_repo.PYTHON_MODEL_SOURCE.read_bytes()
    for repository in (embedded, gpu, production):
        config = _parse((repository / "config.pbtxt").read_text())
        assert config.parameters["weights_version"].string_value == weights_version(fopa_weights_dir)
        assert [p.name for p in repository.parent.iterdir()] == ["fopa"]
    # nothing beside the repositories either: the staging directories are gone
    assert sorted(p.name for p in embedded.parent.parent.iterdir()) == sorted(TARGETS)


def test_a_failed_export_writes_no_repository(
    onnx_path: Path, fopa_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.onnx, "export", _exporting(_tampered(onnx_path, tmp_path / "wrong.onnx")))
    out = tmp_path / "root" / "models"

    with pytest.raises(ExportMismatch):
        write_repository("embedded", out, fopa_weights_dir)

    assert list(out.iterdir()) == []
    assert [p.name for p in out.parent.iterdir()] == ["models"]


def test_a_failed_export_keeps_the_previous_repository(
    repositories: dict[str, Path], fopa_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "models"
    shutil.copytree(repositories["embedded"], out / "fopa")
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(torch.onnx, "export", _failing_export)

    with pytest.raises(RuntimeError, match="exporter crashed"):
        write_repository("embedded", out, fopa_weights_dir)

    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_rewriting_replaces_the_previous_repository(
    onnx_path: Path, fopa_weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "models"
    (out / "fopa" / "2").mkdir(parents=True)  # a stale version that must not survive
    monkeypatch.setattr(torch.onnx, "export", _exporting(onnx_path))

    write_repository("production", out, fopa_weights_dir)

    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "fopa", "fopa/1", "fopa/1/model.onnx", "fopa/config.pbtxt"]
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


# --- the python-backend model, with a stand-in for triton_python_backend_utils -------------------------------


class _TritonError:
    INVALID_ARG = 3
    INTERNAL = 13

    def __init__(self, message: str, code: int) -> None:
        self.message, self.code = message, code


class _Tensor:
    def __init__(self, name: str, values: np.ndarray) -> None:
        self.name, self.values = name, values

    def as_numpy(self) -> np.ndarray:
        return self.values


class _Response:
    def __init__(self, output_tensors: list[_Tensor], error: _TritonError | None = None) -> None:
        self.output_tensors, self.error = output_tensors, error


def _fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.TritonError = _TritonError  # type: ignore[attr-defined]
    module.Tensor = _Tensor  # type: ignore[attr-defined]
    module.InferenceResponse = _Response  # type: ignore[attr-defined]
    module.triton_string_to_numpy = {"TYPE_FP32": np.float32}.__getitem__  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = (  # type: ignore[attr-defined]
        lambda request, name: _Tensor(name, request[name]) if name in request else None)
    return module


class _CountingRuntime:
    """Wraps the model's runtime to record the batch size of every call."""

    def __init__(self, runtime: Callable[[dict[str, np.ndarray]], np.ndarray]) -> None:
        self.runtime = runtime
        self.batches: list[int] = []

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        self.batches.append(next(iter(feed.values())).shape[0])
        return self.runtime(feed)


@pytest.fixture(params=["embedded", "embedded-gpu"])
def python_model(request: pytest.FixtureRequest, repositories: dict[str, Path],
                 monkeypatch: pytest.MonkeyPatch) -> Any:
    """A python-backend repository's model.py, initialised as the python backend would (on CPU here)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    repository = repositories[request.param]
    spec = importlib.util.spec_from_file_location("fopa_triton_model", repository / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(_parse((repository / "config.pbtxt").read_text()),
                                       preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repository),
                      "model_version": "1", "model_instance_name": "fopa_0", "model_instance_kind": "CPU"})
    model.runtime = _CountingRuntime(model.runtime)
    return model


def test_python_model_runs_a_dynamic_batch_in_one_call(python_model: Any, reference: FopaHeatmap) -> None:
    batches = [_batch(rows, seed=30 + rows) for rows in (1, 3, 2)]
    requests = [{"BACKGROUND": background, "FOREGROUND": foreground} for background, foreground in batches]

    responses = python_model.execute(requests)

    assert python_model.runtime.batches == [6]
    for response, (background, foreground) in zip(responses, batches, strict=True):
        assert response.error is None
        (heatmap,) = response.output_tensors
        assert heatmap.name == "HEATMAP"
        np.testing.assert_allclose(heatmap.values, _expected(reference, background, foreground), rtol=0,
                                   atol=TOLERANCE)


@pytest.mark.parametrize(
    ("bad_request", "message"),
    [
        pytest.param({"BACKGROUND": np.full((1, 3, 64, 64), np.nan, np.float32)}, "BACKGROUND must be finite",
                     id="nan"),
        pytest.param({"FOREGROUND": np.zeros((1, 4, 16, 16), np.float32)},
                     "FOREGROUND must be float32 of shape [batch, 4, 32, 32], got float32 [1, 4, 16, 16]", id="shape"),
        pytest.param({"FOREGROUND": np.zeros((3, 4, 32, 32), np.float32)}, "same batch size", id="batch-mismatch"),
        pytest.param({"FOREGROUND": None}, "FOREGROUND is missing", id="missing"),
    ],
)
def test_python_model_fails_only_the_bad_request(
    python_model: Any, reference: FopaHeatmap, bad_request: dict[str, np.ndarray | None], message: str
) -> None:
    batches = [_batch(2, seed=40 + i) for i in range(3)]
    requests: list[dict[str, np.ndarray]] = [{"BACKGROUND": bg, "FOREGROUND": fg} for bg, fg in batches]
    for name, values in bad_request.items():
        if values is None:
            del requests[1][name]
        else:
            requests[1][name] = values

    responses = python_model.execute(requests)

    assert responses[1].error is not None and responses[1].output_tensors == []
    assert responses[1].error.code == _TritonError.INVALID_ARG
    assert message in responses[1].error.message
    assert python_model.runtime.batches == [4]
    for index in (0, 2):
        assert responses[index].error is None
        np.testing.assert_allclose(responses[index].output_tensors[0].values, _expected(reference, *batches[index]),
                                   rtol=0, atol=TOLERANCE)
