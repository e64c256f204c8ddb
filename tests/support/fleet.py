"""A served instance with its broker and relay: the whole revocation loop, for tests.

Its fixtures ``instance`` and ``rig`` are module-scoped (each test module gets its own
instance, broker and relay) and registered for every test module by tests/conftest.py.

    RevocationRig: instance (SoftHSM CA) + `enroll-server broker-config` + a private
    Mosquitto running that configuration + `enroll-server relay` as a subprocess; devices
    enrolled by token with software keys (files, for mosquitto_sub / openssl).
"""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from device_sdk.est import decode_certs_only
from simulators.broker import NoticeLoop
from simulators.served import ServedInstance
from tests.support.est_helpers import csr_der, ec_key, est_body, key_pem, make_csr


@dataclass
class SoftDevice:
    device_id: str
    group: str
    cert_path: Path
    key_path: Path
    serial: int

    @property
    def topic(self) -> str:
        return f"fleet/{self.group}/devices/{self.device_id}/notices"


class RevocationRig(NoticeLoop):
    """The plugin's NoticeLoop (broker-config + Mosquitto + relay) plus test helpers that
    act as token-enrolled software devices (mosquitto_sub, openssl). ``relays`` names
    relay identities to create besides the default one (broker-config --relay)."""

    def __init__(self, instance: ServedInstance, workdir: Path, *relays: str) -> None:
        super().__init__(instance, workdir, *relays)

    # -- devices -----------------------------------------------------------------------
    def enroll(self, device_id: str, group: str = "default") -> SoftDevice:
        return enroll_soft_device(self.instance, self.workdir, device_id, group)

    def mqtt_args(self, device: SoftDevice) -> list[str]:
        return ["-h", "localhost", "-p", str(self.broker.port), "--cafile",
                str(self.instance.trust_anchor), "--cert", str(device.cert_path),
                "--key", str(device.key_path), "-i", device.device_id]

    def subscribe(self, device: SoftDevice, topic: str | None = None, count: int = 1,
                  wait: int = 15, session: bool = True) -> subprocess.Popen[str]:
        """mosquitto_sub as the device (persistent session unless session=False)."""
        args = ["mosquitto_sub", *self.mqtt_args(device), "-t", topic or device.topic,
                "-q", "1", "-C", str(count), "-W", str(wait)]
        if session:
            args.append("-c")
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def connect_once(self, device: SoftDevice) -> subprocess.CompletedProcess[str]:
        """Connect, subscribe to its own topic, leave: exit 0 (or 27, timeout) if the
        broker accepted the connection."""
        return subprocess.run(["mosquitto_sub", *self.mqtt_args(device), "-t", device.topic,
                               "-W", "1", "-C", "1"], capture_output=True, text=True,
                              timeout=20)


def enroll_soft_device(instance: ServedInstance, workdir: Path, device_id: str,
                       group: str = "default") -> SoftDevice:
    """A device enrolled by token with a software key (files in workdir)."""
    key = ec_key()
    token = instance.token(group)
    context = ssl.create_default_context(cafile=str(instance.trust_anchor))
    response = httpx.post(instance.url + "/.well-known/est/simpleenroll",
                          content=est_body(csr_der(make_csr(key, device_id))),
                          headers={"Content-Type": "application/pkcs10",
                                   "Authorization": f"Bearer {token}"},
                          verify=context, timeout=30)
    assert response.status_code == 200, response.text
    certificate = decode_certs_only(response.content)[0]
    cert_path = workdir / f"{device_id}.pem"
    key_path = workdir / f"{device_id}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key_pem(key))
    key_path.chmod(0o600)
    return SoftDevice(device_id, group, cert_path, key_path, certificate.serial_number)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="module")
def instance() -> Iterator[ServedInstance]:
    """A served instance of the module's own (its CRLs and broker state are the module's)."""
    served = ServedInstance()
    try:
        with served:
            yield served
    finally:
        served.cleanup()


@pytest.fixture(scope="module")
def rig(instance: ServedInstance, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[RevocationRig]:  # fmt: skip
    """broker-config + Mosquitto + relay around ``instance``."""
    fleet = RevocationRig(instance, tmp_path_factory.mktemp("fleet"))
    try:
        yield fleet.start()
    finally:
        fleet.close()
