"""Child processes of the simulators and test services: started in their own process group,
stopped as a group, and never left behind.

One place for what swtpm, tpm2-abrmd, dbus-daemon, Mosquitto, the relay and the served
instance all need:

- ``die_with_parent(command)``: the kernel sends SIGKILL to the child when the *thread*
  that started it dies (PR_SET_PDEATHSIG through setpriv), so a crashed test run leaves
  nothing behind. Pass ``die_with_parent=False`` wherever a short-lived worker thread
  starts a process that must outlive it.
- ``stop_group(process)``: SIGTERM to the whole process group, wait, then SIGKILL.
- ``LiveSet``: the instances still running, closed by an atexit hook (a forgotten
  instance is stopped when the interpreter exits).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import threading
from typing import IO, Any, Protocol


def die_with_parent(command: list[str], enabled: bool = True) -> list[str]:
    """``command`` wrapped in ``setpriv --pdeathsig KILL`` when setpriv exists."""
    if enabled and shutil.which("setpriv"):
        return ["setpriv", "--pdeathsig", "KILL", "--", *command]
    return command


def start_group(command: list[str], *, log: IO[bytes] | int | None = subprocess.DEVNULL,
                env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                stdout: IO[bytes] | int | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` as the leader of a new session (its own process group), stdin
    closed, stdout and stderr to ``log`` (stdout to ``stdout`` when given)."""
    return subprocess.Popen(command, stdin=subprocess.DEVNULL,
                            stdout=log if stdout is None else stdout,
                            stderr=subprocess.STDOUT if stdout is None else log,
                            env=env, cwd=cwd, start_new_session=True, close_fds=True)


def stop_group(process: subprocess.Popen[Any] | None, timeout: float = 10.0,
               *, force: bool = False) -> None:
    """Stop a process started with ``start_group`` (or ``start_new_session=True``) and
    everything in its group: SIGTERM (skipped when ``force``), wait up to ``timeout`` s,
    then SIGKILL. Safe on None, on a process that already exited, and twice."""
    if process is None:
        return
    if process.poll() is not None:
        process.wait()
        return
    steps = [(signal.SIGKILL, 5.0)] if force else [(signal.SIGTERM, timeout),
                                                    (signal.SIGKILL, 5.0)]
    for sig, wait in steps:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Closable(Protocol):
    def close(self) -> None: ...


class LiveSet:
    """Instances still running; ``close_all`` (registered with atexit) stops them."""

    def __init__(self) -> None:
        self._items: set[Closable] = set()
        self._lock = threading.Lock()
        atexit.register(self.close_all)

    def add(self, item: Closable) -> None:
        with self._lock:
            self._items.add(item)

    def discard(self, item: Closable) -> None:
        with self._lock:
            self._items.discard(item)

    def close_all(self) -> None:
        with self._lock:
            items = list(self._items)
        for item in items:
            with contextlib.suppress(Exception):
                item.close()


LIVE = LiveSet()  # every swtpm, tpm2-abrmd and broker of this process
