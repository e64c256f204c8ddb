"""The MQTT side of a served instance, as processes: a private Mosquitto, and the broker
that `enroll-server broker-config` configures together with `enroll-server relay`.

    with ServedInstance() as instance, NoticeLoop(instance, workdir) as loop:
        ...  # loop.port: the broker (mTLS, per-device ACL, CRL); the relay publishes

``PrivateMosquitto`` is a broker on a free loopback port in a temp dir (the default
config: anonymous, plain; or any config text with ``{port}`` and ``{dir}``). Used by the
fleet simulator, the benchmarks, the pytest plugin (tpm_enroll_testing) and the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from .processes import start_group, stop_group
from .served import BIN, ServedInstance, free_port

MOSQUITTO_BIN = "/usr/sbin/mosquitto"
DEFAULT_MOSQUITTO_CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {dir}/
log_dest file {dir}/mosquitto.log
log_type all
"""


class ServiceError(RuntimeError):
    """A private service could not be found, started or stopped."""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


class PrivateMosquitto:
    """A private Mosquitto broker on 127.0.0.1:``port`` (a context manager).

    ``config_text`` replaces the whole default config; ``{port}`` and ``{dir}`` (the temp
    dir, also where ``log_text()`` expects mosquitto.log) are substituted in it and in
    ``config_text_extra``. ``port`` fixes the port (default: a free one). As root,
    ``user root`` is prepended unless the config sets ``user``: otherwise mosquitto drops
    to the ``mosquitto`` user, which cannot read root-owned files.
    """

    def __init__(self, config_text_extra: str = "", *, config_text: str | None = None,
                 port: int | None = None, binary: str = MOSQUITTO_BIN,
                 start_timeout: float = 10.0) -> None:
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise ServiceError(f"mosquitto not found at {binary}; install it with: "
                               "apt-get install mosquitto")
        self.binary, self.start_timeout = binary, start_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="enroll-mqtt-"))
        self.port = port or free_port()
        self.conf_path, self.log_path = self.dir / "mosquitto.conf", self.dir / "mosquitto.log"
        text = (DEFAULT_MOSQUITTO_CONFIG if config_text is None else config_text) + "\n"
        text += config_text_extra
        text = text.replace("{port}", str(self.port)).replace("{dir}", str(self.dir))
        if os.geteuid() == 0 and not re.search(r"(?m)^\s*user\s", text):
            text = "user root\n" + text
        self.conf_path.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    def start(self) -> None:
        """(Re)start the broker on the same port with the same config and persistence;
        returns when it accepts TCP connections."""
        if self.proc is not None and self.proc.poll() is None:
            raise ServiceError("mosquitto is already running")
        t0 = time.monotonic()
        with open(self.dir / "stderr.log", "ab") as err:
            self.proc = start_group([self.binary, "-c", str(self.conf_path)], log=err,
                                    cwd=self.dir)
        deadline = t0 + self.start_timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = "exited" if self.proc.poll() is not None else "not listening"
                self.stop()
                raise ServiceError(
                    f"mosquitto {state} on port {self.port}:\n--- log tail ---\n"
                    f"{tail(self.log_path)}\n--- stderr ---\n{tail(self.dir / 'stderr.log')}")
            time.sleep(0.02)
        self.start_seconds = time.monotonic() - t0

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM saves persistence, then SIGKILL)."""
        stop_group(self.proc, timeout)
        self.proc = None

    def reload(self) -> None:
        """Ask the broker to re-read its config (SIGHUP)."""
        if self.proc is None or self.proc.poll() is not None:
            raise ServiceError("mosquitto is not running")
        self.proc.send_signal(signal.SIGHUP)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

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


def _others_can_enter(directory: Path) -> bool:
    """Whether an unprivileged account (the broker's, after it drops root) can reach
    ``directory``: every directory on the way is searchable by others. When not (a
    private 0700 work dir above it), the broker keeps running as root instead."""
    return all(os.stat(path).st_mode & 0o001 for path in [directory, *directory.parents])


class NoticeLoop:
    """What carries revocation notices from a served instance to its devices: the broker
    configured by `enroll-server broker-config` (mTLS, per-device ACL, the CA's CRL,
    persistence) and `enroll-server relay` (outbox -> broker), as restartable processes.

    ``gateway`` names a client certificate CN allowed to read every group's revocation
    topic (broker-config --gateway). The relay's log is ``relay_log``.
    """

    def __init__(self, instance: ServedInstance, workdir: Path, *relays: str,
                 gateway: str | None = None) -> None:
        self.instance, self.workdir = instance, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.relay_log = workdir / "relay.log"
        # broker-config's files are run in place, as an operator would: started as root,
        # Mosquitto switches to the `mosquitto` user and re-reads its config, ACL and CRL
        # as that user on SIGHUP, so the broker directory must be one it can traverse
        # (a pytest or fleet work dir is 0700).
        self._broker_parent = Path(tempfile.mkdtemp(prefix="enroll-broker-"))
        self._broker_parent.chmod(0o755)  # like /etc/mosquitto: the broker's user enters
        self.broker_dir = self._broker_parent / "broker"
        port, self.service_port = free_port(), free_port()
        while self.service_port == port:
            self.service_port = free_port()
        args = ["broker-config", "--dir", str(self.broker_dir), "--port", str(port),
                "--service-port", str(self.service_port),
                *(arg for name in relays for arg in ("--relay", name)),
                *(["--gateway", gateway] if gateway else []),
                *([] if _others_can_enter(self._broker_parent) else ["--user", "root"])]
        self.broker_config = instance.cli_json(*args)
        self.broker = PrivateMosquitto(
            config_text=(self.broker_dir / "mosquitto.conf").read_text(), port=port)
        # Run the file in place (a copy in the private dir would be unreadable to the
        # broker's user on SIGHUP); the private dir keeps stderr.
        self.broker.conf_path = self.broker_dir / "mosquitto.conf"
        self.relay: subprocess.Popen[bytes] | None = None

    @property
    def relay_identity(self) -> tuple[Path, Path]:
        """The default relay's certificate and key (pinned on the service listener)."""
        relay = self.broker_config["relays"][0]
        return Path(relay["certificate"]), Path(relay["key"])

    def relay_args(self) -> list[str]:
        """mosquitto_sub/pub connection options as the default relay (service listener)."""
        cert, key = self.relay_identity
        return ["-h", "localhost", "-p", str(self.service_port), "--cafile",
                str(self.instance.trust_anchor), "--cert", str(cert), "--key", str(key)]

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def address(self) -> str:
        """HOST:PORT, as `enroll-device agent --broker` and `enroll-sim fleet --broker`
        take it."""
        return f"localhost:{self.port}"

    def start(self) -> Self:
        self.broker.start()
        self.start_relay()
        return self

    def start_relay(self) -> None:
        self.relay = self.spawn_relay(self.relay_log)

    def spawn_relay(self, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
        """`enroll-server relay ARGS` as a subprocess of its own session."""
        with open(log_path, "ab") as log:
            return start_group(
                [str(BIN / "enroll-server"), "--config", str(self.instance.config), "relay",
                 *args], log=log, env={**os.environ, **self.instance.env})

    def stop_relay(self, *, kill: bool = False) -> None:
        """SIGTERM (a clean stop), or SIGKILL with ``kill`` (its leases are left behind)."""
        stop_group(self.relay, 15, force=kill)
        self.relay = None

    def close(self) -> None:
        try:
            self.stop_relay()
        finally:
            self.broker.close()
            shutil.rmtree(self._broker_parent, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
