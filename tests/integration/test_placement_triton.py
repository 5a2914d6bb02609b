"""FOPA served by the embedded tritonserver, from repositories `write_repository` generated for the
python-backend targets: `embedded` (onnxruntime) and `embedded-gpu` (torch, on the CPU here).

Random weights stand in for the shipped ones: what is checked is that Triton serves
exactly what torch computes, batched, with per-request errors.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from freemask.placement.model import FopaHeatmap, FopaNet, load_fopa, save_fopa, weights_version
from freemask.placement.triton_repo import write_repository
from freemask.shared.processes import pid_alive, stop_pid
from freemask.shared.triton_server import start_tritonserver

from polling import settled
from ports import reserve_ports

pytestmark = pytest.mark.stack

MODEL = "fopa"
# every call carries a deadline: a server that hangs must fail the test, not stall it
CALL_TIMEOUT_S = 30.0
TOLERANCE = 1e-4

Answer = tuple[int, grpcclient.InferResult | None, InferenceServerException | None]


@dataclass(frozen=True)
class FopaServer:
    grpc_url: str
    weights_dir: Path


@pytest.fixture(scope="module", params=["embedded", "embedded-gpu"])
def fopa_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FopaServer]:
    root = tmp_path_factory.mktemp(f"fopa-triton-{request.param}")
    torch.manual_seed(0)
    save_fopa(FopaNet(), root / "weights")
    repository = root / "models"
    write_repository(request.param, repository, root / "weights")
    http_port, grpc_port, metrics_port = reserve_ports(3)
    server = start_tritonserver(
        repository,
        root / "work",
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_path=root / "tritonserver.log",
    )
    try:
        yield FopaServer(f"127.0.0.1:{grpc_port}", root / "weights")
    finally:
        stop_pid(server.pid)
        assert not pid_alive(server.pid), f"tritonserver pid {server.pid} survived stop_pid"


@pytest.fixture(scope="module")
def reference(fopa_server: FopaServer) -> FopaHeatmap:
    return FopaHeatmap(load_fopa(fopa_server.weights_dir)).eval()


@pytest.fixture
def client(fopa_server: FopaServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(url=fopa_server.grpc_url) as grpc_client:
        yield grpc_client


def _batch(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    background = rng.uniform(-1, 1, (rows, 3, 64, 64)).astype(np.float32)
    foreground = rng.uniform(-1, 1, (rows, 4, 32, 32)).astype(np.float32)
    return background, foreground


def _inputs(background: np.ndarray, foreground: np.ndarray) -> list[grpcclient.InferInput]:
    tensors = []
    for name, values in (("BACKGROUND", background), ("FOREGROUND", foreground)):
        tensor = grpcclient.InferInput(name, list(values.shape), "FP32")
        tensor.set_data_from_numpy(values)
        tensors.append(tensor)
    return tensors


def _infer(client: grpcclient.InferenceServerClient, background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    result = client.infer(MODEL, _inputs(background, foreground), client_timeout=CALL_TIMEOUT_S)
    heatmap = result.as_numpy("HEATMAP")
    assert heatmap is not None
    return heatmap


def _expected(reference: FopaHeatmap, background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.from_numpy(background), torch.from_numpy(foreground)).numpy()


def _send_all(client: grpcclient.InferenceServerClient, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[Answer]:
    """Every batch as its own request, all in flight at once (so the dynamic batcher can merge them)."""
    answers: queue.Queue[Answer] = queue.Queue()
    for index, (background, foreground) in enumerate(batches):
        client.async_infer(
            MODEL,
            _inputs(background, foreground),
            callback=lambda result, error, index=index: answers.put((index, result, error)),
            client_timeout=CALL_TIMEOUT_S,
        )
    return sorted((answers.get(timeout=CALL_TIMEOUT_S) for _ in batches), key=lambda answer: answer[0])


def _executions(client: grpcclient.InferenceServerClient) -> tuple[int, int]:
    """(model executions, requests answered) so far."""
    (stats,) = client.get_inference_statistics(MODEL, as_json=True, client_timeout=CALL_TIMEOUT_S)["model_stats"]
    return int(stats.get("execution_count", 0)), int(stats["inference_stats"]["success"].get("count", 0))


def test_heatmaps_equal_torch(client: grpcclient.InferenceServerClient, reference: FopaHeatmap) -> None:
    background, foreground = _batch(3, seed=1)

    heatmap = _infer(client, background, foreground)

    assert heatmap.shape == (3, 8, 32, 32) and heatmap.dtype == np.float32
    np.testing.assert_allclose(heatmap, _expected(reference, background, foreground), rtol=0, atol=TOLERANCE)


def test_concurrent_requests_are_batched_and_each_answered(
    client: grpcclient.InferenceServerClient, reference: FopaHeatmap
) -> None:
    batches = [_batch(1 + i % 3, seed=10 + i) for i in range(16)]
    executions_before, requests_before = settled(lambda: _executions(client))

    answers = _send_all(client, batches)

    for (index, result, error), (background, foreground) in zip(answers, batches, strict=True):
        assert error is None and result is not None, f"request {index}: {error}"
        np.testing.assert_allclose(result.as_numpy("HEATMAP"), _expected(reference, background, foreground),
                                   rtol=0, atol=TOLERANCE, err_msg=f"request {index}")
    # Triton updates its statistics after it has sent each response: wait for them to catch up.
    deadline = time.monotonic() + 10
    while _executions(client)[1] - requests_before < len(batches) and time.monotonic() < deadline:
        time.sleep(0.05)
    executions_after, requests_after = _executions(client)
    assert requests_after - requests_before == len(batches)
    # one model execution runs far longer than sending 16 requests, so they queue and merge
    assert executions_after - executions_before < len(batches)


@pytest.mark.parametrize(
    ("background", "foreground"),
    [
        pytest.param(np.zeros((1, 3, 32, 32), np.float32), np.zeros((1, 4, 32, 32), np.float32), id="wrong-shape"),
        pytest.param(np.zeros((2, 3, 64, 64), np.float32), np.zeros((3, 4, 32, 32), np.float32), id="batch-mismatch"),
        pytest.param(np.zeros((65, 3, 64, 64), np.float32), np.zeros((65, 4, 32, 32), np.float32), id="over-max-batch"),
    ],
)
def test_malformed_request_is_rejected(
    client: grpcclient.InferenceServerClient, background: np.ndarray, foreground: np.ndarray
) -> None:
    with pytest.raises(InferenceServerException) as error:
        _infer(client, background, foreground)

    assert error.value.status() == "StatusCode.INVALID_ARGUMENT", error.value.message()
    assert _infer(client, *_batch(1, seed=2)).shape == (1, 8, 32, 32)


def test_non_finite_input_fails_only_its_own_request(
    client: grpcclient.InferenceServerClient, reference: FopaHeatmap
) -> None:
    batches = [_batch(2, seed=20 + i) for i in range(5)]
    batches[2][1][1, 3, 5, 5] = np.inf  # FOREGROUND of the third request

    answers = _send_all(client, batches)

    index, result, error = answers[2]
    assert result is None and error is not None
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "FOREGROUND must be finite" in (error.message() or "")
    for index, result, error in answers[:2] + answers[3:]:
        assert error is None and result is not None, f"request {index}: {error}"
        np.testing.assert_allclose(result.as_numpy("HEATMAP"), _expected(reference, *batches[index]),
                                   rtol=0, atol=TOLERANCE)


def test_config_exposes_the_weights_version(client: grpcclient.InferenceServerClient, fopa_server: FopaServer) -> None:
    config = client.get_model_config(MODEL, as_json=True, client_timeout=CALL_TIMEOUT_S)["config"]

    assert config["parameters"]["weights_version"]["string_value"] == weights_version(fopa_server.weights_dir)
    assert config["max_batch_size"] == 64
    assert config["dynamic_batching"]["preferred_batch_size"] == [8, 16, 32]
