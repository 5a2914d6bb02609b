"""Helpers of the fault suite: services run as real `freemask serve` processes, a tritonserver
of a test's own, placement tasks with their pictures in the store, the outcome of every task
read back off the broker, and a process's resident memory.

Everything started here is stopped by its PID; nothing is found by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from freemask.shared.bus import GapGuard
from freemask.shared.config import BusConfig, FreemaskConfig, ServerConfig, load_config
from freemask.shared.grpc_runtime import check_health
from freemask.shared.images import encode_png
from freemask.shared.processes import pid_alive, stop_pid
from freemask.shared.stack import EmbeddedStack
from freemask.shared.store import ObjectStore
from freemask.shared.triton_server import release_shared_memory, start_tritonserver
from freemask.v1 import common_pb2, compose_pb2, generate_pb2

from placement_pictures import FOREGROUND, LABELS, SCENE_H, SCENE_W, scene_image
from ports import reserve_ports

LOOPBACK = "127.0.0.1"


def stack_config(stack: EmbeddedStack, **env: str) -> FreemaskConfig:
    """A config pointing at `stack` with extra FREEMASK_* overrides (tests/conftest.py's `config_for`:
    `conftest` imported from this folder is the fault suite's own)."""
    return load_config(environ={**stack.client_env(), **env})


# --- services as processes ---------------------------------------------------------------------------------------

@dataclass
class ServiceProc:
    """One `freemask serve <name>` child, its loopback ports and its log file."""

    name: str
    process: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode("utf-8")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
        return metric_sum(self.metrics_text(), name, **labels)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as Kubernetes sends it, and the exit code once the service has shut down."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_pid(self.pid)
            raise AssertionError(f"{self.name} (pid {self.pid}) still running {timeout_s:.0f} s after SIGTERM; "
                                 f"log tail:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL its process group: for a service whose graceful exit is not what a test is about."""
        if self.process.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)  # it leads its own group (start_new_session)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop it whatever state it is in (test teardown)."""
        stop_pid(self.pid, timeout_s=30.0)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        assert not pid_alive(self.pid), f"{self.name} pid {self.pid} survived stop_pid"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def service_env(base: Mapping[str, str], name: str, grpc_port: int, metrics_port: int) -> dict[str, str]:
    prefix = f"FREEMASK_SERVER__PORTS__{name.upper()}__"
    return {**base, f"{prefix}GRPC_PORT": str(grpc_port), f"{prefix}METRICS_PORT": str(metrics_port)}


def spawn_service(name: str, env: Mapping[str, str], log_dir: Path,
                  ports: Sequence[int] | None = None) -> ServiceProc:
    """Start `freemask serve <name>` on `ports` (gRPC, metrics; fresh loopback ports by default);
    does not wait for it."""
    grpc_port, metrics_port = ports or reserve_ports(2)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "freemask.shared.cli", "serve", name],
            env=service_env(env, name, grpc_port, metrics_port), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)  # its own group: stop_pid signals exactly it
    return ServiceProc(name, process, grpc_port, metrics_port, log_path)


def wait_healthy(services: Iterable[ServiceProc], timeout_s: float = 180.0,
                 server: ServerConfig | None = None) -> None:
    """Until every service answers health SERVING; fails naming the ones that died or never answered."""
    pending = {s.name: s for s in services}
    deadline = time.monotonic() + timeout_s
    while pending:
        for name, service in list(pending.items()):
            if service.process.poll() is not None:
                raise AssertionError(f"{name} exited with {service.process.returncode} during start-up:\n"
                                     f"{service.log_tail()}")
            if check_health(service.target, timeout_s=0.5, server=server):
                del pending[name]
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}:\n{s.log_tail(10)}" for n, s in pending.items())
            raise AssertionError(f"not healthy after {timeout_s:.0f} s: {sorted(pending)}\n{tails}")
        time.sleep(0.2)


