"""A TPM resource manager for a swtpm: tpm2-abrmd on a private D-Bus session bus.

swtpm serves one connection at a time and holds 3 transient objects; a device runs
several TPM users at once (the agent's ESAPI connection and the tpm2-openssl provider
inside its TLS stack), which a kernel resource manager (/dev/tpmrm0) allows on hardware.
``TabrmdInstance`` gives a swtpm the same: a private ``dbus-daemon`` (own config, socket
in a temp dir, nothing system wide) and ``tpm2-abrmd --session`` attached to the swtpm:

    with SwtpmInstance() as tpm, TabrmdInstance(tpm.tcti) as rm:
        env = {**os.environ, **rm.env}      # DBUS_SESSION_BUS_ADDRESS of the private bus
        subprocess.run([..., "--tcti", rm.tcti], env=env)

While tpm2-abrmd runs it owns the swtpm's single connection: use ``rm.tcti`` (with
``rm.env``) for everything, not the swtpm TCTI. Process hygiene (simulators.processes):
both daemons run in their own process groups and die with the thread that started them;
``close()`` stops tpm2-abrmd then the bus (SIGTERM, then SIGKILL) and removes the temp
dir; an atexit hook stops forgotten instances.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from .processes import LIVE, die_with_parent, stop_group

INSTALL_HINT = "apt-get install tpm2-abrmd libtss2-tcti-tabrmd0 dbus"
DEFAULT_BUS_NAME = "com.intel.tss2.Tabrmd"
BUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

class TabrmdError(RuntimeError):
    """A binary is missing, or the bus / tpm2-abrmd did not come up; holds the logs."""


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}",
                                                                   os.X_OK) else None)
    if path is None:
        raise TabrmdError(f"{name} not found: {INSTALL_HINT}")
    return path


class TabrmdInstance:
    """tpm2-abrmd for the TPM at ``tpm_tcti`` (e.g. "swtpm:host=127.0.0.1,port=2321")."""

    def __init__(self, tpm_tcti: str, *, bus_name: str = DEFAULT_BUS_NAME,
                 start_timeout: float = 15.0, die_with_parent: bool = True) -> None:
        self.tpm_tcti = tpm_tcti
        self.bus_name = bus_name
        self.start_timeout = start_timeout
        self._pdeathsig = die_with_parent
        self.dir: Path | None = None
        self.bus_address = ""
        self._bus: subprocess.Popen[bytes] | None = None
        self._abrmd: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @property
    def tcti(self) -> str:
        """The TCTI for tpm2-pytss, tpm2-tools and TPM2OPENSSL_TCTI (needs ``env``)."""
        return f"tabrmd:bus_name={self.bus_name},bus_type=session"

    @property
    def env(self) -> dict[str, str]:
        """What a TPM user's environment needs to reach this resource manager."""
        return {"DBUS_SESSION_BUS_ADDRESS": self.bus_address}

    @property
    def running(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self._bus, self._abrmd))

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _popen(self, command: list[str], log: str, *, pipe: bool = False,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a daemon in its own process group, stderr (and stdout) to ``log``."""
        assert self.dir is not None
        command = die_with_parent(command, self._pdeathsig)
        with open(self.dir / log, "ab") as out:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE if pipe else out, stderr=out,
                                    env=env, start_new_session=True, close_fds=True)

    def start(self) -> None:
        """Start the bus, then tpm2-abrmd; return when its name is owned on the bus."""
        if self.running:
            return
        dbus_daemon, abrmd, dbus_send = (_binary("dbus-daemon"), _binary("tpm2-abrmd"),
                                         _binary("dbus-send"))
        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="enroll-tabrmd-"))
        config = self.dir / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.dir / "bus"))
        self._bus = self._popen([dbus_daemon, f"--config-file={config}", "--nofork",
                                 "--nopidfile", "--nosyslog", "--print-address=1"],
                                "dbus.log", pipe=True)
        LIVE.add(self)
        assert self._bus.stdout is not None
        self.bus_address = self._bus.stdout.readline().decode().strip()
        self._bus.stdout.close()
        if not self.bus_address:
            raise TabrmdError(f"dbus-daemon did not start:\n{self.log_text()}")
        command = [abrmd, "--session", "--flush-all", f"--dbus-name={self.bus_name}",
                   f"--tcti={self.tpm_tcti}"]
        if os.geteuid() == 0:
            command.append("--allow-root")  # tpm2-abrmd refuses root without it
        env = {**os.environ, **self.env}
        self._abrmd = self._popen(command, "tpm2-abrmd.log", env=env)
        deadline = time.monotonic() + self.start_timeout
        while not self._name_owned(dbus_send, env):
            if self._abrmd.poll() is not None or time.monotonic() > deadline:
                state = "exited" if self._abrmd.poll() is not None else "did not answer"
                raise TabrmdError(f"tpm2-abrmd {state} (TPM {self.tpm_tcti}):\n"
                                  f"{self.log_text()}")
            time.sleep(0.02)
        self.start_seconds = time.monotonic() - t0

    def _name_owned(self, dbus_send: str, env: dict[str, str]) -> bool:
        result = subprocess.run(
            [dbus_send, "--session", "--print-reply", "--dest=org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
             f"string:{self.bus_name}"], env=env, capture_output=True, text=True, timeout=10)
        return result.returncode == 0 and "boolean true" in result.stdout

    def log_text(self) -> str:
        if self.dir is None:
            return ""
        texts = []
        for name in ("dbus.log", "tpm2-abrmd.log"):
            with contextlib.suppress(OSError):
                texts.append(f"--- {name} ---\n" + (self.dir / name).read_text(
                    errors="replace")[-3000:])
        return "\n".join(texts)

    def close(self, timeout: float = 5.0) -> None:
        """Stop tpm2-abrmd, then the bus; remove the temp dir. Safe to call twice."""
        abrmd, bus, self._abrmd, self._bus = self._abrmd, self._bus, None, None
        try:
            stop_group(abrmd, timeout)
        finally:
            stop_group(bus, timeout)
            LIVE.discard(self)
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __repr__(self) -> str:
        return f"<TabrmdInstance {'running' if self.running else 'stopped'} {self.tpm_tcti}>"
