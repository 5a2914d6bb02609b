"""Start the embedded NVIDIA Triton: the tritonserver 2.51 binary from the `nvidia-pytriton` wheel.

The wheel ships the server, its python backend and one python-backend stub per
Python version, but is laid out for PyTriton's own launcher. We use only the
binary and the backend, never PyTriton's decorator API:

- the stub for *this* interpreter is copied, with the backend, into a
  `backends/python/` directory of our own (the installed package is never touched);
- the copied files lose their `$ORIGIN`-relative RPATH, so the wheel's bundled
  libraries (`nvidia_pytriton.libs`, e.g. its libcudart) go on `LD_LIBRARY_PATH`;
  without them the stub cannot start and the server hangs loading the model;
- the interpreter's own `lib/` goes first on `LD_LIBRARY_PATH`, else the stub
  binds whatever libpython3.11 the system has (here Debian's 3.11.2 under a
  3.11.7 venv), or fails to start on a host with none;
- the venv's `bin/` goes first on `PATH`: the embedded interpreter finds its
  prefix (and so the venv's site-packages) through `python3` on `PATH`, and it
  ignores `PYTHONPATH`.

Everything listens on 127.0.0.1 only, and nothing in the command needs a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from freemask.shared.processes import (
    ServerProcess,
    ServerStartError,
    pid_alive,
    start_server,
    stop_pid,
    wait_until_ready,
)

LOGGER = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SERVER_NAME = "tritonserver"
# Below processes.stop_pid's 10 s SIGTERM grace, so a stop ends with Triton's own
# orderly unload (stubs stopped, shared memory released) rather than a SIGKILL.
EXIT_TIMEOUT_S = 5
# Per-probe deadline while waiting for readiness: a probe must never hang the wait.
PROBE_TIMEOUT_S = 1.0
# where the python backend puts its stub shared-memory regions
SHARED_MEMORY_DIR = Path("/dev/shm")

# Files of the bundled python backend that the server loads from --backend-directory.
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB_NAME = "triton_python_backend_stub"
# Logged on every CPU-only start; harmless, so never quoted as a cause.
_BENIGN_ERRORS = ("CudaDriverHelper has not been initialized",)
_ERROR_LINE = re.compile(r"^E\d{4} |error", re.IGNORECASE)


def _pytriton_root() -> Path:
    # find_spec, not import: importing pytriton pulls in its whole decorator API.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError("tritonserver: the nvidia-pytriton wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_dist() -> Path:
    """The `tritonserver/` tree inside the installed nvidia-pytriton wheel."""
    return _pytriton_root() / "tritonserver"


def tritonserver_binary() -> Path:
    return tritonserver_dist() / "bin" / "tritonserver"


def bundled_libs_dir() -> Path:
    """The wheel's vendored shared libraries (auditwheel's `<dist>.libs`)."""
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def interpreter_lib_dir() -> Path:
    """The lib/ of the real interpreter behind the venv, where its libpython lives."""
    return Path(str(sysconfig.get_config_var("LIBDIR")))


def _stub_source() -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tritonserver_dist() / "python_backend_stubs" / version / _STUB_NAME
    if not stub.is_file():
        raise ServerStartError(f"tritonserver: nvidia-pytriton ships no python backend stub for Python {version}")
    return stub


def _copy_if_changed(source: Path, target: Path) -> None:
    if target.is_file():
        src, dst = source.stat(), target.stat()
        if src.st_size == dst.st_size and int(src.st_mtime) == int(dst.st_mtime):
            return
    # copy beside the target, then rename: an interrupted copy never leaves a
    # truncated .so or stub where the server would load it.
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.copy2(source, partial)
    os.replace(partial, target)


def prepare_backends(workdir: Path) -> Path:
    """Build `workdir/backends/python/` (backend + this interpreter's stub); return `workdir/backends`.

    Idempotent: files already in place and unchanged are left alone.
    """
    backend_dir = workdir / "backends"
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    source_dir = tritonserver_dist() / "backends" / "python"
    for name in _BACKEND_FILES:
        _copy_if_changed(source_dir / name, python_dir / name)
    _copy_if_changed(_stub_source(), python_dir / _STUB_NAME)
    return backend_dir


def triton_command(
    model_repository: Path,
    backend_dir: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
) -> list[str]:
    return [
        str(tritonserver_binary()),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_dir}",
        # load exactly what the repository holds at start; no load/unload API
        "--model-control-mode=none",
        # our config.pbtxt files are complete; auto-complete would start an extra
        # python stub per model just to ask it for its config (measured: ready in
        # ~2.6 s with it, ~1.0 s without, on 2 cores)
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        f"--http-address={LOOPBACK}",
        f"--http-port={http_port}",
        f"--grpc-address={LOOPBACK}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={LOOPBACK}",
        f"--metrics-port={metrics_port}",
        # CPU-only: the default 256 MB pinned pool calls cudaHostAlloc (fails with a
        # warning) and GPU metrics start DCGM/NVML (fails with an error); neither is
        # fatal, both are noise. The CUDA memory pool is already off without a GPU.
        "--pinned-memory-pool-byte-size=0",
        "--allow-gpu-metrics=false",
        # name this server's stub shared-memory regions, so that the ones a failed
        # start leaves in /dev/shm can be found and released (release_shared_memory)
        f"--backend-config=python,shm-region-prefix-name={shared_memory_prefix(grpc_port)}",
    ]


def shared_memory_prefix(grpc_port: int) -> str:
    """Prefix of the python-backend shared-memory regions of the server on `grpc_port`."""
    return f"freemask_triton_{grpc_port}_"


def release_shared_memory(grpc_port: int) -> list[Path]:
    """Remove the /dev/shm regions of the (stopped) server on `grpc_port`; return what was removed.

    Triton unlinks them itself on an orderly exit; they are left behind when a
    stub never started or the server was SIGKILLed. Call only once its PID is gone.
    """
    removed = []
    for region in SHARED_MEMORY_DIR.glob(f"{shared_memory_prefix(grpc_port)}*"):
        region.unlink(missing_ok=True)
        removed.append(region)
    return removed


def triton_env() -> dict[str, str]:
    """The environment for tritonserver and the python-backend stubs it spawns."""
    env = dict(os.environ)
    venv_bin = Path(sys.prefix) / "bin"
    env["PATH"] = os.pathsep.join(p for p in (str(venv_bin), env.get("PATH", "")) if p)
    lib_dirs = [str(interpreter_lib_dir()), str(bundled_libs_dir())]
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    # a PYTHONHOME would override the prefix the stub derives from PATH
    env.pop("PYTHONHOME", None)
    return env


def repository_models(model_repository: Path) -> list[str]:
    """The model names Triton will load from the repository: its non-hidden subfolders."""
    return sorted(p.name for p in model_repository.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_libpython() -> None:
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (interpreter_lib_dir() / soname).exists():
        raise ServerStartError(
            f"tritonserver: the python backend stub needs this interpreter's shared libpython "
            f"({soname or 'libpython'} in {interpreter_lib_dir()}); use a Python built with --enable-shared"
        )


def start_tritonserver(
    model_repository: Path,
    workdir: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    log_path: Path,
    timeout_s: float = 120,
) -> ServerProcess:
    """Start tritonserver on 127.0.0.1 and return once it and every repository model are ready.

    Raises ServerStartError, quoting the server log, if it exits or is not ready in time;
    a server that never became ready is stopped before the error is raised.
    """
    model_repository = model_repository.resolve()
    if not model_repository.is_dir():
        raise ServerStartError(f"tritonserver: model repository {model_repository} is not a directory")
    models = repository_models(model_repository)
    if not models:
        # An empty repository starts a "ready" server that fails every call, so a run would
        # dead-letter all its composed scenes and carry on with half its data.
        raise ServerStartError(
            f"tritonserver: the model repository {model_repository} holds no model; "
            "`make deploy/triton/models/fopa/config.pbtxt` (part of make run, test and bench) writes FOPA there"
        )
    _check_libpython()
    workdir.mkdir(parents=True, exist_ok=True)
    backend_dir = prepare_backends(workdir.resolve())
    command = triton_command(model_repository, backend_dir, http_port, grpc_port, metrics_port)

    log_offset = log_path.stat().st_size if log_path.is_file() else 0
    started = time.monotonic()
    server = start_server(SERVER_NAME, command, log_path, env=triton_env(), cwd=workdir)
    client = grpcclient.InferenceServerClient(url=f"{LOOPBACK}:{grpc_port}")

    def ready() -> bool:
        return bool(client.is_server_ready(client_timeout=PROBE_TIMEOUT_S)) and all(
            client.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S) for model in models
        )

    try:
        wait_until_ready(server, ready, timeout_s)
    except ServerStartError as exc:
        stop_pid(server.pid)  # a half-started server (e.g. a hung stub) must not outlive the error
        if not pid_alive(server.pid):
            release_shared_memory(grpc_port)
        raise ServerStartError(_start_failure(str(exc), log_path, log_offset)) from exc
    finally:
        client.close()
    LOGGER.info(
        "tritonserver pid %d ready in %.1f s (grpc %s:%d, models: %s)",
        server.pid,
        time.monotonic() - started,
        LOOPBACK,
        grpc_port,
        ", ".join(models) or "none",
    )
    return server


def _start_failure(message: str, log_path: Path, log_offset: int, limit: int = 8) -> str:
    """`message`'s first line, the errors this start logged, and this start's log tail.

    The log is appended to across starts, and the cause (a model's traceback) often
    scrolls out of the tail behind Triton's option table, so both are cut to this start.
    """
    try:
        with open(log_path, "rb") as log:
            log.seek(log_offset)
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return message
    last = lines[-20:]
    errors = [
        line[:600]
        for line in lines[:-20]
        if _ERROR_LINE.search(line) and not any(benign in line for benign in _BENIGN_ERRORS)
    ]
    parts = [message.partition("\n")[0]]
    if errors:
        parts += ["errors logged by tritonserver:", *(f"  ! {line}" for line in errors[-limit:])]
    parts += [f"log tail ({log_path}):", *(f"  | {line}" for line in last)]
    return "\n".join(parts)