def start_service(name: str, env: Mapping[str, str], log_dir: Path, timeout_s: float = 180.0) -> ServiceProc:
    service = spawn_service(name, env, log_dir)
    try:
        wait_healthy([service], timeout_s)
    except BaseException:
        service.stop()
        raise
    return service


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS), from /proc (psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- a tritonserver of a test's own ------------------------------------------------------------------------------

@dataclass
class PrivateTriton:
    """A tritonserver on ports of its own, so the session stack's Triton is never touched."""

    workdir: Path
    ports: tuple[int, int, int] = field(default_factory=lambda: tuple(reserve_ports(3)))  # type: ignore[arg-type]
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"{LOOPBACK}:{self.ports[1]}"

    def start(self, repository: Path) -> float:
        """Start it on `repository`; the seconds it took to be ready with every model loaded."""
        assert self.pid is None, "already running"
        started = time.monotonic()
        http_port, grpc_port, metrics_port = self.ports
        server = start_tritonserver(repository, self.workdir / "work", http_port=http_port, grpc_port=grpc_port,
                                    metrics_port=metrics_port, log_path=self.workdir / "tritonserver.log")
        self.pid = server.pid
        return time.monotonic() - started

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        stop_pid(pid)
        assert not pid_alive(pid), f"tritonserver pid {pid} survived stop_pid"
        release_shared_memory(self.ports[1])


# --- placement tasks with their pictures in the store ------------------------------------------------------------

@dataclass(frozen=True)
class PlacementRun:
    """A run's scene and object to paste, written once; tasks differ only by sample id."""

    run_id: str
    scene_key: str
    source: generate_pb2.SingleObject

    def task(self, sample_id: str) -> compose_pb2.PlacementTask:
        planned = compose_pb2.PlannedObject(class_id=5, class_name="cat", relation=0.3, source=self.source)
        return compose_pb2.PlacementTask(
            run_id=self.run_id, round=0, sample_id=sample_id, background_name="grass",
            scene=compose_pb2.SceneState(keys=common_pb2.SampleKeys(image_key=self.scene_key),
                                         image_size=common_pb2.ImageSize(width=SCENE_W, height=SCENE_H)),
            next_object=planned, remaining_objects=[planned], step_index=0, seed=5)


def write_placement_run(store: ObjectStore, run_id: str) -> PlacementRun:
    prefix = f"runs/{run_id}/rounds/0/samples/"
    keys = common_pb2.SampleKeys(image_key=prefix + "src-1/image.png", label_key=prefix + "src-1/label.png")
    store.put_bytes(keys.image_key, encode_png(FOREGROUND), "image/png")
    store.put_bytes(keys.label_key, encode_png(LABELS), "image/png")
    scene_key = prefix + "base/image.png"
    store.put_bytes(scene_key, encode_png(scene_image(1)), "image/png")
    source = generate_pb2.SingleObject(sample_id="src-1", run_id=run_id, round=0, class_id=5, class_name="cat",
                                       keys=keys, image_size=common_pb2.ImageSize(width=40, height=40))
    return PlacementRun(run_id, scene_key, source)


# --- outcomes read back off the broker ---------------------------------------------------------------------------

Outcomes = dict[str, dict[str, bytes]]  # topic -> key -> value (the last record of that key)


def read_outcomes(bus: BusConfig, topics: Iterable[str], wanted: Iterable[str], timeout_s: float) -> Outcomes:
    """Every record of `topics` from their start, until each wanted key is on one of them or the time is up.

    A task ends on one of several topics (its output, or the DLQ), so no single topic's
    count says when all are in; the union of keys does.
    """
    topics, wanted = list(topics), set(wanted)
    consumer = KafkaConsumer(bootstrap_servers=bus.bootstrap_servers, group_id=None, enable_auto_commit=False)
    seen: Outcomes = {topic: {} for topic in topics}
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        guard = GapGuard(bus.gap_wait_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in guard.poll(consumer, 500).values():
                for record in records:
                    if record.key is not None:
                        seen[record.topic][record.key.decode("utf-8", "replace")] = record.value
            if wanted <= {key for keyed in seen.values() for key in keyed}:
                break
    finally:
        consumer.close()
    return seen


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a service child: this process's, less any FREEMASK_* it carries, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("FREEMASK_")}, **extra}
