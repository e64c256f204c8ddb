"""One simulated device's life, run in a worker process of the fleet simulator."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from simulators.fleet_rig import BAD_FIRMWARE, GOOD_FIRMWARE, GROUP, measure_firmware

EXPECTED = {"good": None, "flaky": None, "rogue": "ek.untrusted",
            "tampered": "quote.pcr_mismatch"}


@dataclass
class DeviceResult:
    index: int
    role: str = "good"
    device_id: str = ""
    enrolled: bool = False
    renewed: bool = False
    error: str | None = None
    provision_ms: float = 0.0
    enroll_ms: float = 0.0
    renew_ms: float = 0.0
    swtpm_peak_kib: int = 0
    network_drops: int = 0
    serials: list[str] = field(default_factory=list)


def _peak_kib(pid: int | None) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, TypeError):
        pass
    return 0


def revoked_worker(index: int, url: str, trust_anchor: str, workdir: str) -> str:
    """A revoked device boots again and tries a fresh attested enrollment: the code the
    server answered (SECURITY-CHECKLIST 26: it must be refused, device.revoked)."""
    from device_sdk.attest import AttestedEnrollment
    from device_sdk.est import EstError
    from device_sdk.tpm import TpmDevice
    from simulators.swtpm import SwtpmInstance

    try:
        with SwtpmInstance(Path(workdir) / f"tpm-{index:05d}") as swtpm, \
                TpmDevice(swtpm.tcti) as tpm, AttestedEnrollment(
                    url, Path(trust_anchor), tpm, GROUP, timeout=60, attempts=12,
                    backoff=0.5, max_backoff=5.0) as client:
            client.enroll()
    except EstError as error:
        return error.code
    except Exception as error:  # noqa: BLE001 - the report names it
        return f"{type(error).__name__}: {str(error)[:80]}"
    return "enrolled"


def device_worker(index: int, role: str, url: str, trust_anchor: str,
                   manufacturer_dir: str, workdir: str) -> DeviceResult:
    """One device's life, in a worker process (its own ESAPI contexts, no shared GIL)."""
    from urllib.parse import urlsplit

    from device_sdk.attest import AttestedEnrollment
    from device_sdk.est import EstError
    from device_sdk.tpm import TpmDevice
    from simulators.manufacturer import Manufacturer
    from simulators.netfault import DroppingProxy
    from simulators.swtpm import SwtpmInstance

    result = DeviceResult(index, role)
    state = Path(workdir) / f"tpm-{index:05d}"
    proxy = None
    try:
        if role == "flaky":
            target = urlsplit(url)
            proxy = DroppingProxy(target.hostname or "localhost", target.port or 443)
            url = f"https://localhost:{proxy.port}"
        with SwtpmInstance(state) as swtpm:
            started = time.perf_counter()
            Manufacturer.load(manufacturer_dir).provision(swtpm.tcti)
            result.provision_ms = (time.perf_counter() - started) * 1000
            with TpmDevice(swtpm.tcti) as tpm, AttestedEnrollment(
                    url, Path(trust_anchor), tpm, GROUP, timeout=60, attempts=12,
                    backoff=0.5, max_backoff=5.0) as client:
                measure_firmware(tpm, BAD_FIRMWARE if role == "tampered" else GOOD_FIRMWARE)
                started = time.perf_counter()
                first = client.enroll()
                result.enroll_ms = (time.perf_counter() - started) * 1000
                result.enrolled = True
                result.device_id = client.device_id or ""
                started = time.perf_counter()
                second = client.enroll()  # renewal: fresh evidence, same pinned AK
                result.renew_ms = (time.perf_counter() - started) * 1000
                result.renewed = True
                result.serials = [str(first.serial_number), str(second.serial_number)]
            result.swtpm_peak_kib = _peak_kib(swtpm.pid)
    except EstError as error:
        result.error = error.code
    except Exception as error:  # noqa: BLE001 - the report names it
        result.error = f"{type(error).__name__}: {str(error)[:120]}"
    finally:
        if proxy is not None:
            result.network_drops = proxy.dropped
            proxy.close()
    return result
