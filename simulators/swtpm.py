"""One software TPM 2.0 (swtpm) as a context manager: a simulated device's TPM chip.

``SwtpmInstance()`` starts ``swtpm socket --tpm2`` on a free loopback port pair
(TPM commands on ``port``, swtpm's control channel on ``port + 1``) with a fresh temp
state dir, or with a given ``state_dir`` so a device keeps its NV indices and persistent
objects across ``stop()`` / ``start()`` / ``restart()`` (a reboot).  ``.tcti`` is the
TCTI string for tpm2-pytss (``ESAPI(tpm.tcti)``) and tpm2-tools (``TPM2TOOLS_TCTI``).

Process hygiene (simulators.processes): swtpm runs in its own process group, ``stop()``
sends an orderly TPM2_Shutdown, then SIGTERM, then SIGKILL to the group; instances still
running at interpreter exit are stopped by an atexit hook, and with
``die_with_parent=True`` (default) the kernel kills swtpm if the *thread* that started
it dies (pass False when a short-lived worker thread starts a TPM that must outlive it).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from .processes import LIVE, die_with_parent, stop_group

SWTPM_INSTALL_HINT = "apt-get install swtpm swtpm-tools"
# Even base ports below the Linux ephemeral range (32768-60999), where other test services
# pick theirs with bind(0): fewer races with them. Collisions are detected and retried.
PORT_RANGE = (10000, 32766)

# swtpm control channel (swtpm man page "swtpm_ioctl", src/swtpm/tpm_ioctl.h): big-endian
# uint32 command codes; every response starts with a uint32 TPM result code.
_CMD_GET_CAPABILITY = 0x01
# Raw TPM 2.0 commands (TPM 2.0 Part 3): TPM2_GetTestResult and TPM2_Shutdown(TPM_SU_CLEAR).
_TPM2_GET_TEST_RESULT = bytes.fromhex("80010000000a0000017c")
_TPM2_SHUTDOWN_CLEAR = bytes.fromhex("80010000000c000001450000")

class SwtpmError(RuntimeError):
    """swtpm is missing, could not start, or did not answer; the message holds its log."""


def swtpm_binary() -> str:
    """Path of the swtpm executable, or SwtpmError naming the package to install."""
    path = shutil.which("swtpm")
    if path is None:
        raise SwtpmError(f"swtpm not found on PATH: {SWTPM_INSTALL_HINT}")
    return path


def _ports_free(port: int) -> bool:
    for candidate in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def _exchange(port: int, request: bytes, timeout: float) -> bytes:
    """Send one request and read one response (at least the 4-byte result / 10-byte header)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        response = b""
        while len(response) < 4:
            chunk = sock.recv(4096)
            if not chunk:
                break
            response += chunk
        return response


