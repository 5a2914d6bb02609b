"""Start, watch and stop the embedded servers as child processes, always by PID.

A server is started in its own process group and session, with its output
appended to a log file; its PID is written to a pid file so that a later
`freemask stack down` (another process) can stop exactly what was started
and nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class ServerStartError(RuntimeError):
    """A server did not become ready; the message names it and quotes its log."""


@dataclass(frozen=True)
class ServerProcess:
    name: str
    pid: int
    log_path: Path

    def alive(self) -> bool:
        return pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    try:
        waited_pid, _ = os.waitpid(pid, os.WNOHANG)
        if waited_pid == pid:  # our own child has exited and is now reaped
            return False
    except ChildProcessError:
        pass  # not our child: fall through to a signal-0 probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def start_server(
    name: str,
    command: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            # own session: a Ctrl-C in the launching terminal must not kill the
            # stack half-way; `stack down` stops it deliberately instead.
            start_new_session=True,
        )
    return ServerProcess(name=name, pid=proc.pid, log_path=log_path)


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL it after `timeout_s`."""
    if not pid_alive(pid):
        return
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until_ready(
    server: ServerProcess,
    is_ready: Callable[[], bool],
    timeout_s: float,
    poll_s: float = 0.1,
) -> None:
    """Poll `is_ready` until it holds; fail fast if the server dies meanwhile.

    On failure the server is stopped, so a failed start leaves no process behind.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerStartError(f"{server.name} exited during start-up\n{tail(server.log_path)}")
        try:
            if is_ready():
                return
        except Exception:  # noqa: BLE001 - any probe failure just means "not yet"
            pass
        time.sleep(poll_s)
    stop_pid(server.pid)
    raise ServerStartError(
        f"{server.name} (pid {server.pid}) not ready after {timeout_s:.0f} s\n{tail(server.log_path)}"
    )


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(f"  | {line}" for line in text[-lines:])
