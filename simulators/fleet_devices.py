"""One simulated device's life, run in a worker process of the fleet simulator.

Phases (each a JUnit test case, simulators.fleet_junit): ``provision`` (swtpm started,
EK certificates of the manufacturer in NV, firmware measured), ``first_boot`` (attested
enrollment through the device SDK), ``renewal`` (a fresh attested enrollment under the
pinned AK). The device's state dir (device_sdk.state: certificate, chain, TSS2 key) is
written like `enroll-device enroll` writes it, so `enroll-device agent` can run from it
later (the revocation phase, simulators.fleet_notices).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

EXPECTED = {"good": None, "flaky": None, "rogue": "ek.untrusted",
            "tampered": "quote.pcr_mismatch"}
FIRMWARE_PCR = 13  # firmware-hooks/enroll-device.conf: the PCR the image is measured into
# Devices in the field keep retrying; ~2.5 min of attempts rides out server restarts on a
# loaded machine (chaos) instead of making the outcome depend on how long one takes.
SDK_RETRIES = {"timeout": 60, "attempts": 30, "backoff": 0.5, "max_backoff": 5.0}


@dataclass(frozen=True)
class DeviceJob:
    """What a worker process needs to run one device (picklable)."""

    index: int
    role: str
    url: str
    trust_anchor: str
    group: str
    manufacturer_dir: str
    workdir: str  # the device's swtpm state goes to <workdir>/tpm-<index>
    firmware: bytes | None = None  # measured into FIRMWARE_PCR before the first boot

    @property
    def name(self) -> str:
        return f"device-{self.index:04d}"

    @property
    def tpm_dir(self) -> Path:
        return Path(self.workdir) / f"tpm-{self.index:05d}"

    @property
    def state_dir(self) -> Path:
        return Path(self.workdir) / f"state-{self.index:05d}"


@dataclass
class DeviceResult:
    index: int
    role: str = "good"
    device_id: str = ""
    enrolled: bool = False
    renewed: bool = False
    error: str | None = None  # the refusal code, or "<Exception>: message"
    phase: str | None = None  # where it stopped: provision, first_boot, renewal
    provision_ms: float = 0.0
    enroll_ms: float = 0.0
    renew_ms: float = 0.0
    swtpm_peak_kib: int = 0
    network_drops: int = 0
    serials: list[str] = field(default_factory=list)
    certificate_pem: str = ""  # the current (renewed) certificate

    @property
    def name(self) -> str:
        return f"device-{self.index:04d}"


def measure_firmware(tcti_tpm: object, image: bytes) -> None:
    """What firmware-hooks/measure-firmware.sh does: extend H(image) into the PCR."""
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                     digest=TPMU_HA(sha256=hashlib.sha256(image).digest()))
    tcti_tpm.esapi.pcr_extend(getattr(ESYS_TR, f"PCR{FIRMWARE_PCR}"),  # type: ignore[attr-defined]
                              TPML_DIGEST_VALUES([digest]))


def tampered(image: bytes) -> bytes:
    """The image a tampered device boots: one byte more than the good one."""
    return image + b" (tampered)"


def _peak_kib(pid: int | None) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, TypeError):
        pass
    return 0


def _error_text(error: Exception) -> str:
    from device_sdk.est import EstError

    if isinstance(error, EstError):
        return error.code
    return f"{type(error).__name__}: {str(error)[:120]}"


def revoked_worker(job: DeviceJob) -> str:
    """A revoked device boots again and tries a fresh attested enrollment: the code the
    server answered (SECURITY-CHECKLIST 26: it must be refused, device.revoked)."""
    from device_sdk.attest import AttestedEnrollment
    from device_sdk.tpm import TpmDevice
    from simulators.swtpm import SwtpmInstance

    try:
        with SwtpmInstance(job.tpm_dir) as swtpm, TpmDevice(swtpm.tcti) as tpm, \
                AttestedEnrollment(job.url, Path(job.trust_anchor), tpm, job.group,
                                   **SDK_RETRIES) as client:
            client.enroll()
    except Exception as error:  # noqa: BLE001 - the report names it
        return _error_text(error)
    return "enrolled"


def device_worker(job: DeviceJob) -> DeviceResult:
    """One device's life, in a worker process (its own ESAPI contexts, no shared GIL)."""
    from urllib.parse import urlsplit

    from cryptography.hazmat.primitives.serialization import Encoding

    from device_sdk.attest import AttestedEnrollment
    from device_sdk.state import DeviceState
    from device_sdk.tpm import TpmDevice
    from simulators.manufacturer import Manufacturer
    from simulators.netfault import DroppingProxy
    from simulators.swtpm import SwtpmInstance

    result = DeviceResult(job.index, job.role)
    url, proxy, clients = job.url, None, []
    result.phase = "provision"
    try:
        if job.role == "flaky":
            target = urlsplit(url)
            proxy = DroppingProxy(target.hostname or "localhost", target.port or 443)
            url = f"https://localhost:{proxy.port}"
        with SwtpmInstance(job.tpm_dir) as swtpm:
            started = time.perf_counter()
            Manufacturer.load(job.manufacturer_dir).provision(swtpm.tcti)
            result.provision_ms = (time.perf_counter() - started) * 1000
            with TpmDevice(swtpm.tcti) as tpm, AttestedEnrollment(
                    url, Path(job.trust_anchor), tpm, job.group, **SDK_RETRIES) as client:
                clients.append(client)
                if job.firmware is not None:
                    measure_firmware(tpm, tampered(job.firmware) if job.role == "tampered"
                                     else job.firmware)
                result.phase = "first_boot"
                started = time.perf_counter()
                first = client.enroll()
                result.enroll_ms = (time.perf_counter() - started) * 1000
                result.enrolled = True
                result.device_id = client.device_id or ""
                result.phase = "renewal"
                started = time.perf_counter()
                second = client.enroll()  # renewal: fresh evidence, same pinned AK
                result.renew_ms = (time.perf_counter() - started) * 1000
                result.renewed = True
                result.serials = [str(first.serial_number), str(second.serial_number)]
                result.certificate_pem = second.public_bytes(Encoding.PEM).decode()
                DeviceState(job.state_dir).save(second, client.cacerts(),
                                                tpm.tss2_private_key_pem(), group=job.group)
                result.phase = None
            result.swtpm_peak_kib = _peak_kib(swtpm.pid)
    except Exception as error:  # noqa: BLE001 - the report names it
        result.error = _error_text(error)
        result.device_id = result.device_id or (clients and clients[0].device_id) or ""
    finally:
        if proxy is not None:
            result.network_drops = proxy.dropped
            proxy.close()
    return result