class SwtpmInstance:
    """A running swtpm while inside ``with`` (or between ``start()`` and ``close()``).

    ``state_dir=None`` makes a private temp dir that ``close()`` removes; a given
    ``state_dir`` is created if missing and never removed (the device's persistent
    state).  ``stop()`` powers the TPM off but keeps everything; ``start()`` powers it
    on again, trying the previous port first so ``.tcti`` usually stays valid (always
    re-read ``.tcti`` after a restart).  Start time is in ``start_seconds``.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        start_timeout: float = 10.0,
        die_with_parent: bool = True,
    ) -> None:
        self._owns_state_dir = state_dir is None
        self._state_dir = Path(state_dir).absolute() if state_dir is not None else None
        self._start_timeout = start_timeout
        self._die_with_parent = die_with_parent
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.port = 0
        self.start_seconds = 0.0

    # -- properties ----------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        if self._state_dir is None:
            raise SwtpmError("swtpm has no state dir yet: start() it first")
        return self._state_dir

    @property
    def tcti(self) -> str:
        """TCTI config for tpm2-pytss and tpm2-tools (explicit IPv4: 'localhost' may be ::1)."""
        if not self.running:
            raise SwtpmError("swtpm is not running")
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self, attempts: int = 20) -> None:
        """Start swtpm and wait until both its channels answer; retry on port collisions."""
        if self.running:
            return
        binary = swtpm_binary()
        if self._state_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix="enroll-swtpm-"))
        self._state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        preferred = self.port
        last_log = ""
        for _ in range(attempts):
            port = preferred if preferred and _ports_free(preferred) else self._pick_ports()
            preferred = 0
            outcome, last_log = self._launch(binary, port)
            if outcome == "ready":
                self.port = port
                self.start_seconds = time.monotonic() - t0
                LIVE.add(self)
                return
            if outcome == "failed":
                raise SwtpmError(f"swtpm failed to start (state {self._state_dir}):\n{last_log}")
        raise SwtpmError(f"swtpm found no free port pair in {attempts} tries:\n{last_log}")

    @staticmethod
    def _pick_ports() -> int:
        for _ in range(200):
            port = random.randrange(PORT_RANGE[0], PORT_RANGE[1], 2)
            if _ports_free(port):
                return port
        raise SwtpmError("no free loopback port pair for swtpm")

    def _command(self, binary: str, port: int) -> list[str]:
        command = [
            binary, "socket", "--tpm2",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags", "not-need-init,startup-clear",
            "--tpmstate", f"dir={self._state_dir}",
        ]  # fmt: skip
        return die_with_parent(command, self._die_with_parent)

    def _launch(self, binary: str, port: int) -> tuple[str, str]:
        """Start one swtpm; returns ("ready" | "port-busy" | "failed", log text)."""
        log = tempfile.TemporaryFile(prefix="enroll-swtpm-log-")
        process = subprocess.Popen(
            self._command(binary, port), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )  # fmt: skip
        self._process, self._log = process, log
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                text = self._read_log()
                self._reap()
                busy = "Address already in use" in text or "Could not bind" in text
                return ("port-busy" if busy else "failed"), text
            if self._answers(port):
                return "ready", ""
            time.sleep(0.005)
        text = self._read_log()
        self._reap(force=True)
        return "failed", f"no answer within {self._start_timeout}s\n{text}"

    def _answers(self, port: int) -> bool:
        """Control channel answers CMD_GET_CAPABILITY and the TPM answers a command."""
        try:
            ctrl = _exchange(port + 1, struct.pack(">I", _CMD_GET_CAPABILITY), timeout=0.5)
            if len(ctrl) < 4 or struct.unpack(">I", ctrl[:4])[0] != 0:
                return False
            reply = _exchange(port, _TPM2_GET_TEST_RESULT, timeout=0.5)
            return len(reply) >= 10 and reply[:2] == b"\x80\x01"
        except OSError:
            return False

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self, timeout: float = 5.0) -> None:
        """Power off: TPM2_Shutdown(CLEAR) (best effort), SIGTERM, then SIGKILL the group.

        The orderly TPM2_Shutdown avoids the dictionary-attack penalty a TPM applies after
        an unorderly power loss (TPM 2.0 Part 1, 19.8.6), so many reboots stay harmless.
        It is skipped when a client still holds the (single) TPM connection.
        """
        if self._process is None:
            return
        if self._process.poll() is None:
            with contextlib.suppress(OSError):
                _exchange(self.port, _TPM2_SHUTDOWN_CLEAR, timeout=0.3)
        self._reap(timeout=timeout)

    def _reap(self, timeout: float = 5.0, force: bool = False) -> None:
        """Signal the process group (swtpm leads it and forks no children) and wait."""
        process, self._process = self._process, None
        stop_group(process, timeout, force=force)
        if self._log is not None:
            self._log.close()
            self._log = None
        LIVE.discard(self)

    def restart(self) -> None:
        """Reboot: stop and start on the same state; NV and persistent objects survive."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop swtpm and remove the state dir if this instance created it."""
        self.stop()
        if self._owns_state_dir and self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.running else "stopped"
        return f"<SwtpmInstance {state} state_dir={self._state_dir}>"
