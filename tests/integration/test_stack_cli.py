"""`freemask stack up|status|down` and `freemask run`, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from freemask.shared.processes import pid_alive
from freemask.world import DRAWABLE_CLASSES, class_weights

from conftest import make_stack_config
from ports import reserve_ports

pytestmark = pytest.mark.stack


def write_config(tmp_path: Path) -> Path:
    stack = make_stack_config(tmp_path / "stack").model_dump(mode="json")
    names = ("attention_mask", "thesaurus", "placement", "harmonization", "scoring", "coordinator")
    numbers = iter(reserve_ports(2 * len(names)))
    ports = {name: {"grpc_port": next(numbers), "metrics_port": next(numbers)} for name in names}
    path = tmp_path / "freemask.yaml"
    path.write_text(yaml.safe_dump({"stack": stack, "server": {"ports": ports},
                                    "attention_mask": {"num_inference_steps": 4}}))
    return path


def freemask(config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEMASK_")}
    return subprocess.run(
        [sys.executable, "-m", "freemask.shared.cli", "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_stack_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    try:
        up = freemask(config, "stack", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        for part in ("seaweedfs", "tansu", "tritonserver"):
            assert f"{part}: ready on" in up.stdout
        status = freemask(config, "stack", "status")
        assert status.returncode == 0 and status.stdout.count("running (pid") == 3, status.stdout
        again = freemask(config, "stack", "up")
        assert again.stdout.count("already running") == 3, "a second up must not start duplicates"
        pids = [entry["pid"] for entry in json.loads((tmp_path / "stack" / "stack.json").read_text()).values()]
        env_lines = freemask(config, "stack", "env").stdout
        assert "FREEMASK_STORE__SECRET_KEY_FILE=" in env_lines and "SECRET_KEY=" not in env_lines.replace("_FILE=", "")
    finally:
        down = freemask(config, "stack", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [pid for pid in pids if pid_alive(pid)], "stack down left servers running"
    status = freemask(config, "stack", "status")
    assert status.returncode == 3 and status.stdout.count("stopped") == 3


def allowed_on(background: str) -> set[str]:
    return {cls for cls, weight in class_weights(background, DRAWABLE_CLASSES).items() if weight > 0}


def test_run_brings_everything_up_and_shuts_it_down(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = freemask(config, "run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("stage 1 (attention masks), stage 2 (thesaurus, FOPA placement, RAIN harmonization) and scoring ran"
            in result.stdout)
    for cls in ("aeroplane", "bird", "boat", "bus", "car", "cat", "cow", "dog", "horse", "person", "sheep", "train"):
        line = rf"^{cls} +mask +\d+ px  tau 0\.\d\d  runs/make-run/rounds/0/samples/s-0-\d+-[0-9a-f]{{12}}/label\.png$"
        assert re.search(line, result.stdout, re.MULTILINE), f"no single object for {cls}:\n{result.stdout}"
    # Each composition ends as a sample (its objects listed, then its image key) or a dead letter
    # with its reason; the base object comes first, then the two the thesaurus planned.
    outcomes = re.findall(r"^(\w+) +on (\w+)\n((?: {14}.*\n)+)", result.stdout, re.MULTILINE)
    assert len(outcomes) == 12, f"expected one composition per single object:\n{result.stdout}"
    composed = 0
    for base, background, body in outcomes:
        if "dead-lettered by" in body:
            assert re.fullmatch(r" {14}dead-lettered by \w+: .+\n", body), body
            continue
        objects = re.findall(r"^ +(\w+) +at x=(\d+) y=(\d+) (\d+)x(\d+) px, (\d+) px visible, FOPA score [01]\.\d\d$",
                             body, re.MULTILINE)
        assert [cls for cls, *_ in objects][0] == base and len(objects) == 3, body
        for cls, x, y, width, height, visible in objects[1:]:
            assert cls in allowed_on(background)
            assert int(x) + int(width) <= 32 and int(y) + int(height) <= 32  # inside the 32 px scene
            assert int(visible) <= int(width) * int(height)
        assert re.search(r"runs/make-run/rounds/0/samples/c-0-\d+-[0-9a-f]{12}/image\.png$", body, re.MULTILINE)
        composed += 1
    assert composed >= 1 and f"{composed} of 12 scenes composed" in result.stdout
    # f_0 is trained on the single objects, then every composed sample is scored with it.
    assert re.search(r"^segmenter make-run/0: \d+ steps, loss \d+\.\d+, 0 images skipped$", result.stdout,
                     re.MULTILINE), result.stdout
    scores = re.findall(r"^S\(x\) ([01]\.\d{3})  c-0-\d+-[0-9a-f]{12}  by segmenter make-run/0  \((.+)\)$",
                        result.stdout, re.MULTILINE)
    assert len(scores) == composed and f"{composed} of {composed} composed samples scored" in result.stdout
    assert [float(score) for score, _ in scores] == sorted(float(score) for score, _ in scores)
    assert all("background" in classes for _, classes in scores)
    for service in ("attention_mask", "thesaurus", "placement", "harmonization", "scoring", "coordinator"):
        assert f"{service} " in result.stdout
    state = json.loads((tmp_path / "stack" / "stack.json").read_text())
    assert state == {}, "run stops the stack it started"
    for log in (tmp_path / "stack" / "logs").glob("*.log"):
        if log.stem in ("attention_mask", "thesaurus", "placement", "harmonization", "scoring", "coordinator"):
            assert '"msg": "stopped"' in log.read_text(), f"{log.stem} did not shut down gracefully"
