"""Engine server processes: start in their own process group, wait, stop.

One home for what every server-style engine needs: a free loopback port,
a log file, a bounded readiness wait that notices an early exit, a stop
that takes the whole process group (workers included) down, and the
resident memory of that group (/proc).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from kvmatrix.runners.backends.base import EngineError

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class EngineProcess:
    """A server engine in its own session/process group, logging to a file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(("$ " + " ".join(self.argv) + "\n").encode())
        log.flush()
        full_env = dict(os.environ)
        full_env.update(self.env or {})
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, start_new_session=True,
            )
        except OSError as exc:
            raise EngineError(f"cannot start {self.argv[0]}: {exc}") from None
        finally:
            log.close()
        # Recorded so the host can reap the engine's group if the runner itself is killed.
        self.pid_path.write_text(str(self.proc.pid))

    @property
    def pid_path(self) -> Path:
        return self.log_path.with_suffix(".pid")

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll ``probe`` until True; raise EngineError on exit or timeout. Returns seconds waited."""
        assert self.proc is not None
        t0 = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise EngineError(f"{what} exited during start-up ({describe_exit(code)})", tail(self.log_path))
            try:
                if probe():
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() - t0 > timeout_s:
                raise EngineError(f"{what} not ready after {timeout_s:.0f}s", tail(self.log_path))
            time.sleep(0.2)

    def check_alive(self, what: str) -> None:
        if self.proc is not None and (code := self.proc.poll()) is not None:
            raise EngineError(f"{what} died ({describe_exit(code)})", tail(self.log_path))

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = None
        if proc.poll() is None and pgid is not None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if pgid is not None:
            _signal_group(pgid, signal.SIGKILL)  # workers left in the group, if any
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.pid_path.unlink(missing_ok=True)


def group_memory(pid: int | None) -> dict:
    """VmRSS / VmHWM (MiB) summed over the process group of ``pid`` (vLLM's engine core included)."""
    if pid is None:
        return {}
    try:
        pgid = os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return {}
    rss = hwm = n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[2]) != pgid:
                continue
            status = Path(entry.path, "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        n += 1
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return {"rss_mib": round(rss / 1024, 1), "hwm_mib": round(hwm / 1024, 1), "processes": n} if n else {}


def reap_group(pid_path: Path) -> bool:
    """Kill the process group recorded in pid_path (an engine whose runner died). True if one was alive."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return False
    pid_path.unlink(missing_ok=True)
    try:
        os.killpg(pid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
