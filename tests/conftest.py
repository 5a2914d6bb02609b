"""Fixtures shared by the whole suite.

`stack` starts one embedded stack (SeaweedFS, Tansu, tritonserver) for the test
session, on free loopback ports and in a temporary directory, and stops it by
PID at the end. Tests that restart a server start a private stack of their own
(`private_stack`), so they never disturb the shared one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from freemask.shared.config import FreemaskConfig, StackConfig, load_config
from freemask.shared.processes import pid_alive
from freemask.shared.stack import EmbeddedStack

from ports import reserve_ports

_SEAWEED_PORTS = 12


def make_stack_config(data_dir: Path) -> StackConfig:
    base = reserve_ports(_SEAWEED_PORTS + 5)[0]
    return StackConfig(
        data_dir=data_dir,
        s3_port=base,
        kafka_port=base + 1,
        triton_http_port=base + 2,
        triton_grpc_port=base + 3,
        triton_metrics_port=base + 4,
        seaweed_port_base=base + 5,
    )


def config_for(stack: EmbeddedStack, **env: str) -> FreemaskConfig:
    """A full config pointing at `stack`, with extra FREEMASK_* overrides."""
    return load_config(environ={**stack.client_env(), **env})


class PrivateStack:
    """A stack a test owns; stopped (and checked to be gone) when the test ends."""

    def __init__(self, root: Path) -> None:
        self.stack = EmbeddedStack(make_stack_config(root / "stack"))
        self._pids: set[int] = set()

    def up(self, parts: tuple[str, ...] = ("seaweedfs", "tansu")) -> EmbeddedStack:
        self.stack.up(parts)
        self._pids.update(self.stack.running_pids())
        return self.stack

    def close(self) -> None:
        self._pids.update(self.stack.running_pids())
        self.stack.down()
        left = [pid for pid in self._pids if pid_alive(pid)]
        assert not left, f"servers still running after stack down: {left}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    owner = PrivateStack(tmp_path_factory.mktemp("shared-stack"))
    owner.up(("seaweedfs", "tansu", "tritonserver"))
    yield owner.stack
    owner.close()


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[PrivateStack]:
    owner = PrivateStack(tmp_path)
    yield owner
    owner.close()


@pytest.fixture(scope="session")
def stack_config(stack: EmbeddedStack) -> FreemaskConfig:
    return config_for(stack)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module of tiny-model tests, restored afterwards so no other test inherits it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fopa_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of an untrained FOPA (seed 0): exporting and publishing need a net, not a good one."""
    import torch

    from freemask.placement.model import FopaNet, save_fopa

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("fopa-weights")
    save_fopa(FopaNet(), directory)
    return directory


FAULTS_DIR = Path(__file__).resolve().parent / "faults"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/faults is marked `faults`, so `make faults` runs that folder alone and
    `make test` runs it with everything else. (The folder has no conftest of its own: it is on the
    import path for its helper modules, where a second `conftest` module would shadow this one.)"""
    for item in items:
        if FAULTS_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.faults)
