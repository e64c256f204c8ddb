"""The README's broker commands, run as written (in a temporary directory instead of
/etc/mosquitto/enroll, on free ports): `enroll-server broker-config --dir D && mosquitto
-c D/mosquitto.conf`.

This suite runs as root: Mosquitto then switches to the `mosquitto` user before it writes
its pid file and reads its key, and re-reads its configuration, ACL and CRL as that user
on SIGHUP. The broker must start, write its pid file, accept devices, and refuse a
revoked one after the relay's SIGHUP; its key must stay unreadable to anyone else.
(Run as another user, the same commands make a broker running as that user.)
"""

from __future__ import annotations

import os
import pwd
import shlex
import signal
import stat
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.served import BIN, ServedInstance, free_port
from tests.support.fleet import SoftDevice, enroll_soft_device, wait_for
from tests.support.services import port_open

pytestmark = pytest.mark.integration  # served, swtpm, SoftHSM or a private broker



def proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective uid
    raise AssertionError("no Uid line")


def expected_account() -> pwd.struct_passwd:
    """Who the broker runs as: mosquitto when started as root, else whoever started it."""
    return pwd.getpwnam("mosquitto") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())


class ReadmeBroker:
    """The README's command line, in a shell with a strict umask."""

    def __init__(self, instance: ServedInstance, parent: Path) -> None:
        self.instance = instance
        self.dir = parent / "enroll"
        self.port, self.service_port = free_port(), free_port()
        command = (f"umask 077; {shlex.quote(str(BIN / 'enroll-server'))} broker-config "
                   f"--dir {shlex.quote(str(self.dir))} --port {self.port} --service-port "
                   f"{self.service_port} && exec mosquitto -c "
                   f"{shlex.quote(str(self.dir / 'mosquitto.conf'))}")
        self.log = parent / "mosquitto.out"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["sh", "-c", command], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **instance.env, "ENROLL_CONFIG": str(instance.config)},
                start_new_session=True)

    def wait_listening(self) -> bool:
        return wait_for(lambda: self.process.poll() is not None or (
            port_open(self.port) and port_open(self.service_port)), 60) and \
            self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(15)


@pytest.fixture(scope="module")
def readme_broker(instance: ServedInstance) -> Iterator[ReadmeBroker]:
    parent = Path(tempfile.mkdtemp(prefix="enroll-etc-"))
    parent.chmod(0o755)  # like /etc/mosquitto
    broker = ReadmeBroker(instance, parent)
    try:
        yield broker
    finally:
        broker.stop()
        subprocess.run(["rm", "-rf", str(parent)], check=False)


def connects(instance: ServedInstance, broker: ReadmeBroker, device: SoftDevice) -> bool:
    result = subprocess.run(
        ["mosquitto_sub", "-h", "localhost", "-p", str(broker.port), "--cafile",
         str(instance.trust_anchor), "--cert", str(device.cert_path), "--key",
         str(device.key_path), "-t", device.topic, "-W", "1", "-C", "1"],
        capture_output=True, text=True, timeout=20)
    return result.returncode in (0, 27)  # 27: -W timeout after a successful connect


def test_the_readme_commands_give_a_broker_that_drops_root_and_enforces_revocation(
        instance: ServedInstance, readme_broker: ReadmeBroker, tmp_path: Path) -> None:  # fmt: skip
    broker = readme_broker
    assert broker.wait_listening(), broker.log.read_text()
    account = expected_account()
    pid = broker.process.pid  # the shell exec'd mosquitto
    assert proc_uid(pid) == account.pw_uid
    assert int((broker.dir / "run/mosquitto.pid").read_text()) == pid

    key = (broker.dir / "broker.key").stat()
    assert key.st_mode & stat.S_IRWXO == 0  # never world-readable
    if os.geteuid() == 0:
        assert (key.st_uid, key.st_gid, stat.S_IMODE(key.st_mode)) == (
            0, account.pw_gid, 0o640)  # root's file, readable by the broker's group only
        assert (broker.dir / "data").stat().st_uid == account.pw_uid
    for public in ("mosquitto.conf", "acl", "ca-chain.pem", "crl.pem", "relays.pem"):
        assert stat.S_IMODE((broker.dir / public).stat().st_mode) == 0o644  # despite umask
    mqtt = tomllib.loads(instance.config.read_text())["mqtt"]
    assert stat.S_IMODE(Path(mqtt["client_key"]).stat().st_mode) == 0o600  # the relay's
    assert mqtt["port"] == broker.service_port

    # Devices connect; the relay (configured by broker-config) publishes and, after a
    # revocation, rewrites the CRL and SIGHUPs the broker, which re-reads it as mosquitto.
    device = enroll_soft_device(instance, tmp_path, "readme-device-1")
    bystander = enroll_soft_device(instance, tmp_path, "readme-device-2")
    assert connects(instance, broker, device) and connects(instance, broker, bystander)
    relay = subprocess.Popen([str(BIN / "enroll-server"), "--config", str(instance.config),
                              "relay"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             env={**os.environ, **instance.env}, start_new_session=True)
    try:
        instance.cli("revoke", "--device", device.device_id, "--reason", "keyCompromise")
        assert wait_for(lambda: not connects(instance, broker, device), 60)
        assert connects(instance, broker, bystander)
        assert broker.process.poll() is None
    finally:
        os.killpg(relay.pid, signal.SIGTERM)
        relay.wait(15)


def test_broker_config_refuses_a_directory_the_broker_cannot_reach(
        instance: ServedInstance, tmp_path: Path) -> None:  # fmt: skip
    """As root (as here), refused before anything is written; as another user, the
    broker will run as that user, who can reach it."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    target = private / "broker"
    result = instance.cli("broker-config", "--dir", str(target), "--port", str(free_port()),
                          "--service-port", str(free_port()), check=False)
    if os.geteuid() != 0:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and "'mosquitto'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not target.exists()  # nothing written
    same = instance.cli("broker-config", "--dir", str(tmp_path / "b"), "--port", "8999",
                        "--service-port", "8999", check=False)
    assert same.returncode == 1 and "different ports" in same.stderr
    missing = instance.cli("broker-config", "--dir", str(tmp_path / "c"), "--user",
                           "no-such-broker-user", check=False)
    assert missing.returncode == 1 and "no user 'no-such-broker-user'" in missing.stderr
