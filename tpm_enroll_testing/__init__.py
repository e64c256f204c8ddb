"""pytest fixtures for testing devices and firmware against a real tpm-enroll service.

Shipped with the tpm-enroll package as the pytest plugin ``tpm_enroll_testing`` (a
``pytest11`` entry point). Loading it only defines fixtures: nothing starts until a test
asks for one. Name it where autoloading is off (PYTEST_DISABLE_PLUGIN_AUTOLOAD=1, common
in CI) or to make the dependency explicit:

    pytest -p tpm_enroll_testing
    # or in conftest.py:
    pytest_plugins = ["tpm_enroll_testing"]

Fixtures (all real components: swtpm, SoftHSM, Mosquitto, TLS; each stops its processes
and removes its files at the end, also when a test fails):

- ``enroll_server`` (session): a private served instance, `enroll-server init` + `serve`
  (SQLite, the CA key in a SoftHSM token, gunicorn over TLS on a free loopback port).
  ``.url``, ``.trust_anchor`` (ca-chain.pem), ``.operator_token``, ``.cli(...)``,
  ``.token(group)`` (a one-time EST token).
- ``enroll_manufacturer`` (session): a simulated TPM manufacturer; ``.roots`` is the
  PEM an enrollment group trusts (root + EK issuing CA), ``.provision(tcti)``.
- ``enroll_tpm_group`` (session): the name of a TPM-attested group on ``enroll_server``
  that trusts ``enroll_manufacturer``.
- ``enroll_broker`` (session): Mosquitto configured by `enroll-server broker-config`
  (mTLS, per-device ACL, the CA's CRL) and `enroll-server relay`, so revocation notices
  flow; ``.address`` (HOST:PORT for `enroll-device agent --broker`), ``.port``.
- ``enroll_device`` (each test): a fresh swtpm with the manufacturer's EK certificates in
  NV behind tpm2-abrmd; ``.tcti`` and ``.env`` for the device's processes,
  ``.environ()`` for this one, ``.state_dir`` for its enrollment.
- ``enroll_operator`` (session): the operator API (``.revoke(device_id)``,
  ``.device(device_id)``), as an operator's tooling calls it.

Needs the Debian packages swtpm swtpm-tools tpm2-abrmd libtss2-tcti-tabrmd0 dbus
softhsm2 mosquitto tpm2-openssl (docs/ci.md). A missing one makes the fixture fail with
the package to install; it never skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from simulators.broker import NoticeLoop
    from simulators.device import SimulatedDevice
    from simulators.manufacturer import Manufacturer, ProvisionedTpm
    from simulators.operator_api import OperatorApi
    from simulators.served import ServedInstance

TPM_GROUP = "tpm-devices"


@dataclass(frozen=True)
class SimulatedManufacturer:
    """A saved simulated TPM manufacturer (simulators.manufacturer) and its trust PEM."""

    directory: Path
    maker: Manufacturer

    @property
    def roots(self) -> Path:
        """What `enroll-server group create --ek-roots` takes for this manufacturer."""
        return self.directory / "root.pem"

    def provision(self, tcti: str) -> ProvisionedTpm:
        return self.maker.provision(tcti)


@pytest.fixture(scope="session")
def enroll_server() -> Iterator[ServedInstance]:
    """A private served instance (SQLite, SoftHSM CA key, TLS) for the session."""
    from simulators.served import ServedInstance

    instance = ServedInstance()
    try:
        with instance:
            yield instance
    finally:
        instance.cleanup()


@pytest.fixture(scope="session")
def enroll_manufacturer(tmp_path_factory: pytest.TempPathFactory) -> SimulatedManufacturer:
    """A simulated TPM manufacturer (root + EK issuing CA) for the session."""
    from simulators.manufacturer import Manufacturer

    directory = tmp_path_factory.mktemp("tpm-manufacturer")
    maker = Manufacturer.create(directory)
    ek_ca, root = maker.ca_certificate_pems
    (directory / "root.pem").write_text(root + ek_ca)
    return SimulatedManufacturer(directory, maker)


@pytest.fixture(scope="session")
def enroll_tpm_group(enroll_server: ServedInstance,
                     enroll_manufacturer: SimulatedManufacturer) -> str:
    """A TPM-attested enrollment group trusting ``enroll_manufacturer``'s EK roots."""
    enroll_server.cli("group", "create", TPM_GROUP, "--auth", "tpm", "--ek-roots",
                      str(enroll_manufacturer.roots))
    return TPM_GROUP


@pytest.fixture(scope="session")
def enroll_broker(enroll_server: ServedInstance,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[NoticeLoop]:
    """Mosquitto configured by `broker-config`, and the relay, around ``enroll_server``."""
    from simulators.broker import NoticeLoop

    loop = NoticeLoop(enroll_server, tmp_path_factory.mktemp("enroll-broker"))
    with loop:
        yield loop


@pytest.fixture
def enroll_device(enroll_manufacturer: SimulatedManufacturer,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatedDevice]:
    """A fresh, factory-provisioned swtpm behind tpm2-abrmd (one per test)."""
    from simulators.device import SimulatedDevice

    with SimulatedDevice(tmp_path_factory.mktemp("device"), enroll_manufacturer.maker
                         ) as device:  # fmt: skip
        yield device


@pytest.fixture(scope="session")
def enroll_operator(enroll_server: ServedInstance) -> Iterator[OperatorApi]:
    """The operator API of ``enroll_server`` with its operator credential."""
    from simulators.operator_api import OperatorApi

    with OperatorApi(enroll_server.url, enroll_server.trust_anchor,
                     enroll_server.operator_token) as api:
        yield api
