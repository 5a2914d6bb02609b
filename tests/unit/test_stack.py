"""The embedded stack refuses to start a tritonserver that would have nothing to serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from freemask.shared.config import StackConfig
from freemask.shared.processes import ServerStartError
from freemask.shared.stack import EmbeddedStack


def test_an_empty_model_repository_is_refused_before_anything_starts(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    (repository / "README.md").write_text("the export writes each model's folder here\n")
    stack = EmbeddedStack(StackConfig(data_dir=tmp_path / "stack", model_repository=repository))

    try:
        with pytest.raises(ServerStartError, match="holds no model") as refused:
            stack.up(("tritonserver",))
    finally:
        stack.down()  # where the refusal is missing, the server it started must not outlive the test

    assert str(repository.resolve()) in str(refused.value)
    assert "make deploy/triton/models/fopa/config.pbtxt" in str(refused.value)
    assert stack.running_pids() == []
