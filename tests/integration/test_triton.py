"""The embedded tritonserver (nvidia-pytriton's 2.51 binary, python backend) serves a real model."""

from __future__ import annotations

import queue
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from freemask.shared.processes import ServerProcess, ServerStartError, pid_alive, stop_pid
from freemask.shared.triton_server import start_tritonserver

from ports import reserve_ports

pytestmark = pytest.mark.stack

MODEL_REPOSITORY = Path(__file__).resolve().parents[1] / "fixtures" / "triton_models"
MODEL = "affine"
# every call carries a deadline: a server that hangs must fail the test, not stall it
CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Triton:
    server: ServerProcess
    grpc_url: str
    ports: tuple[int, int, int]


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    workdir = tmp_path_factory.mktemp("triton")
    http_port, grpc_port, metrics_port = reserve_ports(3)
    server = start_tritonserver(
        MODEL_REPOSITORY,
        workdir,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_path=workdir / "tritonserver.log",
    )
    stubs = _children(server.pid)  # the python backend stubs, one per model instance
    assert stubs, "tritonserver is ready but runs no python backend stub"
    try:
        yield Triton(server, f"127.0.0.1:{grpc_port}", (http_port, grpc_port, metrics_port))
    finally:
        stop_pid(server.pid)
        assert not pid_alive(server.pid), f"tritonserver pid {server.pid} survived stop_pid"
        assert not [pid for pid in stubs if pid_alive(pid)], "python backend stubs survived the server"


@pytest.fixture
def client(triton: Triton) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(url=triton.grpc_url) as grpc_client:
        yield grpc_client


def _infer(client: grpcclient.InferenceServerClient, values: np.ndarray, datatype: str = "FP32") -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT", list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    result = client.infer(MODEL, [tensor], client_timeout=CALL_TIMEOUT_S)
    output = result.as_numpy("OUTPUT")
    assert output is not None
    return output


def test_model_answers_a_batch(client: grpcclient.InferenceServerClient) -> None:
    batch = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5

    output = _infer(client, batch)

    assert output.dtype == np.float32
    assert output.shape == (3, 4)
    np.testing.assert_allclose(output, 2.0 * batch + 1.0)


def test_concurrent_requests_are_each_answered(client: grpcclient.InferenceServerClient) -> None:
    """Several requests in flight at once (so dynamic batching may merge them) each get their own rows."""
    rows = [np.full((1 + i % 3, 4), float(i), dtype=np.float32) for i in range(8)]
    answers: queue.Queue[tuple[int, grpcclient.InferResult | None, InferenceServerException | None]] = queue.Queue()
    for index, values in enumerate(rows):
        tensor = grpcclient.InferInput("INPUT", list(values.shape), "FP32")
        tensor.set_data_from_numpy(values)
        client.async_infer(
            MODEL,
            [tensor],
            callback=lambda result, error, index=index: answers.put((index, result, error)),
            client_timeout=CALL_TIMEOUT_S,
        )
    for _ in rows:
        index, result, error = answers.get(timeout=CALL_TIMEOUT_S)
        assert error is None and result is not None, error
        np.testing.assert_allclose(result.as_numpy("OUTPUT"), 2.0 * rows[index] + 1.0)


@pytest.mark.parametrize(
    ("values", "datatype"),
    [
        pytest.param(np.zeros((2, 5), dtype=np.float32), "FP32", id="wrong-shape"),
        pytest.param(np.zeros((2, 4), dtype=np.int32), "INT32", id="wrong-dtype"),
        pytest.param(np.zeros((17, 4), dtype=np.float32), "FP32", id="batch-over-max"),
    ],
)
def test_malformed_request_is_rejected_by_the_server(
    client: grpcclient.InferenceServerClient, values: np.ndarray, datatype: str
) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as error:
        _infer(client, values, datatype)

    assert error.value.status() == "StatusCode.INVALID_ARGUMENT", error.value.message()
    assert time.monotonic() - started < CALL_TIMEOUT_S / 2  # an answer, not a deadline
    np.testing.assert_allclose(_infer(client, np.ones((1, 4), dtype=np.float32)), 3.0)


def test_error_from_the_model_is_attached_to_that_response(client: grpcclient.InferenceServerClient) -> None:
    values = np.ones((2, 4), dtype=np.float32)
    values[1, 2] = np.nan

    with pytest.raises(InferenceServerException) as error:
        _infer(client, values)

    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "finite" in (error.value.message() or "")
    assert client.is_model_ready(MODEL, client_timeout=CALL_TIMEOUT_S)
    np.testing.assert_allclose(_infer(client, np.zeros((1, 4), dtype=np.float32)), 1.0)


def test_server_metadata_names_the_version(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_server_metadata(as_json=True, client_timeout=CALL_TIMEOUT_S)

    assert metadata["name"] == "triton"
    assert metadata["version"] == "2.51.0"


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket that process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                address, port = local.split(":")
                listening.add((_decode_address(address), int(port, 16)))
    return listening


def _decode_address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc/net/tcp{,6} stores each 32-bit word in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return ".".join(str(b) for b in words)
    if words[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped IPv6
        return ".".join(str(b) for b in words[12:])
    return words.hex()


def test_server_listens_on_loopback_only(triton: Triton) -> None:
    listening = _listening_addresses(triton.server.pid)

    assert {port for _, port in listening} == set(triton.ports)
    assert {address for address, _ in listening} == {"127.0.0.1"}


def test_a_model_that_fails_to_load_gives_a_clear_error(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    shutil.copytree(MODEL_REPOSITORY, repository)
    (repository / MODEL / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('weights missing: /nowhere/affine.onnx')\n"
    )

    with pytest.raises(ServerStartError) as error:
        start_tritonserver(
            repository,
            tmp_path / "work",
            *reserve_ports(3),
            log_path=tmp_path / "tritonserver.log",
            timeout_s=60,
        )

    message = str(error.value)
    assert message.startswith("tritonserver exited during start-up")
    assert "weights missing: /nowhere/affine.onnx" in message
