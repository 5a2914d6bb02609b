"""`freemask placement publish` against a real S3 API, and a real tritonserver serving FOPA from there.

This is the path the Helm chart takes (publish Job, then Triton with an s3:// model
repository), with the embedded target because the wheel's tritonserver has only the
python backend; the URL form and the upload are the same for both targets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from freemask.placement.publish import repository_url
from freemask.shared.cli import main
from freemask.shared.config import load_config
from freemask.shared.processes import ServerProcess, pid_alive, start_server, stop_pid, wait_until_ready
from freemask.shared.triton_server import prepare_backends, triton_command, triton_env

from ports import reserve_ports

pytestmark = pytest.mark.stack

PREFIX = "triton/repository"


@pytest.fixture
def store_env(private_stack) -> dict[str, str]:  # noqa: ANN001 - conftest's PrivateStack
    return private_stack.up(("seaweedfs",)).client_env()


@pytest.fixture
def published(store_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """The printed --model-repository of a `freemask placement publish` run."""
    for name, value in store_env.items():
        monkeypatch.setenv(name, value)

    assert main(["placement", "publish", "--prefix", PREFIX, "--target", "embedded"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("uploaded ")][-1] == f"uploaded {PREFIX}/fopa/config.pbtxt"
    return lines[-1].rpartition("--model-repository=")[2]


@pytest.fixture
def triton_from_s3(published: str, store_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    http_port, grpc_port, metrics_port = reserve_ports(3)
    store = load_config(environ=store_env).store
    env = {
        **triton_env(),
        # how the chart hands Triton the store's credentials: AWS variables from the same Secret
        "AWS_ACCESS_KEY_ID": store.access_key.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": store.secret_key.get_secret_value(),
        "AWS_DEFAULT_REGION": store.region,
    }
    command = triton_command(published, prepare_backends(tmp_path), http_port, grpc_port, metrics_port)
    server: ServerProcess = start_server("tritonserver", command, tmp_path / "tritonserver.log", env=env, cwd=tmp_path)
    try:
        with grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}") as client:
            wait_until_ready(server, lambda: client.is_model_ready("fopa", client_timeout=1.0), timeout_s=120)
        yield f"127.0.0.1:{grpc_port}"
    finally:
        stop_pid(server.pid)
        assert not pid_alive(server.pid)


def test_published_url_is_the_stores(published: str, store_env: dict[str, str]) -> None:
    assert published == repository_url(load_config(environ=store_env).store, PREFIX)


def test_triton_serves_fopa_from_the_published_prefix(triton_from_s3: str) -> None:
    with grpcclient.InferenceServerClient(url=triton_from_s3) as client:
        config = client.get_model_config("fopa", as_json=True, client_timeout=5.0)["config"]

    assert config["name"] == "fopa"
    assert [tensor["name"] for tensor in config["input"]] == ["BACKGROUND", "FOREGROUND"]
