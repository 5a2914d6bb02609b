"""`freemask stack up|status|down` and `freemask run`, as a user runs them."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from freemask.shared.processes import pid_alive

from conftest import make_stack_config
from ports import reserve_ports

pytestmark = pytest.mark.stack

ROUNDS, PER_ROUND = 2, 8


def write_config(tmp_path: Path) -> Path:
    stack = make_stack_config(tmp_path / "stack").model_dump(mode="json")
    names = ("attention_mask", "thesaurus", "placement", "harmonization", "scoring", "coordinator")
    numbers = iter(reserve_ports(2 * len(names)))
    ports = {name: {"grpc_port": next(numbers), "metrics_port": next(numbers)} for name in names}
    path = tmp_path / "freemask.yaml"
    path.write_text(yaml.safe_dump({
        "stack": stack, "server": {"ports": ports}, "attention_mask": {"num_inference_steps": 4},
        "scoring": {"input_size": 32, "batch_size": 8},
        "coordinator": {"rounds": ROUNDS, "initial_samples": 6, "samples_per_round": PER_ROUND, "train_epochs": 2}}))
    return path


def freemask(config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FREEMASK_")}
    return subprocess.run(
        [sys.executable, "-m", "freemask.shared.cli", "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def seaweed_files_in_tmp(config: Path) -> set[Path]:
    """/tmp's SeaweedFS unix sockets named after this stack's ports, and every SeaweedFS log file there."""
    stack = yaml.safe_load(config.read_text())["stack"]
    ports = {stack["s3_port"], *range(stack["seaweed_port_base"], stack["seaweed_port_base"] + 12)}
    sockets = {path for path in Path("/tmp").glob("seaweedfs-*.sock")
               if any(path.name.endswith(f"-{port}.sock") for port in ports)}
    return sockets | set(Path("/tmp").glob("weed.*"))


def test_stack_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    already_there = seaweed_files_in_tmp(config)  # left by other runs: a port number may come round again
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
    # nothing in /tmp either: neither SeaweedFS's unix sockets nor its log files
    left = seaweed_files_in_tmp(config) - already_there
    assert not left, f"stack down left {sorted(left)}"


def test_run_brings_everything_up_runs_algorithm_1_exports_and_shuts_down(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = freemask(config, "run", "--run-id", "cli-run", "--seed", "5", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for service in ("attention_mask", "thesaurus", "placement", "harmonization", "scoring", "coordinator"):
        assert f"{service} " in result.stdout
    assert f"run cli-run: completed, {ROUNDS} of {ROUNDS} rounds" in result.stdout, result.stdout
    # the default selection, per_class_and_kind: the range of the cuts of its groups (class and slot kind)
    rounds = re.findall(r"^round (\d): (\d+) requested, (\d+) scored, (\d+) dead-lettered, (\d+) kept at "
                        r"the top of each of \d+ groups, S\(x\) >= ([01]\.\d{3}) to ([01]\.\d{3}), "
                        r"segmenter cli-run/(\d) \(validation mIoU ([01]\.\d{3})\)$", result.stdout, re.MULTILINE)
    assert [int(r[0]) for r in rounds] == list(range(ROUNDS)), result.stdout
    kept = 0
    for index, requested, scored, dead, retained, lowest_cut, highest_cut, segmenter_round, _miou in rounds:
        assert int(requested) == PER_ROUND and int(scored) + int(dead) == PER_ROUND
        assert float(lowest_cut) <= float(highest_cut)
        assert int(retained) >= math.ceil(0.7 * int(scored)) and segmenter_round == index
        kept += int(retained)
    # Every stage did work, and its share of the time is reported from its Prometheus metrics.
    for stage in ("attention_mask", "thesaurus", "placement", "harmonization", "scoring"):
        assert re.search(rf"^{stage} +[1-9]\d* messages, \d+\.\d{{3}} s each$", result.stdout, re.MULTILINE), (
            result.stdout)
    exports = tmp_path / "stack" / "exports" / "cli-run"
    for fmt in ("coco", "voc", "jsonl"):
        assert re.search(rf"^{fmt} +{kept} samples, \d+ objects: {re.escape(str(exports / fmt))}$", result.stdout,
                         re.MULTILINE), result.stdout
    assert len(json.loads((exports / "coco" / "coco" / "annotations" / "instances.json").read_text())["images"]) == kept
    assert len((exports / "voc" / "voc" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()) == kept
    assert f"report: {exports / 'report.html'}" in result.stdout
    page = (exports / "report.html").read_text()
    assert "cli-run" in page and page.count('class="round-row"') == ROUNDS and "data:image/png;base64," in page
    assert "Where the time went" in page
    state = json.loads((tmp_path / "stack" / "stack.json").read_text())
    assert state == {}, "run stops the stack it started"
    for log in (tmp_path / "stack" / "logs").glob("*.log"):
        if log.stem in ("attention_mask", "thesaurus", "placement", "harmonization", "scoring", "coordinator"):
            assert '"msg": "stopped"' in log.read_text(), f"{log.stem} did not shut down gracefully"
