"""What the sensor does at first boot and in service, on top of the tpm-enroll SDK."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from device_sdk.agent import EXIT_REVOKED, AgentConfig, run_agent
from device_sdk.attest import AttestedEnrollment
from device_sdk.state import DeviceState
from device_sdk.tpm import TpmDevice


@dataclass(frozen=True)
class SensorConfig:
    server: str  # the enrollment server, https://host:port
    server_ca: Path  # its trust anchor (ca-chain.pem)
    group: str  # the TPM-attested enrollment group
    tcti: str  # the TPM: "device:/dev/tpmrm0" on hardware
    state_dir: Path  # certificate, chain, TSS2 key, status

    @property
    def lockdown_file(self) -> Path:
        return self.state_dir / "lockdown.json"


def first_boot(config: SensorConfig) -> str:
    """Enroll once (attested by the TPM) and keep the certificate; returns the device id.
    Running it again on an enrolled device does nothing."""
    state = DeviceState(config.state_dir)
    status = state.status()
    if status is not None and state.certificate() is not None:
        return status.device_id
    with TpmDevice(config.tcti) as tpm, AttestedEnrollment(
            config.server, config.server_ca, tpm, config.group) as client:
        certificate = client.enroll()
        state.save(certificate, client.cacerts(), tpm.tss2_private_key_pem(),
                   group=config.group)
        return client.device_id or ""


def serve(config: SensorConfig, broker: tuple[str, int]) -> int:
    """Run until stopped or revoked. On revocation: lockdown (the sensor's own policy),
    exit status 10 so that its supervisor does not restart it."""
    if config.lockdown_file.exists():
        return EXIT_REVOKED
    status = run_agent(AgentConfig(
        state_dir=config.state_dir, tcti=config.tcti, server=config.server,
        server_ca=config.server_ca, broker_host=broker[0], broker_port=broker[1],
        group=config.group, renew_jitter=5.0, max_backoff=5.0), as_json=True)
    if status == EXIT_REVOKED:
        revoked = DeviceState(config.state_dir).status()
        config.lockdown_file.write_text(json.dumps({
            "reason": revoked.reason if revoked else None,
            "revoked_by": revoked.revoked_by if revoked else None}))
        print(json.dumps({"event": "sensor_lockdown"}), flush=True)
    return status
